"""The compiled CUDA kernels (``kernels/``) as PyTorch custom ops and as the ``cuda`` backend of each op.

The extensions ``spatial_mamba._selective_scan_cuda`` and ``spatial_mamba._dwconv2d_cuda`` exist only after
``SPATIAL_MAMBA_BUILD_CUDA=1 python setup.py build_ext --inplace``. Without them this module still imports: the
``cuda`` backends are registered as unavailable, with the build command as the reason.

Custom ops (namespace ``spatial_mamba``, so that torch.compile and torch.export see them whole):
``selective_scan_cuda_fwd``/``_bwd``, ``dwconv2d_cuda_fwd``, ``dwconv2d_cuda_dgrad`` and ``dwconv2d_cuda_wgrad``,
with fake (meta) implementations and autograd formulas.

Coverage: the selective scan kernels handle d_state N = 1 (all Spatial-Mamba models); the depthwise convolution
handles odd kernel sizes 3 to 11 with any dilation; float32, float16 and bfloat16 inputs. ``available()`` reports
whether the extension was built; ``supports_*`` tell the dispatcher which inputs the kernels cannot take, so that it
hands those to the next backend. Called directly, the implementations raise a ValueError for such inputs.
"""

# No `from __future__ import annotations`: torch.library.custom_op reads the annotations to build each op's schema.
import importlib
import warnings
from types import ModuleType
from typing import Callable, List, Optional, Tuple

import torch

from . import backend

__all__ = [
    "DWCONV_KERNEL_SIZES",
    "KERNEL_DTYPES",
    "dwconv2d_cuda",
    "selective_scan_cuda",
    "supports_dwconv2d",
    "supports_selective_scan",
]

BUILD_COMMAND = "SPATIAL_MAMBA_BUILD_CUDA=1 python setup.py build_ext --inplace"
DWCONV_KERNEL_SIZES = (3, 5, 7, 9, 11)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_reasons(*tensors) -> List[str]:
    return [
        f"{str(t.dtype).replace('torch.', '')} inputs (the kernels take float32, float16 and bfloat16)"
        for t in tensors[:1]
        if isinstance(t, torch.Tensor) and t.dtype not in KERNEL_DTYPES
    ]


def supports_selective_scan(u=None, delta=None, A=None, B=None, delta_bias=None, *rest) -> List[str]:
    """Why the scan kernels (CUDA and Triton) cannot take these inputs: d_state N > 1, or a dtype they lack."""
    reasons = _dtype_reasons(u)
    if isinstance(A, torch.Tensor) and (A.dim() != 2 or A.shape[1] != 1):
        reasons.append(f"d_state N = {A.shape[-1]} (the kernels handle N = 1 only)")
    return reasons


def supports_dwconv2d(x=None, weight=None, *rest) -> List[str]:
    """Why the CUDA convolution cannot take these inputs: a kernel size without a kernel, or a dtype it lacks."""
    reasons = _dtype_reasons(x)
    if isinstance(weight, torch.Tensor) and weight.shape[-1] not in DWCONV_KERNEL_SIZES:
        reasons.append(f"kernel size {weight.shape[-1]} (the kernels handle {DWCONV_KERNEL_SIZES})")
    return reasons


def _import_extension(name: str) -> Tuple[Optional[ModuleType], str]:
    """(module, why) for ``spatial_mamba.<name>``; module is None when it was not built or does not load."""
    qualified = f"spatial_mamba.{name}"
    try:
        return importlib.import_module(qualified), f"compiled extension {qualified}"
    except ModuleNotFoundError as error:
        if error.name != qualified:
            raise
        return None, f"extension not built: run {BUILD_COMMAND}"
    except (ImportError, OSError) as error:
        # Typically built against another torch or CUDA version than the one installed now.
        why = f"extension {qualified} does not load ({error}); rebuild it: {BUILD_COMMAND}"
        warnings.warn(f"spatial_mamba: {why}", RuntimeWarning, stacklevel=2)
        return None, why


_scan_ext, _scan_why = _import_extension("_selective_scan_cuda")
_dwconv_ext, _dwconv_why = _import_extension("_dwconv2d_cuda")


def _availability(extension: Optional[ModuleType], why: str) -> Callable[[], Tuple[bool, str]]:
    return lambda: (extension is not None, why)


