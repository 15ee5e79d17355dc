"""Structure-aware state fusion (SASF, the paper's eq. for h_t): three dilated depthwise 3x3 convolutions of the
scan state, weighted by alpha.

h_t = Σ_{d ∈ {1, 3, 5}} α_d Σ_{i, j ∈ {-1, 0, 1}} k^d_ij x_{t + d i w + d j}, with replicate borders.

The three kernels share their centre, so the function has 25 distinct taps (``FUSION_OFFSETS``). Three ways to run
it, all exactly the same function, borders included (replicate padding; docs/official_bugs.md, #2):

- ``"taps"``: the backend op ``state_fusion(h, taps)`` over the 25 taps from ``fusion_taps`` in one pass over h;
- ``"branches"``: the three replicate-padded dilated convolutions (the official training path, and the one the
  official FLOP count measures);
- ``"merged"``: one 11x11 depthwise convolution whose kernel places the three dilated kernels on one grid (the
  official evaluation path, ``classification/models/spatialmamba.py``).

``"auto"`` is the taps op.

``fused_observation`` runs the fusion together with the observation step that follows it in the mixer (the paper's
eq. for y_t with d_state N = 1): y = fusion(h)·C + D·u, so that a kernel backend reads h and u once and writes y,
without writing the fused states and reading them back (``kernels/README.md`` counts the bytes).
"""

from __future__ import annotations

from typing import Tuple

import torch

from .. import compat
from . import backend
from .dwconv2d import depthwise_conv2d_replicate, depthwise_conv2d_replicate_ref

__all__ = [
    "DILATIONS",
    "FUSION_OFFSETS",
    "PATHS",
    "fused_observation",
    "fused_observation_ref",
    "fusion_taps",
    "merge_state_fusion_kernels",
    "state_fusion",
    "state_fusion_ref",
]

DILATIONS = (1, 3, 5)
PATHS = ("auto", "taps", "branches", "merged")

# (dy, dx) of the 25 taps: the shared centre, then each dilation's 8 outer taps in the row-major order of its kernel.
FUSION_OFFSETS: Tuple[Tuple[int, int], ...] = ((0, 0),) + tuple(
    (d * i, d * j) for d in DILATIONS for i in (-1, 0, 1) for j in (-1, 0, 1) if (i, j) != (0, 0)
)
RADIUS = DILATIONS[-1]
_SIZE = 2 * RADIUS + 1  # the side of the merged kernel
_DENSE_INDEX = [(RADIUS + dy) * _SIZE + RADIUS + dx for dy, dx in FUSION_OFFSETS]  # each tap's place in it
_OUTER = [0, 1, 2, 3, 5, 6, 7, 8]  # the row-major indices of a 3x3 kernel without its centre (4)

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_DTYPES = (torch.float32, torch.float64, *_HALF_DTYPES)


def _check_kernels(kernel_3, kernel_3_1, kernel_3_2, alpha) -> int:
    channels = kernel_3.shape[0]
    for name, kernel in (("kernel_3", kernel_3), ("kernel_3_1", kernel_3_1), ("kernel_3_2", kernel_3_2)):
        if kernel.shape != (channels, 1, 3, 3):
            raise ValueError(f"state fusion: {name} must be (channels={channels}, 1, 3, 3); got {tuple(kernel.shape)}")
    if alpha.shape != (len(DILATIONS),):
        raise ValueError(f"state fusion: alpha must be ({len(DILATIONS)},); got {tuple(alpha.shape)}")
    return channels


def _param_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any tensor is float64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def fusion_taps(kernel_3, kernel_3_1, kernel_3_2, alpha) -> torch.Tensor:
    """The (C, 25) taps of the fusion in the order of ``FUSION_OFFSETS``, differentiable w.r.t. all inputs.

    Tap 0 is α0·k3 + α1·k3_1 + α2·k3_2 at the centre; then α_d times the 8 outer taps of each dilation's kernel.
    float32, or float64 when the parameters are float64.
    """
    channels = _check_kernels(kernel_3, kernel_3_1, kernel_3_2, alpha)
    dtype = _param_dtype(kernel_3, kernel_3_1, kernel_3_2, alpha)
    weighted = [
        alpha[index].to(dtype) * kernel.to(dtype).reshape(channels, 9)
        for index, kernel in enumerate((kernel_3, kernel_3_1, kernel_3_2))
    ]
    centre = weighted[0][:, 4:5] + weighted[1][:, 4:5] + weighted[2][:, 4:5]
    return torch.cat([centre, *(w[:, _OUTER] for w in weighted)], dim=1)


