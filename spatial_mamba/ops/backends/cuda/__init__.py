"""The compiled CUDA kernels (``kernels/``) as PyTorch custom ops and as the ``cuda`` backend of each op.

The extensions ``spatial_mamba._selective_scan_cuda``, ``._dwconv2d_cuda`` and ``._state_fusion_cuda`` exist only after
``SPATIAL_MAMBA_BUILD_CUDA=1 python setup.py build_ext --inplace``. Without them this module still imports: the
``cuda`` backends are registered as unavailable, with the build command as the reason.

Custom ops (namespace ``spatial_mamba``, so that torch.compile and torch.export see them whole; torch >= 2.4, before
which they run eagerly, see ``compat.custom_op``):
``selective_scan_cuda_fwd``/``_bwd``, ``dwconv2d_cuda_fwd``, ``dwconv2d_cuda_dgrad``, ``dwconv2d_cuda_wgrad`` and
``state_fusion_cuda_fwd``/``_bwd`` and ``fused_observation_cuda_fwd``/``_bwd``, with fake (meta) implementations and
autograd formulas.

Coverage: the selective scan kernels handle d_state N = 1 (all Spatial-Mamba models); the depthwise convolution
handles odd kernel sizes 3 to 11 with any dilation; the state fusion and the fused observation take (C, 25) float32
taps (and float32 D); all take float32, float16 and bfloat16 inputs (the fused observation's u and C may have another
of the three dtypes than h). ``available()`` reports whether the extension was built; ``supports_*`` tell the
dispatcher which inputs the kernels cannot take, so that it hands those to the next backend. Called directly, the
implementations raise a ValueError for such inputs.
"""

# No `from __future__ import annotations`: torch.library.custom_op reads the annotations to build each op's schema.
import importlib
import re
import warnings
from types import ModuleType
from typing import Callable, Dict, List, Tuple

import torch

from .... import compat
from ... import backend

__all__ = [
    "DWCONV_KERNEL_SIZES",
    "KERNEL_DTYPES",
    "dwconv2d_cuda",
    "fused_observation_cuda",
    "selective_scan_cuda",
    "state_fusion_cuda",
    "supports_dwconv2d",
    "supports_fused_observation",
    "supports_selective_scan",
    "supports_state_fusion",
]

BUILD_COMMAND = "SPATIAL_MAMBA_BUILD_CUDA=1 python setup.py build_ext --inplace"
DWCONV_KERNEL_SIZES = (3, 5, 7, 9, 11)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FUSION_TILE = 32  # the fusion kernels' output tile side (kernels/state_fusion/fusion_tile.cuh)
_MAX_GRID_Y = 65535


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


def supports_state_fusion(h=None, taps=None, *rest) -> List[str]:
    """Why the fusion kernels (CUDA and Triton) cannot take these inputs: a dtype they lack, or a huge plane."""
    reasons = _dtype_reasons(h)
    if isinstance(h, torch.Tensor) and h.dim() == 4 and h.shape[-2] * h.shape[-1] >= 2**31:
        reasons.append(f"a {h.shape[-2]}x{h.shape[-1]} plane (the kernels index planes below 2**31 pixels)")
    if isinstance(taps, torch.Tensor) and taps.dtype != torch.float32:
        reasons.append(f"{str(taps.dtype).replace('torch.', '')} taps (the kernels take float32 taps)")
    return reasons


def supports_fused_observation(h=None, taps=None, C=None, u=None, D=None, *rest) -> List[str]:
    """Why the fused observation kernels cannot take these inputs: the fusion's reasons, a dtype of u and C they lack,
    or float64 D."""
    reasons = supports_state_fusion(h, taps)
    reasons += [reason.replace("inputs", "u and C") for reason in _dtype_reasons(u)]
    if isinstance(D, torch.Tensor) and D.dtype != torch.float32:
        reasons.append(f"{str(D.dtype).replace('torch.', '')} D (the kernels take float32 D)")
    return reasons


