"""GPU-only checks of the compiled CUDA kernels (kernels/, registered by spatial_mamba/ops/backends/cuda/).

Needs a CUDA GPU and the built extensions (``SPATIAL_MAMBA_BUILD_CUDA=1 python setup.py build_ext --inplace``):
skipped without a GPU; on a GPU without the extensions every test fails (``tests/kernels/gpu.py``). Their numbers on
every test shape are checked with the other backends in test_backend_parity.py; this file covers what only a GPU
shows: dispatch, determinism, torch.compile and opcheck, non-default streams, misaligned pointers, and tensors beyond
2**31 elements. Ground truth and tolerances: ``tests/kernels/parity.py``; a kernel is never compared with itself.
"""

import pytest
import torch
import torch.nn.functional as F

from spatial_mamba.ops import backend, depthwise_conv2d_replicate, selective_scan_fn

from . import parity
from .gpu import require_cuda_kernels

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda_kernels():
    require_cuda_kernels()


def impl(op):
    return backend.implementation(op, "cuda")


# ---------------------------------------------------------------------------------------------- selective scan


def test_selective_scan_gradients_are_deterministic():
    inputs, dhs = parity.scan_inputs(4, 64, 3136, torch.bfloat16, device="cuda")
    first = parity.run_scan(impl("selective_scan"), inputs, True, dhs)[1]
    second = parity.run_scan(impl("selective_scan"), inputs, True, dhs)[1]
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_dispatcher_picks_cuda_for_the_model_inputs_and_hands_d_state_two_on():
    inputs, dhs = parity.scan_inputs(2, 32, 196, torch.float16, device="cuda")
    assert backend.explain("selective_scan", *inputs.values()).backend == "cuda"
    inputs2, dhs2 = parity.scan_inputs(1, 4, 16, torch.float32, device="cuda", states=2)
    choice = backend.explain("selective_scan", *inputs2.values())
    assert choice.backend == "reference" and "d_state N = 2" in choice.passed_over["cuda"][0]
    hs, grads = parity.run_scan(
        lambda u, d, A, B, b, s: selective_scan_fn(u, d, A, B, delta_bias=b, delta_softplus=s), inputs2, True, dhs2
    )
    parity.check_scan(hs, grads, inputs2, True, dhs2)


def test_selective_scan_handles_misaligned_inputs():
    # B from torch.split with a storage offset, as the model's batch-1 B: the kernels must take the scalar path.
    inputs, dhs = parity.scan_inputs(1, 16, 3136, torch.bfloat16, device="cuda")
    storage = torch.empty(inputs["B"].numel() + 1, device="cuda", dtype=torch.bfloat16)
    shifted = storage[1:].view_as(inputs["B"])
    shifted.copy_(inputs["B"])
    assert shifted.data_ptr() % 16 != 0
    hs, grads = parity.run_scan(impl("selective_scan"), {**inputs, "B": shifted}, True, dhs)
    parity.check_scan(hs, grads, inputs, True, dhs)


