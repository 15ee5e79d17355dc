"""The Triton state fusion and fused observation kernels compile for sm_90 without register spills (no GPU needed),
check their inputs and compute only the gradients asked for; the fused observation's channel groups and tiles.

Their numbers are checked against a float64 definition, with the other backends, in
tests/kernels/test_backend_parity.py (in Triton's interpreter when there is no GPU). The channel groups of the fused
observation's backward pass are 16 channels wide, too many for the interpreter: ``test_interpreted_kernels_*`` shrink
them (and the tiles) and run in a child process with TRITON_INTERPRET=1 when there is no GPU.
"""

import itertools
import os

import pytest
import torch

from spatial_mamba.ops.backends.triton.selective_scan import triton_installed  # noqa: E402

if not triton_installed()[0]:
    pytest.skip(f"the Triton backend cannot run: {triton_installed()[1]}", allow_module_level=True)

from spatial_mamba.ops.backends.triton import state_fusion as triton_state_fusion  # noqa: E402

from ..kernels import parity  # noqa: E402
from ._triton_interpreter import (  # noqa: E402
    INTERPRETED,
    assert_interpreted_tests_pass,
    assert_no_spills,
    in_parent_only,
    needs_compiler,
    ptxas_report,
)

GPU = torch.cuda.is_available()
THIS_FILE = os.path.abspath(__file__)


def _compile_without_spills(tmp_path, kernel, constexprs, pointer_kinds):
    kinds = {name: "i32" for name in ("n_channels", "height", "width", "n_border", "group_size", "zero")}
    kinds.update(dict.fromkeys(constexprs, "constexpr"))
    kinds.update(taps_ptr="*fp32", d_ptr="*fp32", dtaps_partial_ptr="*fp32", dc_partial_ptr="*fp32")
    kinds.update(dd_partial_ptr="*fp32")
    signature = {name: kinds.get(name) or pointer_kinds[name] for name in kernel.arg_names}
    assert_no_spills(ptxas_report(kernel, signature, constexprs, triton_state_fusion.NUM_WARPS, tmp_path))


@needs_compiler
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_hopper_without_register_spills(tmp_path, dtype):
    # The interpreter accepts code that the GPU compiler rejects: compile the real kernels for sm_90 (no GPU needed).
    kernels = triton_state_fusion._kernels()
    _, block_h, block_w = triton_state_fusion._tiling(1, 56, 56)
    tile = {"BLOCK_H": block_h, "BLOCK_W": block_w}
    launches = [
        (kernels.state_fusion_fwd_kernel, tile),
        (kernels.state_fusion_bwd_kernel, {**tile, "NEED_DH": True, "NEED_DTAPS": True}),
        (kernels.state_fusion_dgrad_border_kernel, {"SCALED": False, "BLOCK": triton_state_fusion.BORDER_BLOCK}),
    ]
    pointers = {name: f"*{dtype}" for name in ("h_ptr", "out_ptr", "dy_ptr", "scale_ptr", "dh_ptr")}
    for kernel, constexprs in launches:
        _compile_without_spills(tmp_path, kernel, constexprs, pointers)


@needs_compiler
@pytest.mark.parametrize("dtype, u_dtype", [("fp32", "bf16"), ("bf16", "bf16")])
def test_observation_kernels_compile_for_hopper_without_register_spills(tmp_path, dtype, u_dtype):
    kernels = triton_state_fusion._kernels()
    _, block_h, block_w = triton_state_fusion._tiling(1, 56, 56)
    tile = {"BLOCK_H": block_h, "BLOCK_W": block_w}
    every_gradient = dict.fromkeys(("NEED_DH", "NEED_DTAPS", "NEED_DC", "NEED_DU", "NEED_DD"), True)
    launches = [
        (kernels.fused_observation_fwd_kernel, tile),
        (kernels.fused_observation_bwd_kernel, {**tile, **every_gradient}),
        # Without dC and the tap gradients the 25 reads of h go; without dh the adjoint does.
        (kernels.fused_observation_bwd_kernel, {**tile, **every_gradient, "NEED_DC": False, "NEED_DTAPS": False}),
        (kernels.fused_observation_bwd_kernel, {**tile, **every_gradient, "NEED_DH": False}),
        (kernels.state_fusion_dgrad_border_kernel, {"SCALED": True, "BLOCK": triton_state_fusion.BORDER_BLOCK}),
    ]
    pointers = {name: f"*{dtype}" for name in ("h_ptr", "y_ptr", "dy_ptr", "dh_ptr")}
    pointers.update({name: f"*{u_dtype}" for name in ("c_ptr", "scale_ptr", "u_ptr", "du_ptr")})
    for kernel, constexprs in launches:
        _compile_without_spills(tmp_path, kernel, constexprs, pointers)


