"""What differs between the torch releases we support (2.1 to the newest), in one place.

Every entry detects the feature itself (an attribute, an import), never a version string. A feature that an older
torch lacks is not an import error: the code that needs it calls :func:`unavailable`, which names the feature and the
torch release that brings it, once per process. ``docs/compatibility.md`` lists what each release adds.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable, Iterable

import torch

__all__ = [
    "HAS_CUSTOM_OP",
    "HAS_SAFE_GLOBALS",
    "add_safe_globals",
    "autocast_dtype",
    "cpu_float16",
    "require_dynamic_export",
    "require_cpu_float16",
    "custom_op",
    "eager_op",
    "grad_scaler",
    "is_compiling",
    "is_exporting",
    "is_fx_tracing",
    "safe_globals",
    "unavailable",
]

# torch.library.custom_op (torch 2.4): the CUDA and CPU kernels as ops that torch.compile and torch.export see whole.
HAS_CUSTOM_OP = hasattr(torch.library, "custom_op")
# torch.serialization.add_safe_globals (torch 2.4): extending what torch.load(weights_only=True) may rebuild.
HAS_SAFE_GLOBALS = hasattr(torch.serialization, "add_safe_globals")

_SAID: set = set()


def unavailable(feature: str, needs: str, instead: str = "", error: bool = False) -> str | None:
    """Says once per process that ``feature`` needs ``needs`` (e.g. "torch >= 2.4") and what happens ``instead``.

    With ``error=True`` it raises a RuntimeError with the same line instead (for features with no fallback)."""
    message = f"spatial_mamba: {feature} needs {needs} (this is torch {torch.__version__})"
    message += f"; {instead}" if instead else ""
    if error:
        raise RuntimeError(message)
    if message not in _SAID:
        _SAID.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return message


def _never() -> bool:
    return False


# Chosen once, so that the hot paths call torch's own function, which torch.compile recognises while it traces.
# is_compiling: true while torch.compile (or torch.export, which traces with it) traces the code (torch.compiler's,
# torch 2.3; before, torch._dynamo's). is_exporting: true while torch.export traces (torch 2.5 tells it apart; before,
# export is also is_compiling).
if hasattr(torch.compiler, "is_compiling"):
    is_compiling = torch.compiler.is_compiling
else:
    import torch._dynamo

    is_compiling = torch._dynamo.is_compiling
is_exporting = getattr(torch.compiler, "is_exporting", None) or _never


def _fx_tracing_test() -> Callable[[], bool]:
    try:
        from torch.fx._symbolic_trace import is_fx_symbolic_tracing  # torch 2.5

        return is_fx_symbolic_tracing
    except ImportError:  # before, the one flag also covers make_fx, which our callers do not meet
        from torch.fx._symbolic_trace import is_fx_tracing

        return is_fx_tracing


is_fx_tracing = _fx_tracing_test()
is_fx_tracing.__doc__ = "True while torch.fx symbolically traces the code (timm's feature extraction does)."


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type`` when it is on there, else None."""
    if hasattr(torch, "get_autocast_dtype"):  # torch 2.4: one API for every device
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


@functools.cache
def cpu_float16() -> bool:
    """Whether this torch convolves and replicate-pads float16 tensors on the CPU (torch 2.2 added both)."""
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float16)
    try:
        torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), x)
    except RuntimeError:
        return False
    return True


def require_cpu_float16(t: torch.Tensor) -> None:
    """Raises the one-line error of :func:`unavailable` for a float16 CPU tensor on a torch without float16 CPU ops."""
    if t.dtype == torch.float16 and t.device.type == "cpu" and not cpu_float16():
        unavailable("float16 tensors on the CPU", "torch >= 2.2", "use float32 or bfloat16 there", error=True)


