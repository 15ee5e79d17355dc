"""The CUDA kernels' own source, run on the CPU through kernels/emulation/ and checked against the reference.

No GPU is needed: the .cu files are compiled with g++ against a small emulation of the CUDA execution model (one
thread per CUDA thread, barriers for warp shuffles and __syncthreads, blocks run one after another, shared memory
poisoned with NaN) and called through their launchers, so the launch configurations, the tiling and border
handling, the warp scans and the partial-sum layouts are all exercised. What it cannot check: speed, races that need
concurrent blocks, and the GPU's fast-math intrinsics. The binding's last steps (summing partials, casting) are
mirrored here. Ground truth and tolerances: see ``tests/kernels/parity.py``.
"""

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from .parity import (
    ATOL_OF_MAX,
    DTYPES,
    ROUNDING,
    assert_close,
    check_conv,
    check_fusion,
    check_observation,
    check_scan,
    conv_inputs,
    fusion_inputs,
    gather_fusion,
    observation_inputs,
    run_fusion,
    scan_inputs,
)

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "kernels"
SOURCES = [
    "selective_scan/selective_scan_fwd.cu",
    "selective_scan/selective_scan_bwd.cu",
    "dwconv2d/dwconv2d_fwd.cu",
    "dwconv2d/dwconv2d_wgrad.cu",
    "state_fusion/state_fusion_kernels.cu",
    "state_fusion/observation_kernels.cu",
]
KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
LAUNCH = re.compile(r"([\w:]+(?:<[^;<>]*>)?)<<<(.*?)>>>\((.*?)\);")
DYNAMIC_SHARED = "extern __shared__ __align__(16) float smem[];"


def _gxx_major(gxx: str) -> int:
    version = subprocess.run([gxx, "-dumpversion"], capture_output=True, text=True, check=True).stdout
    return int(version.split(".")[0])


