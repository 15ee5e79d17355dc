"""Replicate-padded depthwise convolution (spatial_mamba/ops/dwconv2d.py).

Two independent definitions serve as ground truth: ``clamped_gather_conv``, the official CUDA kernel's definition
(source indices clamped to the border, as the official
``kernels/dwconv2d/`` does) written as a sum of shifted gathers, and PyTorch's
``nn.Conv2d(padding_mode="replicate")`` (the official ``check.py``'s comparison). Both are run in float64; the op runs
in float32 (rtol 1e-5 and atol 1e-6 * max, for sums of at most 121 taps) or in float64 (1e-12).
"""

import pytest
import torch
import torch.nn as nn

from spatial_mamba.ops import backend, depthwise_conv2d_replicate
from tests.kernels.parity import clamped_gather_conv

SIZES = [(1, 1), (1, 5), (2, 3), (7, 7), (13, 9)]


def torch_replicate_conv(x, weight, dilation):
    channels, kernel = weight.shape[0], weight.shape[-1]
    conv = nn.Conv2d(
        channels, channels, kernel, padding=dilation * (kernel // 2), dilation=dilation, groups=channels,
        bias=False, padding_mode="replicate",
    )  # fmt: skip
    conv = conv.to(weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv(x)


def make(batch, channels, size, kernel, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *size, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn(channels, 1, kernel, kernel, generator=gen, dtype=torch.float64).to(dtype)
    return x.requires_grad_(), weight.requires_grad_()


def assert_close(actual, expected, rtol, atol_of_max):
    atol = atol_of_max * expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kernel", [3, 11])
@pytest.mark.parametrize("dilation", [1, 3, 5])
def test_matches_clamped_gather_and_replicate_padded_conv2d(size, kernel, dilation):
    x, weight = make(2, 3, size, kernel)
    y = depthwise_conv2d_replicate(x, weight, dilation)
    assert y.shape == x.shape
    exact = clamped_gather_conv(x.double(), weight.double(), dilation)
    assert_close(y, exact, 1e-5, 1e-6)
    assert_close(torch_replicate_conv(x.double(), weight.double(), dilation), exact, 1e-12, 1e-12)


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (13, 9)])
@pytest.mark.parametrize("kernel, dilation", [(3, 1), (3, 5), (11, 1)])
def test_gradients_match_clamped_gather(size, kernel, dilation):
    x, weight = make(2, 3, size, kernel, dtype=torch.float64)
    dy = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(depthwise_conv2d_replicate(x, weight, dilation), (x, weight), dy)
    expected = torch.autograd.grad(clamped_gather_conv(x, weight, dilation), (x, weight), dy)
    for actual, exact in zip(grads, expected):
        assert_close(actual, exact, 1e-12, 1e-12)


def test_non_contiguous_input_gives_the_same_result():
    x, weight = make(2, 3, (6, 5), 3)
    channels_last = x.detach().to(memory_format=torch.channels_last)
    torch.testing.assert_close(
        depthwise_conv2d_replicate(channels_last, weight, 3), depthwise_conv2d_replicate(x, weight, 3)
    )


def test_runs_in_bfloat16_under_cpu_autocast():
    # The official training path runs the SASF convs under autocast in low precision (official
    # ``classification/models/spatialmamba.py`` under AMP).
    x, weight = make(1, 2, (5, 5), 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = depthwise_conv2d_replicate(x, weight, 1)
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), depthwise_conv2d_replicate(x, weight, 1), 2.0**-6, 2.0**-6)


@pytest.mark.parametrize(
    "x_shape, w_shape, dilation, match",
    [
        ((2, 3, 5), (3, 1, 3, 3), 1, r"x must be \(batch, channels, height, width\)"),
        ((1, 3, 5, 5), (3, 1, 4, 4), 1, "odd k"),
        ((1, 3, 5, 5), (3, 1, 3, 5), 1, "odd k"),
        ((1, 3, 5, 5), (3, 2, 3, 3), 1, r"\(channels, 1, k, k\)"),
        ((1, 3, 5, 5), (4, 1, 3, 3), 1, "weight has 4 channels, x has 3"),
        ((1, 3, 5, 5), (3, 1, 3, 3), 0, "dilation must be an int >= 1; got 0"),
        ((1, 3, 5, 5), (3, 1, 3, 3), 2.0, "dilation must be an int >= 1; got 2.0"),
        ((1, 3, 5, 5), (3, 1, 3, 3), True, "dilation must be an int >= 1; got True"),
        ((1, 3, 0, 5), (3, 1, 3, 3), 1, "height and width >= 1"),
    ],
)
def test_rejects_bad_arguments(x_shape, w_shape, dilation, match):
    with pytest.raises(ValueError, match=match):
        depthwise_conv2d_replicate(torch.zeros(x_shape), torch.zeros(w_shape), dilation)


def test_forced_cuda_backend_on_cpu_tensors_raises(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match=f"{backend.ENV_VAR}=cuda"):
        depthwise_conv2d_replicate(torch.zeros(1, 2, 4, 4), torch.zeros(2, 1, 3, 3))


@pytest.mark.parametrize("height, width, pad", [(1, 1, 5), (1, 7, 3), (6, 1, 1), (2, 2, 5), (9, 13, 5), (4, 5, 0)])
def test_padding_adjoint_traced_by_torch_compile_is_the_autograd_one(height, width, pad):
    """The slices-and-sums adjoint that torch.compile traces equals autograd's gradient of replicate padding (float64),
    a side of 1 and padding wider than x included."""
    from spatial_mamba.ops.dwconv2d import _replicate_pad_adjoint

    g = torch.Generator().manual_seed(height * 100 + width * 10 + pad)
    x = torch.randn(2, 3, height, width, dtype=torch.float64, generator=g, requires_grad=True)
    grad_padded = torch.randn(2, 3, height + 2 * pad, width + 2 * pad, dtype=torch.float64, generator=g)
    (expected,) = torch.autograd.grad(torch.nn.functional.pad(x, (pad,) * 4, mode="replicate"), x, grad_padded)
    torch.testing.assert_close(
        _replicate_pad_adjoint(grad_padded, pad, height, width), expected, rtol=1e-12, atol=1e-12
    )
