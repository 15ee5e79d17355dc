"""Inputs, runners and tolerances shared by the CUDA kernel tests (on the GPU, and emulated on the CPU).

Ground truth is the reference backend on the same inputs cast to float64. Tolerances, on |actual - expected| <=
atol + rtol * |expected| elementwise:
- the kernels compute in float32, so atol = 2e-5 * max|expected| for every output and gradient; the convolution's
  weight gradient sums over batch and plane, so its atol is 1e-4 * max|expected|;
- results returned in a 16-bit input dtype carry one rounding to it: rtol = 2**-11 for float16, 2**-8 for
  bfloat16 (1e-5 for float32). hs, dA and ddelta_bias are always float32.
"""

import torch

from spatial_mamba.ops import backend

ATOL_OF_MAX = 2e-5
WGRAD_ATOL_OF_MAX = 1e-4
ROUNDING = {torch.float32: 1e-5, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference(op):
    return backend._REGISTRY[op]["reference"].fn


def assert_close(actual, expected, rtol, atol_of_max, name):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    expected = expected.double()
    diff = (actual.double() - expected).abs()
    bound = atol_of_max * expected.abs().max() + rtol * expected.abs()
    worst = (diff - bound).max().item()
    assert worst <= 0, f"{name}: max |error| {diff.max().item():.3g} exceeds the tolerance by {worst:.3g}"


def scan_inputs(batch, channels, length, dtype, delta_softplus, with_bias, device, seed=0):
    """Inputs in the model's ranges (SPEC §1.5): softplus(delta + bias) mostly in [1e-3, 0.1], A = -exp(A_log),
    plus the gradient dhs. Returns ({u, delta, A, B, delta_bias}, dhs)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, channels, length, generator=gen)
    A = -torch.empty(channels, 1).uniform_(0.5, 4.0, generator=gen)
    B = torch.randn(batch, 1, length, generator=gen)
    if delta_softplus:
        delta = torch.randn(batch, channels, length, generator=gen) - 3.0
        # Both branches of the official softplus: the identity above 20 and log1p(exp(v)) far below 0.
        delta[..., 1::11] = 25.0
        delta[..., 2::13] = -30.0
        bias = torch.log(torch.expm1(torch.empty(channels).uniform_(1e-3, 0.1, generator=gen)))
    else:
        delta = torch.rand(batch, channels, length, generator=gen) * 0.1
        bias = torch.rand(channels, generator=gen) * 0.05
    dhs = torch.randn(batch, channels, 1, length, generator=gen)
    inputs = {"u": u.to(dtype), "delta": delta.to(dtype), "A": A, "B": B.to(dtype), "delta_bias": bias}
    if not with_bias:
        inputs["delta_bias"] = None
    return {k: None if v is None else v.to(device) for k, v in inputs.items()}, dhs.to(device)


def run_scan(fn, inputs, delta_softplus, dhs, dtype=None):
    """hs and the gradients of (hs * dhs).sum() w.r.t. every input, with the inputs cast to ``dtype`` first."""
    leaves = {
        k: None if v is None else (v if dtype is None else v.to(dtype)).detach().requires_grad_()
        for k, v in inputs.items()
    }
    hs = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["delta_bias"], delta_softplus)
    hs.backward(dhs.to(hs.dtype))
    return hs.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


def check_scan(hs, grads, inputs, delta_softplus, dhs):
    """Compares a kernel's hs and gradients with the float64 reference on the same inputs."""
    hs_ref, grads_ref = run_scan(reference("selective_scan"), inputs, delta_softplus, dhs, torch.float64)
    assert hs.dtype == torch.float32
    assert_close(hs, hs_ref, 0.0, ATOL_OF_MAX, "hs")
    assert set(grads) == set(grads_ref)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, f"d{name} is {grad.dtype}, {name} is {inputs[name].dtype}"
        assert_close(grad, grads_ref[name], ROUNDING[grad.dtype], ATOL_OF_MAX, f"d{name}")


def conv_inputs(batch, channels, height, width, kernel_size, dtype, device, seed=0):
    """(x, weight, dy): x and dy in ``dtype``, the weight in float32."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=gen).to(dtype)
    weight = torch.randn(channels, 1, kernel_size, kernel_size, generator=gen)
    dy = torch.randn(batch, channels, height, width, generator=gen).to(dtype)
    return x.to(device), weight.to(device), dy.to(device)


def run_conv(fn, x, weight, dilation, dy, dtype=None):
    """y and the gradients of (y * dy).sum() w.r.t. x and weight, with x and weight cast to ``dtype`` first."""
    x = (x if dtype is None else x.to(dtype)).detach().requires_grad_()
    weight = (weight if dtype is None else weight.to(dtype)).detach().requires_grad_()
    y = fn(x, weight, dilation)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, weight.grad


def check_conv(y, dx, dw, x, weight, dilation, dy):
    """Compares a kernel's output and gradients with the float64 reference on the same inputs."""
    y_ref, dx_ref, dw_ref = run_conv(reference("dwconv2d"), x, weight, dilation, dy, torch.float64)
    assert y.dtype == x.dtype and dx.dtype == x.dtype and dw.dtype == weight.dtype
    assert_close(y, y_ref, ROUNDING[x.dtype], ATOL_OF_MAX, "y")
    assert_close(dx, dx_ref, ROUNDING[x.dtype], ATOL_OF_MAX, "dx")
    assert_close(dw, dw_ref, 0.0, WGRAD_ATOL_OF_MAX, "dweight")
