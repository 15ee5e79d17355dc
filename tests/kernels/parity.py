"""One input factory, one tolerance table and independent float64 references for every op, shared by all backends.

Used by the cross-backend parity tests (``test_backend_parity.py``: reference, Triton in its interpreter, CUDA on a
GPU), the CUDA emulation tests and the GPU-only CUDA tests.

Ground truth is never an implementation under test: each op has a float64 definition written here as plainly as
possible: the scan as a sequential loop over t (``sequential_scan``), the convolution and the state fusion as sums of
clamped gathers (``clamped_gather_conv``, ``gather_fusion``), differentiated by autograd (the scan's loop has a
hand-written adjoint, checked by gradcheck in tests/ops/test_selective_scan.py).

Tolerances, on |actual - expected| <= atol + rtol * |expected| elementwise (``assert_close``):
- every backend computes in float32 (or better): atol = 2e-5 * max|expected| for every output and gradient; sums over
  batch and plane (the convolution's and the fusion's weight gradients) use 1e-4 * max|expected|. Measured: at most
  1.4e-6 * max (scan dA, a sum over batch and L) and 2.6e-7 * max (convolutions), so the margin is >= 10x;
- results returned in a 16-bit dtype (outputs, input gradients, weight gradients of 16-bit weights) carry one
  rounding to it: rtol = one ulp (twice round-to-nearest's error) for float16 (2**-10) and bfloat16 (2**-7, which
  also covers Triton's interpreter, which truncates to bfloat16), and 1e-5 for float32. hs and the float32
  parameters' gradients are always float32;
- the reference convolution computes 16-bit inputs in their own dtype, as the official training does under autocast
  (``LOW_PRECISION_COMPUTE``): its intermediate sums are rounded too, so atol = 4 ulp of max|expected| (measured:
  1.5 ulp for bfloat16, 1.2 ulp for float16, on planes up to 56x56 and kernels up to 11x11).
"""

from __future__ import annotations

import numpy as np
import torch

from spatial_mamba.models.ssm import dt_bias_init

ATOL_OF_MAX = 2e-5
REDUCTION_ATOL_OF_MAX = 1e-4
ROUNDING = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (op, backend) pairs that compute 16-bit inputs in their own dtype rather than in float32.
LOW_PRECISION_COMPUTE = {("dwconv2d", "reference")}


def atol_of_max(dtype: torch.dtype, low_precision_compute: bool = False, base: float = ATOL_OF_MAX) -> float:
    """The atol (as a multiple of max|expected|) for results computed from ``dtype`` inputs."""
    if low_precision_compute and dtype in (torch.float16, torch.bfloat16):
        return max(base, 4 * ROUNDING[dtype])
    return base


