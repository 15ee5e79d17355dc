"""Structure-aware state fusion (spatial_mamba/ops/state_fusion.py; docs/official_bugs.md, #1 and #2).

The merged 11x11 path and the three-branch training path are the same function, borders included, so they are
compared in float32 with rtol 1e-5 and atol 1e-6 * max (different summation orders of at most 27 taps), and in
float64 with 1e-12 for gradients. The branches are also checked against three
``nn.Conv2d(padding_mode="replicate")`` convolutions, as the official ``kernels/dwconv2d/check.py`` does.
"""

import pytest
import torch
import torch.nn as nn

from spatial_mamba.ops import merge_state_fusion_kernels, state_fusion

SIZES = [(1, 1), (1, 7), (2, 3), (5, 5), (6, 11), (12, 12)]


def make(batch, channels, size, dtype=torch.float32, seed=0):
    """h and random SASF weights (not the all-ones init, under which the kernels' taps cannot be told apart)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, channels, *size, generator=gen, dtype=torch.float64).to(dtype)
    kernels = [torch.randn(channels, 1, 3, 3, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3)]
    alpha = torch.randn(3, generator=gen, dtype=torch.float64).to(dtype)
    return h.requires_grad_(), [k.requires_grad_() for k in kernels], alpha.requires_grad_()


def three_replicate_convs(h, kernels, alpha):
    """α0·conv_d1(h) + α1·conv_d3(h) + α2·conv_d5(h) with nn.Conv2d's own replicate padding."""
    out = 0
    for kernel, weight, dilation in zip(kernels, alpha, (1, 3, 5)):
        conv = nn.Conv2d(
            h.shape[1], h.shape[1], 3, padding=dilation, dilation=dilation, groups=h.shape[1], bias=False,
            padding_mode="replicate",
        ).to(h.dtype)  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(kernel)
        out = out + weight * conv(h)
    return out


def assert_close(actual, expected, rtol, atol_of_max):
    atol = atol_of_max * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("size", SIZES)
def test_merged_kernel_equals_the_three_branches_at_borders(size):
    h, kernels, alpha = make(2, 4, size)
    branches = state_fusion(h, *kernels, alpha, path="branches")
    merged = state_fusion(h, *kernels, alpha, path="merged")
    assert merged.shape == branches.shape == h.shape
    assert_close(merged, branches, 1e-5, 1e-6)


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (6, 11)])
def test_fusion_equals_three_replicate_padded_nn_convs(size, merged):
    h, kernels, alpha = make(2, 4, size)
    expected = three_replicate_convs(h.detach().double(), [k.detach().double() for k in kernels], alpha.double())
    assert_close(
        state_fusion(h, *kernels, alpha, path="merged" if merged else "branches").double(), expected, 1e-5, 1e-6
    )


def test_merged_kernel_places_each_dilated_kernel_on_its_taps():
    _, kernels, alpha = make(1, 3, (1, 1))
    merged = merge_state_fusion_kernels(*kernels, alpha).detach()
    assert merged.shape == (3, 1, 11, 11) and merged.dtype == torch.float32
    expected = torch.zeros(3, 1, 11, 11)
    for kernel, weight, taps in zip(kernels, alpha, ([4, 5, 6], [2, 5, 8], [0, 5, 10])):
        for i, row in enumerate(taps):
            for j, col in enumerate(taps):
                expected[:, :, row, col] += weight.detach() * kernel.detach()[:, :, i, j]
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-6)
    # The centre accumulates the three centre taps; 27 - 3 + 1 = 25 taps are used, the rest are zero.
    assert int((expected[0, 0] != 0).sum()) == 25


def test_gradients_of_merged_and_branches_agree():
    h, kernels, alpha = make(2, 3, (5, 7), dtype=torch.float64)
    leaves = [h, *kernels, alpha]
    dy = torch.randn(h.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    merged = torch.autograd.grad(state_fusion(h, *kernels, alpha, path="merged"), leaves, dy)
    branches = torch.autograd.grad(state_fusion(h, *kernels, alpha, path="branches"), leaves, dy)
    for name, a, b in zip(["h", "kernel_3", "kernel_3_1", "kernel_3_2", "alpha"], merged, branches):
        assert a.abs().max() > 0, name
        assert_close(a, b, 1e-12, 1e-12)


def test_merged_path_follows_weights_changed_in_place():
    # The official code cached the merged kernel on the first eval call and never rebuilt it
    # (docs/official_bugs.md, #1).
    h, kernels, alpha = make(1, 3, (6, 6))
    before = state_fusion(h, *kernels, alpha, path="merged")
    with torch.no_grad():
        kernels[1].mul_(-2.0)
        alpha[2] += 0.5
    after = state_fusion(h, *kernels, alpha, path="merged")
    assert (after - before).abs().max() > 1e-2
    assert_close(after, state_fusion(h, *kernels, alpha, path="branches"), 1e-5, 1e-6)


def test_all_ones_init_sums_twenty_seven_taps_of_a_constant_map():
    # With the official init (kernels and alpha all ones) a constant map is multiplied by 27
    # (docs/official_bugs.md, #7).
    h = torch.full((1, 2, 4, 5), 0.5)
    ones = [torch.ones(2, 1, 3, 3) for _ in range(3)]
    for merged in (False, True):
        torch.testing.assert_close(
            state_fusion(h, *ones, torch.ones(3), path="merged" if merged else "branches"), torch.full_like(h, 13.5)
        )


@pytest.mark.parametrize(
    "h_shape, kernel_shape, alpha_shape, match",
    [
        ((1, 3, 4, 4), (3, 1, 5, 5), (3,), r"kernel_3 must be \(channels=3, 1, 3, 3\)"),
        ((1, 4, 4, 4), (3, 1, 3, 3), (3,), r"h must be \(batch, channels=3, height, width\)"),
        ((3, 4, 4), (3, 1, 3, 3), (3,), r"h must be \(batch, channels=3, height, width\)"),
        ((1, 3, 4, 4), (3, 1, 3, 3), (2,), r"alpha must be \(3,\)"),
    ],
)
def test_rejects_bad_shapes(h_shape, kernel_shape, alpha_shape, match):
    kernels = [torch.zeros(kernel_shape), torch.zeros(3, 1, 3, 3), torch.zeros(3, 1, 3, 3)]
    for merged in (False, True):
        with pytest.raises(ValueError, match=match):
            state_fusion(
                torch.zeros(h_shape), *kernels, torch.zeros(alpha_shape), path="merged" if merged else "branches"
            )


def test_merge_rejects_mismatched_kernels():
    kernels = [torch.zeros(3, 1, 3, 3), torch.zeros(4, 1, 3, 3), torch.zeros(3, 1, 3, 3)]
    with pytest.raises(ValueError, match=r"kernel_3_1 must be \(channels=3, 1, 3, 3\)"):
        merge_state_fusion_kernels(*kernels, torch.zeros(3))


def test_inputs_on_two_devices_are_refused_naming_each_device():
    from spatial_mamba.ops import fused_observation

    h = torch.zeros(1, 2, 4, 4)
    kernels = [torch.zeros(2, 1, 3, 3) for _ in range(3)]
    alpha = torch.ones(3, device="meta")
    with pytest.raises(ValueError, match=r"state fusion: all inputs must be on one device; .*alpha on meta"):
        state_fusion(h, *kernels, alpha)
    C, u, D = torch.zeros(1, 4, 4), torch.zeros(1, 2, 4, 4), torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match=r"fused observation: all inputs must be on one device; .*D on meta"):
        fused_observation(h, *kernels, torch.ones(3), C, u, D)
