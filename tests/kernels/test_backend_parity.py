"""Every registered backend of every op against one independent float64 definition: one parity test per op.

Each test forces one backend with ``backend.force`` (and checks that the dispatcher picked it), runs the op's public
entry point forward and backward, and compares with ``tests/kernels/parity.py`` (inputs, tolerance table and float64
references). Backends:
- ``reference``: always, on CPU tensors (on the GPU when there is one);
- ``triton``: on the GPU when there is one, else on CPU tensors in Triton's interpreter. Triton reads TRITON_INTERPRET
  only when it is imported, so without a GPU those tests run in a child pytest started with TRITON_INTERPRET=1
  (``test_interpreted_triton_backend_passes_in_a_child_process``), about a minute on 2 cores;
- ``cuda``: on a GPU with the extension built, else skipped (the CUDA source is checked on the CPU by
  test_cuda_emulated.py);
- ``cpu``: the compiled CPU kernels, on CPU tensors, float32 only (other dtypes are the reference's: the backend
  declines them, tested in test_dispatch.py). Its own paths (planes smaller than the halo, widths around its vector
  width, row blocks, channel groups, thread counts) have the cases of ``CPU_FUSION_CASES``.
The interpreter is slow (tens of microseconds per element and tap), so CPU shapes stay small; they still cover one
position/pixel, chunk and tile boundaries, masked channels, planes smaller than the halo and non-square planes. GPUs
add the model's stage shapes and long rows.
"""

import inspect
import os

import pytest
import torch

from spatial_mamba import compat
from spatial_mamba.ops import backend, depthwise_conv2d_replicate, selective_scan_fn
from spatial_mamba.ops.backends.triton.selective_scan import triton_installed

from . import parity
from .gpu import require_cuda_kernels

HAS_TRITON, TRITON_WHY = triton_installed()  # the triton tests skip without a usable Triton, saying why
if HAS_TRITON:
    from tests.ops._triton_interpreter import INTERPRETED, assert_interpreted_tests_pass
else:
    INTERPRETED = False

GPU = torch.cuda.is_available()
THIS_FILE = os.path.abspath(__file__)


