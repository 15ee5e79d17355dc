"""The compiled CUDA kernels (kernels/, registered by spatial_mamba/ops/_cuda.py) against the pure-PyTorch reference.

Needs a CUDA GPU and the built extensions (``SPATIAL_MAMBA_BUILD_CUDA=1 python setup.py build_ext --inplace``);
everything here is skipped otherwise. Ground truth and tolerances: see ``tests/kernels/common.py``.
"""

import pytest
import torch
import torch.nn.functional as F

from spatial_mamba.ops import backend, depthwise_conv2d_replicate, selective_scan_fn

from .common import ATOL_OF_MAX, DTYPES, assert_close, check_conv, check_scan, run_conv, run_scan
from .common import conv_inputs as _conv_inputs
from .common import scan_inputs as _scan_inputs


def _cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    return all(backend._REGISTRY[op]["cuda"].available()[0] for op in ("selective_scan", "dwconv2d"))


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA GPU and the built extension"),
]


def impl(op, name):
    return backend._REGISTRY[op][name].fn


def scan_inputs(*args):
    return _scan_inputs(*args, device="cuda")


def conv_inputs(*args):
    return _conv_inputs(*args, device="cuda")


# ---------------------------------------------------------------------------------------------- selective scan

# Token counts of the four stages of Spatial-Mamba-T at 224 (SPEC §1.8): (batch, D, L), then odd and long rows.
STAGE_SHAPES = [(2, 128, 3136), (2, 256, 784), (2, 512, 196), (2, 1024, 49)]
ODD_SHAPES = [(1, 3, 1), (2, 5, 7), (1, 9, 64), (1, 16, 65), (2, 24, 257), (3, 7, 1001)]
LONG_SHAPE = (1, 4, 66_600)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", STAGE_SHAPES + ODD_SHAPES + [LONG_SHAPE], ids=str)
@pytest.mark.parametrize("delta_softplus, with_bias", [(True, True), (False, False)], ids=["softplus", "plain"])
def test_selective_scan_matches_reference(shape, dtype, delta_softplus, with_bias):
    inputs, dhs = scan_inputs(*shape, dtype, delta_softplus, with_bias)
    hs, grads = run_scan(impl("selective_scan", "cuda"), inputs, delta_softplus, dhs)
    check_scan(hs, grads, inputs, delta_softplus, dhs)