def assert_close(actual, expected, rtol, atol_of_max, name):
    """|actual - expected| <= atol_of_max * max|expected| + rtol * |expected| everywhere, with a readable message."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    expected = expected.detach().double().cpu()
    actual = actual.detach().double().cpu()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    diff = (actual - expected).abs()
    bound = atol_of_max * expected.abs().max() + rtol * expected.abs()
    worst = (diff - bound).max().item()
    assert worst <= 0, f"{name}: max |error| {diff.max().item():.3g} exceeds the tolerance by {worst:.3g}"


# ------------------------------------------------------------------------------------------------ selective scan


class SequentialRecurrence(torch.autograd.Function):
    """x_t = a_t x_{t-1} + b_t, x_{-1} = 0, along the last dim: a plain loop over t in float64 numpy.

    Its backward is the textbook adjoint, also a loop: g_t = dx_t + a_{t+1} g_{t+1}, da_t = g_t x_{t-1}, db_t = g_t.
    (Autograd through a torch loop takes minutes on a 66,600-long row.)
    """

    @staticmethod
    def forward(ctx, a, b):
        a_np, b_np = a.detach().reshape(-1, a.shape[-1]).numpy(), b.detach().reshape(-1, b.shape[-1]).numpy()
        x = np.zeros_like(b_np)
        state = np.zeros(b_np.shape[0])
        for t in range(b_np.shape[1]):
            state = a_np[:, t] * state + b_np[:, t]
            x[:, t] = state
        out = torch.from_numpy(x).reshape(b.shape)
        ctx.save_for_backward(a, out)
        return out

    @staticmethod
    def backward(ctx, dx):
        a, x = ctx.saved_tensors
        a_np, x_np = a.reshape(-1, a.shape[-1]).numpy(), x.reshape(-1, x.shape[-1]).numpy()
        dx_np = dx.double().reshape(-1, dx.shape[-1]).numpy()
        g = np.zeros_like(dx_np)
        adjoint = np.zeros(dx_np.shape[0])
        for t in range(dx_np.shape[1] - 1, -1, -1):
            adjoint = dx_np[:, t] + (a_np[:, t + 1] * adjoint if t + 1 < dx_np.shape[1] else 0.0)
            g[:, t] = adjoint
        da = np.zeros_like(g)
        da[:, 1:] = g[:, 1:] * x_np[:, :-1]
        return torch.from_numpy(da).reshape(a.shape), torch.from_numpy(g).reshape(a.shape)


def sequential_scan(u, delta, A, B, delta_bias, delta_softplus):
    """x_t = exp(Δ_t A) x_{t-1} + Δ_t B_t u_t, x_{-1} = 0 (paper Eq. 2-3), as a loop over t in float64 (CPU)."""
    u, delta, A, B = (t.double().cpu() for t in (u, delta, A, B))
    B = B.squeeze(1) if B.dim() == 4 else B
    dt = delta if delta_bias is None else delta + delta_bias.double().cpu()[:, None]
    if delta_softplus:
        # The official rule (log1p(exp(v)) up to 20, v above); the clamp keeps exp finite in the discarded branch.
        dt = torch.where(dt <= 20, torch.log1p(torch.exp(dt.clamp(max=20))), dt)
    decay = torch.exp(dt.unsqueeze(2) * A[:, :, None])
    drive = (dt * u).unsqueeze(2) * B.unsqueeze(1)
    return SequentialRecurrence.apply(decay, drive)


def scan_inputs(
    batch, channels, length, dtype, delta_softplus=True, with_bias=True, device="cpu", seed=0, states=1, memory="short"
):
    """Inputs in the model's ranges (``classification/models/spatialmamba.py``: A = -exp(A_log) with A_log in
    log[1, 16], delta_bias drawn as the model initialises it, ``dt_bias_init``: the inverse softplus of Δ,
    log-uniform in [1e-3, 0.1]) plus the gradient dhs: ({u, delta, A, B, delta_bias}, dhs). With the softplus, some
    raw deltas sit on both sides of its threshold (25 and -30): Δ = 25 every 11 positions resets the state.

    ``memory="long"``: no resets and the slowest decays of the model at its initialisation (A = -1, the N = 1 init,
    Δ log-uniform in [1e-4, 1e-3]): the state remembers 1,000 to 10,000 positions, so rounding in the decays
    accumulates along the whole row (a 1333x800 detection image at stride 4 is a row of 66,600)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, channels, length, generator=gen)
    A = -torch.empty(channels, states).uniform_(0.5, 4.0, generator=gen)
    B = torch.randn(batch, states, length, generator=gen)
    if memory == "long":
        A = -torch.ones(channels, states)
        delta = 0.05 * torch.randn(batch, channels, length, generator=gen)
        bias = dt_bias_init(channels, dt_min=1e-4, dt_max=1e-3, generator=gen)
        if not delta_softplus:
            delta, bias = (torch.rand(batch, channels, length, generator=gen) + 1) * 1e-4, torch.full((channels,), 1e-4)
    elif delta_softplus:
        delta = torch.randn(batch, channels, length, generator=gen) - 3.0
        delta[..., 1::11] = 25.0
        delta[..., 2::13] = -30.0
        bias = dt_bias_init(channels, dt_min=1e-3, dt_max=0.1, generator=gen)
    else:
        delta = torch.rand(batch, channels, length, generator=gen) * 0.1
        bias = torch.rand(channels, generator=gen) * 0.05
    dhs = torch.randn(batch, channels, states, length, generator=gen)
    inputs = {"u": u.to(dtype), "delta": delta.to(dtype), "A": A, "B": B.to(dtype), "delta_bias": bias}
    if not with_bias:
        inputs["delta_bias"] = None
    return {k: None if v is None else v.to(device) for k, v in inputs.items()}, dhs.to(device)


def run_scan(fn, inputs, delta_softplus, dhs):
    """hs and the gradients of (hs * dhs).sum() w.r.t. every input; fn(u, delta, A, B, delta_bias, softplus)."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
    hs = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["delta_bias"], delta_softplus)
    hs.backward(dhs.to(hs.dtype).to(hs.device))
    return hs.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


def check_scan(hs, grads, inputs, delta_softplus, dhs):
    """A backend's hs and gradients against ``sequential_scan`` on the same (rounded) inputs, in float64."""
    exact = {k: None if v is None else v.double().cpu() for k, v in inputs.items()}
    hs_ref, grads_ref = run_scan(sequential_scan, exact, delta_softplus, dhs.double().cpu())
    assert hs.dtype == torch.float32, f"hs is {hs.dtype}"
    assert_close(hs, hs_ref, ROUNDING[torch.float32], ATOL_OF_MAX, "hs")
    assert set(grads) == set(grads_ref)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, f"d{name} is {grad.dtype}, {name} is {inputs[name].dtype}"
        assert_close(grad, grads_ref[name], ROUNDING[grad.dtype], ATOL_OF_MAX, f"d{name}")


