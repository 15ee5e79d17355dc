"""The ``cpu`` backend: compiled CPU kernels of ``state_fusion``, ``fused_observation`` and ``selective_scan``
(d_state N = 1), forward and backward, in ``spatial_mamba/ops/backends/cpu/``.

The kernels are plain C++ over raw float pointers (no torch headers), compiled with g++ on first use
(``-O3 -march=native -fopenmp``) into a cache directory, ``$SPATIAL_MAMBA_CACHE`` or
``~/.cache/spatial_mamba/cpu_kernels/``, under a name keyed by the source, the flags, the compiler's version and the
CPU's flags. One process of the machine compiles, under a file lock in the cache directory, while the others wait;
the library is written to a temporary name and renamed, so no process loads half a file, and it is readable by the
users the umask allows, so a shared ``$SPATIAL_MAMBA_CACHE`` serves them all. ``status()`` reports without compiling.
It is loaded with ctypes and called with the tensors' data pointers, on ``torch.get_num_threads()`` OpenMP threads.
``$SPATIAL_MAMBA_CXX`` names another compiler.

Custom ops (namespace ``spatial_mamba``, so that torch.compile and torch.export keep the kernels in their graphs;
torch >= 2.4, before which they run eagerly, see ``compat.custom_op``): ``state_fusion_cpu_fwd``/``_bwd``,
``fused_observation_cpu_fwd``/``_bwd`` and ``selective_scan_cpu_fwd``/``_bwd``, with fake implementations that give
the kernels' output shapes and strides and autograd formulas that ask the backward kernels only for the gradients
needed. The forward scan op also returns Δ = softplus(delta + bias), which its backward reads.

Every kernel has two layouts: the states (and u, Δ and their gradients) contiguous, (B, C, ...), or token-major, views
of (B, ..., C) memory (``backend.token_major``), which is how the model's blocks hold their tokens on the CPU; the
inputs' layout picks the kernel and the outputs come back in it.

``available()`` is (False, reason) when the compiler is missing or the compile fails; the dispatcher then warns once
and runs the reference. While torch.compile traces, dynamo calls it (and the compile happens there, at the first use)
and keeps its answer as a constant. ``supports(*inputs)`` declines what the kernels cannot take, silently: anything
but contiguous-able float32 CPU tensors, and the tracers that cannot keep a custom op: TorchScript tracing, ONNX export
(ONNX has no operator for the kernels; the reference and the export scan serve it), FX proxies, and, where torch
lacks custom ops, torch.compile and torch.export. Fake tensors are taken only while torch.compile or torch.export
traces; meta tensors never.
"""

# No `from __future__ import annotations`: torch.library.custom_op reads the annotations to build each op's schema.
import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch

from .... import compat
from ... import backend
from ...state_fusion import FUSION_OFFSETS

__all__ = [
    "CXX_FLAGS",
    "SOURCES",
    "available",
    "cache_dir",
    "status",
    "describe_cpu",
    "fused_observation_cpu",
    "selective_scan_cpu",
    "state_fusion_cpu",
    "supports",
    "supports_selective_scan",
]

SOURCE_DIR = Path(__file__).resolve().parent  # package data: installed wheels carry it
SOURCES = (SOURCE_DIR / "state_fusion.cpp", SOURCE_DIR / "selective_scan.cpp")
HEADERS = (SOURCE_DIR / "simd.h",)
CXX_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
CACHE_ENV = "SPATIAL_MAMBA_CACHE"
CXX_ENV = "SPATIAL_MAMBA_CXX"
N_TAPS = 25

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_LOADED: Dict[Tuple[str, str], Tuple[ctypes.CDLL | None, str]] = {}
_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Where compiled libraries are kept: ``$SPATIAL_MAMBA_CACHE`` or ``~/.cache/spatial_mamba/cpu_kernels``."""
    root = os.environ.get(CACHE_ENV, "").strip()
    return Path(root) if root else Path.home() / ".cache" / "spatial_mamba" / "cpu_kernels"


def _compiler() -> str:
    return os.environ.get(CXX_ENV, "").strip() or "g++"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.machine() + " " + platform.processor()


def describe_cpu() -> str:
    """The CPU's model name and the vector extensions the kernels' width depends on, for benchmark reports: e.g.
    "AMD EPYC (avx2 fma)". The kernels use 16-float vectors with avx512f, else 8."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = set(_cpu_flags().split())
    return (
        f"{model} ({' '.join(f for f in ('avx2', 'fma', 'avx512f', 'asimd', 'sve') if f in flags) or 'no SIMD flags'})"
    )


