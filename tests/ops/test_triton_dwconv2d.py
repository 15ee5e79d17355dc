"""The Triton depthwise convolution (spatial_mamba/ops/triton_dwconv2d.py) against the pure-PyTorch reference.

With TRITON_INTERPRET=1 and SPATIAL_MAMBA_BACKEND=triton, ``depthwise_conv2d_replicate`` runs the Triton kernels on
CPU tensors through Triton's interpreter. The ``interpreted_kernels`` tests run in this process when Triton was
imported under TRITON_INTERPRET=1, else in a child pytest (``test_interpreted_tests_pass_in_a_child_process``): see
``_triton_interpreter``. The interpreter is slow (several ms per tap and tile), so the planes stay small; they cover
the state fusion's 3x3 kernels at dilations 1, 3 and 5 and its merged 11x11 kernel (SPEC §1.6), planes smaller than
the padding, and several tiles in both directions.

Ground truth: ``depthwise_conv2d_replicate_ref`` (F.conv2d on the replicate-padded input) on the same inputs cast to
float64. Tolerances, on |actual - expected| <= atol + rtol * |expected| elementwise: atol = 2e-5 * max|expected|
(the kernels compute in fp32; measured at most 2.6e-7 * max|expected|), and rtol = one rounding to the output dtype:
1e-5 for float32, 2**-11 for float16, 2**-7 for bfloat16 (Triton's interpreter truncates float32 to bfloat16).
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot run")

from spatial_mamba.ops import backend, depthwise_conv2d_replicate, triton_dwconv2d  # noqa: E402
from spatial_mamba.ops.dwconv2d import depthwise_conv2d_replicate_ref  # noqa: E402

from ._triton_interpreter import (  # noqa: E402
    assert_interpreted_tests_pass,
    assert_no_spills,
    in_parent_only,
    needs_compiler,
    needs_interpreter,
    ptxas_report,
)

ATOL_OF_MAX = 2e-5
ROUNDING = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-11}


@pytest.fixture
def triton_on_cpu(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "triton")


def assert_close_to_reference(shape, k, dilation, dtype=torch.float32, x_grad=True, weight_grad=True):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype)
    weight = torch.randn(shape[1], 1, k, k, generator=gen).to(dtype)
    grad_y = torch.randn(shape, generator=gen).to(dtype)
    assert backend.select("dwconv2d", x) is triton_dwconv2d.depthwise_conv2d_replicate_triton

    def run(conv, x, weight):
        x, weight = x.detach().clone().requires_grad_(x_grad), weight.detach().clone().requires_grad_(weight_grad)
        y = conv(x, weight, dilation)
        y.backward(grad_y.to(y.dtype))
        return y.detach(), x.grad, weight.grad

    actual = run(depthwise_conv2d_replicate, x, weight)
    expected = run(depthwise_conv2d_replicate_ref, x.double(), weight.double())
    for name, a, e in zip(("y", "dx", "dweight"), actual, expected):
        if e is None:
            assert a is None, f"{name} was computed though not asked for"
            continue
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}, expected {dtype}"
        atol = ATOL_OF_MAX * e.abs().max().item()
        torch.testing.assert_close(
            a.double(), e, rtol=ROUNDING[dtype], atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


@needs_interpreter
@pytest.mark.parametrize(
    "shape, k, dilation",
    [
        ((2, 3, 7, 9), 3, 1),
        ((2, 3, 7, 9), 3, 3),
        ((1, 2, 5, 6), 3, 5),  # the dilated taps reach past the whole plane: everything clamps
        ((1, 1, 1, 1), 3, 3),
        ((1, 1, 19, 70), 3, 1),  # 3 x 2 tiles of 8 x 64
        ((1, 1, 6, 13), 11, 1),  # the merged SASF kernel, taller than the plane
    ],
)
def test_interpreted_kernels_match_reference(triton_on_cpu, shape, k, dilation):
    assert_close_to_reference(shape, k, dilation)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interpreted_kernels_match_reference_for_half_precision(triton_on_cpu, dtype):
    assert_close_to_reference((2, 3, 7, 9), 3, 3, dtype)


@needs_interpreter
@pytest.mark.parametrize("x_grad, weight_grad", [(True, False), (False, True)])
def test_interpreted_kernels_compute_only_the_gradients_asked_for(triton_on_cpu, x_grad, weight_grad):
    assert_close_to_reference((1, 2, 5, 6), 3, 1, x_grad=x_grad, weight_grad=weight_grad)


@in_parent_only
def test_interpreted_tests_pass_in_a_child_process():
    assert_interpreted_tests_pass(__file__)


@needs_compiler
@pytest.mark.parametrize("k, dilation", [(3, 1), (3, 5), (11, 1)])
def test_kernels_compile_for_hopper_without_register_spills(tmp_path, k, dilation):
    # The interpreter accepts code that the GPU compiler rejects: compile the real kernels for sm_90 (no GPU needed).
    kernels = triton_dwconv2d._kernels()
    _, block_h, block_w = triton_dwconv2d._tiling(1, 56, 56)
    tile = {"K": k, "DILATION": dilation, "BLOCK_H": block_h, "BLOCK_W": block_w}
    ints = dict.fromkeys(("n_channels", "in_height", "in_width", "out_height", "out_width", "height", "width"), "i32")
    pad = dilation * (k // 2)
    # (kernel, constexprs, float32 pointers; the other pointers are bfloat16 inputs)
    launches = [
        (kernels.dwconv2d_kernel, {**tile, "OFFSET": 0, "REPLICATE": True}, ()),  # forward
        (kernels.dwconv2d_kernel, {**tile, "OFFSET": pad, "REPLICATE": False}, ("y_ptr",)),  # input gradient
        (kernels.dwconv2d_weight_grad_kernel, tile, ("dw_partial_ptr",)),
    ]
    for kernel, constexprs, fp32_pointers in launches:
        kinds = {**ints, **dict.fromkeys(constexprs, "constexpr"), **dict.fromkeys(fp32_pointers, "*fp32")}
        signature = {name: kinds.get(name, "*bf16") for name in kernel.arg_names}
        assert_no_spills(ptxas_report(kernel, signature, constexprs, triton_dwconv2d.NUM_WARPS, tmp_path))
