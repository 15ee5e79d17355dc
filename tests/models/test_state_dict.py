"""The official state-dict layout and parameter counts (``classification/models/spatialmamba.py``, README)."""

import math

import pytest
import torch

from spatial_mamba import VARIANTS, SpatialMamba


def _bn(prefix):
    return [(f"{prefix}.{n}", None) for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def official_keys(dims, depths, num_classes=1000):
    """The official key list and shapes, written out independently of the model code."""
    c1 = dims
    keys = [("patch_embed.conv1.conv.weight", (c1 // 2, 3, 3, 3))] + _bn("patch_embed.conv1.norm")
    for j in range(2):
        keys += [(f"patch_embed.conv2.{j}.conv.weight", (c1 // 2, c1 // 2, 3, 3))] + _bn(f"patch_embed.conv2.{j}.norm")
    keys += [("patch_embed.conv3.0.conv.weight", (4 * c1, c1 // 2, 3, 3))] + _bn("patch_embed.conv3.0.norm")
    keys += [("patch_embed.conv3.1.conv.weight", (c1, 4 * c1, 1, 1))] + _bn("patch_embed.conv3.1.norm")
    for i, depth in enumerate(depths):
        c = c1 * 2**i
        d, r = 2 * c, math.ceil(c / 16)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            s = p + "self_attention."
            keys += [
                (p + "cpe1.weight", (c, 1, 3, 3)), (p + "cpe1.bias", (c,)),
                (p + "ln_1.weight", (c,)), (p + "ln_1.bias", (c,)),
                (s + "x_proj_weight", (r + 2, d)), (s + "dt_projs_weight", (d, r)), (s + "dt_projs_bias", (d,)),
                (s + "A_logs", (d, 1)), (s + "Ds", (d,)),
                (s + "in_proj.weight", (2 * d, c)), (s + "conv2d.weight", (d, 1, 3, 3)), (s + "conv2d.bias", (d,)),
                (s + "state_fusion.kernel_3", (d, 1, 3, 3)), (s + "state_fusion.kernel_3_1", (d, 1, 3, 3)),
                (s + "state_fusion.kernel_3_2", (d, 1, 3, 3)), (s + "state_fusion.alpha", (3,)),
                (s + "out_norm.weight", (d,)), (s + "out_norm.bias", (d,)), (s + "out_proj.weight", (c, d)),
                (p + "cpe2.weight", (c, 1, 3, 3)), (p + "cpe2.bias", (c,)),
                (p + "ln_2.weight", (c,)), (p + "ln_2.bias", (c,)),
                (p + "mlp.fc1.weight", (4 * c, c)), (p + "mlp.fc1.bias", (4 * c,)),
                (p + "mlp.fc2.weight", (c, 4 * c)), (p + "mlp.fc2.bias", (c,)),
            ]  # fmt: skip
        if i < len(depths) - 1:
            p = f"layers.{i}.downsample.conv."
            keys += [
                (p + "0.conv.weight", (8 * c, c, 1, 1)), (p + "0.conv.bias", (8 * c,)),
                (p + "1.conv.weight", (8 * c, 1, 3, 3)), (p + "1.conv.bias", (8 * c,)),
                (p + "2.conv.weight", (2 * c, 8 * c, 1, 1)), (p + "2.conv.bias", (2 * c,)),
            ] + _bn(p + "2.norm")  # fmt: skip
    c4 = c1 * 8
    keys += [
        ("norm.weight", (c4,)),
        ("norm.bias", (c4,)),
        ("head.weight", (num_classes, c4)),
        ("head.bias", (num_classes,)),
    ]
    return keys


@pytest.mark.parametrize("variant,num_keys", [("spatial_mamba_tiny", 553), ("spatial_mamba_small", 931),
                                              ("spatial_mamba_base", 931)])  # fmt: skip
def test_state_dict_keys_shapes_and_order_are_the_official_ones(variant, num_keys):
    cfg = VARIANTS[variant]
    model = SpatialMamba(dims=cfg["dims"], depths=cfg["depths"], d_state=1)
    expected = official_keys(cfg["dims"], cfg["depths"])
    state = model.state_dict()
    assert len(state) == num_keys == len(expected)
    assert list(state) == [k for k, _ in expected]
    for key, shape in expected:
        if shape is None:  # BN entries: per-channel vectors, and a scalar step counter
            assert state[key].ndim == (0 if key.endswith("num_batches_tracked") else 1)
        else:
            assert tuple(state[key].shape) == shape, key


@pytest.mark.parametrize("variant,count", [("spatial_mamba_tiny", 26_748_862), ("spatial_mamba_small", 43_074_280),
                                           ("spatial_mamba_base", 95_745_592)])  # fmt: skip
def test_parameter_counts_are_the_official_ones(variant, count):
    cfg = VARIANTS[variant]
    model = SpatialMamba(dims=cfg["dims"], depths=cfg["depths"], d_state=1)
    assert sum(p.numel() for p in model.parameters()) == count


def test_int_dims_expand_to_four_stages_and_d_state_none_follows_the_official_rule():
    model = SpatialMamba(dims=32, depths=(1, 1, 1, 1), d_state=None, num_classes=5)
    assert model.dims == [32, 64, 128, 256]
    assert model.d_state == math.ceil(32 / 6)
    assert model.layers[0].blocks[0].self_attention.A_logs.shape == (64, 6)


def test_initialisation_follows_the_official_rules():
    torch.manual_seed(0)
    model = SpatialMamba(dims=32, depths=(1, 1, 1, 1), num_classes=5)
    ssm = model.layers[1].blocks[0].self_attention
    d, r = ssm.d_inner, ssm.dt_rank
    assert torch.all(ssm.state_fusion.kernel_3 == 1) and torch.all(ssm.state_fusion.alpha == 1)
    assert torch.all(ssm.A_logs == 0) and torch.all(ssm.Ds == 1)
    dt = torch.nn.functional.softplus(ssm.dt_projs_bias)
    assert dt.min() >= 1e-3 - 1e-6 and dt.max() <= 0.1 + 1e-6
    assert ssm.dt_projs_weight.abs().max() <= r**-0.5
    assert ssm.x_proj_weight.abs().max() <= d**-0.5  # nn.Linear(D, R + 2N) default init
    # timm trunc_normal_(std=0.02) on every Linear (bounds +-2 absolute, so effectively untruncated), biases zero
    assert 0.018 < ssm.in_proj.weight.std() < 0.022 and abs(ssm.in_proj.weight.mean()) < 0.002
    assert torch.all(model.layers[0].blocks[0].mlp.fc1.bias == 0)
    assert torch.all(ssm.out_norm.weight == 1) and torch.all(ssm.out_norm.bias == 0)
