"""The Triton state fusion kernels compile for sm_90 without register spills (no GPU needed), and check their inputs.

Their numbers are checked against a float64 definition, with the other backends, in
tests/kernels/test_backend_parity.py (in Triton's interpreter when there is no GPU).
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot run")

from spatial_mamba.ops import triton_state_fusion  # noqa: E402

from ._triton_interpreter import assert_no_spills, needs_compiler, ptxas_report  # noqa: E402


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
        (kernels.state_fusion_dgrad_border_kernel, {"BLOCK": triton_state_fusion.BORDER_BLOCK}),
    ]
    for kernel, constexprs in launches:
        kinds = {name: "i32" for name in ("n_channels", "height", "width", "n_border")}
        kinds.update(dict.fromkeys(constexprs, "constexpr"))
        kinds.update(taps_ptr="*fp32", dtaps_partial_ptr="*fp32")
        signature = {name: kinds.get(name, f"*{dtype}") for name in kernel.arg_names}
        assert_no_spills(ptxas_report(kernel, signature, constexprs, triton_state_fusion.NUM_WARPS, tmp_path))


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
