"""Backend choice for the custom ops.

Every op (``selective_scan``, ``dwconv2d``, ``state_fusion``, ``fused_observation``) has up to four implementations:

1. ``cuda``: the compiled extension from ``kernels/`` (``SPATIAL_MAMBA_BUILD_CUDA=1``), for CUDA tensors;
2. ``triton``: Triton kernels, for CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1`` when forced);
3. ``cpu``: C++ kernels in ``backends/cpu/``, compiled with g++ on first use, for float32 CPU tensors
   (``state_fusion``, ``fused_observation``, ``selective_scan`` with d_state 1);
4. ``reference``: pure PyTorch, every device and dtype.

A backend can decline by *what the inputs need*, not only by being absent: each registration may pass
``supports(*tensors) -> reasons``, the list of reasons it cannot take these inputs (empty: it can; for example
"d_state N = 2 > 1" or "float64 inputs"). On CUDA tensors the dispatcher walks cuda -> triton -> reference and takes
the first backend that is available and supports the inputs; reaching the reference there is a warning that lists
every reason, and so is passing over a built backend that cannot take the inputs (the ``cuda`` extension on a GPU it
was not built for, or a plane beyond its grid), once per op and backend. On CPU tensors it walks cpu -> reference:
the ``cpu`` backend declines, silently (logged at info), what it cannot take (non-float32 tensors, meta tensors, and
the tracers that cannot keep its kernels as custom ops: TorchScript tracing, ONNX export, FX proxies, and torch.compile
and torch.export on torch < 2.4), and the reference runs those. A backend in the walk that is *unavailable* (for
``cpu``: no compiler, or the compile failed) is a RuntimeWarning naming the reason, once per process, before the
reference runs in its place. A backend's input checks come before its availability check only for ``cpu``: inputs it
declines never start its compile.

Forcing a backend, for tests and benchmarks: ``with backend.force("triton"): ...`` (optionally for one op), or the
environment variable ``SPATIAL_MAMBA_BACKEND=cuda|triton|cpu|reference`` for a whole process; the context manager
wins. ``SPATIAL_MAMBA_BACKEND=reference`` runs everything on the pure-PyTorch reference. A forced backend that cannot
run raises an error that says why. The backend each op runs on is logged once per process.

Layouts: the ops take (B, C, ...) tensors either contiguous or *token-major* (a view of (B, ..., C) memory, the layout
of the blocks' tokens; ``token_major``). The entry points keep a token-major input in that layout (``as_layout``) and
make anything else contiguous; the ``cpu`` kernels run both layouts, the others make their inputs contiguous.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch

from .. import compat

__all__ = [
    "BACKENDS",
    "Choice",
    "choose",
    "describe",
    "explain",
    "force",
    "forced_backend",
    "implementation",
    "is_available",
    "register",
    "registered",
    "select",
    "as_layout",
    "token_major",
]

BACKENDS = ("cuda", "triton", "cpu", "reference")
# The walk over backends for CUDA tensors and for CPU tensors.
CUDA_ORDER = ("cuda", "triton", "reference")
CPU_ORDER = ("cpu", "reference")
ENV_VAR = "SPATIAL_MAMBA_BACKEND"

logger = logging.getLogger("spatial_mamba")

Supports = Callable[..., Sequence[str]]


def token_major(t: torch.Tensor) -> bool:
    """Whether ``t`` (B, C, ...) holds its channels innermost, as a view of (B, ..., C) memory. With one channel or a
    plane of one pixel both layouts are the same memory; such a tensor counts as contiguous."""
    return t.dim() > 2 and not t.is_contiguous() and t.movedim(1, -1).is_contiguous()


def as_layout(t: torch.Tensor, tokens: bool) -> torch.Tensor:
    """``t`` (B, C, ...) token-major (``tokens``) or contiguous; ``t`` itself when it already is."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1) if tokens else t.contiguous()


def _always() -> Tuple[bool, str]:
    return True, "always available"


def _no_limits(*tensors) -> Sequence[str]:
    return ()


@dataclass
class _Impl:
    fn: Callable
    # Returns (available, reason); ``reason`` explains a missing backend (e.g. "extension not built").
    available: Callable[[], Tuple[bool, str]] = _always
    # Returns the reasons this backend cannot take the given inputs (empty when it can).
    supports: Supports = _no_limits
    # Like ``available``, but without building anything (``describe``, ``explain(build=False)``); None: ``available``.
    status: Callable[[], Tuple[bool, str]] | None = None