def test_border_pixels_counts_every_edge_pixel_once():
    for height in range(1, 8):
        for width in range(1, 8):
            grid = torch.zeros(height, width, dtype=torch.bool)
            grid[0], grid[-1], grid[:, 0], grid[:, -1] = True, True, True, True
            assert triton_state_fusion.border_pixels(height, width) == int(grid.sum()), (height, width)


@pytest.mark.parametrize(
    "h_shape, taps_shape, taps_dtype, match",
    [
        ((2, 3, 4), (3, 25), torch.float32, r"h must be \(batch, channels, height, width\)"),
        ((1, 3, 4, 4), (3, 24), torch.float32, r"taps must be \(channels=3, 25\)"),
        ((1, 3, 4, 4), (3, 25), torch.float64, "float64 taps"),
    ],
)
def test_rejects_bad_inputs_with_a_clear_error(h_shape, taps_shape, taps_dtype, match):
    with pytest.raises(ValueError, match=match):
        triton_state_fusion.state_fusion_triton(torch.zeros(h_shape), torch.zeros(taps_shape, dtype=taps_dtype))


def _observation_inputs(**changes):
    inputs = {
        "h": torch.zeros(2, 3, 4, 5),
        "taps": torch.zeros(3, 25),
        "C": torch.zeros(2, 4, 5, dtype=torch.bfloat16),
        "u": torch.zeros(2, 3, 4, 5, dtype=torch.bfloat16),
        "D": torch.zeros(3),
    }
    return {**inputs, **changes}


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"C": torch.zeros(2, 4, 4, dtype=torch.bfloat16)}, r"C must be \(batch, height, width\) = \(2, 4, 5\)"),
        ({"u": torch.zeros(2, 3, 4, 4, dtype=torch.bfloat16)}, r"u must have h's shape"),
        ({"C": torch.zeros(2, 4, 5)}, "u and C must share one dtype"),
        ({"C": torch.zeros(2, 4, 5).double(), "u": torch.zeros(2, 3, 4, 5).double()}, "float64 u and C"),
        ({"D": torch.zeros(4)}, r"D must be \(channels=3,\)"),
        ({"D": torch.zeros(3).half()}, "float16 D"),
        ({"taps": torch.zeros(3, 25).double()}, "float64 taps"),
    ],
)
def test_observation_rejects_bad_inputs_with_a_clear_error(changes, match):
    inputs = _observation_inputs(**changes)
    assert triton_state_fusion.supports_observation(*_observation_inputs().values()) == []
    with pytest.raises(ValueError, match=match):
        triton_state_fusion.fused_observation_triton(*inputs.values())


class _Recorder:
    """Stands in for a kernel module: records each launch's grid and flags and writes nothing."""

    def __init__(self):
        self.launches = []

    def __getattr__(self, name):
        recorder = self

        class Kernel:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    flags = {k: v for k, v in kwargs.items() if k.startswith(("NEED_", "SCALED"))}
                    recorder.launches.append((name, grid, flags))

                return launch

        return Kernel()


GRADIENTS = ("h", "taps", "C", "u", "D")