def _backend_params():
    params = []
    for name in backend.BACKENDS:
        marks = []
        if name == "cuda" and not GPU:
            marks.append(pytest.mark.skip(reason="needs a CUDA GPU (the emulation tests cover the CUDA source)"))
        if name == "triton" and not HAS_TRITON:
            marks.append(pytest.mark.skip(reason=TRITON_WHY))
        elif name == "triton" and not GPU and not INTERPRETED:
            marks.append(pytest.mark.skip(reason="no GPU: runs in the interpreter, in a child process"))
        if name != "triton" and INTERPRETED:
            marks.append(pytest.mark.skip(reason="triton was imported with TRITON_INTERPRET=1: triton tests only"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


BACKEND_PARAMS = _backend_params()


def device_for(name: str) -> str:
    if name == "cpu":
        return "cpu"
    return "cuda" if GPU and not (name == "triton" and INTERPRETED) else "cpu"


def require(op: str, name: str, *tensors):
    """Skips when ``name`` has no implementation of ``op`` or cannot run here; checks that the dispatcher picks it."""
    if name not in backend.registered(op):
        pytest.skip(f"no {name} implementation of {op} is registered")
    if name == "cuda":
        require_cuda_kernels(op)
    ok, why = backend.is_available(op, name)
    if not ok:
        pytest.skip(f"{name} is unavailable here: {why}")
    if name == "cpu" and any(t is not None and t.dtype != torch.float32 for t in tensors):
        pytest.skip("the cpu backend takes float32 only (the reference runs the other dtypes)")
    if op == "dwconv2d" and tensors[0].dtype == torch.float16 and tensors[0].device.type == "cpu":
        if not compat.cpu_float16():
            pytest.skip(f"torch {torch.__version__} has no float16 convolution on the CPU (torch >= 2.2)")
    with backend.force(name, op):
        assert backend.explain(op, *tensors).backend == name


# ---------------------------------------------------------------------------------------------- selective scan

SCAN_SHAPES = [(2, 3, 1), (2, 40, 7), (1, 5, 100), (2, 3, 256), (1, 3, 515), (1, 2, 1000)]
# The four stages of Spatial-Mamba-T at 224, odd rows with idle warps, and a 1333x800 detection row at stride 4.
GPU_SCAN_SHAPES = [(2, 128, 3136), (2, 256, 784), (2, 512, 196), (2, 1024, 49), (2, 24, 257), (3, 7, 1001)]
GPU_SCAN_SHAPES += [(1, 4, 66_600), (2, 128, 66_600)]
SCAN_CASES = [(shape, torch.float32, True, True) for shape in SCAN_SHAPES]
SCAN_CASES += [((2, 3, 7), dtype, True, True) for dtype in (torch.float16, torch.bfloat16)]
SCAN_CASES += [((2, 3, 515), dtype, True, True) for dtype in (torch.float16, torch.bfloat16)]
SCAN_CASES += [((2, 3, 300), torch.float32, softplus, bias) for softplus, bias in [(False, False), (True, False)]]
if GPU:
    SCAN_CASES += [(shape, dtype, True, True) for shape in GPU_SCAN_SHAPES for dtype in parity.DTYPES]
    SCAN_CASES += [((2, 16, 3136), torch.bfloat16, False, False)]


def public_scan(u, delta, A, B, delta_bias, delta_softplus):
    return selective_scan_fn(u, delta, A, B, delta_bias=delta_bias, delta_softplus=delta_softplus)


@pytest.mark.parametrize("name", BACKEND_PARAMS)
@pytest.mark.parametrize("shape, dtype, softplus, bias", SCAN_CASES, ids=str)
def test_selective_scan_parity(name, shape, dtype, softplus, bias):
    inputs, dhs = parity.scan_inputs(*shape, dtype, softplus, bias, device=device_for(name))
    require("selective_scan", name, *inputs.values())
    with backend.force(name, "selective_scan"):
        hs, grads = parity.run_scan(public_scan, inputs, softplus, dhs)
    parity.check_scan(hs, grads, inputs, softplus, dhs)


# Long memory (parity.scan_inputs(memory="long"): no state resets, the model's slowest initial decays): rounding in
# the decays accumulates along the whole row. Measured here (max |error| / max |value|, float32): reference 6.9e-7,
# cpu 1.6e-6 on a 66,600-token row; the tolerance is check_scan's 2e-5.
LONG_SCAN_CASES = [((1, 4, 66_600), torch.float32), ((2, 16, 3136), torch.bfloat16)]
if GPU:
    LONG_SCAN_CASES += [((2, 128, 66_600), dtype) for dtype in parity.DTYPES]


@pytest.mark.parametrize("name", BACKEND_PARAMS)
@pytest.mark.parametrize("shape, dtype", LONG_SCAN_CASES, ids=str)
def test_selective_scan_long_memory_parity(name, shape, dtype):
    inputs, dhs = parity.scan_inputs(*shape, dtype, device=device_for(name), memory="long")
    require("selective_scan", name, *inputs.values())
    with backend.force(name, "selective_scan"):
        hs, grads = parity.run_scan(public_scan, inputs, True, dhs)
    parity.check_scan(hs, grads, inputs, True, dhs)


@pytest.mark.skipif(not HAS_TRITON, reason=TRITON_WHY)
@pytest.mark.skipif(not GPU and not INTERPRETED, reason="no GPU: runs in the interpreter, in a child process")
def test_triton_scan_backward_is_deterministic():
    """dB sums over channel blocks: the Triton backward writes one partial row per block and sums them in a fixed
    order (an atomic add would be the only nondeterministic backward, and invisible to
    torch.use_deterministic_algorithms). 40 channels make several channel blocks."""
    from spatial_mamba.ops.backends.triton import selective_scan as triton_scan
    from spatial_mamba.ops.backends.triton import selective_scan_kernels as _triton_scan_kernels

    assert "tl.atomic" not in inspect.getsource(_triton_scan_kernels)
    inputs, dhs = parity.scan_inputs(2, 40, 300, torch.float32, device=device_for("triton"))
    assert triton_scan._launch_config(inputs["u"])[1][1] > 1  # several channel blocks
    first, second = (parity.run_scan(triton_scan.selective_scan_triton, inputs, True, dhs)[1] for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


# Split rows of the Triton scan (segments scanned by programs of their own; the CUDA kernels' split rows are checked
# in test_cuda_emulated.py): (batch, D, L), segments, dtype, softplus and bias. A ragged last segment (1000 = 3 x 256
# + 232) with a masked channel (3 channels in programs of 2), a last segment of one token (257) without softplus and
# bias, and float16 rows over three channel programs. The split rule itself: tests/ops/test_triton_scan.py.
TRITON_SPLIT_CASES = [
    ((1, 3, 1000), 4, torch.float32, True),
    ((2, 3, 257), 2, torch.bfloat16, False),
    ((1, 5, 1001), 4, torch.float16, True),
]
if GPU:
    TRITON_SPLIT_CASES += [((2, 128, 66_600), 4, dtype, True) for dtype in parity.DTYPES]


@pytest.mark.skipif(not HAS_TRITON, reason=TRITON_WHY)
@pytest.mark.skipif(not GPU and not INTERPRETED, reason="no GPU: runs in the interpreter, in a child process")
@pytest.mark.parametrize("shape, segments, dtype, softplus", TRITON_SPLIT_CASES, ids=str)
def test_triton_split_rows_parity(shape, segments, dtype, softplus):
    from spatial_mamba.ops.backends.triton import selective_scan as triton_scan

    inputs, dhs = parity.scan_inputs(*shape, dtype, softplus, softplus, device=device_for("triton"))

    def split_scan(u, delta, A, B, delta_bias, delta_softplus):
        return triton_scan._SelectiveScanTriton.apply(u, delta, A, B, delta_bias, delta_softplus, segments)

    hs, grads = parity.run_scan(split_scan, inputs, softplus, dhs)
    parity.check_scan(hs, grads, inputs, softplus, dhs)


# ------------------------------------------------------------------------------------------------ depthwise conv

# (batch, C, H, W, kernel size, dilation): the SASF branches (3x3 at dilations 1, 3, 5) and the merged 11x11 kernel,
# planes smaller than the padding, one pixel, several tiles in both directions.
CONV_CASES = [
    ((2, 3, 7, 9, 3, 1), torch.float32),
    ((2, 3, 7, 9, 3, 3), torch.float32),
    ((1, 2, 5, 6, 3, 5), torch.float32),
    ((1, 1, 1, 1, 3, 3), torch.float32),
    ((1, 1, 19, 70, 3, 1), torch.float32),
    ((1, 1, 6, 13, 11, 1), torch.float32),
    ((2, 3, 7, 9, 3, 3), torch.bfloat16),
    ((2, 3, 7, 9, 3, 3), torch.float16),
]
if GPU:
    planes = [(2, 8, 56, 56), (2, 16, 28, 28), (2, 64, 7, 7), (2, 3, 13, 37), (1, 2, 2, 3), (3, 2, 5, 70)]
    CONV_CASES += [
        ((*plane, k, d), dtype)
        for plane in planes
        for k, d in [(3, 1), (3, 3), (3, 5), (11, 1), (5, 2)]
        for dtype in parity.DTYPES
    ]


@pytest.mark.parametrize("name", BACKEND_PARAMS)
@pytest.mark.parametrize("case, dtype", CONV_CASES, ids=str)
def test_dwconv2d_parity(name, case, dtype):
    *shape, k, dilation = case
    x, weight, dy = parity.conv_inputs(*shape, k, dtype, device=device_for(name))
    require("dwconv2d", name, x, weight)
    with backend.force(name, "dwconv2d"):
        y, dx, dw = parity.run_conv(depthwise_conv2d_replicate, x, weight.to(dtype), dilation, dy)
    # The public op takes the weight in x's dtype, as the model passes it.
    low = ("dwconv2d", name) in parity.LOW_PRECISION_COMPUTE
    parity.check_conv(y, dx, dw, x, weight.to(dtype), dilation, dy, low_precision_compute=low)


# -------------------------------------------------------------------------------------------------- state fusion

# (batch, C, H, W): a plane inside one tile, one pixel, one row, one column, planes within the halo of 5 in one or
# both directions, several tiles across.
# Two planes where the channel matters (taps per channel), one elsewhere: the interpreter runs programs one by one.
FUSION_CASES = [
    ((1, 2, 7, 9), torch.float32),
    ((1, 1, 1, 1), torch.float32),
    ((1, 1, 1, 6), torch.float32),
    ((1, 1, 12, 1), torch.float32),
    ((2, 1, 6, 4), torch.float32),
    ((1, 1, 13, 70), torch.float32),
    ((1, 1, 7, 9), torch.bfloat16),
    ((1, 1, 7, 9), torch.float16),
]
if GPU:
    planes = [(2, 8, 56, 56), (2, 16, 28, 28), (2, 32, 14, 14), (2, 64, 7, 7), (3, 2, 5, 70), (1, 4, 200, 334)]
    FUSION_CASES += [(plane, dtype) for plane in planes for dtype in parity.DTYPES]


def public_fusion(h, taps):
    return backend.select("state_fusion", h, taps)(h, taps)


@pytest.mark.parametrize("name", BACKEND_PARAMS)
@pytest.mark.parametrize("shape, dtype", FUSION_CASES, ids=str)
def test_state_fusion_parity(name, shape, dtype):
    h, taps, dy = parity.fusion_inputs(*shape, dtype, device=device_for(name))
    require("state_fusion", name, h, taps)
    with backend.force(name, "state_fusion"):
        out, dh, dtaps = parity.run_fusion(public_fusion, h, taps, dy)
    parity.check_fusion(out, dh, dtaps, h, taps, dy)


# ----------------------------------------------------------------------------------------------- fused observation

# (batch, C, H, W), dtype of h, dtype of u and C: the fusion's borders and tiles again, now with the observation's
# per-pixel C (shared by the channels: its gradient sums over them) and per-channel D; u in a 16-bit dtype beside
# float32 states, as under autocast (the scan's states are float32).
OBSERVATION_CASES = [
    ((1, 2, 7, 9), torch.float32, torch.float32),
    ((1, 1, 1, 1), torch.float32, torch.float32),
    ((2, 3, 6, 4), torch.float32, torch.float32),
    ((1, 1, 13, 70), torch.float32, torch.float32),
    ((1, 2, 7, 9), torch.float32, torch.bfloat16),
    ((1, 1, 7, 9), torch.float16, torch.float16),
]
if GPU:
    planes = [(2, 8, 56, 56), (2, 64, 7, 7), (3, 2, 5, 70), (1, 4, 200, 334)]
    OBSERVATION_CASES += [(plane, torch.float32, u_dtype) for plane in planes for u_dtype in parity.DTYPES]
    OBSERVATION_CASES += [((2, 8, 28, 28), dtype, dtype) for dtype in (torch.float16, torch.bfloat16)]


def public_observation(h, taps, C, u, D):
    return backend.select("fused_observation", h, taps, C, u, D)(h, taps, C, u, D)


@pytest.mark.parametrize("name", BACKEND_PARAMS)
@pytest.mark.parametrize("shape, dtype, u_dtype", OBSERVATION_CASES, ids=str)
def test_fused_observation_parity(name, shape, dtype, u_dtype):
    inputs = parity.observation_inputs(*shape, dtype, u_dtype, device=device_for(name))
    require("fused_observation", name, *inputs[:5])
    with backend.force(name, "fused_observation"):
        y, grads = parity.run_observation(public_observation, *inputs)
    parity.check_observation(y, grads, *inputs)


@pytest.mark.skipif(GPU or not HAS_TRITON or INTERPRETED, reason="runs the triton tests of this file in a child")
def test_interpreted_triton_backend_passes_in_a_child_process():
    assert_interpreted_tests_pass(THIS_FILE, keyword="triton and not child_process")


# ------------------------------------------------------------------------------ the checks reject a wrong border


def test_fusion_check_rejects_zero_padding():
    # A backend that zero-pads instead of replicating the border must fail the parity check.
    h, taps, dy = parity.fusion_inputs(1, 2, 9, 8, torch.float32)

    def zero_padded(h, taps):
        padded = torch.nn.functional.pad(h, (parity.FUSION_HALO,) * 4)
        height, width = h.shape[-2:]
        out = torch.zeros_like(h)
        for k, (dy_, dx_) in enumerate(parity.FUSION_OFFSETS):
            window = padded[..., 5 + dy_ : 5 + dy_ + height, 5 + dx_ : 5 + dx_ + width]
            out = out + taps[:, k][None, :, None, None] * window
        return out

    out, dh, dtaps = parity.run_fusion(zero_padded, h, taps, dy)
    with pytest.raises(AssertionError, match="out: max"):
        parity.check_fusion(out, dh, dtaps, h, taps, dy)


def test_conv_check_rejects_zero_padding():
    x, weight, dy = parity.conv_inputs(1, 2, 9, 8, 3, torch.float32)

    def zero_padded(x, weight, dilation):
        return torch.nn.functional.conv2d(x, weight, padding=dilation, dilation=dilation, groups=x.shape[1])

    y, dx, dw = parity.run_conv(zero_padded, x, weight, 3, dy)
    with pytest.raises(AssertionError, match="y: max"):
        parity.check_conv(y, dx, dw, x, weight, 3, dy)
