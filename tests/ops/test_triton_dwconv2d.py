"""The Triton depthwise convolution compiles for sm_90 without register spills (no GPU needed).

Its numbers are checked against a float64 definition, with the other backends, in
tests/kernels/test_backend_parity.py (in Triton's interpreter when there is no GPU).
"""

import pytest

from spatial_mamba.ops.backends.triton.selective_scan import triton_installed  # noqa: E402

if not triton_installed()[0]:
    pytest.skip(f"the Triton backend cannot run: {triton_installed()[1]}", allow_module_level=True)

from spatial_mamba.ops.backends.triton import dwconv2d as triton_dwconv2d  # noqa: E402

from ._triton_interpreter import assert_no_spills, needs_compiler, ptxas_report  # noqa: E402


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