@pytest.mark.parametrize(
    "wanted", [s for r in range(1, 6) for s in itertools.combinations(GRADIENTS, r)], ids=lambda s: "+".join(s)
)
def test_observation_backward_computes_only_the_gradients_asked_for(monkeypatch, wanted):
    # The launches are recorded, not run: the flags of the backward kernel and which kernels run are what is checked.
    recorder = _Recorder()
    monkeypatch.setattr(triton_state_fusion, "_kernels", lambda: recorder)
    batch, channels = 2, 35
    inputs = _observation_inputs(h=torch.zeros(batch, channels, 4, 5), u=torch.zeros(batch, channels, 4, 5))
    inputs.update(C=torch.zeros(batch, 4, 5), taps=torch.zeros(channels, 25), D=torch.zeros(channels))
    leaves = {name: t.requires_grad_(name in wanted) for name, t in inputs.items()}
    y = triton_state_fusion.fused_observation_triton(*leaves.values())
    grads = torch.autograd.grad(y, [leaves[name] for name in wanted], torch.ones_like(y))
    assert [g.shape for g in grads] == [leaves[name].shape for name in wanted]
    names = [launch[0] for launch in recorder.launches]
    border = ["state_fusion_dgrad_border_kernel"] if "h" in wanted else []
    assert names == ["fused_observation_fwd_kernel", "fused_observation_bwd_kernel", *border]
    _, grid, flags = recorder.launches[1]
    expected = {f"NEED_{'DTAPS' if name == 'taps' else 'D' + name.upper()}": name in wanted for name in GRADIENTS}
    assert flags == expected
    # Only dC sums over the channels: without it, one channel per program.
    groups = -(-channels // triton_state_fusion.CHANNEL_GROUP) if "C" in wanted else channels
    assert grid[0] == batch * groups
    if border:
        assert recorder.launches[2][2] == {"SCALED": True}


@pytest.mark.parametrize("batch, channels", [(0, 3), (2, 0)])
def test_observation_of_empty_inputs_launches_nothing(monkeypatch, batch, channels):
    # No kernel runs; the gradients are empty or zero (dC sums over no channels, dtaps and dD over no pixels).
    recorder = _Recorder()
    monkeypatch.setattr(triton_state_fusion, "_kernels", lambda: recorder)
    inputs = _observation_inputs(h=torch.zeros(batch, channels, 4, 5), u=torch.zeros(batch, channels, 4, 5))
    inputs.update(C=torch.ones(batch, 4, 5), taps=torch.ones(channels, 25), D=torch.ones(channels))
    leaves = [t.requires_grad_() for t in inputs.values()]
    y = triton_state_fusion.fused_observation_triton(*leaves)
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
    assert recorder.launches == []
    assert [g.shape for g in grads] == [t.shape for t in leaves]
    assert all(not g.abs().sum() for g in grads)


# ------------------------------------------------------------- channel groups and tiles, in the interpreter


@pytest.mark.skipif(not GPU and not INTERPRETED, reason="no GPU: runs in the interpreter, in a child process")
@pytest.mark.parametrize(
    "shape, dtype, u_dtype, group",
    [((2, 3, 7, 12), torch.float32, torch.bfloat16, 2), ((1, 1, 3, 4), torch.bfloat16, torch.float32, 2)],
    ids=str,
)
def test_interpreted_kernels_observation_over_channel_groups_and_tiles(monkeypatch, shape, dtype, u_dtype, group):
    # Channel groups of 2 over 3 channels (the last group ragged) and two batch elements, on 4 x 8 tiles: 2 x 2 tiles
    # per plane, the last ones ragged in both directions; then float32 u and C beside bfloat16 states.
    monkeypatch.setattr(triton_state_fusion, "CHANNEL_GROUP", group)
    monkeypatch.setattr(triton_state_fusion, "MAX_BLOCK_W", 8)
    monkeypatch.setattr(triton_state_fusion, "TILE_ELEMENTS", 32)
    assert triton_state_fusion._tiling(1, 7, 12)[0] == (1, 2, 2)
    inputs = parity.observation_inputs(*shape, dtype, u_dtype, device="cuda" if GPU else "cpu")
    y, grads = parity.run_observation(triton_state_fusion.fused_observation_triton, *inputs)
    parity.check_observation(y, grads, *inputs)


@in_parent_only
@pytest.mark.skipif(GPU, reason="the GPU runs the interpreted tests in this process")
def test_interpreted_kernels_pass_in_a_child_process():
    assert_interpreted_tests_pass(THIS_FILE, keyword="interpreted_kernels and not child_process")


def test_planes_beyond_the_triton_grid_go_to_the_next_backend():
    tall = torch.empty(1, 1, 2**26, 1, device="meta")  # 131072 row tiles of 512
    reasons = triton_state_fusion.supports(tall, torch.empty(1, 25))
    assert any("the grid takes 65535" in reason for reason in reasons), reasons
    assert triton_state_fusion.supports(torch.empty(2, 3, 56, 56, device="meta"), torch.empty(3, 25)) == []
