"""Hidden-state selective scan of Spatial-Mamba (the paper's eq. for x_t; the official
``kernels/selective_scan`` extension).

For every batch element b, inner channel d and state n, one raster-order scan over the L tokens::

    Δ_t = softplus(delta_t + delta_bias)   (delta_t + delta_bias without softplus)
    x_t = exp(Δ_t A) x_{t-1} + Δ_t B_t u_t,   x_{-1} = 0

returns every x_t: hs of shape (Bt, Dn, N, L). C and D are applied outside the scan, after the state fusion
(y = fused_state * C + u * D), and there is no z gate.

The pure-PyTorch reference (``selective_scan_ref``) is the CPU path and the ground truth of the kernel tests. It
avoids a Python loop over all L positions with a two-level scan over chunks of about sqrt(L) positions
(``_chunked_scan``). It only ever multiplies decays exp(Δ A) and adds inputs, as the sequential recurrence does, so
it neither over- nor underflows where the recurrence itself does not, however long the row.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

from .. import compat
from . import backend

__all__ = ["selective_scan_fn", "selective_scan_ref"]

# float64 (the tests) runs on the reference backend only.
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PARAM_DTYPES = (torch.float32, torch.float64)

# The official softplus: log1p(exp(v)) for v <= 20, v above; F.softplus has the same rule.
_SOFTPLUS_THRESHOLD = 20.0


def _chunk_shape(length: int) -> Tuple[int, int]:
    """Chunk length T and chunk count C with T * C >= length, T close to sqrt(length) / 2.

    Chunks shorter than sqrt(L) measured slightly faster: the per-position loops then run over wider tensors. The
    divisor of ``length`` closest to that target (within a factor 2) is preferred, so that square token grids need
    no padding.
    """
    target = max(1, math.isqrt(length) // 2)
    divisors = [t for t in range(max(1, target // 2), 2 * target + 1) if length % t == 0]
    if divisors:
        chunk = min(divisors, key=lambda t: abs(math.log(t / target)))
        return chunk, length // chunk
    return target, -(-length // target)


def _chunk_view(x: torch.Tensor, chunk: int, count: int) -> torch.Tensor:
    """(..., L) -> (..., T, C) with [..., t, c] = x[..., c * T + t], zero from L on: a view when L = T * C.

    Elementwise ops that write this view into a contiguous ``out`` do the transposition on the way.
    """
    pad = chunk * count - x.shape[-1]
    if pad:
        x = F.pad(x, (0, pad))
    return x.unflatten(-1, (count, chunk)).transpose(-1, -2)


def _from_chunks(x: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of ``_chunk_view``: (..., T, C) -> contiguous (..., L)."""
    chunk = x.shape[-2]
    full = length // chunk
    out = x.new_empty((*x.shape[:-2], length))
    out[..., : full * chunk].unflatten(-1, (full, chunk)).copy_(x[..., :full].transpose(-1, -2))
    if full * chunk < length:
        out[..., full * chunk :].copy_(x[..., : length - full * chunk, full])
    return out