def _fusion_grid_reasons(h=None, *rest) -> List[str]:
    """The grid limits of the CUDA fusion and observation bindings (``check_inputs`` in
    kernels/state_fusion/state_fusion.cpp): at most 65535 tiles of 32 x 32 per plane, fewer than 2**31 planes, and
    fewer than 2**31 tiles in all."""
    if not isinstance(h, torch.Tensor) or h.dim() != 4:
        return []
    batch, channels, height, width = h.shape
    tiles = -(-height // _FUSION_TILE) * -(-width // _FUSION_TILE)
    if tiles > _MAX_GRID_Y:
        return [f"a {height}x{width} plane ({tiles} tiles of 32 x 32; the cuda kernels take 65535)"]
    if batch * channels >= 2**31:
        return [f"{batch} x {channels} planes (the cuda kernels take fewer than 2**31)"]
    if batch * tiles >= 2**31:
        return [f"batch {batch} of {tiles} tiles each (the cuda kernels take fewer than 2**31 tiles)"]
    return []


def _device_capability(t) -> Tuple[int, int] | None:
    """The compute capability of ``t``'s GPU, None for a tensor that is not on one."""
    if isinstance(t, torch.Tensor) and t.is_cuda:
        return torch.cuda.get_device_capability(t.device)
    return None


def runs_on(cuda_archs: str, capability: Tuple[int, int]) -> bool:
    """Whether an extension built for ``cuda_archs`` (``kernels/build.py``'s tag, e.g. ``"sm80_sm90_compute90"``) has
    code for a GPU of ``capability``: machine code of the same major and no higher minor version (``sm90a``: that GPU
    only), or PTX of no higher version, which the driver compiles for it."""
    for kind, digits, specific in re.findall(r"(sm|compute)(\d+)(a?)", cuda_archs):
        arch = (int(digits[:-1]), int(digits[-1]))
        if kind == "compute" and arch <= capability:
            return True
        if kind == "sm" and (arch == capability if specific else arch[0] == capability[0] and arch[1] <= capability[1]):
            return True
    return False


def _describe_archs(cuda_archs: str) -> str:
    codes = re.findall(r"(sm|compute)(\d+a?)", cuda_archs)
    return ", ".join(f"{kind}_{digits}" for kind, digits in codes) or "no architecture"


def _arch_reasons(extension: str, tensor) -> List[str]:
    """Why the extension ``spatial_mamba.<extension>`` cannot run on ``tensor``'s GPU: it was built for others."""
    capability = _device_capability(tensor)
    module = _EXTENSIONS[extension][0]
    if capability is None or module is None:
        return []
    device = f"{tensor.device} (sm_{capability[0]}{capability[1]})"
    archs = getattr(module, "cuda_archs", "")
    if not archs:
        return [f"spatial_mamba.{extension} does not record the GPUs it was built for; rebuild it: {BUILD_COMMAND}"]
    if runs_on(archs, capability):
        return []
    return [
        f"spatial_mamba.{extension} was built for {_describe_archs(archs)}, which {device} cannot run; rebuild it "
        f"with TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]}: {BUILD_COMMAND}"
    ]


def _cuda_supports(extension: str, *checks: Callable[..., List[str]]) -> Callable[..., List[str]]:
    """The ``supports`` of a cuda backend: the kernels' input checks, then whether the build runs on the GPU."""

    def supports(*tensors) -> List[str]:
        reasons = [reason for check in checks for reason in check(*tensors)]
        return reasons + _arch_reasons(extension, tensors[0] if tensors else None)

    return supports


def supports_dwconv2d(x=None, weight=None, *rest) -> List[str]:
    """Why the CUDA convolution cannot take these inputs: a kernel size without a kernel, or a dtype it lacks."""
    reasons = _dtype_reasons(x)
    if isinstance(weight, torch.Tensor) and weight.shape[-1] not in DWCONV_KERNEL_SIZES:
        reasons.append(f"kernel size {weight.shape[-1]} (the kernels handle {DWCONV_KERNEL_SIZES})")
    return reasons


def _import_extension(name: str) -> Tuple[ModuleType | None, str]:
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


# Extension name -> (module or None, why); read at each call, so that tests can stand in other modules.
_EXTENSIONS = {
    name: _import_extension(name) for name in ("_selective_scan_cuda", "_dwconv2d_cuda", "_state_fusion_cuda")
}


# The forward op of each kernel, by name: a torch.library custom op (torch.ops.spatial_mamba.<name>) on torch >= 2.4,
# an eager stand-in before (compat.custom_op).
_OPS: Dict[str, Callable] = {}


def _availability(extension: str) -> Callable[[], Tuple[bool, str]]:
    return lambda: (_EXTENSIONS[extension][0] is not None, _EXTENSIONS[extension][1])


def _register_selective_scan_ops(ext: ModuleType):
    @compat.custom_op("selective_scan_cuda_fwd", mutates_args=())
    def selective_scan_cuda_fwd(
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        delta_bias: torch.Tensor | None,
        delta_softplus: bool,
    ) -> torch.Tensor:
        return ext.fwd(u, delta, A, B, delta_bias, delta_softplus)

    @selective_scan_cuda_fwd.register_fake
    def _(u, delta, A, B, delta_bias, delta_softplus):
        return u.new_empty((u.shape[0], u.shape[1], A.shape[1], u.shape[2]), dtype=torch.float32)

    @compat.custom_op("selective_scan_cuda_bwd", mutates_args=())
    def selective_scan_cuda_bwd(
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        delta_bias: torch.Tensor | None,
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
    _OPS["selective_scan_cuda_fwd"] = selective_scan_cuda_fwd


def _register_dwconv2d_ops(ext: ModuleType):
    @compat.custom_op("dwconv2d_cuda_fwd", mutates_args=())
    def dwconv2d_cuda_fwd(x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
        return ext.fwd(x, weight, dilation)

    @dwconv2d_cuda_fwd.register_fake
    def _(x, weight, dilation):
        return torch.empty_like(x)

    @compat.custom_op("dwconv2d_cuda_dgrad", mutates_args=())
    def dwconv2d_cuda_dgrad(dy: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
        return ext.dgrad(dy, weight, dilation)

    @dwconv2d_cuda_dgrad.register_fake
    def _(dy, weight, dilation):
        return torch.empty_like(dy)

    @compat.custom_op("dwconv2d_cuda_wgrad", mutates_args=())
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
    _OPS["dwconv2d_cuda_fwd"] = dwconv2d_cuda_fwd


def _register_state_fusion_ops(ext: ModuleType):
    @compat.custom_op("state_fusion_cuda_fwd", mutates_args=())
    def state_fusion_cuda_fwd(h: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
        return ext.fwd(h, taps)

    @state_fusion_cuda_fwd.register_fake
    def _(h, taps):
        return torch.empty_like(h)

    @compat.custom_op("state_fusion_cuda_bwd", mutates_args=())
    def state_fusion_cuda_bwd(
        h: torch.Tensor, taps: torch.Tensor, dy: torch.Tensor, need_dh: bool, need_dtaps: bool
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        dh, dtaps = ext.bwd(h, taps, dy, need_dh, need_dtaps)
        return dh, dtaps

    @state_fusion_cuda_bwd.register_fake
    def _(h, taps, dy, need_dh, need_dtaps):
        dh = torch.empty_like(h) if need_dh else h.new_empty((0,))
        return dh, taps.new_empty(taps.shape if need_dtaps else (0,))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, dy):
        h, taps = ctx.saved_tensors
        need_dh, need_dtaps = ctx.needs_input_grad[:2]
        dh, dtaps = state_fusion_cuda_bwd(h, taps, dy.to(h.dtype).contiguous(), need_dh, need_dtaps)
        return dh if need_dh else None, dtaps if need_dtaps else None

    state_fusion_cuda_fwd.register_autograd(backward, setup_context=setup_context)
    _OPS["state_fusion_cuda_fwd"] = state_fusion_cuda_fwd


def _register_fused_observation_ops(ext: ModuleType):
    @compat.custom_op("fused_observation_cuda_fwd", mutates_args=())
    def fused_observation_cuda_fwd(
        h: torch.Tensor, taps: torch.Tensor, C: torch.Tensor, u: torch.Tensor, D: torch.Tensor
    ) -> torch.Tensor:
        return ext.observe_fwd(h, taps, C, u, D)

    @fused_observation_cuda_fwd.register_fake
    def _(h, taps, C, u, D):
        return torch.empty_like(h)

    @compat.custom_op("fused_observation_cuda_bwd", mutates_args=())
    def fused_observation_cuda_bwd(
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
        dh, dtaps, dC, du, dD = ext.observe_bwd(h, taps, C, u, D, dy, need_dh, need_dtaps, need_dC, need_du, need_dD)
        return dh, dtaps, dC, du, dD

    @fused_observation_cuda_bwd.register_fake
    def _(h, taps, C, u, D, dy, need_dh, need_dtaps, need_dC, need_du, need_dD):
        needs = (need_dh, need_dtaps, need_dC, need_du, need_dD)
        return tuple(torch.empty_like(t) if need else t.new_empty((0,)) for t, need in zip((h, taps, C, u, D), needs))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, dy):
        h, taps, C, u, D = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:5])
        grads = fused_observation_cuda_bwd(h, taps, C, u, D, dy.to(h.dtype).contiguous(), *needs)
        return tuple(grad if need else None for grad, need in zip(grads, needs))

    fused_observation_cuda_fwd.register_autograd(backward, setup_context=setup_context)
    _OPS["fused_observation_cuda_fwd"] = fused_observation_cuda_fwd


def state_fusion_cuda(h: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """The 25-tap state fusion on the CUDA kernels (backend implementation signature of the ``state_fusion`` op)."""
    if h.dim() != 4 or taps.shape != (h.shape[1], 25):
        raise ValueError(
            f"state_fusion: h must be (batch, channels, height, width) and taps (channels, 25); got "
            f"{tuple(h.shape)} and {tuple(taps.shape)}"
        )
    reasons = supports_state_fusion(h, taps) + _fusion_grid_reasons(h)
    if reasons:
        raise ValueError(f"state_fusion: the cuda kernels cannot take {'; '.join(reasons)}")
    return _OPS["state_fusion_cuda_fwd"](h.contiguous(), taps.contiguous())


def fused_observation_cuda(
    h: torch.Tensor, taps: torch.Tensor, C: torch.Tensor, u: torch.Tensor, D: torch.Tensor
) -> torch.Tensor:
    """y = fusion(h)·C + D·u on the CUDA kernels (backend implementation signature of the ``fused_observation`` op)."""
    if h.dim() != 4 or taps.shape != (h.shape[1], 25) or D.shape != (h.shape[1],):
        raise ValueError(
            f"fused_observation: h must be (batch, channels, height, width), taps (channels, 25) and D (channels,); "
            f"got {tuple(h.shape)}, {tuple(taps.shape)} and {tuple(D.shape)}"
        )
    if C.shape != (h.shape[0], *h.shape[2:]) or u.shape != h.shape or u.dtype != C.dtype:
        raise ValueError(
            f"fused_observation: C must be (batch, height, width) and u h's shape, both in one dtype; got C "
            f"{tuple(C.shape)} {C.dtype}, u {tuple(u.shape)} {u.dtype} for h {tuple(h.shape)}"
        )
    reasons = supports_fused_observation(h, taps, C, u, D) + _fusion_grid_reasons(h)
    if reasons:
        raise ValueError(f"fused_observation: the cuda kernels cannot take {'; '.join(reasons)}")
    return _OPS["fused_observation_cuda_fwd"](
        h.contiguous(), taps.contiguous(), C.contiguous(), u.contiguous(), D.contiguous()
    )


def selective_scan_cuda(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    delta_bias: torch.Tensor | None,
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
    return _OPS["selective_scan_cuda_fwd"](
        u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), delta_bias, bool(delta_softplus)
    )


def dwconv2d_cuda(x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """Replicate-padded depthwise conv on the CUDA kernels (backend implementation signature, see ``backend``)."""
    if weight.shape[-1] not in DWCONV_KERNEL_SIZES:
        raise ValueError(
            f"the cuda dwconv2d backend supports kernel sizes {DWCONV_KERNEL_SIZES}; got weight of shape "
            f"{tuple(weight.shape)}. Use {backend.ENV_VAR}=reference for other sizes"
        )
    return _OPS["dwconv2d_cuda_fwd"](x.contiguous(), weight, int(dilation))


for _name, _registrations in [
    ("_selective_scan_cuda", [_register_selective_scan_ops]),
    ("_dwconv2d_cuda", [_register_dwconv2d_ops]),
    ("_state_fusion_cuda", [_register_state_fusion_ops, _register_fused_observation_ops]),
]:
    if _EXTENSIONS[_name][0] is not None:
        for _registration in _registrations:
            _registration(_EXTENSIONS[_name][0])
for _op, _fn, _name, _checks in [
    ("selective_scan", selective_scan_cuda, "_selective_scan_cuda", [supports_selective_scan]),
    ("dwconv2d", dwconv2d_cuda, "_dwconv2d_cuda", [supports_dwconv2d]),
    ("state_fusion", state_fusion_cuda, "_state_fusion_cuda", [supports_state_fusion, _fusion_grid_reasons]),
    (
        "fused_observation",
        fused_observation_cuda,
        "_state_fusion_cuda",
        [supports_fused_observation, _fusion_grid_reasons],
    ),
]:
    backend.register(_op, "cuda", _fn, _availability(_name), supports=_cuda_supports(_name, *_checks))
