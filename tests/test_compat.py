"""spatial_mamba.compat on the torch that runs the tests: the pinned one, and torch 2.1 in the compatibility leg of
tools/run_tests.sh, where the fallbacks are the code under test."""

import warnings

import pytest
import torch

from spatial_mamba import compat


def _scaled_op():
    """y = 3·x through compat.custom_op, computed on a detached tensor: a gradient can only come from the registered
    backward."""

    @compat.custom_op("scale_by_three_for_tests", mutates_args=())
    def scale(x: torch.Tensor) -> torch.Tensor:
        return x.detach() * 3

    @scale.register_fake
    def _(x):
        return torch.empty_like(x)

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, grad):
        return grad * 3

    scale.register_autograd(backward, setup_context=setup_context)
    return scale


SCALE = _scaled_op()


def test_custom_op_runs_and_differentiates_through_its_registered_backward():
    x = torch.randn(4, requires_grad=True)
    y = SCALE(x)
    torch.testing.assert_close(y, x.detach() * 3)
    (grad,) = torch.autograd.grad(y, x, torch.arange(4.0))
    torch.testing.assert_close(grad, torch.arange(4.0) * 3)


def test_unavailable_says_once_which_torch_a_feature_needs_and_raises_when_asked():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.unavailable("a test feature", "torch >= 99.0", "nothing happens")
        compat.unavailable("a test feature", "torch >= 99.0", "nothing happens")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("spatial_mamba: a test feature needs torch >= 99.0 (this is torch ")
    assert "\n" not in message and message.endswith("; nothing happens")
    with pytest.raises(RuntimeError, match=r"another feature needs torch >= 99\.0"):
        compat.unavailable("another feature", "torch >= 99.0", error=True)


def test_autocast_dtype_follows_the_cpu_autocast_state():
    assert compat.autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compat.autocast_dtype("cpu") == torch.bfloat16
    assert compat.autocast_dtype("cpu") is None


def test_float16_on_the_cpu_works_or_names_the_torch_it_needs():
    x, w = torch.randn(1, 2, 5, 5).half(), torch.randn(2, 1, 3, 3).half()
    from spatial_mamba.ops import depthwise_conv2d_replicate

    if compat.cpu_float16():
        assert depthwise_conv2d_replicate(x, w).dtype == torch.float16
    else:
        with pytest.raises(RuntimeError, match=r"float16 tensors on the CPU needs torch >= 2\.2"):
            depthwise_conv2d_replicate(x, w)


def test_fx_tracing_flag_is_set_only_while_fx_traces():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(compat.is_fx_tracing())
            return x + 1

    Probe()(torch.zeros(1))
    torch.fx.symbolic_trace(Probe())
    assert seen == [False, True]