def _chunked_scan(decay: torch.Tensor, drive: torch.Tensor, chunk_decay: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Solves x_i = decay_i * x_{i-1} + drive_i (x_{i+1} if ``reverse``; zero beyond the ends) in place in ``drive``.

    decay, drive: contiguous (..., T, C) in the layout of ``_chunk_view``; chunk_decay: (..., C), the product of
    ``decay`` over each chunk. Level 1 runs the recurrence inside all chunks at once from a zero state and keeps each
    chunk's last value; level 2 carries the state from chunk to chunk; level 3 reruns all chunks from their true
    entry states. Each level is a Python loop of about sqrt(L) steps over tensors that hold every chunk.
    """
    chunk, count = drive.shape[-2:]
    order = range(chunk - 1, -1, -1) if reverse else range(chunk)
    first, rest = order[0], order[1:]

    # Eager calls reuse buffers through out= rather than allocating a tensor per step; torch.compile does not trace
    # out= into a strided view and plans its own buffers, so it gets the functional form.
    compiling = compat.is_compiling()
    end = drive[..., first, :].clone()
    for i in rest:
        end = torch.addcmul(drive[..., i, :], decay[..., i, :], end, out=None if compiling else end)

    # carry[c]: the state entering chunk c from its neighbour (chunk c - 1, or c + 1 in reverse).
    end, chunk_decay = end.movedim(-1, 0), chunk_decay.movedim(-1, 0)
    neighbour = 1 if reverse else -1
    steps = range(count - 2, -1, -1) if reverse else range(1, count)
    if compiling:
        carries = [torch.zeros_like(end[0])]
        for c in steps:
            carries.append(torch.addcmul(end[c + neighbour], chunk_decay[c + neighbour], carries[-1]))
        carry = torch.stack(carries[::-1] if reverse else carries)
    else:
        carry = torch.zeros_like(end)
        for c in steps:
            torch.addcmul(end[c + neighbour], chunk_decay[c + neighbour], carry[c + neighbour], out=carry[c])

    state = carry.movedim(0, -1)
    for i in order:
        state = drive[..., i, :].addcmul_(decay[..., i, :], state)
    return drive


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """The official softplus: log1p(exp(x)) for x <= 20, x above.

    torch.log1p (and F.softplus) is not vectorised on the CPU and would cost more than the scan itself, so log1p(y)
    is computed as log(w) - ((w - 1) - y) / w with w = 1 + y rounded: the second term undoes the rounding of w to
    first order, which leaves an error of a few ulp, and gives y itself where w rounds to 1.
    """
    y = torch.exp(x)
    w = y + 1
    correction = (w - 1).sub_(y).div_(w)
    out = w.log_().sub_(correction)
    # The branch spares eager calls a pass when no value is above the threshold; torch.compile would break its graph
    # on the data-dependent test, and fuses the select anyway.
    if compat.is_compiling() or (x.numel() and bool(x.max() > _SOFTPLUS_THRESHOLD)):
        out = torch.where(x > _SOFTPLUS_THRESHOLD, x, out)
    return out


def _delta(delta: torch.Tensor, delta_bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """delta + delta_bias in ``dtype`` (Bt, Dn, L); may be ``delta`` itself, so never modify it in place."""
    if delta_bias is None:
        return delta.to(dtype)
    return torch.add(delta.to(dtype), delta_bias.to(dtype)[:, None])


def _decays(dt: torch.Tensor, A: torch.Tensor, chunk: int, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """exp(Δ A) in chunk layout (Bt, Dn, N, T, C), and its product over each chunk (Bt, Dn, N, C)."""
    batch, channels, states = dt.shape[0], *A.shape
    view = _chunk_view(dt, chunk, count).unsqueeze(2)
    A = A[:, :, None, None]
    decay = torch.mul(view, A, out=dt.new_empty((batch, channels, states, chunk, count))).exp_()
    # The product over a chunk is exp of the summed exponent: one reduction instead of a loop of products.
    chunk_decay = torch.mul(view.sum(-2, keepdim=True), A).exp_().squeeze(-2)
    return decay, chunk_decay


class _SelectiveScanRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, delta_bias, delta_softplus):
        dtype = _compute_dtype(u, A, delta_bias)
        (batch, channels, length), states = u.shape, A.shape[1]
        chunk, count = _chunk_shape(length)
        dt = _delta(delta, delta_bias, dtype)
        if delta_softplus:
            dt = _softplus(dt)
        decay, chunk_decay = _decays(dt, A.to(dtype), chunk, count)
        drive = torch.mul(
            _chunk_view(dt * u, chunk, count).unsqueeze(2),
            _chunk_view(B.to(dtype), chunk, count).unsqueeze(1),
            out=dt.new_empty((batch, channels, states, chunk, count)),
        )
        hs = _from_chunks(_chunked_scan(decay, drive, chunk_decay, reverse=False), length)
        ctx.delta_softplus = delta_softplus
        # Δ is kept, one (Bt, Dn, L) tensor: recomputing the softplus would cost more than the rest of a pass.
        ctx.save_for_backward(u, delta, A, B, delta_bias, hs, dt)
        return hs

    @staticmethod
    def backward(ctx, dhs):
        u, delta, A, B, delta_bias, hs, dt = ctx.saved_tensors
        # einsum and vecdot would run in low precision if .backward() were called under autocast.
        with torch.autocast(hs.device.type, enabled=False):
            grads = _backward(dhs, u, delta, A, B, delta_bias, ctx.delta_softplus, hs, dt)
        return (*grads, None)


def _backward(dhs, u, delta, A, B, delta_bias, delta_softplus, hs, dt):
    """Gradients w.r.t. u, delta, A, B, delta_bias (in their dtypes) from dL/dhs and the forward's hs and Δ."""
    dtype, length = hs.dtype, hs.shape[-1]
    chunk, count = _chunk_shape(length)
    A_ = A.to(dtype)

    # With g_t = dL/dx_t in total, g_t = dhs_t + a_{t+1} g_{t+1}. Its decayed part w_t = a_t g_t solves the reverse
    # recurrence w_t = a_t w_{t+1} + a_t dhs_t, which uses the forward's decays at their own positions.
    decay, chunk_decay = _decays(dt, A_, chunk, count)
    w = torch.mul(decay, _chunk_view(dhs.to(dtype), chunk, count), out=torch.empty_like(decay))
    w = _from_chunks(_chunked_scan(decay, w, chunk_decay, reverse=True), length)
    del decay, chunk_decay
    if compat.is_compiling():  # no out= into a strided view under torch.compile (see ``_chunked_scan``)
        g = torch.cat([torch.add(dhs[..., :-1], w[..., 1:]), dhs[..., -1:]], -1).to(dtype)
    else:
        g = torch.empty_like(hs)
        g[..., -1] = dhs[..., -1]
        torch.add(dhs[..., :-1], w[..., 1:], out=g[..., :-1])
    # q_t = a_t g_t x_{t-1} (x_{-1} = 0): the decayed state's share of step t, which carries d/d(Δ A); made in w.
    q = w
    q[..., 0] = 0
    q[..., 1:].mul_(hs[..., :-1])

    # einsum turns the sums over N = 1 into plain products.
    g_b = torch.einsum("bdnl,bnl->bdl", g, B.to(dtype))
    du = g_b * dt
    d_dt = g_b.mul_(u).add_(torch.einsum("bdnl,dn->bdl", q, A_))
    dA = torch.linalg.vecdot(q, dt.unsqueeze(2)).sum(0)
    dB = (g * (dt * u).unsqueeze(2)).sum(1)
    del g, q
    if delta_softplus:
        d_dt = torch.ops.aten.softplus_backward(d_dt, _delta(delta, delta_bias, dtype), 1.0, _SOFTPLUS_THRESHOLD)
    d_bias = None if delta_bias is None else d_dt.sum((0, 2)).to(delta_bias.dtype)
    return du.to(u.dtype), d_dt.to(delta.dtype), dA.to(A.dtype), dB.to(B.dtype), d_bias


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64 (the tests), float32 otherwise, as the kernels compute."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> torch.Tensor:
    """Pure-PyTorch selective scan (backend implementation signature, see ``backend``).

    Returns hs (Bt, Dn, N, L) in float32, or in float64 when any input is float64.
    """
    return _SelectiveScanRef.apply(u, delta, A, B, delta_bias, delta_softplus)


backend.register("selective_scan", "reference", selective_scan_ref)


def _check_dtype(name: str, tensor: torch.Tensor, allowed: Tuple[torch.dtype, ...]):
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"selective_scan_fn: {name} must be {names}; got {str(tensor.dtype).replace('torch.', '')}")