def _dense_kernel(taps: torch.Tensor) -> torch.Tensor:
    """(C, 25) taps -> the (C, 1, 11, 11) kernel with each tap at its offset and zeros elsewhere (differentiable)."""
    index = torch.tensor(_DENSE_INDEX, device=taps.device)
    return taps.new_zeros(taps.shape[0], _SIZE * _SIZE).index_copy(1, index, taps).view(-1, 1, _SIZE, _SIZE)


def merge_state_fusion_kernels(kernel_3, kernel_3_1, kernel_3_2, alpha) -> torch.Tensor:
    """The (D, 1, 11, 11) kernel equal to the three branches (the official evaluation path): the 25 taps of
    ``fusion_taps`` placed at their offsets.

    α0·kernel_3 fills rows/cols 4..6, α1·kernel_3_1 the taps {2, 5, 8}², α2·kernel_3_2 the taps {0, 5, 10}², and the
    centre sums the three centre taps. Built out of place, so gradients reach the kernels and alpha. The result is
    float32 (float64 when the kernels are float64).
    """
    return _dense_kernel(fusion_taps(kernel_3, kernel_3_1, kernel_3_2, alpha))


def state_fusion_ref(h: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch taps op (backend implementation signature): out[b, c, y, x] = Σ_k taps[c, k] h[b, c, y + dy_k,
    x + dx_k] with replicate borders, accumulated in float32 (float64 for float64 h), returned in h's dtype.

    It runs as one depthwise convolution whose 11x11 kernel holds the 25 taps: on the CPU oneDNN's single pass over
    h beats 25 element-wise passes (each a full read and write of h) by about 2.5x at Spatial-Mamba-T's first stage,
    and the zero taps cost no memory traffic. The backward is the CPU-friendly one of ``depthwise_conv2d_replicate``.
    """
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    with torch.autocast(h.device.type, enabled=False):
        out = depthwise_conv2d_replicate_ref(h.to(dtype), _dense_kernel(taps.to(dtype)), 1)
    return out.to(h.dtype)


backend.register("state_fusion", "reference", state_fusion_ref)


def _branches(h, kernels, alpha) -> torch.Tensor:
    """α0·dw(h, k3, 1) + α1·dw(h, k3_1, 3) + α2·dw(h, k3_2, 5), each α folded into its kernel (three fewer passes)."""
    fused = None
    for index, (kernel, dilation) in enumerate(zip(kernels, DILATIONS)):
        branch = depthwise_conv2d_replicate(h, (alpha[index] * kernel).to(h.dtype), dilation)
        fused = branch if fused is None else fused.add_(branch)
    return fused


def fused_observation_ref(h, taps, C, u, D) -> torch.Tensor:
    """Pure-PyTorch fused observation (backend implementation signature of the ``fused_observation`` op):
    y[b, c] = fusion(h)[b, c]·C[b] + D[c]·u[b, c], computed in float32 (float64 for float64 h), returned in h's dtype.
    """
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    with torch.autocast(h.device.type, enabled=False):
        fused = depthwise_conv2d_replicate_ref(h.to(dtype), _dense_kernel(taps.to(dtype)), 1)
        y = torch.addcmul(u.to(dtype) * D.to(dtype)[:, None, None], fused, C.to(dtype)[:, None])
    return y.to(h.dtype)


backend.register("fused_observation", "reference", fused_observation_ref)


def _check_states(h: torch.Tensor, channels: int):
    if h.dim() != 4 or h.shape[1] != channels:
        raise ValueError(f"state fusion: h must be (batch, channels={channels}, height, width); got {tuple(h.shape)}")
    if h.dtype not in _DTYPES:
        raise TypeError(f"state fusion: h must be float32, float16, bfloat16 or float64; got {h.dtype}")
    if min(h.shape[2:]) < 1:
        raise ValueError(f"state fusion: h must have height and width >= 1; got {tuple(h.shape)}")


def _check_devices(op: str, **tensors: torch.Tensor):
    """One device for every input: on the GPU kernels a stray CPU or other-GPU tensor is an illegal address, not an
    error message."""
    devices = [t.device for t in tensors.values()]
    if any(device != devices[0] for device in devices):
        found = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        raise ValueError(f"{op}: all inputs must be on one device; got {found}")


def _fusion_taps_for(h, kernel_3, kernel_3_1, kernel_3_2, alpha) -> torch.Tensor:
    """The (C, 25) taps in the dtype the backends take: float32, or float64 for float64 h."""
    taps = fusion_taps(kernel_3, kernel_3_1, kernel_3_2, alpha)
    return taps.to(torch.float64 if h.dtype == torch.float64 else torch.float32)


@compat.eager_op
def fused_observation(h, kernel_3, kernel_3_1, kernel_3_2, alpha, C, u, D) -> torch.Tensor:
    """The state fusion followed by the observation step: y = fusion(h)·C + D·u, (B, C, H, W) in h's dtype.

    Args:
        h: (B, C, H, W) scan states (d_state N = 1), float32, float16, bfloat16 or float64.
        kernel_3, kernel_3_1, kernel_3_2, alpha: as for ``state_fusion``.
        C: (B, H, W), the observation of every pixel, shared by all channels; u: (B, C, H, W), the scan input, in
            C's dtype; D: (C,), the skip weight.
    The fusion is the taps op's (``path="taps"``); computed in float32 (float64 for float64 h).
    """
    channels = _check_kernels(kernel_3, kernel_3_1, kernel_3_2, alpha)
    _check_states(h, channels)
    batch, _, height, width = h.shape
    if C.shape != (batch, height, width):
        raise ValueError(
            f"fused observation: C must be (batch, height, width) = {(batch, height, width)}; got {tuple(C.shape)}"
        )
    if u.shape != h.shape:
        raise ValueError(f"fused observation: u must have h's shape {tuple(h.shape)}; got {tuple(u.shape)}")
    if u.dtype != C.dtype or u.dtype not in _DTYPES:
        raise TypeError(f"fused observation: u and C must share one float dtype; got {u.dtype} and {C.dtype}")
    if D.shape != (channels,):
        raise ValueError(f"fused observation: D must be (channels={channels},); got {tuple(D.shape)}")
    kernels = dict(kernel_3=kernel_3, kernel_3_1=kernel_3_1, kernel_3_2=kernel_3_2, alpha=alpha)
    _check_devices("fused observation", h=h, **kernels, C=C, u=u, D=D)
    taps = _fusion_taps_for(h, kernel_3, kernel_3_1, kernel_3_2, alpha)
    D = D.to(taps.dtype)
    tokens = backend.token_major(h)
    h, C, u = backend.as_layout(h, tokens), C.contiguous(), backend.as_layout(u, tokens)
    return backend.select("fused_observation", h, taps, C, u, D)(h, taps, C, u, D)


@compat.eager_op
def state_fusion(h, kernel_3, kernel_3_1, kernel_3_2, alpha, path: str = "auto") -> torch.Tensor:
    """Fuses the scan states h (B, C, H, W) with their dilated neighbourhoods; returns (B, C, H, W).

    Args:
        h: (B, C, H, W) float32, float16, bfloat16 or float64; B may be 0.
        kernel_3, kernel_3_1, kernel_3_2: (C, 1, 3, 3), the kernels at dilations 1, 3 and 5. alpha: (3,).
        path: ``"auto"`` (= ``"taps"``), ``"taps"``, ``"branches"`` or ``"merged"`` (module docstring). ``"taps"``
            accumulates in float32 and returns h's dtype; ``"branches"`` keeps autocast's low-precision convolutions
            as the official training path does; ``"merged"`` computes in float32 even under autocast, as the official
            evaluation kernel does, and returns float32 (float64 for float64 inputs). The merged kernel is rebuilt
            from the current weights on every call: the official code cached it on the first evaluation and kept
            using it after weight updates (docs/official_bugs.md, #1).
    """
    if path not in PATHS:
        raise ValueError(f"state fusion: path must be one of {', '.join(PATHS)}; got {path!r}")
    channels = _check_kernels(kernel_3, kernel_3_1, kernel_3_2, alpha)
    _check_states(h, channels)
    _check_devices("state fusion", h=h, kernel_3=kernel_3, kernel_3_1=kernel_3_1, kernel_3_2=kernel_3_2, alpha=alpha)
    if path in ("auto", "taps"):
        taps = _fusion_taps_for(h, kernel_3, kernel_3_1, kernel_3_2, alpha)
        h = backend.as_layout(h, backend.token_major(h))
        return backend.select("state_fusion", h, taps)(h, taps)
    if path == "branches":
        return _branches(h, (kernel_3, kernel_3_1, kernel_3_2), alpha)
    with torch.autocast(device_type=h.device.type, enabled=False):
        weight = merge_state_fusion_kernels(kernel_3, kernel_3_1, kernel_3_2, alpha)
        h = h if h.dtype == torch.float64 else h.float()
        return depthwise_conv2d_replicate(h, weight.to(h.dtype), 1)