def _summary(text: str, limit: int = 300) -> str:
    """The compiler's first error line (or its first line), shortened."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    line = (errors or lines or ["no output"])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _target(cxx: str, directory: Path) -> Tuple[Path | None, str]:
    """(where the library for these sources, flags, compiler and CPU is or will be, why); None when it cannot be
    built. Compiles nothing."""
    missing = [str(path) for path in SOURCES + HEADERS if not path.is_file()]
    if missing:
        return None, f"the kernel sources {', '.join(missing)} are missing (the package is incomplete)"
    if shutil.which(cxx) is None:
        return None, f"the C++ compiler {cxx!r} was not found (set {CXX_ENV} or install g++)"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"{cxx} --version failed: {error}"
    parts = [path.read_bytes() for path in SOURCES + HEADERS] + [" ".join(CXX_FLAGS).encode(), version.encode()]
    key = hashlib.sha256(b"\0".join([*parts, _cpu_flags().encode()]))
    return directory / f"state_fusion_{key.hexdigest()[:20]}.so", f"compiled CPU kernels in {directory}"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _machine_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` shared by every process of the machine (``flock``; none where it is missing)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: the atomic rename below still keeps half-written files out
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(cxx: str, directory: Path) -> Tuple[Path | None, str]:
    """(path of the compiled library, why); the path is None when it cannot be built.

    One process of the machine compiles (under a lock in the cache directory); the others wait for it and load its
    library. The library is readable by whoever the umask lets read new files, so a shared cache serves every user.
    """
    target, why = _target(cxx, directory)
    if target is None or target.is_file():
        return target, f"compiled CPU kernels {target}" if target is not None else why
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _machine_lock(directory / ".lock"):
            if target.is_file():  # another process compiled it while this one waited
                return target, f"compiled CPU kernels {target}"
            return _compile(cxx, target)
    except OSError as error:
        return None, f"the cache directory {directory} is not writable ({error})"


def _compile(cxx: str, target: Path) -> Tuple[Path | None, str]:
    handle, temp = tempfile.mkstemp(suffix=".so", prefix=".build_", dir=target.parent)
    os.close(handle)
    try:
        result = subprocess.run(
            [cxx, *CXX_FLAGS, "-o", temp, *map(str, SOURCES)], capture_output=True, text=True, timeout=600
        )
        if result.returncode != 0:
            return None, f"{cxx} failed to compile {SOURCE_DIR}: {_summary(result.stderr + result.stdout)}"
        os.chmod(temp, 0o755 & ~_umask())  # mkstemp made it private to this user
        os.replace(temp, target)
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"{cxx} failed to compile {SOURCE_DIR}: {error}"
    finally:
        if os.path.exists(temp):
            os.remove(temp)
    return target, f"compiled CPU kernels {target}"


def _bind(library: ctypes.CDLL) -> str:
    """Declares the kernels' signatures; returns why the library cannot be used ('' when it can)."""
    library.sm_fusion_offsets.argtypes = [ctypes.POINTER(ctypes.c_int)] * 2
    library.sm_fusion_offsets.restype = ctypes.c_int
    library.sm_fusion_forward.argtypes = [_P] * 6 + [_I64] * 4 + [ctypes.c_int]
    library.sm_fusion_forward.restype = None
    library.sm_fusion_backward.argtypes = [_P] * 11 + [_I64] * 4 + [ctypes.c_int]
    library.sm_fusion_backward.restype = None
    library.sm_scan_forward.argtypes = [_P] * 5 + [ctypes.c_int] + [_P] * 2 + [_I64] * 3 + [ctypes.c_int]
    library.sm_scan_forward.restype = None
    library.sm_scan_backward.argtypes = [_P] * 5 + [ctypes.c_int] + [_P] * 8 + [_I64] * 3 + [ctypes.c_int]
    library.sm_scan_backward.restype = None
    for name in ("sm_fusion_forward", "sm_fusion_backward", "sm_scan_forward", "sm_scan_backward"):
        # The token-major kernels take the same arguments.
        tokens = getattr(library, name + "_tokens")
        tokens.argtypes, tokens.restype = getattr(library, name).argtypes, None
    dy, dx = (ctypes.c_int * N_TAPS)(), (ctypes.c_int * N_TAPS)()
    count = library.sm_fusion_offsets(dy, dx)
    if count != N_TAPS or tuple(zip(dy, dx)) != FUSION_OFFSETS:
        return "the compiled kernels' tap offsets differ from FUSION_OFFSETS"
    return ""