# ------------------------------------------------------------------------------------------------ depthwise conv


def clamped_gather_conv(x, weight, dilation):
    """y[b, c, i, j] = Σ_pq w[c, p, q] x[b, c, clamp(i + d (p - k//2)), clamp(j + d (q - k//2))] (replicate)."""
    height, width = x.shape[-2:]
    half = weight.shape[-1] // 2
    out = torch.zeros_like(x)
    for p in range(weight.shape[-2]):
        rows = (torch.arange(height) + dilation * (p - half)).clamp(0, height - 1)
        for q in range(weight.shape[-1]):
            cols = (torch.arange(width) + dilation * (q - half)).clamp(0, width - 1)
            out = out + weight[:, 0, p, q][None, :, None, None] * x[:, :, rows][:, :, :, cols]
    return out


def conv_inputs(batch, channels, height, width, kernel_size, dtype, device="cpu", seed=0):
    """(x, weight, dy): x and dy in ``dtype``, the weight in float32."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=gen).to(dtype)
    weight = torch.randn(channels, 1, kernel_size, kernel_size, generator=gen)
    dy = torch.randn(batch, channels, height, width, generator=gen).to(dtype)
    return x.to(device), weight.to(device), dy.to(device)


def run_conv(fn, x, weight, dilation, dy):
    """y and the gradients of (y * dy).sum() w.r.t. x and weight; fn(x, weight, dilation)."""
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    y = fn(x, weight, dilation)
    y.backward(dy.to(y.dtype).to(y.device))
    return y.detach(), x.grad, weight.grad


def check_conv(y, dx, dw, x, weight, dilation, dy, low_precision_compute=False):
    """A backend's output and gradients against ``clamped_gather_conv`` in float64."""
    y_ref, dx_ref, dw_ref = run_conv(clamped_gather_conv, x.double().cpu(), weight.double().cpu(), dilation, dy.cpu())
    assert y.dtype == x.dtype and dx.dtype == x.dtype and dw.dtype == weight.dtype
    atol = atol_of_max(x.dtype, low_precision_compute)
    assert_close(y, y_ref, ROUNDING[x.dtype], atol, "y")
    assert_close(dx, dx_ref, ROUNDING[x.dtype], atol, "dx")
    atol = atol_of_max(x.dtype, low_precision_compute, REDUCTION_ATOL_OF_MAX)
    assert_close(dw, dw_ref, ROUNDING[dw.dtype], atol, "dweight")


# -------------------------------------------------------------------------------------------------- state fusion

# The 25 distinct taps of the three dilated 3x3 kernels of the state fusion (paper Eq. 4; the official
# ``classification/models/spatialmamba.py``, ``StateFusion``): the shared centre first, then for dilation 1, 3, 5 the
# eight off-centre taps row by row.
FUSION_OFFSETS = [(0, 0)] + [
    (d * i, d * j) for d in (1, 3, 5) for i in (-1, 0, 1) for j in (-1, 0, 1) if (i, j) != (0, 0)
]
FUSION_HALO = 5


def fusion_taps(kernel_3, kernel_3_1, kernel_3_2, alpha):
    """(C, 25) taps equal to α0 k3 (dilation 1) + α1 k3_1 (dilation 3) + α2 k3_2 (dilation 5), centres summed."""
    kernels = [alpha[i] * k[:, 0] for i, k in enumerate((kernel_3, kernel_3_1, kernel_3_2))]
    columns = [sum(k[:, 1, 1] for k in kernels)]
    for k in kernels:
        columns += [k[:, i + 1, j + 1] for i in (-1, 0, 1) for j in (-1, 0, 1) if (i, j) != (0, 0)]
    return torch.stack(columns, dim=1)


def gather_fusion(h, taps):
    """out[b, c, y, x] = Σ_k taps[c, k] h[b, c, clamp(y + dy_k), clamp(x + dx_k)], by clamped gathers (any dtype)."""
    height, width = h.shape[-2:]
    out = torch.zeros_like(h)
    for k, (dy, dx) in enumerate(FUSION_OFFSETS):
        rows = (torch.arange(height, device=h.device) + dy).clamp(0, height - 1)
        cols = (torch.arange(width, device=h.device) + dx).clamp(0, width - 1)
        out = out + taps[:, k][None, :, None, None] * h[:, :, rows][:, :, :, cols]
    return out