@pytest.fixture(scope="module")
def emulated(tmp_path_factory) -> ctypes.CDLL:
    gxx = shutil.which("g++")
    if gxx is None or _gxx_major(gxx) < 12:
        pytest.skip("needs g++ >= 12 (C++20 <barrier> and _Float16) to compile the emulated kernels")
    build = tmp_path_factory.mktemp("cuda_emulation")
    translated = []
    for source in SOURCES:
        text = (KERNELS / source).read_text()
        text, launches = LAUNCH.subn(r"::emu::launch(\1, \2, \3);", text)
        assert launches > 0, f"{source}: no kernel launch found to translate"
        text = text.replace(DYNAMIC_SHARED, "float* smem = ::emu::dynamic_shared();")
        target = build / (source.replace("/", "_") + ".cpp")
        target.write_text(text)
        translated.append(str(target))
    library = build / "libemulated_kernels.so"
    includes = [
        KERNELS / "emulation",
        KERNELS,
        KERNELS / "selective_scan",
        KERNELS / "dwconv2d",
        KERNELS / "state_fusion",
    ]
    command = [gxx, "-std=c++20", "-O2", "-fPIC", "-shared", "-pthread"]
    command += [f"-I{path}" for path in includes] + ["-include", str(KERNELS / "emulation" / "emulation.h")]
    command += translated + [str(KERNELS / "emulation" / "harness.cpp"), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lib = ctypes.CDLL(str(library))
    lib.emu_scan_bwd_dim_groups.restype = ctypes.c_int64
    lib.emu_scan_split_segments.restype = ctypes.c_int64
    lib.emu_scan_segment_length.restype = ctypes.c_int64
    lib.emu_dwconv2d_wgrad_partials.restype = ctypes.c_int64
    lib.emu_fusion_tiles.restype = ctypes.c_int64
    lib.emu_observation_channel_groups.restype = ctypes.c_int64
    return lib


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _sizes(*values):
    return [ctypes.c_int64(v) for v in values]


def emulated_scan(lib, inputs, delta_softplus, dhs, segments=1):
    """hs and gradients as spatial_mamba._selective_scan_cuda returns them, from the emulated kernels, with rows cut
    into ``segments`` segments (the binding takes the count from the split rule)."""
    u, delta, A, B, bias = (inputs[k] for k in ("u", "delta", "A", "B", "delta_bias"))
    batch, dim, length = u.shape
    kind = KIND[u.dtype]
    hs = torch.full((batch, dim, 1, length), float("nan"))
    common = [kind, _ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(bias), int(delta_softplus)]
    assert lib.emu_scan_fwd(*common, _ptr(hs), *_sizes(batch, dim, length, segments)) == 0
    du, ddelta = torch.full_like(u, float("nan")), torch.full_like(delta, float("nan"))
    dB_partial = torch.full((batch, lib.emu_scan_bwd_dim_groups(ctypes.c_int64(dim)), length), float("nan"))
    dA_partial, ddelta_bias_partial = torch.zeros(segments, batch, dim), torch.zeros(segments, batch, dim)
    outputs = [du, ddelta, dB_partial, dA_partial, ddelta_bias_partial]
    sizes = _sizes(batch, dim, length, segments)
    assert lib.emu_scan_bwd(*common, _ptr(hs), _ptr(dhs), *map(_ptr, outputs), *sizes) == 0
    grads = {
        "u": du,
        "delta": ddelta,
        "A": dA_partial.sum((0, 1)).view(dim, 1),
        "B": dB_partial.sum(1, keepdim=True).to(B.dtype),
        "delta_bias": ddelta_bias_partial.sum((0, 1)),
    }
    if bias is None:
        del grads["delta_bias"]
    return hs, grads


def emulated_conv(lib, x, weight, dilation, dy):
    """y, dx and dw as spatial_mamba._dwconv2d_cuda returns them, from the emulated kernels."""
    batch, channels, height, width = x.shape
    k = weight.shape[-1]
    kind = KIND[x.dtype]
    shape = [*_sizes(batch, channels, height, width), k, dilation]
    w = weight.float().contiguous()
    y, dx = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    assert lib.emu_dwconv2d(0, kind, _ptr(x), _ptr(w), _ptr(y), *shape) == 0
    assert lib.emu_dwconv2d(1, kind, _ptr(dy), _ptr(w), _ptr(dx), *shape) == 0
    partial = torch.full((lib.emu_dwconv2d_wgrad_partials(*shape), channels, k * k), float("nan"))
    assert lib.emu_dwconv2d_wgrad(kind, _ptr(x), _ptr(dy), _ptr(partial), *shape) == 0
    return y, dx, partial.sum(0).view(channels, 1, k, k).to(weight.dtype)


# (batch, D, L): one position; a step of 64 (2 items per lane) with and without vector loads; steps of 256 with
# scalar loads (odd L), with vector loads and channel groups with idle warps (D = 17), and a long row.
SCAN_SHAPES = [(1, 1, 1), (2, 9, 64), (1, 3, 63), (1, 8, 65), (2, 17, 256), (1, 4, 257), (1, 8, 3136)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SCAN_SHAPES, ids=str)
@pytest.mark.parametrize("delta_softplus, with_bias", [(True, True), (False, False)], ids=["softplus", "plain"])
def test_emulated_selective_scan_matches_reference(emulated, shape, dtype, delta_softplus, with_bias):
    inputs, dhs = scan_inputs(*shape, dtype, delta_softplus, with_bias, device="cpu")
    hs, grads = emulated_scan(emulated, inputs, delta_softplus, dhs)
    check_scan(hs, grads, inputs, delta_softplus, dhs)


# Split rows, (batch, D, L, segments, dtype): a ragged last segment (1000 = 3 x 256 + 232) on the vector path, odd
# rows on the scalar path with idle warps in the backward's channel groups (D = 9), a last segment of one token
# (257), and eight full segments over three channel groups.
# (Without softplus and bias on one case.)
SPLIT_CASES = [
    (1, 3, 1000, 4, torch.float32, True),
    (2, 9, 1001, 4, torch.bfloat16, True),
    (2, 9, 1001, 4, torch.bfloat16, False),
    (1, 2, 257, 2, torch.float16, True),
    (1, 17, 2048, 8, torch.float32, True),
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=str)
def test_emulated_split_rows_match_reference(emulated, case):
    *shape, segments, dtype, delta_softplus = case
    with_bias = delta_softplus
    piece = emulated.emu_scan_segment_length(*_sizes(shape[-1], segments))
    assert -(-shape[-1] // piece) == segments  # the case really has that many segments
    inputs, dhs = scan_inputs(*shape, dtype, delta_softplus, with_bias, device="cpu")
    hs, grads = emulated_scan(emulated, inputs, delta_softplus, dhs, segments)
    check_scan(hs, grads, inputs, delta_softplus, dhs)


@pytest.mark.slow
@pytest.mark.parametrize("memory", ["short", "long"])
def test_emulated_split_rows_match_reference_on_a_detection_row(emulated, memory):
    # A 1333x800 image at stride 4 is 66,600 tokens; at batch 2 and D = 128 the rule cuts rows into 8 segments on a
    # 132-SM GPU. Two such rows here, bfloat16 inputs, against the float64 loop; with long memory (no resets, the
    # slowest decays of the model's initialisation) the segments' composed maps carry the state across the cuts.
    segments = emulated.emu_scan_split_segments(*_sizes(2, 128, 66_600, 132))
    assert segments == 8
    inputs, dhs = scan_inputs(1, 2, 66_600, torch.bfloat16, device="cpu", memory=memory)
    hs, grads = emulated_scan(emulated, inputs, True, dhs, segments)
    check_scan(hs, grads, inputs, True, dhs)


@pytest.mark.parametrize("shape", [(1, 4, 66_600), (2, 16, 3136)], ids=str)
def test_emulated_whole_rows_with_long_memory_match_reference(emulated, shape):
    inputs, dhs = scan_inputs(*shape, torch.float32, device="cpu", memory="long")
    hs, grads = emulated_scan(emulated, inputs, True, dhs)
    check_scan(hs, grads, inputs, True, dhs)


def _split_segments(lib, batch, dim, length, sm_count):
    return lib.emu_scan_split_segments(*_sizes(batch, dim, length, sm_count))


def test_split_rule_cuts_only_rows_too_few_for_the_gpu(emulated):
    sm = 132  # an H100 or H200
    # Detection (batch 2, D 128, 66,600 tokens): 256 rows, 8 segments of 8,448 positions (the last one 7,464):
    # 2,048 warps, within 16 per SM.
    assert _split_segments(emulated, 2, 128, 66_600, sm) == 8
    assert emulated.emu_scan_segment_length(*_sizes(66_600, 8)) == 8_448
    # Rows enough for half the target or more (classification at batch 128), rows of one token, or rows shorter
    # than two minimum segments: not split.
    assert _split_segments(emulated, 128, 128, 3_136, sm) == 1
    assert _split_segments(emulated, 2, 529, 66_600, sm) == 1
    assert _split_segments(emulated, 2, 128, 1, sm) == 1
    assert _split_segments(emulated, 1, 1, 4_095, sm) == 1
    assert _split_segments(emulated, 1, 1, 4_096, sm) == 2
    # A smaller GPU needs fewer segments; one row of 10**6 tokens stops at 32 segments.
    assert _split_segments(emulated, 2, 128, 66_600, 16) == 1
    assert _split_segments(emulated, 2, 64, 66_600, 16) == 2
    assert _split_segments(emulated, 1, 1, 10**6, sm) == 32


@pytest.mark.parametrize("sm_count", [16, 78, 132])
def test_split_rule_gives_valid_segments(emulated, sm_count):
    # Whatever the shape: segments of whole 256-position steps that cover the row with none empty, at least 2,048
    # positions each when split; never more warps than the target (16 per SM: one wave), and as many segments as fit
    # in it unless the row length or the 32-segment cap stops them (whole steps per segment cost at most 1 in 9
    # segments of at least 2,048 positions).
    target = 16 * sm_count
    for rows in (1, 3, 8, 100, 256, 1_000, 2_111, 2_112):
        for length in (1, 255, 4_095, 4_096, 4_097, 10_000, 66_600, 200_001):
            segments = _split_segments(emulated, 1, rows, length, sm_count)
            piece = emulated.emu_scan_segment_length(*_sizes(length, segments))
            assert 1 <= segments <= 32 and piece % 256 == 0
            assert (segments - 1) * piece < length <= segments * piece, (rows, length, segments, piece)
            if segments > 1:
                assert piece >= 2_048 and rows * segments <= target
            assert 9 * segments >= 8 * min(target // rows, 32, length // 2_048), (rows, length, segments)


def test_emulated_scan_launchers_refuse_invalid_segment_counts(emulated):
    # 64 positions cannot be cut into 2 segments of whole steps; 33 segments exceed the warp-scan carry.
    null = [None] * 5
    assert emulated.emu_scan_fwd(0, *null, 1, None, *_sizes(1, 1, 64, 2)) != 0
    assert emulated.emu_scan_fwd(0, *null, 1, None, *_sizes(1, 1, 33 * 256, 33)) != 0
    assert emulated.emu_scan_bwd(0, *null, 1, *[None] * 7, *_sizes(1, 1, 64, 2)) != 0


# (batch, C, H, W, kernel size, dilation, dtype): one pixel, thin and tiny planes, the SASF branches and the merged
# kernel on T's stage sizes, several planes per block (7x7), non-square planes, and the other compiled kernel sizes.
CONV_CASES = [
    (1, 2, 1, 1, 3, 1, torch.float32),
    (1, 2, 1, 5, 3, 2, torch.bfloat16),
    (1, 3, 2, 3, 3, 1, torch.float16),
    (2, 3, 7, 7, 11, 1, torch.float32),
    (1, 2, 14, 14, 3, 5, torch.bfloat16),
    (1, 2, 13, 37, 3, 3, torch.float16),
    (1, 1, 56, 56, 11, 1, torch.float16),
    (1, 2, 56, 56, 3, 5, torch.float32),
    (2, 2, 28, 28, 5, 1, torch.bfloat16),
    (1, 2, 9, 20, 7, 2, torch.float32),
    (1, 1, 17, 9, 9, 1, torch.float16),
    (1, 2, 40, 3, 5, 1, torch.bfloat16),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_emulated_dwconv2d_matches_reference(emulated, case):
    *shape, k, dilation, dtype = case
    x, weight, dy = conv_inputs(*shape, k, dtype, device="cpu")
    y, dx, dw = emulated_conv(emulated, x, weight, dilation, dy)
    check_conv(y, dx, dw, x, weight, dilation, dy)


def emulated_fusion(lib, h, taps, dy, need_dh=True, need_dtaps=True):
    """out, dh and dtaps as spatial_mamba._state_fusion_cuda returns them, from the emulated kernels."""
    batch, channels, height, width = h.shape
    kind = KIND[h.dtype]
    sizes = _sizes(batch, channels, height, width)
    out, dh = torch.full_like(h, float("nan")), torch.full_like(h, float("nan"))
    assert lib.emu_state_fusion_fwd(kind, _ptr(h), _ptr(taps), _ptr(out), *sizes) == 0
    partial = torch.full((batch, channels, lib.emu_fusion_tiles(*sizes), 25), float("nan"))
    pointers = [_ptr(dh) if need_dh else None, _ptr(partial) if need_dtaps else None]
    assert lib.emu_state_fusion_bwd(kind, _ptr(h), _ptr(taps), _ptr(dy), *pointers, *sizes) == 0
    return out, dh, partial.sum((0, 2))


# (batch, C, H, W, dtype): one pixel, one row, one column, planes within the halo, several 32 x 32 tiles across
# (70 wide) and down (40 tall) with ragged edges, T's last stage (7 x 7), and the half-precision types.
FUSION_CASES = [
    (1, 2, 1, 1, torch.float32),
    (2, 1, 1, 6, torch.float32),
    (1, 2, 12, 1, torch.float32),
    (1, 1, 6, 4, torch.float32),
    (1, 2, 40, 70, torch.float32),
    (2, 3, 7, 7, torch.float16),
    (1, 2, 33, 9, torch.bfloat16),
]


@pytest.mark.parametrize("case", FUSION_CASES, ids=str)
def test_emulated_state_fusion_matches_reference(emulated, case):
    *shape, dtype = case
    h, taps, dy = fusion_inputs(*shape, dtype)
    out, dh, dtaps = emulated_fusion(emulated, h, taps, dy)
    check_fusion(out, dh, dtaps, h, taps, dy)


def test_emulated_state_fusion_computes_only_the_gradients_asked_for(emulated):
    h, taps, dy = fusion_inputs(1, 2, 9, 9, torch.float32)
    _, dh, _ = emulated_fusion(emulated, h, taps, dy, need_dh=False)
    assert torch.isnan(dh).all()  # never written
    _, dh_only, dtaps = emulated_fusion(emulated, h, taps, dy, need_dtaps=False)
    assert torch.isnan(dtaps).all()
    _, dh_ref, _ = run_fusion(gather_fusion, h.double(), taps.double(), dy)
    assert_close(dh_only, dh_ref, ROUNDING[torch.float32], ATOL_OF_MAX, "dh")


GRADIENTS = ("dh", "dtaps", "dC", "du", "dD")


def emulated_observation(lib, h, taps, C, u, D, dy, groups=None, need=GRADIENTS):
    """y and (dh, dtaps, dC, du, dD) as spatial_mamba._state_fusion_cuda's observe_fwd/observe_bwd return them, from
    the emulated kernels, with the backward's channels in ``groups`` groups (default: the binding's rule). Gradients
    not in ``need`` are not asked for: their buffers come back as allocated (NaN) and unsummed."""
    batch, channels, height, width = h.shape
    sizes = _sizes(batch, channels, height, width)
    kinds = [KIND[h.dtype], KIND[u.dtype]]
    inputs = [_ptr(t) for t in (h, taps, C, u, D)]
    y = torch.full_like(h, float("nan"))
    assert lib.emu_fused_observation_fwd(*kinds, *inputs, _ptr(y), *sizes) == 0
    groups = lib.emu_observation_channel_groups(*sizes) if groups is None else groups
    tiles = lib.emu_fusion_tiles(*sizes)
    buffers = {
        "dh": torch.full_like(h, float("nan")),
        "dtaps": torch.full((batch, channels, tiles, 25), float("nan")),
        "dC": torch.full((groups, batch, height, width), float("nan")),
        "du": torch.full_like(u, float("nan")),
        "dD": torch.full((batch, channels, tiles), float("nan")),
    }
    pointers = [_ptr(buffers[name]) if name in need else None for name in GRADIENTS]
    status = lib.emu_fused_observation_bwd(*kinds, *inputs, _ptr(dy), *pointers, ctypes.c_int64(groups), *sizes)
    assert status == 0
    sums = {
        "dh": buffers["dh"],
        "dtaps": buffers["dtaps"].sum((0, 2)),
        "dC": buffers["dC"].sum(0).to(u.dtype),
        "du": buffers["du"],
        "dD": buffers["dD"].sum((0, 2)),
    }
    return y, tuple(sums[name] if name in need else buffers[name] for name in GRADIENTS)


# (batch, C, H, W, dtype of h, dtype of u and C, channel groups or None for the rule): the fusion's border cases (one
# pixel, one row, one column, planes within the halo, several tiles across and down, non-square), batch 2, several
# channels in one group, groups that do not divide the channels (17 = 9 + 8 by the rule; 7 = 3 + 3 + 1), one channel
# per group, and the dtype pairs of training: float32 states beside 16-bit u and C (autocast), and one dtype for all.
OBSERVATION_CASES = [
    (1, 2, 1, 1, torch.float32, torch.float32, None),
    (2, 1, 1, 6, torch.float32, torch.bfloat16, None),
    (1, 2, 12, 1, torch.float16, torch.float16, None),
    (1, 3, 6, 4, torch.bfloat16, torch.bfloat16, None),
    (1, 2, 40, 70, torch.float32, torch.float32, None),
    (2, 3, 7, 7, torch.float32, torch.bfloat16, None),
    (1, 2, 33, 9, torch.bfloat16, torch.bfloat16, None),
    (1, 17, 9, 11, torch.float32, torch.float16, None),
    (2, 7, 10, 12, torch.float32, torch.float32, 3),
    (1, 3, 5, 9, torch.float16, torch.float32, 3),
]


@pytest.mark.parametrize("case", OBSERVATION_CASES, ids=str)
def test_emulated_fused_observation_matches_reference(emulated, case):
    *shape, dtype, u_dtype, groups = case
    if groups is None:
        groups = emulated.emu_observation_channel_groups(*_sizes(*shape))
        assert shape[1] < 16 or groups > 1  # the rule splits these channels
    inputs = observation_inputs(*shape, dtype, u_dtype)
    y, grads = emulated_observation(emulated, *inputs, groups=groups)
    check_observation(y, grads, *inputs)


def test_emulated_fused_observation_computes_only_the_gradients_asked_for(emulated):
    inputs = observation_inputs(2, 5, 9, 13, torch.float32, torch.bfloat16)
    y, everything = emulated_observation(emulated, *inputs, groups=2)
    check_observation(y, everything, *inputs)
    for name in GRADIENTS:
        _, grads = emulated_observation(emulated, *inputs, groups=2, need=(name,))
        for other, grad, full in zip(GRADIENTS, grads, everything):
            if other == name:
                assert torch.equal(grad, full), name  # the same arithmetic as with every gradient asked for
            else:
                assert torch.isnan(grad.float()).all(), f"{other} written when only {name} was asked for"


def test_observation_channel_groups_fill_the_gpu_at_model_sizes(emulated):
    def groups(*shape):
        return emulated.emu_observation_channel_groups(*_sizes(*shape))

    def tiles(*shape):
        return emulated.emu_fusion_tiles(*_sizes(*shape))

    # Detection (batch 2, 200 x 334: 7 x 11 tiles, 192 channels): 14 groups of 14 channels, 2,156 blocks, about five
    # waves of a 132-SM GPU at 3 blocks per SM. Classification at batch 128, 56 x 56 (2 x 2 tiles): 4 groups.
    assert groups(2, 192, 200, 334) == 14 and 2 * tiles(2, 192, 200, 334) * 14 == 2156
    assert groups(128, 96, 56, 56) == 4
    # Grids that fill the GPU without groups, and channels too few for two groups of 8, take one group.
    assert groups(128, 384, 224, 224) == 1
    assert groups(1, 15, 7, 7) == 1
    for shape in [(2, 192, 200, 334), (128, 96, 56, 56), (1, 17, 9, 11), (2, 1000, 7, 7), (4, 64, 14, 14)]:
        count, channels = groups(*shape), shape[1]
        per_group = -(-channels // count)
        assert 1 <= count <= channels and (count - 1) * per_group < channels  # no empty group
        assert count == 1 or per_group >= 8


def test_emulated_observation_backward_refuses_invalid_channel_groups(emulated):
    inputs = observation_inputs(1, 3, 4, 4, torch.float32)
    for groups in (0, 4):
        with pytest.raises(AssertionError):
            emulated_observation(emulated, *inputs, groups=groups)


def test_emulated_softplus_keeps_float32_accuracy(emulated):
    # With L = 1, B = u = 1 and A = 0 the scan returns Δ = softplus(delta) itself. The kernels' log-free softplus
    # must match the official rule (log1p(exp(v)) up to 20, v above) to a few float32 ulp everywhere, also far below
    # 0 where softplus(v) ~ exp(v) is tiny. (The emulation runs exact expf and division; on the GPU both are
    # approximations with about 2**-21 relative error, well inside the scan tests' tolerances.)
    raw = torch.cat([torch.linspace(-87.0, 19.99, 4001), torch.tensor([20.0, 20.1, 60.0])])
    channels = raw.numel()
    inputs = {
        "u": torch.ones(1, channels, 1),
        "delta": raw[None, :, None].clone(),
        "A": torch.zeros(channels, 1),
        "B": torch.ones(1, 1, 1),
        "delta_bias": None,
    }
    hs = torch.full((1, channels, 1, 1), float("nan"))
    pointers = [_ptr(inputs[k]) for k in ("u", "delta", "A", "B", "delta_bias")]
    assert emulated.emu_scan_fwd(0, *pointers, 1, _ptr(hs), *_sizes(1, channels, 1, 1)) == 0
    value = raw.double()
    expected = torch.where(value <= 20, torch.log1p(torch.exp(value.clamp(max=20))), value)
    torch.testing.assert_close(hs.flatten().double(), expected, rtol=4 * 2.0**-24, atol=0)


def test_emulated_scan_launchers_refuse_rows_beyond_32_bit_positions(emulated):
    # Positions inside a row are 32-bit; longer rows are refused before any launch (the binding says why).
    too_long = 2**31
    null = [None] * 5
    assert emulated.emu_scan_fwd(0, *null, 1, None, *_sizes(1, 1, too_long, 1)) != 0
    assert emulated.emu_scan_bwd(0, *null, 1, *[None] * 7, *_sizes(1, 1, too_long, 1)) != 0
