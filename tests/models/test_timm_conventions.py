"""The checks timm applies to its own model families, on a narrow Spatial-Mamba built through timm."""

import re

import pytest
import timm
import torch
from timm.layers import create_feature_extractor, get_channel_dim, get_graph_node_names, get_spatial_dim

import spatial_mamba  # noqa: F401

NARROW = dict(dims=16, depths=(1, 2, 1, 1), drop_path_rate=0.0)


def _model(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("spatial_mamba_tiny", **{**NARROW, "num_classes": 7, **kwargs})


@pytest.mark.parametrize("size", [(33, 47), (64, 64)])
def test_forward_and_backward_reach_every_parameter(size):
    model = _model().train()
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 7)
    out.logsumexp(1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_default_cfg_matches_the_model():
    model = _model(num_classes=1000).eval()
    cfg = model.pretrained_cfg
    x = torch.randn(1, *cfg["input_size"])
    with torch.no_grad():
        feats = model.forward_features(x)
    # the unpooled output, read through the declared format as timm's tools do
    assert model.output_fmt == "NHWC"
    assert tuple(feats.shape[i] for i in get_spatial_dim(model.output_fmt)) == cfg["pool_size"]
    assert feats.shape[get_channel_dim(model.output_fmt)] == model.num_features == model.head_hidden_size == 128
    assert model.forward_head(feats, pre_logits=True).shape == (1, model.head_hidden_size)
    state = model.state_dict()
    assert state[cfg["first_conv"] + ".weight"].shape[1] == cfg["input_size"][0]
    assert state[cfg["classifier"] + ".weight"].shape == (cfg["num_classes"], model.num_features)
    assert model.get_classifier() is model.head
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (1, model.num_features)
    assert model.forward_head(feats).shape == (1, model.num_features)


def test_unknown_constructor_arguments_are_a_type_error():
    with pytest.raises(TypeError, match="drop_path"):
        timm.create_model("spatial_mamba_tiny", drop_path=0.3)
    with pytest.raises(TypeError, match="num_classes"):
        spatial_mamba.SpatialMambaBackbone(num_classes=5, **NARROW)
    with pytest.raises(ValueError, match="depths"):
        spatial_mamba.SpatialMamba(dims=16, depths=(1, 0, 1, 1))


def test_forward_intermediates_options():
    model = _model().eval()
    x = torch.randn(2, 3, 45, 70)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        assert [tuple(f.shape[1:]) for f in feats] == [(16, 12, 18), (32, 6, 9), (64, 3, 5), (128, 2, 3)]

        nhwc = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        for a, b in zip(nhwc, feats):
            torch.testing.assert_close(a.permute(0, 3, 1, 2), b, rtol=0, atol=0)

        normed = model.forward_intermediates(x, norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[-1], final.permute(0, 3, 1, 2), rtol=0, atol=0)
        torch.testing.assert_close(normed[0], feats[0], rtol=0, atol=0)  # the norm has the last stage's width only

        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        negative = model.forward_intermediates(x, indices=[-3, 0], intermediates_only=True)
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(last_two, feats[2:], rtol=0, atol=0)
    torch.testing.assert_close(negative, feats[:2], rtol=0, atol=0)
    torch.testing.assert_close(early, feats[:2], rtol=0, atol=0)
    with pytest.raises(ValueError, match="intermediates_only"):
        model.forward_intermediates(x, indices=[1], stop_early=True)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NLC")
    with pytest.raises(ValueError, match="feature indices"):
        model.forward_intermediates(x, indices=[4])


def test_stop_early_does_not_run_later_stages():
    model = _model().eval()
    calls = []
    for i, layer in enumerate(model.layers):
        layer.blocks[0].register_forward_hook(lambda *_, i=i: calls.append(i))
        if layer.downsample is not None:
            layer.downsample.register_forward_hook(lambda *_, i=i: calls.append(f"down{i}"))
    model.forward_intermediates(torch.randn(1, 3, 40, 40), indices=[1], stop_early=True, intermediates_only=True)
    assert calls == [0, "down0", 1]


def test_prune_intermediate_layers_keeps_the_selected_features():
    model = _model().eval()
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert model.prune_intermediate_layers([0, 1]) == [0, 1]
        assert len(model.layers) == 2 and model.layers[1].downsample is None
        assert isinstance(model.head, torch.nn.Identity) and isinstance(model.norm, torch.nn.Identity)
        final, got = model.forward_intermediates(x, indices=[0, 1])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(final, got[1].permute(0, 2, 3, 1), rtol=0, atol=0)

    full = _model().eval()
    full.prune_intermediate_layers(indices=1, prune_head=False)
    assert len(full.layers) == 4 and full.layers[3].downsample is None and isinstance(full.norm, torch.nn.LayerNorm)
    assert full(x).shape == (1, 7)


@pytest.mark.parametrize("feature_cls", ["getter", "hook", "fx"])
def test_features_only_wrappers_return_the_stage_features(feature_cls):
    features = timm.create_model(
        "spatial_mamba_tiny", features_only=True, feature_cls=feature_cls, out_indices=(1, 3), **NARROW
    ).eval()
    model = _model().eval()
    weights = {re.sub(r"^(model|body|graph_module)\.", "", k): v for k, v in features.state_dict().items()}
    result = model.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys and all(k.startswith(("norm.", "head.")) for k in result.missing_keys)
    assert features.feature_info.channels() == [32, 128] and features.feature_info.reduction() == [8, 32]
    x = torch.randn(2, 3, 37, 52)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        got = features(x)
    got = list(got.values()) if isinstance(got, dict) else got
    # timm's convention: the hook and FX wrappers return the module outputs in the model's output_fmt (NHWC here)
    # and say so; the getter returns NCHW.
    assert str(features.output_fmt.value if hasattr(features.output_fmt, "value") else features.output_fmt) == (
        "NCHW" if feature_cls == "getter" else "NHWC"
    )
    if feature_cls != "getter":
        got = [f.permute(0, 3, 1, 2) for f in got]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _fx_model(model):
    """timm's FX route: trace the whole model with the registered leaves and return its last node."""
    train_nodes, eval_nodes = get_graph_node_names(model)
    return create_feature_extractor(model, {train_nodes[-1]: "out"} if model.training else {eval_nodes[-1]: "out"})


def test_fx_traced_model_matches_eager_forward_and_backward():
    model = _model()  # no drop path: the traced graph draws its masks in another order
    x = torch.randn(2, 3, 40, 56)
    model.eval()
    fx_eval = _fx_model(model)
    with torch.no_grad():
        torch.testing.assert_close(fx_eval(x)["out"], model(x), rtol=0, atol=0)

    model.train()
    fx_train = _fx_model(model)
    fx_train(x)["out"].logsumexp(1).mean().backward()
    fx_grads = {n: p.grad.clone() for n, p in fx_train.named_parameters()}
    model.zero_grad()
    model(x).logsumexp(1).mean().backward()
    grads = dict(model.named_parameters())
    assert len(fx_grads) == len(grads)
    for name, grad in fx_grads.items():
        torch.testing.assert_close(grad, grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_input_checks_stay_for_eager_callers_and_leave_fx_alone():
    model = _model().eval()
    with pytest.raises(ValueError, match="3 input channels"):
        model(torch.randn(1, 1, 40, 40))
    traced = _fx_model(model)  # tracing passes proxies through the checks without raising
    assert "check_image_batch" not in str(traced.graph)