def _library() -> Tuple[ctypes.CDLL | None, str]:
    """The loaded library and why (or None and why not), once per compiler and cache directory."""
    key = (_compiler(), str(cache_dir()))
    with _LOCK:
        if key not in _LOADED:
            path, why = _build(key[0], Path(key[1]))
            library = None
            if path is not None:
                try:
                    library = ctypes.CDLL(str(path))
                    problem = _bind(library)
                except (OSError, AttributeError) as error:
                    library, problem = None, f"{path} does not load ({error})"
                if problem:
                    library, why = None, problem
            _LOADED[key] = (library, why)
        return _LOADED[key]


# torch.compile asks the dispatcher while dynamo traces it: dynamo calls this (and compiles the library, the first
# time) instead of tracing the compile and the locks, and takes the answer as a constant of the graph.
@torch.compiler.assume_constant_result
def available() -> Tuple[bool, str]:
    """(True, the library's path) once the kernels are compiled and loaded; (False, why) otherwise."""
    library, why = _library()
    return library is not None, why


def status() -> Tuple[bool, str]:
    """Like ``available()``, without compiling: whether the kernels are loaded, compiled or can be compiled here."""
    key = (_compiler(), str(cache_dir()))
    if key in _LOADED:
        library, why = _LOADED[key]
        return library is not None, why
    target, why = _target(key[0], Path(key[1]))
    if target is None:
        return False, why
    if target.is_file():
        return True, f"compiled CPU kernels {target} (loaded at first use)"
    return True, f"not compiled yet: {key[0]} compiles them at first use into {target.parent}"


def _tracing() -> str:
    """Why the tracer now running cannot take the kernels; '' when none runs, or when it keeps them in its graph as
    the custom ops below."""
    if torch.jit.is_tracing():
        return "TorchScript/ONNX tracing (compiled CPU kernels are opaque to it)"
    if compat.is_compiling():
        if not compat.HAS_CUSTOM_OP:
            return "torch.compile/torch.export is tracing (the kernels enter its graphs as custom ops from torch 2.4)"
        if torch.onnx.is_in_onnx_export():
            return "ONNX export (ONNX has no operator for the compiled CPU kernels)"
    return ""