def require_dynamic_export(onnx: bool = False) -> None:
    """Raises the one-line error of :func:`unavailable` where torch.export (and, with ``onnx``, the dynamo ONNX
    exporter) cannot take a dynamic batch and image size the way the export path here uses them."""
    export = getattr(torch, "export", None)
    dim = getattr(export, "Dim", None)
    missing = [] if hasattr(dim, "DYNAMIC") else ["torch.export.Dim.DYNAMIC"]
    if onnx and "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        missing.append("torch.onnx.export(dynamo=True)")
    if missing:
        unavailable("export with a dynamic batch and image size", f"torch >= 2.6 ({', '.join(missing)})", error=True)


def grad_scaler(device_type: str, enabled: bool) -> Any:
    """A gradient scaler for ``device_type`` (torch.amp.GradScaler, torch 2.3; before, torch.cuda.amp's)."""
    amp = getattr(torch, "amp", None)
    if amp is not None and hasattr(amp, "GradScaler"):
        return amp.GradScaler(device_type, enabled=enabled)
    if enabled and device_type != "cuda":
        unavailable(f"a float16 gradient scaler on {device_type}", "torch >= 2.3", error=True)
    return torch.cuda.amp.GradScaler(enabled=enabled)


def add_safe_globals(objects: Iterable[Any]) -> bool:
    """Allow-lists ``objects`` for torch.load(weights_only=True); False where torch cannot extend that list."""
    if not HAS_SAFE_GLOBALS:
        return False
    torch.serialization.add_safe_globals(list(objects))
    return True


def safe_globals() -> list:
    """What was allow-listed with :func:`add_safe_globals` (empty where torch has no such list)."""
    getter = getattr(torch.serialization, "get_safe_globals", None)
    return list(getter()) if getter is not None else []


class _EagerCustomOp:
    """What the CUDA and CPU bindings use of ``torch.library.custom_op`` where torch lacks it (< 2.4): the function
    called directly, differentiable through an autograd.Function built from the registered backward."""

    def __init__(self, name: str, fn: Callable):
        self.name, self._fn, self._function = name, fn, None

    def register_fake(self, fn: Callable) -> Callable:
        return fn  # only torch.compile's fake tensors use it, and they never reach this op

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        fn = self._fn

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                output = fn(*inputs)
                setup_context(ctx, inputs, output)
                return output

            @staticmethod
            def backward(ctx, *grads):
                return backward(ctx, *grads)

        self._function = Function

    def __call__(self, *args):
        # Under torch.compile the public ops around these calls run eagerly and say so (``eager_op``).
        return self._fn(*args) if self._function is None else self._function.apply(*args)


# The ops' namespace is the package's own name (``torch.ops.spatial_mamba``): a second copy of the package imported
# under another name in the same process (benchmarks/cpu_revisions.py times two revisions side by side) registers its
# ops apart instead of over the first copy's, which torch refuses.
OP_NAMESPACE = __name__.split(".")[0]


def custom_op(name: str, mutates_args: tuple = (), device_types: str | None = None) -> Callable[[Callable], Any]:
    """``torch.library.custom_op`` (torch 2.4) for the op ``OP_NAMESPACE::name``, or on older torch an op with the
    same surface that runs eagerly (and leaves ``device_types`` to its callers, which hand it only tensors of those
    devices)."""
    qualified = f"{OP_NAMESPACE}::{name}"
    if HAS_CUSTOM_OP:
        return torch.library.custom_op(qualified, mutates_args=mutates_args, device_types=device_types)
    return lambda fn: _EagerCustomOp(qualified, fn)


def eager_op(fn: Callable) -> Callable:
    """Marks a public op entry point to run eagerly under torch.compile where torch lacks ``torch.library.custom_op``
    (< 2.4): the dynamo of those releases cannot trace the backend dispatch and the kernels' wrappers, so the op runs
    between compiled graphs, with one warning; ``fullgraph=True`` then fails at the break. Newer torch traces it."""
    if HAS_CUSTOM_OP:
        return fn
    eager = torch._dynamo.disable(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if is_compiling():
            unavailable(
                f"torch.compile of the {fn.__name__} op",
                "torch >= 2.4 (torch.library.custom_op)",
                "it runs eagerly between compiled graphs",
            )
        return eager(*args, **kwargs)

    return wrapper
