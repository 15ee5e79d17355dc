"""timm registration, the standard model API and gradient checkpointing."""

import pytest
import timm
import torch

import spatial_mamba  # noqa: F401


def test_variants_are_registered_with_official_default_cfgs():
    assert {"spatial_mamba_tiny", "spatial_mamba_small", "spatial_mamba_base"} <= set(timm.list_models("spatial*"))
    model = timm.create_model("spatial_mamba_tiny", num_classes=10, drop_path_rate=0.0)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
    assert cfg["crop_pct"] == pytest.approx(224 / 256)
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["input_size"] == (3, 224, 224)
    assert model.head.out_features == 10 and model.dims == [64, 128, 256, 512] and model.depths == [2, 4, 8, 4]


def test_drop_path_rate_is_spread_linearly_over_blocks():
    model = timm.create_model("spatial_mamba_tiny", drop_path_rate=0.2)
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0
             for layer in model.layers for b in layer.blocks]  # fmt: skip
    assert rates == pytest.approx(torch.linspace(0, 0.2, 18).tolist())


def test_features_only_returns_stage_maps_at_strides_4_to_32():
    model = timm.create_model("spatial_mamba_tiny", features_only=True, out_indices=(0, 1, 2, 3))
    feats = model(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 16, 24), (1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]
    assert model.feature_info.channels() == [64, 128, 256, 512]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    partial = timm.create_model("spatial_mamba_tiny", features_only=True, out_indices=(1, 3))
    assert [f.shape[1] for f in partial(torch.randn(1, 3, 64, 64))] == [128, 512]


def test_forward_head_pre_logits_and_reset_classifier():
    torch.manual_seed(0)
    model = timm.create_model("spatial_mamba_tiny", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 2, 2, 512)
    pooled = model.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(pooled, feats.mean(dim=(1, 2)))
    torch.testing.assert_close(model.forward_head(feats), model.head(pooled))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 512)
    assert model.no_weight_decay() == {"absolute_pos_embed"}


def _saved_tensor_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def test_gradient_checkpointing_keeps_outputs_and_gradients_and_saves_memory():
    torch.manual_seed(0)
    model = spatial_mamba.SpatialMamba(dims=16, depths=(1, 2, 2, 1), num_classes=7, drop_path_rate=0.3).train()
    x = torch.randn(2, 3, 64, 64)

    def step():
        torch.manual_seed(123)  # the same drop-path draws in both runs
        return model(x)

    out, plain_bytes = _saved_tensor_bytes(step)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out_ckpt, ckpt_bytes = _saved_tensor_bytes(step)
    out_ckpt.sum().backward()
    torch.testing.assert_close(out_ckpt, out)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    # activations kept for the backward pass: only the block inputs (and the stem/downsampling) remain; the mixer
    # keeps only its input even without checkpointing, so the saving is of the norms, CPEs and MLPs (measured 0.59)
    assert ckpt_bytes < 0.65 * plain_bytes, (ckpt_bytes, plain_bytes)
