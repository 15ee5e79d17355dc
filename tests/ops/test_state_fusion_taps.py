"""The 25-tap state fusion op (spatial_mamba/ops/state_fusion.py): offsets, the taps map, the backend op and the
``path`` argument.

The ground truth is written here independently of the package: out[b, c, y, x] = Σ_k taps[c, k] h[b, c, clamp(y +
dy_k), clamp(x + dx_k)], gathered in float64. float32 results are compared with rtol 1e-5 and atol 1e-6 * max (sums of
25 products in another order); half-precision inputs are rounded to their dtype first and the output once more
(2^-8 relative for bfloat16, 2^-11 for float16, with a factor 2 margin); float64 gradients agree to 1e-12.
"""

import pytest
import torch

from spatial_mamba.ops import FUSION_OFFSETS, backend, fusion_taps, merge_state_fusion_kernels, state_fusion
from spatial_mamba.ops.state_fusion import state_fusion_ref
from tests.ops.test_state_fusion import SIZES, make


def gathered(h, taps):
    """Σ_k taps[:, k] h[clamp(y + dy_k), clamp(x + dx_k)] by explicit index gathering."""
    height, width = h.shape[-2:]
    out = 0
    for k, (dy, dx) in enumerate(FUSION_OFFSETS):
        rows = (torch.arange(height) + dy).clamp(0, height - 1)
        cols = (torch.arange(width) + dx).clamp(0, width - 1)
        out = out + taps[:, k, None, None] * h[:, :, rows][:, :, :, cols]
    return out


def assert_close(actual, expected, rtol, atol_of_max):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol_of_max * expected.abs().max().item())


def test_offsets_are_the_centre_then_each_dilation_in_row_major_order():
    assert len(FUSION_OFFSETS) == len(set(FUSION_OFFSETS)) == 25
    assert FUSION_OFFSETS[:9] == ((0, 0), (-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
    assert FUSION_OFFSETS[9] == (-3, -3) and FUSION_OFFSETS[16] == (3, 3)
    assert FUSION_OFFSETS[17] == (-5, -5) and FUSION_OFFSETS[-1] == (5, 5)


def test_taps_are_the_non_zero_entries_of_the_merged_kernel():
    _, kernels, alpha = make(1, 4, (1, 1), dtype=torch.float64)
    taps = fusion_taps(*kernels, alpha)
    assert taps.shape == (4, 25) and taps.dtype == torch.float64
    merged = merge_state_fusion_kernels(*kernels, alpha)[:, 0]
    for k, (dy, dx) in enumerate(FUSION_OFFSETS):
        torch.testing.assert_close(taps[:, k], merged[:, 5 + dy, 5 + dx], rtol=0, atol=1e-15)
    centre = sum(a * k[:, 0, 1, 1] for a, k in zip(alpha, kernels))
    torch.testing.assert_close(taps[:, 0], centre, rtol=0, atol=1e-15)
    # float32 parameters give float32 taps, whatever the kernels' half dtype
    assert fusion_taps(*(k.half() for k in kernels), alpha.half()).dtype == torch.float32


@pytest.mark.parametrize("size", SIZES)
def test_reference_op_equals_gathered_taps_at_borders(size):
    h, _, _ = make(2, 3, size)
    taps = torch.randn(3, 25, generator=torch.Generator().manual_seed(3))
    out = state_fusion_ref(h, taps)
    assert out.shape == h.shape and out.dtype == torch.float32
    assert_close(out.double(), gathered(h.detach().double(), taps.double()), 1e-5, 1e-6)


@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, 2 * 2**-8), (torch.float16, 2 * 2**-11)])
def test_reference_op_accumulates_half_inputs_in_float32(dtype, rtol):
    h, _, _ = make(2, 3, (7, 9), dtype=dtype)
    taps = torch.randn(3, 25, generator=torch.Generator().manual_seed(3))
    out = state_fusion_ref(h, taps)
    assert out.dtype == dtype
    expected = gathered(h.detach().double(), taps.double())
    # one rounding of the output to the half dtype; the float32 sum itself is far more precise
    assert_close(out.double(), expected, rtol, rtol)


def test_reference_op_gradients_equal_gathered_taps_in_float64():
    h, _, _ = make(2, 3, (6, 7), dtype=torch.float64)
    taps = torch.randn(3, 25, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    dy = torch.randn(h.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad(state_fusion_ref(h, taps), (h, taps), dy)
    expected = torch.autograd.grad(gathered(h, taps), (h, taps), dy)
    for a, b in zip(got, expected):
        assert b.abs().max() > 0
        assert_close(a, b, 1e-12, 1e-12)


@pytest.mark.parametrize("path", ["auto", "taps", "merged"])
def test_every_path_equals_the_branches_with_gradients(path):
    h, kernels, alpha = make(2, 3, (5, 11), dtype=torch.float64)
    leaves = [h, *kernels, alpha]
    dy = torch.randn(h.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = state_fusion(h, *kernels, alpha, path=path)
    expected = state_fusion(h, *kernels, alpha, path="branches")
    assert_close(out, expected, 1e-12, 1e-12)
    names = ["h", "kernel_3", "kernel_3_1", "kernel_3_2", "alpha"]
    for name, a, b in zip(names, torch.autograd.grad(out, leaves, dy), torch.autograd.grad(expected, leaves, dy)):
        assert b.abs().max() > 0, name
        assert_close(a, b, 1e-12, 1e-12)


def test_taps_path_dispatches_through_the_backend_registry():
    # Float32 CPU tensors take the compiled CPU kernels when they can be built; float64 ones the reference.
    ok, _ = backend.is_available("state_fusion", "cpu")
    assert backend.choose("state_fusion", torch.zeros(1))[0] == ("cpu" if ok else "reference")
    assert backend.select("state_fusion", torch.zeros(1, dtype=torch.float64)) is state_fusion_ref
    with backend.force("reference"):
        assert backend.select("state_fusion", torch.zeros(1)) is state_fusion_ref


@pytest.mark.parametrize("path", ["auto", "branches", "merged"])
def test_empty_batch_gives_empty_outputs_and_zero_weight_gradients(path):
    h, kernels, alpha = make(0, 3, (4, 5))
    out = state_fusion(h, *kernels, alpha, path=path)
    assert out.shape == (0, 3, 4, 5)
    grads = torch.autograd.grad(out.sum(), [h, *kernels, alpha], allow_unused=True)
    assert grads[0].shape == h.shape
    for grad in grads[1:]:
        assert grad is None or not grad.any()


def test_rejects_an_unknown_path():
    h, kernels, alpha = make(1, 3, (4, 4))
    with pytest.raises(ValueError, match=r"path must be one of auto, taps, branches, merged; got 'dense'"):
        state_fusion(h, *kernels, alpha, path="dense")