def _wrapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is a functorch wrapper (vmap, grad transforms): it has no data pointer of its own."""
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(is_wrapped is not None and is_wrapped(t))


def _tensor_reasons(t: torch.Tensor, traced: bool) -> List[str]:
    if isinstance(t, torch.fx.Proxy) or not isinstance(t, torch.Tensor):
        return [f"a {type(t).__name__} input (compiled CPU kernels take real tensors)"]
    if t.device.type != "cpu":
        return [f"tensors on {t.device.type} (the cpu backend takes CPU tensors)"]
    plain = type(t) in (torch.Tensor, torch.nn.Parameter)
    # torch.compile and torch.export trace with fake tensors (dynamo shows them as plain ones), which the custom ops
    # take; outside them a tensor without data of its own cannot reach a kernel.
    is_fake = torch._subclasses.fake_tensor.is_fake
    usable = (plain or is_fake(t)) if traced else (plain and not is_fake(t) and not _wrapped(t))
    if not usable:
        return [f"a {type(t).__name__} tensor (compiled CPU kernels take plain tensors with data)"]
    if t.dtype != torch.float32:
        return [f"{str(t.dtype).replace('torch.', '')} inputs (the cpu kernels take float32)"]
    return []


def supports(*tensors) -> List[str]:
    """Why the compiled CPU kernels cannot take these inputs (empty when they can)."""
    tracing = _tracing()
    if tracing:
        return [tracing]
    traced = compat.is_compiling()
    reasons: List[str] = []
    for t in tensors:
        if t is None:
            continue
        for reason in _tensor_reasons(t, traced):
            if reason not in reasons:
                reasons.append(reason)
    return reasons


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _loaded() -> ctypes.CDLL:
    library, why = _library()
    if library is None:
        raise RuntimeError(f"the cpu backend is unavailable: {why}")
    return library


def _kernel(library: ctypes.CDLL, name: str, tokens: bool):
    return getattr(library, name + ("_tokens" if tokens else ""))


def _empty(t: torch.Tensor, tokens: bool) -> torch.Tensor:
    """A new tensor of ``t``'s shape in the layout ``backend.as_layout(t, tokens)`` gives: how the kernels write."""
    return t.new_empty(t.movedim(1, -1).shape).movedim(-1, 1) if tokens else t.new_empty(t.shape)


def _contiguous(*tensors: torch.Tensor | None) -> List[torch.Tensor | None]:
    return [None if t is None else t.contiguous() for t in tensors]


