"""The state fusion path inside the whole model (alone or fused with the observation step), the mixer's recomputation
in training, and empty batches.

Runs in float64, where the taps op and the three branches differ only by summation order: outputs and gradients are
compared with rtol 1e-10 (the model's depth and the norms amplify the 1e-16 differences of the fusion).
"""

import copy
import importlib

import pytest
import timm
import torch

import spatial_mamba.models.ssm as ssm
from spatial_mamba.models.spatial_mamba import SpatialMamba
from spatial_mamba.models.ssm import StateFusion

# the module, which the package's ``state_fusion`` function shadows as an attribute
fusion_module = importlib.import_module("spatial_mamba.ops.state_fusion")


def small_model(seed=0):
    torch.manual_seed(seed)
    model = SpatialMamba(dims=16, depths=(1, 1, 1, 1), num_classes=7, drop_path_rate=0.0).double()
    with torch.no_grad():  # random fusion weights, so that every tap and border row matters
        for module in model.modules():
            if isinstance(module, StateFusion):
                for p in (module.kernel_3, module.kernel_3_1, module.kernel_3_2, module.alpha):
                    p.copy_(torch.randn_like(p))
    return model


def outputs_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.pow(2).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def set_path(model, path):
    for module in model.modules():
        if isinstance(module, StateFusion):
            module.path = path
    return model


def test_three_branch_training_path_equals_the_default_through_the_whole_model():
    model = small_model().train()
    x = torch.randn(1, 3, 36, 32, dtype=torch.float64)
    out, grads = outputs_and_grads(model, x)
    out_b, grads_b = outputs_and_grads(set_path(copy.deepcopy(model), "branches"), x)
    torch.testing.assert_close(out, out_b, rtol=1e-10, atol=1e-10)
    assert grads.keys() == grads_b.keys() and any("kernel_3_2" in name for name in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_b[name], rtol=1e-10, atol=1e-10, msg=name)


def test_the_cpu_trains_and_evaluates_through_the_taps_op_only(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the branches or the merged kernel ran")

    monkeypatch.setattr(fusion_module, "depthwise_conv2d_replicate", forbidden)
    model = small_model()
    assert {m.path for m in model.modules() if isinstance(m, StateFusion)} == {"auto"}
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model.train()(x).sum().backward()
    with torch.no_grad():
        model.eval()(x)


def test_the_mixer_fuses_the_observation_unless_a_hook_watches_the_fusion(monkeypatch):
    # By default each mixer runs fusion and observation as one op; a hook on a StateFusion module (feature
    # extraction, the stale-kernel evaluation of classification/stale_fusion.py) must still see the fused states.
    calls = []
    fused = ssm.fused_observation
    monkeypatch.setattr(ssm, "fused_observation", lambda *args: calls.append(args[0].shape) or fused(*args))
    model = small_model().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out, grads = outputs_and_grads(model, x)
    stages = [(2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2), (2, 256, 1, 1)]
    assert calls == stages + stages[::-1]  # one per block, and again in the backward's recomputation
    seen = []
    for module in model.modules():
        if isinstance(module, StateFusion):
            module.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    calls.clear()
    out_hooked, grads_hooked = outputs_and_grads(model, x)
    assert not calls and seen == stages + stages[::-1]
    torch.testing.assert_close(out, out_hooked, rtol=1e-10, atol=1e-10)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_hooked[name], rtol=1e-10, atol=1e-10, msg=name)


def test_recomputing_the_mixer_in_the_backward_changes_no_gradient(monkeypatch):
    model = small_model().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out, grads = outputs_and_grads(model, x)
    monkeypatch.setattr(ssm, "checkpoint", lambda fn, *args, **kwargs: fn(*args))
    out_kept, grads_kept = outputs_and_grads(model, x)
    torch.testing.assert_close(out, out_kept, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_kept[name], rtol=1e-12, atol=1e-12, msg=name)


def test_state_fusion_rejects_an_unknown_path():
    with pytest.raises(ValueError, match=r"path must be one of auto, taps, branches, merged; got 'fast'"):
        StateFusion(4, path="fast")


@pytest.mark.parametrize("train", [False, True])
def test_empty_batch_gives_an_empty_output_like_timm_models(train):
    model = timm.create_model("spatial_mamba_tiny", num_classes=5).train(train)
    x = torch.zeros(0, 3, 64, 64, requires_grad=train)
    out = model(x)
    assert out.shape == (0, 5)
    if train:
        out.sum().backward()
        assert x.grad.shape == x.shape
        assert all(not p.grad.any() for p in model.parameters() if p.grad is not None)