@compat.eager_op
def selective_scan_fn(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """Hidden states of the selective scan (module docstring).

    Args:
        u, delta: (Bt, Dn, L), float32, float16 or bfloat16, the same dtype (float64 runs on the reference only).
        A: (Dn, N) float32 (or float64). B: (Bt, N, L) or (Bt, 1, N, L) in u's dtype: one group, shared by all Dn.
        D, z: must be None; Spatial-Mamba adds D·u after the state fusion and has no z gate.
        delta_bias: (Dn,) float32 (or float64), added to delta before the softplus.
        delta_softplus: Δ = softplus(delta + delta_bias) if True, else delta + delta_bias.
        return_last_state: also return hs[..., -1].
    Returns:
        hs (Bt, Dn, N, L) float32 (float64 for float64 inputs on the reference), or (hs, last_state (Bt, Dn, N)).
    """
    if D is not None:
        raise ValueError(
            "selective_scan_fn: D must be None; Spatial-Mamba applies D outside the scan "
            "(y = fused_state * C + u * D) and the official wrapper ignored it (docs/official_bugs.md, #5)"
        )
    if z is not None:
        raise ValueError("selective_scan_fn: z must be None; Spatial-Mamba's scan has no z gate")
    if u.dim() != 3:
        raise ValueError(f"selective_scan_fn: u must be (batch, channels, length); got shape {tuple(u.shape)}")
    batch, channels, length = u.shape
    if length == 0:
        raise ValueError("selective_scan_fn: u has length 0; the scan needs at least one position")
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan_fn: delta must have u's shape {tuple(u.shape)}; got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"selective_scan_fn: A must be (channels={channels}, d_state); got shape {tuple(A.shape)}")
    if B.dim() == 4:
        if B.shape[1] != 1:
            raise ValueError(
                f"selective_scan_fn: B must have one group (batch, 1, d_state, length); got {B.shape[1]} groups"
            )
        B = B.squeeze(1)
    if B.dim() != 3 or B.shape != (batch, A.shape[1], length):
        raise ValueError(
            f"selective_scan_fn: B must be (batch={batch}, d_state={A.shape[1]}, length={length}) "
            f"or (batch, 1, d_state, length); got shape {tuple(B.shape)}"
        )
    if delta_bias is not None and delta_bias.shape != (channels,):
        raise ValueError(f"selective_scan_fn: delta_bias must be (channels={channels},); got {tuple(delta_bias.shape)}")
    _check_dtype("u", u, _INPUT_DTYPES)
    for name, tensor in (("delta", delta), ("B", B)):
        if tensor.dtype != u.dtype:
            raise TypeError(f"selective_scan_fn: {name} must have u's dtype {u.dtype}; got {tensor.dtype}")
    _check_dtype("A", A, _PARAM_DTYPES)
    if delta_bias is not None:
        _check_dtype("delta_bias", delta_bias, _PARAM_DTYPES)
    tensors = [t for t in (u, delta, A, B, delta_bias) if t is not None]
    float64 = any(t.dtype == torch.float64 for t in tensors)
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"selective_scan_fn: all inputs must be on one device; got {[str(t.device) for t in tensors]}")

    tokens = backend.token_major(u)  # kept token-major for the cpu kernels (backend module docstring)
    u, delta, B = backend.as_layout(u, tokens), backend.as_layout(delta, tokens), B.contiguous()
    # Export hook: torch.export / ONNX and TorchScript tracing need a graph with no Python loop over a length-dependent
    # chunk count and no data-dependent branch; the export formulation computes the same states (float32-accurate).
    # The cpu kernels need none of it: torch.export keeps them whole as a custom op (ONNX and TorchScript decline them).
    if (compat.is_exporting() or torch.jit.is_tracing()) and backend.explain(
        "selective_scan", u, delta, A, B, delta_bias
    ).backend != "cpu":
        from .selective_scan_export import selective_scan_export

        hs = selective_scan_export(u, delta, A, B, delta_bias, delta_softplus)
        return (hs, hs[..., -1]) if return_last_state else hs
    impl = backend.select("selective_scan", u, delta, A, B, delta_bias)
    if float64 and impl is not selective_scan_ref:
        raise TypeError(
            "selective_scan_fn: float64 inputs run on the reference backend only (CPU tensors, or "
            f"{backend.ENV_VAR}=reference)"
        )
    hs = impl(u, delta, A, B, delta_bias, delta_softplus)
    return (hs, hs[..., -1]) if return_last_state else hs