def _present(grads: List[torch.Tensor | None], like: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The gradient buffers as op outputs: an empty tensor stands for one not computed (an op returns tensors)."""
    return tuple(like.new_empty((0,)) if g is None else g for g in grads)


def _needed(grads: Tuple[torch.Tensor, ...], needs: Tuple[bool, ...]) -> Tuple[torch.Tensor | None, ...]:
    return tuple(g if need else None for g, need in zip(grads, needs))


def _float_in_layout(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An output gradient as the backward kernels read it: float32, in ``like``'s layout."""
    return backend.as_layout(grad.to(torch.float32), backend.token_major(like))


# The custom ops' real implementations run the kernels on inputs in one layout: the states' (token-major or
# contiguous; u, Δ and the output gradients follow them), the parameters contiguous. The public functions below hand
# them so already, and then nothing is copied; anything else (a direct call) is put in that layout first. Outputs are
# fresh tensors in it, allocated by the same functions as the fake implementations' (``_fusion_grads``,
# ``_scan_outputs``, ``_scan_grads``), so that both agree on every shape and stride.


def _fusion_grads(h, taps, C, u, D, needs: Tuple[bool, ...]) -> List[torch.Tensor | None]:
    """The buffers the fusion's backward kernel fills, (dh, dtaps, dC, du, dD), None where ``needs`` is False."""
    tokens = backend.token_major(h)
    likes = ((h, tokens), (taps, False), (C, False), (h, tokens), (D, False))
    return [_empty(t, layout) if need else None for (t, layout), need in zip(likes, needs)]


def _fusion(h, taps, C=None, u=None, D=None) -> torch.Tensor:
    """F(h), or F(h)·C + D·u, in h's layout."""
    library = _loaded()
    tokens = backend.token_major(h)
    h, u = backend.as_layout(h, tokens), None if u is None else backend.as_layout(u, tokens)
    taps, C, D = _contiguous(taps, C, D)
    out = _empty(h, tokens)
    batch, channels, height, width = h.shape
    _kernel(library, "sm_fusion_forward", tokens)(
        _ptr(h), _ptr(taps), _ptr(C), _ptr(u), _ptr(D), _ptr(out), batch, channels, height, width,
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def _fusion_backward(h, taps, C, u, D, dy, needs: Tuple[bool, ...]) -> Tuple[torch.Tensor, ...]:
    """(dh, dtaps, dC, du, dD) as op outputs, empty where ``needs`` is False (the last three only with C)."""
    library = _loaded()
    tokens = backend.token_major(h)
    h, dy = backend.as_layout(h, tokens), backend.as_layout(dy, tokens)
    u = None if u is None else backend.as_layout(u, tokens)
    taps, C, D = _contiguous(taps, C, D)
    grads = _fusion_grads(h, taps, C, u, D, needs)
    batch, channels, height, width = h.shape
    _kernel(library, "sm_fusion_backward", tokens)(
        _ptr(h), _ptr(taps), _ptr(C), _ptr(u), _ptr(D), _ptr(dy), *(_ptr(g) for g in grads),
        batch, channels, height, width, torch.get_num_threads(),
    )  # fmt: skip
    return _present(grads, h)


@compat.custom_op("state_fusion_cpu_fwd", mutates_args=(), device_types="cpu")
def state_fusion_cpu_fwd(h: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    return _fusion(h, taps)


@state_fusion_cpu_fwd.register_fake
def _(h, taps):
    return _empty(h, backend.token_major(h))


@compat.custom_op("state_fusion_cpu_bwd", mutates_args=(), device_types="cpu")
def state_fusion_cpu_bwd(
    h: torch.Tensor, taps: torch.Tensor, dy: torch.Tensor, need_dh: bool, need_dtaps: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    dh, dtaps, *_ = _fusion_backward(h, taps, None, None, None, dy, (need_dh, need_dtaps, False, False, False))
    return dh, dtaps


@state_fusion_cpu_bwd.register_fake
def _(h, taps, dy, need_dh, need_dtaps):
    dh, dtaps, *_ = _present(_fusion_grads(h, taps, None, None, None, (need_dh, need_dtaps, False, False, False)), h)
    return dh, dtaps


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _state_fusion_backward(ctx, dy):
    h, taps = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:2])
    return _needed(state_fusion_cpu_bwd(h, taps, _float_in_layout(dy, h), *needs), needs)


state_fusion_cpu_fwd.register_autograd(_state_fusion_backward, setup_context=_save_inputs)


@compat.custom_op("fused_observation_cpu_fwd", mutates_args=(), device_types="cpu")
def fused_observation_cpu_fwd(
    h: torch.Tensor, taps: torch.Tensor, C: torch.Tensor, u: torch.Tensor, D: torch.Tensor
) -> torch.Tensor:
    return _fusion(h, taps, C, u, D)


@fused_observation_cpu_fwd.register_fake
def _(h, taps, C, u, D):
    return _empty(h, backend.token_major(h))


@compat.custom_op("fused_observation_cpu_bwd", mutates_args=(), device_types="cpu")
def fused_observation_cpu_bwd(
    h: torch.Tensor,
    taps: torch.Tensor,
    C: torch.Tensor,
    u: torch.Tensor,
    D: torch.Tensor,
    dy: torch.Tensor,
    need_dh: bool,
    need_dtaps: bool,
    need_dC: bool,
    need_du: bool,
    need_dD: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dh, dtaps, dC, du, dD = _fusion_backward(h, taps, C, u, D, dy, (need_dh, need_dtaps, need_dC, need_du, need_dD))
    return dh, dtaps, dC, du, dD


@fused_observation_cpu_bwd.register_fake
def _(h, taps, C, u, D, dy, need_dh, need_dtaps, need_dC, need_du, need_dD):
    dh, dtaps, dC, du, dD = _present(
        _fusion_grads(h, taps, C, u, D, (need_dh, need_dtaps, need_dC, need_du, need_dD)), h
    )
    return dh, dtaps, dC, du, dD


def _fused_observation_backward(ctx, dy):
    h, taps, C, u, D = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:5])
    return _needed(fused_observation_cpu_bwd(h, taps, C, u, D, _float_in_layout(dy, h), *needs), needs)


fused_observation_cpu_fwd.register_autograd(_fused_observation_backward, setup_context=_save_inputs)


def _check(op: str, h, taps, *rest):
    if h.dim() != 4 or taps.shape != (h.shape[1], N_TAPS):
        raise ValueError(
            f"{op}: h must be (batch, channels, height, width) and taps (channels, {N_TAPS}); "
            f"got {tuple(h.shape)} and {tuple(taps.shape)}"
        )
    reasons = supports(h, taps, *rest)
    if reasons:
        raise ValueError(f"{op}: the cpu kernels cannot take {'; '.join(reasons)}")


def state_fusion_cpu(h: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """The 25-tap state fusion on the compiled CPU kernels (backend implementation signature of ``state_fusion``)."""
    _check("state_fusion", h, taps)
    return state_fusion_cpu_fwd(backend.as_layout(h, backend.token_major(h)), taps.contiguous())


def fused_observation_cpu(h, taps, C, u, D) -> torch.Tensor:
    """y = fusion(h)·C + D·u on the compiled CPU kernels (backend implementation signature of ``fused_observation``)."""
    _check("fused_observation", h, taps, C, u, D)
    batch, channels, height, width = h.shape
    if C.shape != (batch, height, width) or u.shape != h.shape or D.shape != (channels,):
        raise ValueError(
            f"fused_observation: C must be {(batch, height, width)}, u {tuple(h.shape)} and D ({channels},); "
            f"got {tuple(C.shape)}, {tuple(u.shape)} and {tuple(D.shape)}"
        )
    tokens = backend.token_major(h)
    h, u = backend.as_layout(h, tokens), backend.as_layout(u, tokens)
    return fused_observation_cpu_fwd(h, taps.contiguous(), C.contiguous(), u, D.contiguous())


def _scan_outputs(u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """hs (B, D, 1, L) and Δ (B, D, L) as the forward kernel writes them: in u's layout (token-major hs is a view of
    (B, L, D) memory)."""
    tokens = backend.token_major(u)
    return _empty(u, tokens).unsqueeze(2), _empty(u, tokens)


def _scan_grads(u, delta, A, B, delta_bias, needs: Tuple[bool, ...]) -> List[torch.Tensor | None]:
    """The buffers the scan's backward kernel fills, (du, dΔ, dA, dB, d bias), None where not needed."""
    need_u, need_delta, need_A, need_B, need_bias = needs
    need_bias = need_bias and delta_bias is not None
    tokens = backend.token_major(u)
    return [
        _empty(u, tokens) if need_u else None,
        # dΔ is computed on the way to d bias.
        _empty(delta, tokens) if need_delta or need_bias else None,
        _empty(A, False) if need_A else None,
        _empty(B, False) if need_B else None,
        _empty(delta_bias, False) if need_bias else None,
    ]


def _scan_inputs(u, delta, A, B, delta_bias):
    """The scan's inputs in the kernels' layout: Δ in u's, the parameters contiguous."""
    tokens = backend.token_major(u)
    return (tokens, backend.as_layout(u, tokens), backend.as_layout(delta, tokens), *_contiguous(A, B, delta_bias))


@compat.custom_op("selective_scan_cpu_fwd", mutates_args=(), device_types="cpu")
def selective_scan_cpu_fwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    library = _loaded()
    tokens, u, delta, A, B, delta_bias = _scan_inputs(u, delta, A, B, delta_bias)
    hs, dt = _scan_outputs(u)
    batch, channels, length = u.shape
    _kernel(library, "sm_scan_forward", tokens)(
        _ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(delta_bias), int(delta_softplus), _ptr(hs), _ptr(dt),
        batch, channels, length, torch.get_num_threads(),
    )  # fmt: skip
    return hs, dt


@selective_scan_cpu_fwd.register_fake
def _(u, delta, A, B, delta_bias, delta_softplus):
    return _scan_outputs(u)


@compat.custom_op("selective_scan_cpu_bwd", mutates_args=(), device_types="cpu")
def selective_scan_cpu_bwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    hs: torch.Tensor,
    dt: torch.Tensor,
    dhs: torch.Tensor,
    need_du: bool,
    need_ddelta: bool,
    need_dA: bool,
    need_dB: bool,
    need_ddelta_bias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    library = _loaded()
    tokens, u, delta, A, B, delta_bias = _scan_inputs(u, delta, A, B, delta_bias)
    hs = backend.as_layout(hs.squeeze(2), tokens).unsqueeze(2)
    dt, dhs = backend.as_layout(dt, tokens), backend.as_layout(dhs, tokens)
    grads = _scan_grads(u, delta, A, B, delta_bias, (need_du, need_ddelta, need_dA, need_dB, need_ddelta_bias))
    batch, channels, length = u.shape
    _kernel(library, "sm_scan_backward", tokens)(
        _ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(delta_bias), int(delta_softplus), _ptr(hs), _ptr(dt),
        _ptr(dhs), *(_ptr(g) for g in grads), batch, channels, length, torch.get_num_threads(),
    )  # fmt: skip
    du, ddelta, dA, dB, ddelta_bias = _present(grads, u)
    return du, ddelta, dA, dB, ddelta_bias


@selective_scan_cpu_bwd.register_fake
def _(u, delta, A, B, delta_bias, delta_softplus, hs, dt, dhs, *needs):
    du, ddelta, dA, dB, ddelta_bias = _present(_scan_grads(u, delta, A, B, delta_bias, needs), u)
    return du, ddelta, dA, dB, ddelta_bias


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, delta_bias, delta_softplus = inputs
    hs, dt = output
    # Δ = softplus(delta + bias) is an output only for the backward kernel, which reads it: never differentiated.
    ctx.mark_non_differentiable(dt)
    ctx.set_materialize_grads(False)
    ctx.delta_softplus = delta_softplus
    ctx.save_for_backward(u, delta, A, B, delta_bias, hs, dt)


def _scan_backward(ctx, dhs, ddt):
    u, delta, A, B, delta_bias, hs, dt = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:5])
    grads = selective_scan_cpu_bwd(
        u, delta, A, B, delta_bias, ctx.delta_softplus, hs, dt, _float_in_layout(dhs.squeeze(2), u), *needs
    )
    return (*_needed(grads, needs), None)


selective_scan_cpu_fwd.register_autograd(_scan_backward, setup_context=_scan_setup_context)


def supports_selective_scan(u=None, delta=None, A=None, B=None, delta_bias=None, *rest) -> List[str]:
    """Why the CPU scan cannot take these inputs: those of ``supports``, or d_state N > 1."""
    reasons = supports(u, delta, A, B, delta_bias)
    if isinstance(A, torch.Tensor) and (A.dim() != 2 or A.shape[1] != 1):
        reasons.append(f"d_state N = {A.shape[-1]} (the cpu kernels handle N = 1 only)")
    return reasons


def selective_scan_cpu(u, delta, A, B, delta_bias, delta_softplus) -> torch.Tensor:
    """The selective scan's forward on the compiled CPU kernels (backend implementation signature of
    ``selective_scan``): hs (Bt, Dn, 1, L) float32; d_state N = 1, float32 inputs."""
    reasons = supports_selective_scan(u, delta, A, B, delta_bias)
    if reasons:
        raise ValueError(f"selective_scan: the cpu kernels cannot take {'; '.join(reasons)}")
    B = B.squeeze(1) if B.dim() == 4 else B
    _, *inputs = _scan_inputs(u, delta, A, B, delta_bias)
    return selective_scan_cpu_fwd(*inputs, bool(delta_softplus))[0]


backend.register("state_fusion", "cpu", state_fusion_cpu, available, supports=supports, status=status)
backend.register(
    "selective_scan", "cpu", selective_scan_cpu, available, supports=supports_selective_scan, status=status
)
backend.register("fused_observation", "cpu", fused_observation_cpu, available, supports=supports, status=status)