@dataclass
class Choice:
    """What the dispatcher decided for one call: the backend, its function, why, and why not the others."""

    op: str
    backend: str
    fn: Callable
    why: str
    # Backends tried before the chosen one, each with the reasons it was passed over.
    passed_over: Dict[str, List[str]] = field(default_factory=dict)
    forced_by: str | None = None
    # The passed-over backends that cannot run here at all (not built, no compiler), with the reason.
    unavailable: Dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        skipped = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in self.passed_over.items())
        return f"{self.backend} ({self.why}" + (f"; not {skipped}" if skipped else "") + ")"


_REGISTRY: Dict[str, Dict[str, _Impl]] = {}
_ANNOUNCED: set = set()
_WARNED_UNAVAILABLE: set = set()
# (backend, op or None for every op) set by ``force``; innermost wins.
_FORCED: contextvars.ContextVar[Tuple[Tuple[str, str | None], ...]] = contextvars.ContextVar(
    "spatial_mamba_forced_backend", default=()
)


def register(
    op: str,
    backend: str,
    fn: Callable,
    available: Callable[[], Tuple[bool, str]] | None = None,
    *,
    supports: Supports | None = None,
    status: Callable[[], Tuple[bool, str]] | None = None,
):
    """Registers ``fn`` as ``backend``'s implementation of ``op``.

    available: () -> (bool, reason), whether the backend can run at all here (Triton installed, extension built).
    supports: (*tensors) -> reasons, why it cannot take these inputs (empty when it can). It receives the tensors the
    op passes to ``select``/``choose`` (None for absent optional ones).
    status: () -> (bool, reason) like ``available`` but without building anything, for a backend that builds at its
    first use (the ``cpu`` kernels): what ``describe`` reports.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, available or _always, supports or _no_limits, status)


def registered(op: str) -> Tuple[str, ...]:
    """The backends with an implementation of ``op``, in dispatch order."""
    return tuple(name for name in BACKENDS if name in _REGISTRY.get(op, {}))


def implementation(op: str, backend: str) -> Callable:
    """The function registered as ``backend``'s implementation of ``op`` (whether or not it can run here)."""
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        raise KeyError(f"no {backend!r} implementation of {op!r}; registered: {registered(op)}")
    return impl.fn


def is_available(op: str, backend: str) -> Tuple[bool, str]:
    """(available, reason) of ``backend`` for ``op`` on this machine, before looking at any input."""
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return False, f"no {backend} implementation of {op} is registered"
    return impl.available()


def _check_name(name: str, source: str) -> str:
    value = name.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return value


@contextlib.contextmanager
def force(backend: str, op: str | None = None) -> Iterator[None]:
    """Runs ``op`` (every op if None) on ``backend`` inside the block; it raises if that backend cannot run.

    Overrides ``SPATIAL_MAMBA_BACKEND``. Nested blocks stack, the innermost wins; the setting is per thread and per
    asyncio task (a context variable).
    """
    backend = _check_name(backend, "force(backend)")
    token = _FORCED.set(_FORCED.get() + ((backend, op),))
    try:
        yield
    finally:
        _FORCED.reset(token)


def forced_backend(op: str | None = None) -> str | None:
    """The backend forced for ``op`` (by ``force`` or ``SPATIAL_MAMBA_BACKEND``), or None."""
    return _forced(op)[0]


def _forced(op: str | None) -> Tuple[str | None, str | None]:
    for backend, only in reversed(_FORCED.get()):
        if only is None or only == op:
            return backend, f"backend.force({backend!r})"
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None, None
    value = _check_name(value, ENV_VAR)
    return value, f"{ENV_VAR}={value}"


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _on_cuda(tensors: Sequence) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)


def _reasons(op: str, backend: str, tensors: Sequence, on_cuda: bool, build: bool = True) -> Tuple[List[str], bool]:
    """Why ``backend`` cannot run ``op`` on ``tensors`` (empty when it can), and whether it is unavailable here."""
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return [f"no {backend} implementation of {op} is registered"], True
    if backend == "cpu":
        # Input checks first: a traced or float64 call must not start the compile.
        if on_cuda:
            return ["the tensors are on a CUDA device"], False
        reasons = list(impl.supports(*tensors))
        if reasons:
            return reasons, False
    ok, reason = impl.available() if build or impl.status is None else impl.status()
    if not ok:
        return [reason], True
    if backend == "cuda" and not on_cuda:
        return ["the tensors are not on a CUDA device"], False
    if backend == "triton" and not on_cuda and not _triton_interpret():
        return ["the tensors are on the CPU and TRITON_INTERPRET=1 is not set"], False
    if backend == "cpu":
        return [], False  # its input checks ran above
    return list(impl.supports(*tensors)), False