def _register_selective_scan_ops(ext: ModuleType):
    @torch.library.custom_op("spatial_mamba::selective_scan_cuda_fwd", mutates_args=())
    def selective_scan_cuda_fwd(
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        delta_bias: Optional[torch.Tensor],
        delta_softplus: bool,
    ) -> torch.Tensor:
        return ext.fwd(u, delta, A, B, delta_bias, delta_softplus)

    @selective_scan_cuda_fwd.register_fake
    def _(u, delta, A, B, delta_bias, delta_softplus):
        return u.new_empty((u.shape[0], u.shape[1], A.shape[1], u.shape[2]), dtype=torch.float32)

    @torch.library.custom_op("spatial_mamba::selective_scan_cuda_bwd", mutates_args=())
    def selective_scan_cuda_bwd(
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        delta_bias: Optional[torch.Tensor],
        delta_softplus: bool,
        hs: torch.Tensor,
        dhs: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        du, ddelta, dA, dB, ddelta_bias = ext.bwd(u, delta, A, B, delta_bias, delta_softplus, hs, dhs)
        return du, ddelta, dA, dB, ddelta_bias

    @selective_scan_cuda_bwd.register_fake
    def _(u, delta, A, B, delta_bias, delta_softplus, hs, dhs):
        return (
            torch.empty_like(u),
            torch.empty_like(delta),
            torch.empty_like(A),
            torch.empty_like(B),
            A.new_empty((A.shape[0],)),
        )

    def setup_context(ctx, inputs, output):
        u, delta, A, B, delta_bias, delta_softplus = inputs
        ctx.save_for_backward(u, delta, A, B, delta_bias, output)
        ctx.delta_softplus = delta_softplus

    def backward(ctx, dhs):
        u, delta, A, B, delta_bias, hs = ctx.saved_tensors
        du, ddelta, dA, dB, ddelta_bias = selective_scan_cuda_bwd(
            u, delta, A, B, delta_bias, ctx.delta_softplus, hs, dhs.to(torch.float32).contiguous()
        )
        return du, ddelta, dA, dB, None if delta_bias is None else ddelta_bias, None

    selective_scan_cuda_fwd.register_autograd(backward, setup_context=setup_context)


def _register_dwconv2d_ops(ext: ModuleType):
    @torch.library.custom_op("spatial_mamba::dwconv2d_cuda_fwd", mutates_args=())
    def dwconv2d_cuda_fwd(x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
        return ext.fwd(x, weight, dilation)

    @dwconv2d_cuda_fwd.register_fake
    def _(x, weight, dilation):
        return torch.empty_like(x)

    @torch.library.custom_op("spatial_mamba::dwconv2d_cuda_dgrad", mutates_args=())
    def dwconv2d_cuda_dgrad(dy: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
        return ext.dgrad(dy, weight, dilation)

    @dwconv2d_cuda_dgrad.register_fake
    def _(dy, weight, dilation):
        return torch.empty_like(dy)

    @torch.library.custom_op("spatial_mamba::dwconv2d_cuda_wgrad", mutates_args=())
    def dwconv2d_cuda_wgrad(dy: torch.Tensor, x: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
        return ext.wgrad(dy, x, kernel_size, dilation)

    @dwconv2d_cuda_wgrad.register_fake
    def _(dy, x, kernel_size, dilation):
        return x.new_empty((x.shape[1], 1, kernel_size, kernel_size), dtype=torch.float32)

    def setup_context(ctx, inputs, output):
        x, weight, dilation = inputs
        ctx.save_for_backward(x, weight)
        ctx.dilation = dilation

    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.to(x.dtype).contiguous()
        dx = dwconv2d_cuda_dgrad(dy, weight, ctx.dilation) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            dw = dwconv2d_cuda_wgrad(dy, x, weight.shape[-1], ctx.dilation).to(weight.dtype)
        return dx, dw, None

    dwconv2d_cuda_fwd.register_autograd(backward, setup_context=setup_context)


def selective_scan_cuda(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
) -> torch.Tensor:
    """Selective scan on the CUDA kernels (backend implementation signature, see ``backend``); N = 1 only."""
    if A.dim() != 2 or A.shape[1] != 1:
        raise ValueError(
            f"the cuda selective_scan backend supports d_state N = 1 only; got A of shape {tuple(A.shape)}. "
            f"Use {backend.ENV_VAR}=reference (or triton) for N > 1"
        )
    if delta_bias is not None:
        delta_bias = delta_bias.contiguous()
    return torch.ops.spatial_mamba.selective_scan_cuda_fwd(
        u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), delta_bias, bool(delta_softplus)
    )


def dwconv2d_cuda(x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """Replicate-padded depthwise conv on the CUDA kernels (backend implementation signature, see ``backend``)."""
    if weight.shape[-1] not in DWCONV_KERNEL_SIZES:
        raise ValueError(
            f"the cuda dwconv2d backend supports kernel sizes {DWCONV_KERNEL_SIZES}; got weight of shape "
            f"{tuple(weight.shape)}. Use {backend.ENV_VAR}=reference for other sizes"
        )
    return torch.ops.spatial_mamba.dwconv2d_cuda_fwd(x.contiguous(), weight, int(dilation))


if _scan_ext is not None:
    _register_selective_scan_ops(_scan_ext)
if _dwconv_ext is not None:
    _register_dwconv2d_ops(_dwconv_ext)
backend.register(
    "selective_scan",
    "cuda",
    selective_scan_cuda,
    _availability(_scan_ext, _scan_why),
    supports=supports_selective_scan,
)
backend.register("dwconv2d", "cuda", dwconv2d_cuda, _availability(_dwconv_ext, _dwconv_why), supports=supports_dwconv2d)