def test_selective_scan_gradients_are_deterministic():
    inputs, dhs = scan_inputs(4, 64, 3136, torch.bfloat16, True, True)
    first = run_scan(impl("selective_scan", "cuda"), inputs, True, dhs)[1]
    second = run_scan(impl("selective_scan", "cuda"), inputs, True, dhs)[1]
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_selective_scan_fn_dispatches_to_cuda(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    inputs, _ = scan_inputs(2, 32, 196, torch.float16, True, True)
    hs = selective_scan_fn(
        inputs["u"], inputs["delta"], inputs["A"], inputs["B"], delta_bias=inputs["delta_bias"], delta_softplus=True
    )
    direct = impl("selective_scan", "cuda")(*inputs.values(), True)
    assert torch.equal(hs, direct)


def test_selective_scan_cuda_rejects_d_state_above_one():
    inputs, _ = scan_inputs(1, 4, 16, torch.float32, True, True)
    A = inputs["A"].expand(4, 2).contiguous()
    B = inputs["B"].expand(1, 2, 16).contiguous()
    with pytest.raises(ValueError, match="N = 1"):
        impl("selective_scan", "cuda")(inputs["u"], inputs["delta"], A, B, inputs["delta_bias"], True)


def test_selective_scan_compiles_without_graph_breaks():
    inputs, dhs = scan_inputs(2, 16, 196, torch.float32, True, True)
    scan = impl("selective_scan", "cuda")
    compiled = torch.compile(lambda *args: scan(*args) * 2.0, fullgraph=True)
    hs = compiled(*inputs.values(), True)
    assert torch.equal(hs, scan(*inputs.values(), True) * 2.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_selective_scan_custom_ops_pass_opcheck(dtype):
    inputs, dhs = scan_inputs(2, 8, 100, dtype, True, True)
    fwd_args = tuple(v.requires_grad_() if v.is_floating_point() else v for v in inputs.values()) + (True,)
    torch.library.opcheck(torch.ops.spatial_mamba.selective_scan_cuda_fwd.default, fwd_args)
    hs = torch.ops.spatial_mamba.selective_scan_cuda_fwd(*[a.detach() if torch.is_tensor(a) else a for a in fwd_args])
    bwd_args = tuple(v.detach() for v in inputs.values()) + (True, hs, dhs)
    torch.library.opcheck(torch.ops.spatial_mamba.selective_scan_cuda_bwd.default, bwd_args)


# ------------------------------------------------------------------------------------------------ depthwise conv

# (batch, C, H, W): the SASF planes of the four stages at 224, then odd, non-square, thin and one-pixel planes.
CONV_SHAPES = [
    (2, 8, 56, 56),
    (2, 16, 28, 28),
    (2, 32, 14, 14),
    (2, 64, 7, 7),
    (2, 3, 13, 37),
    (1, 2, 1, 1),
    (1, 2, 2, 3),
    (1, 4, 64, 5),
    (3, 2, 5, 70),
]
# (kernel size, dilation): the three SASF training branches, the merged eval kernel, and the other compiled sizes.
CONV_KERNELS = [(3, 1), (3, 3), (3, 5), (11, 1), (5, 2), (7, 1), (9, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel_size, dilation", CONV_KERNELS, ids=str)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=str)
def test_dwconv2d_matches_reference(shape, kernel_size, dilation, dtype):
    x, weight, dy = conv_inputs(*shape, kernel_size, dtype)
    y, dx, dw = run_conv(impl("dwconv2d", "cuda"), x, weight, dilation, dy)
    check_conv(y, dx, dw, x, weight, dilation, dy)


def test_dwconv2d_merged_kernel_equals_three_dilated_branches():
    """SPEC §1.6: with replicate padding, one 11x11 conv of the merged taps equals the three 3x3 branches."""
    x, _, _ = conv_inputs(2, 8, 56, 56, 3, torch.float32)
    kernels = [torch.randn(8, 1, 3, 3, device="cuda") for _ in range(3)]
    branches = sum(depthwise_conv2d_replicate(x, k, dilation=d) for k, d in zip(kernels, (1, 3, 5)))
    merged = torch.zeros(8, 1, 11, 11, device="cuda")
    for k, d in zip(kernels, (1, 3, 5)):
        merged[:, :, 5 - d : 6 + d : d, 5 - d : 6 + d : d] += k
    conv = impl("dwconv2d", "cuda")
    assert_close(conv(x, merged, 1), branches, 0.0, ATOL_OF_MAX, "merged")


def test_dwconv2d_fn_dispatches_to_cuda(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    x, weight, _ = conv_inputs(2, 8, 28, 28, 3, torch.float16)
    assert torch.equal(depthwise_conv2d_replicate(x, weight, 3), impl("dwconv2d", "cuda")(x, weight, 3))


def test_dwconv2d_cuda_rejects_kernel_sizes_without_kernels():
    x, weight, _ = conv_inputs(1, 2, 16, 16, 13, torch.float32)
    with pytest.raises(ValueError, match="kernel sizes"):
        impl("dwconv2d", "cuda")(x, weight, 1)


def test_dwconv2d_gradients_are_deterministic():
    x, weight, dy = conv_inputs(8, 16, 56, 56, 3, torch.float16)
    first = run_conv(impl("dwconv2d", "cuda"), x, weight, 3, dy)
    second = run_conv(impl("dwconv2d", "cuda"), x, weight, 3, dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_dwconv2d_compiles_without_graph_breaks():
    x, weight, _ = conv_inputs(2, 8, 14, 14, 11, torch.float32)
    conv = impl("dwconv2d", "cuda")
    compiled = torch.compile(lambda a, w: F.gelu(conv(a, w, 1)), fullgraph=True)
    assert_close(compiled(x, weight), F.gelu(conv(x, weight, 1)), 0.0, ATOL_OF_MAX, "compiled")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel_size, dilation", [(3, 3), (11, 1)], ids=str)
def test_dwconv2d_custom_ops_pass_opcheck(kernel_size, dilation, dtype):
    x, weight, dy = conv_inputs(2, 4, 9, 12, kernel_size, dtype)
    ops = torch.ops.spatial_mamba
    torch.library.opcheck(ops.dwconv2d_cuda_fwd.default, (x.requires_grad_(), weight.requires_grad_(), dilation))
    torch.library.opcheck(ops.dwconv2d_cuda_dgrad.default, (dy, weight.detach(), dilation))
    torch.library.opcheck(ops.dwconv2d_cuda_wgrad.default, (dy, x.detach(), kernel_size, dilation))