def _announce(choice: Choice, warn: bool = False):
    # torch.compile cannot trace a logging call without breaking the graph there: choices made while it traces are
    # not announced (the first eager call announces them). Tested first: reading the set while tracing would make
    # the compiled graph depend on its contents, and an eager call that adds to it would force a recompilation.
    if compat.is_compiling() or (choice.op, choice.backend) in _ANNOUNCED:
        return
    _ANNOUNCED.add((choice.op, choice.backend))
    message = f"spatial_mamba: {choice.op} runs on the {choice.summary()}"
    if warn:
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    logger.info(message)


def explain(op: str, *tensors, build: bool = True) -> Choice:
    """The dispatcher's decision for ``op`` on ``tensors``, with the reasons; raises if a forced backend can't run.

    ``tensors`` are the op's inputs as its public function passes them (None for absent optional ones). With
    ``build=False`` a backend that builds at its first use (the ``cpu`` kernels) is judged by its status, unbuilt.
    """
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; registered ops: {sorted(_REGISTRY)}")
    on_cuda = _on_cuda(tensors)
    forced, forced_by = _forced(op)
    if forced is not None:
        reasons, _ = _reasons(op, forced, tensors, on_cuda, build)
        if reasons:
            raise RuntimeError(f"{forced_by} was asked for, but {op} cannot run on it: {'; '.join(reasons)}")
        return Choice(op, forced, _REGISTRY[op][forced].fn, f"forced by {forced_by}", forced_by=forced_by)
    passed_over: Dict[str, List[str]] = {}
    unavailable: Dict[str, str] = {}
    # On the CPU, a backend without an implementation of this op is not part of its walk.
    order = CUDA_ORDER if on_cuda else tuple(name for name in CPU_ORDER if name in _REGISTRY[op])
    for name in order:
        reasons, missing = _reasons(op, name, tensors, on_cuda, build)
        if not reasons:
            why = "CPU tensors" if not on_cuda else ("first able backend" if passed_over else "fastest backend")
            return Choice(op, name, _REGISTRY[op][name].fn, why, passed_over, unavailable=unavailable)
        passed_over[name] = reasons
        if missing:
            unavailable[name] = reasons[0]
    details = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in passed_over.items())
    raise RuntimeError(f"no backend of {op} can take these inputs ({details})")


def _warn_unavailable(choice: Choice):
    """On CPU tensors: a RuntimeWarning, once per process and reason, for each backend of the walk that cannot run."""
    if compat.is_compiling():
        return
    for name, reason in choice.unavailable.items():
        if (name, reason) in _WARNED_UNAVAILABLE:
            continue
        _WARNED_UNAVAILABLE.add((name, reason))
        warnings.warn(
            f"spatial_mamba: the {name} backend is unavailable ({reason}); {choice.op} and the other ops it "
            f"serves run on the {choice.backend} backend instead",
            RuntimeWarning,
            stacklevel=4,
        )


def choose(op: str, *tensors) -> Tuple[str, Callable]:
    """Returns ``(backend name, implementation)`` of ``op`` for ``tensors`` (see :func:`explain`), and logs it."""
    choice = explain(op, *tensors)
    on_cuda = _on_cuda(tensors)
    if not on_cuda:
        _warn_unavailable(choice)
    # On a GPU, a warning when the reference runs in place of kernels, or when a built backend had to pass these
    # inputs on (a GPU its build has no code for, a plane beyond its grid): a slower path than the user built for.
    declined = [name for name in choice.passed_over if name not in choice.unavailable]
    warn = on_cuda and choice.forced_by is None and bool(choice.passed_over)
    warn = warn and (choice.backend == "reference" or bool(declined))
    _announce(choice, warn=warn)
    return choice.backend, choice.fn


def select(op: str, *tensors) -> Callable:
    """Returns the implementation of ``op`` to use for ``tensors`` (see :func:`choose`)."""
    return choose(op, *tensors)[1]


def describe() -> Dict[str, Dict[str, str]]:
    """For each op and backend, whether it is available on this machine and why (before looking at inputs). Nothing
    is built: the ``cpu`` kernels report whether they are compiled yet, or where they will be."""
    report = {}
    for op, impls in sorted(_REGISTRY.items()):
        report[op] = {}
        for backend in BACKENDS:
            if backend not in impls:
                report[op][backend] = "not implemented"
                continue
            impl = impls[backend]
            ok, reason = (impl.status or impl.available)()
            report[op][backend] = ("available: " if ok else "unavailable: ") + reason
    return report