def fusion_inputs(batch, channels, height, width, dtype, device="cpu", seed=0):
    """(h, taps, dy): h and dy in ``dtype``, taps (C, 25) float32 built from random kernels and alpha."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, channels, height, width, generator=gen).to(dtype)
    kernels = [torch.randn(channels, 1, 3, 3, generator=gen) / 3 for _ in range(3)]
    alpha = torch.rand(3, generator=gen) + 0.5
    dy = torch.randn(batch, channels, height, width, generator=gen).to(dtype)
    return h.to(device), fusion_taps(*kernels, alpha).contiguous().to(device), dy.to(device)


def run_fusion(fn, h, taps, dy):
    """out and the gradients of (out * dy).sum() w.r.t. h and taps; fn(h, taps)."""
    h, taps = h.detach().clone().requires_grad_(), taps.detach().clone().requires_grad_()
    out = fn(h, taps)
    out.backward(dy.to(out.dtype).to(out.device))
    return out.detach(), h.grad, taps.grad


def check_fusion(out, dh, dtaps, h, taps, dy):
    """A backend's fused state and gradients against ``gather_fusion`` in float64."""
    out_ref, dh_ref, dtaps_ref = run_fusion(gather_fusion, h.double().cpu(), taps.double().cpu(), dy.cpu())
    assert out.dtype == h.dtype and dh.dtype == h.dtype and dtaps.dtype == taps.dtype
    assert_close(out, out_ref, ROUNDING[h.dtype], ATOL_OF_MAX, "out")
    assert_close(dh, dh_ref, ROUNDING[h.dtype], ATOL_OF_MAX, "dh")
    assert_close(dtaps, dtaps_ref, 0.0, REDUCTION_ATOL_OF_MAX, "dtaps")


# ----------------------------------------------------------------------------------------------- fused observation


def observation_inputs(batch, channels, height, width, dtype, u_dtype=None, device="cpu", seed=0):
    """(h, taps, C, u, D, dy) for the fused observation y = fusion(h)·C + D·u: h and dy in ``dtype``, C (B, H, W) and
    u (B, C, H, W) in ``u_dtype`` (default ``dtype``), taps (C, 25) and D (C,) float32."""
    h, taps, dy = fusion_inputs(batch, channels, height, width, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    u_dtype = dtype if u_dtype is None else u_dtype
    C = torch.randn(batch, height, width, generator=gen).to(u_dtype)
    u = torch.randn(batch, channels, height, width, generator=gen).to(u_dtype)
    D = torch.rand(channels, generator=gen) + 0.5
    return h, taps, C.to(device), u.to(device), D.to(device), dy


def gather_observation(h, taps, C, u, D):
    """y = gather_fusion(h, taps)·C + D·u (any dtype)."""
    return gather_fusion(h, taps) * C[:, None] + D[:, None, None] * u


def run_observation(fn, h, taps, C, u, D, dy):
    """y and the gradients of (y * dy).sum() w.r.t. (h, taps, C, u, D); fn(h, taps, C, u, D)."""
    inputs = [t.detach().clone().requires_grad_() for t in (h, taps, C, u, D)]
    y = fn(*inputs)
    y.backward(dy.to(y.dtype).to(y.device))
    return y.detach(), tuple(t.grad for t in inputs)


def check_observation(y, grads, h, taps, C, u, D, dy):
    """A backend's y and gradients against ``gather_observation`` in float64. y and dh carry h's dtype, dC and du u's,
    dtaps and dD are float32; dC sums over channels, dtaps and dD over batch and plane."""
    inputs = [t.double().cpu() for t in (h, taps, C, u, D)]
    y_ref, grads_ref = run_observation(gather_observation, *inputs, dy.cpu())
    dh, dtaps, dC, du, dD = grads
    dh_ref, dtaps_ref, dC_ref, du_ref, dD_ref = grads_ref
    assert (y.dtype, dh.dtype, dC.dtype, du.dtype) == (h.dtype, h.dtype, u.dtype, u.dtype)
    assert dtaps.dtype == torch.float32 and dD.dtype == torch.float32
    assert_close(y, y_ref, ROUNDING[h.dtype], ATOL_OF_MAX, "y")
    assert_close(dh, dh_ref, ROUNDING[h.dtype], ATOL_OF_MAX, "dh")
    assert_close(du, du_ref, ROUNDING[u.dtype], ATOL_OF_MAX, "du")
    assert_close(dC, dC_ref, ROUNDING[u.dtype], REDUCTION_ATOL_OF_MAX, "dC")
    assert_close(dtaps, dtaps_ref, 0.0, REDUCTION_ATOL_OF_MAX, "dtaps")
    assert_close(dD, dD_ref, 0.0, REDUCTION_ATOL_OF_MAX, "dD")