@pytest.mark.slow
def test_selective_scan_beyond_two_to_the_31_elements():
    # 32768 x 66,600 = 2.2e9 elements (a 1333x800 detection row at stride 4); rows are independent, so the last rows
    # of the result are compared with the float64 loop on those rows alone.
    batch, channels, length = 1, 32768, 66_600
    assert batch * channels * length > 2**31
    inputs, dhs = parity.scan_inputs(batch, 8, length, torch.bfloat16, device="cuda", seed=3)
    big = {
        "u": inputs["u"].repeat(1, channels // 8, 1),
        "delta": inputs["delta"].repeat(1, channels // 8, 1),
        "A": inputs["A"].repeat(channels // 8, 1),
        "B": inputs["B"],
        "delta_bias": inputs["delta_bias"].repeat(channels // 8),
    }
    with torch.no_grad():
        hs = impl("selective_scan")(*big.values(), True)
    del big
    tail = hs[:, -8:].float()
    expected = parity.sequential_scan(*(v.double().cpu() for v in inputs.values()), True)
    parity.assert_close(tail, expected, parity.ROUNDING[torch.float32], parity.ATOL_OF_MAX, "hs of the last rows")


def test_selective_scan_compiles_without_graph_breaks():
    inputs, dhs = parity.scan_inputs(2, 16, 196, torch.float32, device="cuda")
    scan = impl("selective_scan")
    compiled = torch.compile(lambda *args: scan(*args) * 2.0, fullgraph=True)
    hs = compiled(*inputs.values(), True)
    expected = parity.sequential_scan(*(None if v is None else v.cpu() for v in inputs.values()), True) * 2.0
    parity.assert_close(hs, expected, parity.ROUNDING[torch.float32], parity.ATOL_OF_MAX, "compiled hs")


@pytest.mark.parametrize("dtype", parity.DTYPES, ids=str)
def test_selective_scan_custom_ops_pass_opcheck(dtype):
    inputs, dhs = parity.scan_inputs(2, 8, 100, dtype, device="cuda")
    fwd_args = tuple(v.requires_grad_() if v.is_floating_point() else v for v in inputs.values()) + (True,)
    torch.library.opcheck(torch.ops.spatial_mamba.selective_scan_cuda_fwd.default, fwd_args)
    hs = torch.ops.spatial_mamba.selective_scan_cuda_fwd(*[a.detach() if torch.is_tensor(a) else a for a in fwd_args])
    bwd_args = tuple(v.detach() for v in inputs.values()) + (True, hs, dhs)
    torch.library.opcheck(torch.ops.spatial_mamba.selective_scan_cuda_bwd.default, bwd_args)


# ------------------------------------------------------------------------------------------------ depthwise conv


def test_dwconv2d_merged_kernel_equals_three_dilated_branches():
    """With replicate padding, one 11x11 conv of the merged taps equals the three 3x3 branches (paper Eq. 4)."""
    x, _, _ = parity.conv_inputs(2, 8, 56, 56, 3, torch.float32, device="cuda")
    kernels = [torch.randn(8, 1, 3, 3, device="cuda") for _ in range(3)]
    merged = torch.zeros(8, 1, 11, 11, device="cuda")
    for k, d in zip(kernels, (1, 3, 5)):
        merged[:, :, 5 - d : 6 + d : d, 5 - d : 6 + d : d] += k
    expected = sum(
        parity.clamped_gather_conv(x.double().cpu(), k.double().cpu(), d) for k, d in zip(kernels, (1, 3, 5))
    )
    parity.assert_close(impl("dwconv2d")(x, merged, 1), expected, 0.0, parity.ATOL_OF_MAX, "merged")


def test_dispatcher_picks_cuda_for_the_conv_and_hands_kernel_size_13_on():
    x, weight, dy = parity.conv_inputs(2, 8, 28, 28, 3, torch.float16, device="cuda")
    assert backend.explain("dwconv2d", x, weight).backend == "cuda"
    x, weight, dy = parity.conv_inputs(1, 2, 16, 16, 13, torch.float32, device="cuda")
    choice = backend.explain("dwconv2d", x, weight)
    assert choice.backend != "cuda" and "kernel size 13" in choice.passed_over["cuda"][0]
    y, dx, dw = parity.run_conv(depthwise_conv2d_replicate, x, weight, 1, dy)
    parity.check_conv(y, dx, dw, x, weight, 1, dy)


def test_dwconv2d_gradients_are_deterministic():
    x, weight, dy = parity.conv_inputs(8, 16, 56, 56, 3, torch.float16, device="cuda")
    first = parity.run_conv(impl("dwconv2d"), x, weight, 3, dy)
    second = parity.run_conv(impl("dwconv2d"), x, weight, 3, dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_dwconv2d_compiles_without_graph_breaks():
    x, weight, _ = parity.conv_inputs(2, 8, 14, 14, 11, torch.float32, device="cuda")
    conv = impl("dwconv2d")
    compiled = torch.compile(lambda a, w: F.gelu(conv(a, w, 1)), fullgraph=True)
    expected = F.gelu(parity.clamped_gather_conv(x.double().cpu(), weight.double().cpu(), 1))
    parity.assert_close(compiled(x, weight), expected, parity.ROUNDING[torch.float32], parity.ATOL_OF_MAX, "compiled")


@pytest.mark.parametrize("dtype", parity.DTYPES, ids=str)
@pytest.mark.parametrize("kernel_size, dilation", [(3, 3), (11, 1)], ids=str)
def test_dwconv2d_custom_ops_pass_opcheck(kernel_size, dilation, dtype):
    x, weight, dy = parity.conv_inputs(2, 4, 9, 12, kernel_size, dtype, device="cuda")
    ops = torch.ops.spatial_mamba
    torch.library.opcheck(ops.dwconv2d_cuda_fwd.default, (x.requires_grad_(), weight.requires_grad_(), dilation))
    torch.library.opcheck(ops.dwconv2d_cuda_dgrad.default, (dy, weight.detach(), dilation))
    torch.library.opcheck(ops.dwconv2d_cuda_wgrad.default, (dy, x.detach(), kernel_size, dilation))


# -------------------------------------------------------------------------------------------- fused observation


def test_fused_observation_gradients_are_deterministic():
    # The detection shape: 14 channel groups whose dC partials, and per-tile dtaps and dD partials, the binding sums.
    inputs = parity.observation_inputs(2, 192, 200, 334, torch.float32, torch.bfloat16, device="cuda")
    first = parity.run_observation(impl("fused_observation"), *inputs)
    second = parity.run_observation(impl("fused_observation"), *inputs)
    assert torch.equal(first[0], second[0])
    for name, a, b in zip(("dh", "dtaps", "dC", "du", "dD"), first[1], second[1]):
        assert torch.equal(a, b), name


def test_fused_observation_compiles_without_graph_breaks():
    h, taps, C, u, D, _ = parity.observation_inputs(2, 4, 14, 14, torch.float32, device="cuda")
    fused = impl("fused_observation")
    compiled = torch.compile(lambda *args: F.gelu(fused(*args)), fullgraph=True)
    expected = F.gelu(parity.gather_observation(*(t.double().cpu() for t in (h, taps, C, u, D))))
    actual = compiled(h, taps, C, u, D)
    parity.assert_close(actual, expected, parity.ROUNDING[torch.float32], parity.ATOL_OF_MAX, "compiled")


@pytest.mark.parametrize(
    "dtype, u_dtype",
    [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.float16)],
    ids=str,
)
def test_fused_observation_custom_ops_pass_opcheck(dtype, u_dtype):
    h, taps, C, u, D, dy = parity.observation_inputs(2, 3, 9, 40, dtype, u_dtype, device="cuda")
    ops = torch.ops.spatial_mamba
    leaves = tuple(t.detach().clone().requires_grad_() for t in (h, taps, C, u, D))
    torch.library.opcheck(ops.fused_observation_cuda_fwd.default, leaves)
    needs = (True, False, True, False, True)  # dh, dC and dD only
    torch.library.opcheck(ops.fused_observation_cuda_bwd.default, (h, taps, C, u, D, dy, *needs))


# ------------------------------------------------------------------------------------------------- state fusion


@pytest.mark.parametrize("dtype", parity.DTYPES, ids=str)
def test_state_fusion_custom_ops_pass_opcheck(dtype):
    h, taps, dy = parity.fusion_inputs(2, 3, 9, 40, dtype, device="cuda")
    ops = torch.ops.spatial_mamba
    leaves = tuple(t.detach().clone().requires_grad_() for t in (h, taps))
    torch.library.opcheck(ops.state_fusion_cuda_fwd.default, leaves)
    torch.library.opcheck(ops.state_fusion_cuda_bwd.default, (h, taps, dy, True, True))
    torch.library.opcheck(ops.state_fusion_cuda_bwd.default, (h, taps, dy, True, False))


def test_state_fusion_compiles_without_graph_breaks_forward_and_backward():
    h, taps, dy = parity.fusion_inputs(2, 4, 14, 14, torch.float32, device="cuda")
    fusion = impl("state_fusion")
    compiled = torch.compile(lambda h, taps: F.gelu(fusion(h, taps)), fullgraph=True)
    out, dh, dtaps = parity.run_fusion(compiled, h, taps, dy)
    expected, dh_ref, dtaps_ref = parity.run_fusion(
        lambda h, taps: F.gelu(parity.gather_fusion(h, taps)), h.double().cpu(), taps.double().cpu(), dy.cpu()
    )
    parity.assert_close(out, expected, parity.ROUNDING[torch.float32], parity.ATOL_OF_MAX, "out")
    parity.assert_close(dh, dh_ref, parity.ROUNDING[torch.float32], parity.ATOL_OF_MAX, "dh")
    parity.assert_close(dtaps, dtaps_ref, 0.0, parity.REDUCTION_ATOL_OF_MAX, "dtaps")


def test_every_op_runs_on_a_non_default_stream():
    """Each kernel must launch on the current stream. On a side stream kept busy by a long fill, every input is
    produced by an op queued behind that fill, so a kernel launched on the default stream would read it unwritten."""
    stream = torch.cuda.Stream()
    filler = torch.empty(2**28, device="cuda")  # 1 GiB of random numbers per fill
    fusion = parity.fusion_inputs(2, 8, 56, 56, torch.float32)
    observation = parity.observation_inputs(2, 8, 28, 28, torch.float32, torch.bfloat16)
    scan, dhs = parity.scan_inputs(2, 16, 3136, torch.bfloat16)
    on_gpu = [t.cuda() for t in fusion] + [t.cuda() for t in observation] + [dhs.cuda()]
    scan_on_gpu = {name: t.cuda() if isinstance(t, torch.Tensor) else t for name, t in scan.items()}
    torch.cuda.synchronize()

    def behind_the_fill(tensors):
        filler.normal_()
        return [t * 1 for t in tensors]

    with torch.cuda.stream(stream):
        fused = parity.run_fusion(impl("state_fusion"), *behind_the_fill(on_gpu[:3]))
        observed = parity.run_observation(impl("fused_observation"), *behind_the_fill(on_gpu[3:9]))
        filler.normal_()
        scan_inputs = {name: t * 1 if isinstance(t, torch.Tensor) else t for name, t in scan_on_gpu.items()}
        scanned = parity.run_scan(impl("selective_scan"), scan_inputs, True, on_gpu[9] * 1)
    stream.synchronize()
    parity.check_fusion(*fused, *fusion)
    parity.check_observation(*observed, *observation)
    parity.check_scan(*scanned, scan, True, dhs)
