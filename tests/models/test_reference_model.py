"""The whole model against an independent float64 transcription of the paper's equations and the official architecture
(``classification/models/spatialmamba.py`` and ``classification/models/utils.py``): stem, blocks with a sequential
raster scan and three replicate-padded dilated convolutions, downsampling, head; and the backbone's outputs.

The transcription reads the model's state dict only; it shares no code with the package.
"""

import pytest
import torch
import torch.nn.functional as F

from spatial_mamba import SpatialMamba, SpatialMambaBackbone
from spatial_mamba.models import SpatialMambaBlock

DIMS, DEPTHS = 8, (1, 2, 1, 1)
EPS = 1e-5  # every LayerNorm and BatchNorm of the official model


def _batch_norm(x, sd, p, train):
    if train:  # batch statistics, biased variance
        mean = x.mean((0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean((0, 2, 3), keepdim=True)
    else:
        mean, var = sd[p + "running_mean"][:, None, None], sd[p + "running_var"][:, None, None]
    return (x - mean) / torch.sqrt(var + EPS) * sd[p + "weight"][:, None, None] + sd[p + "bias"][:, None, None]


def _layer_norm(x, sd, p):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS) * sd[p + "weight"] + sd[p + "bias"]


def _conv(x, sd, p, stride=1, groups=1, bn=True, act=True, train=False):
    """ConvLayer: conv (padding k // 2) -> optional BN -> optional ReLU."""
    weight = sd[p + "conv.weight"]
    x = F.conv2d(x, weight, sd.get(p + "conv.bias"), stride, weight.shape[-1] // 2, groups=groups)
    if bn:
        x = _batch_norm(x, sd, p + "norm.", train)
    return torch.relu(x) if act else x


def _stem(x, sd, train):
    x = _conv(x, sd, "patch_embed.conv1.", stride=2, train=train)
    y = _conv(x, sd, "patch_embed.conv2.0.", train=train)
    x = _conv(y, sd, "patch_embed.conv2.1.", act=False, train=train) + x
    x = _conv(x, sd, "patch_embed.conv3.0.", stride=2, train=train)
    x = _conv(x, sd, "patch_embed.conv3.1.", act=False, train=train)
    return x.permute(0, 2, 3, 1)


def _ssm(x, sd, p):
    """x_t = exp(Δ_t A) x_{t-1} + Δ_t B_t u_t; h_t = Σ_k α_k x_{ρ_k(t)}; y_t = C_t h_t + D u_t; then norm and gate."""
    b, h, w, _ = x.shape
    xz = x @ sd[p + "in_proj.weight"].T
    d = xz.shape[-1] // 2
    u, z = xz[..., :d].permute(0, 3, 1, 2), xz[..., d:]
    u = F.silu(F.conv2d(u, sd[p + "conv2d.weight"], sd[p + "conv2d.bias"], padding=1, groups=d)).reshape(b, d, h * w)
    n = sd[p + "A_logs"].shape[1]
    r = sd[p + "dt_projs_weight"].shape[1]
    proj = torch.einsum("cd,bdl->bcl", sd[p + "x_proj_weight"], u)
    dts, Bs, Cs = proj[:, :r], proj[:, r : r + n], proj[:, r + n :]
    delta = F.softplus(torch.einsum("dr,brl->bdl", sd[p + "dt_projs_weight"], dts) + sd[p + "dt_projs_bias"][:, None])
    A = -torch.exp(sd[p + "A_logs"])
    state, states = torch.zeros(b, d, n, dtype=x.dtype), []
    for t in range(h * w):  # raster order t = row * w + col
        state = (
            torch.exp(delta[:, :, t, None] * A) * state + (delta[:, :, t] * u[:, :, t])[..., None] * Bs[:, None, :, t]
        )
        states.append(state)
    maps = torch.stack(states, -1).reshape(b, d * n, h, w)
    fused = 0
    for i, (name, dilation) in enumerate((("kernel_3", 1), ("kernel_3_1", 3), ("kernel_3_2", 5))):
        kernel = sd[p + "state_fusion." + name].repeat_interleave(n, 0)
        padded = F.pad(maps, (dilation,) * 4, mode="replicate")
        fused = fused + sd[p + "state_fusion.alpha"][i] * F.conv2d(padded, kernel, dilation=dilation, groups=d * n)
    y = (fused.reshape(b, d, n, h * w) * Cs[:, None]).sum(2) + u * sd[p + "Ds"][:, None]
    y = _layer_norm(y.transpose(1, 2).reshape(b, h, w, d), sd, p + "out_norm.") * F.silu(z)
    return y @ sd[p + "out_proj.weight"].T


def _block(x, sd, p):
    def cpe(x, name):
        c = x.shape[-1]
        return F.conv2d(x.permute(0, 3, 1, 2), sd[p + name + ".weight"], sd[p + name + ".bias"], padding=1, groups=c)

    x = x + cpe(x, "cpe1").permute(0, 2, 3, 1)
    x = x + _ssm(_layer_norm(x, sd, p + "ln_1."), sd, p + "self_attention.")
    x = x + cpe(x, "cpe2").permute(0, 2, 3, 1)
    hidden = F.gelu(_layer_norm(x, sd, p + "ln_2.") @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
    return x + hidden @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]


def _downsample(x, sd, p, train):
    x = x.permute(0, 3, 1, 2)
    x = _conv(x, sd, p + "conv.0.", bn=False)
    x = _conv(x, sd, p + "conv.1.", stride=2, groups=x.shape[1], bn=False)
    x = _conv(x, sd, p + "conv.2.", act=False, train=train)
    return x.permute(0, 2, 3, 1)


def reference_stages(sd, x, train):
    """The stem and the four stages; returns each stage's output before its downsampling."""
    x = _stem(x, sd, train)
    outs = []
    for i, depth in enumerate(DEPTHS):
        for j in range(depth):
            x = _block(x, sd, f"layers.{i}.blocks.{j}.")
        outs.append(x)
        if i < len(DEPTHS) - 1:
            x = _downsample(x, sd, f"layers.{i}.downsample.", train)
    return outs


def reference_logits(sd, x, train):
    x = _layer_norm(reference_stages(sd, x, train)[-1], sd, "norm.")
    return x.mean((1, 2)) @ sd["head.weight"].T + sd["head.bias"]


def _randomised(model):
    """Moves every parameter and BN statistic away from its structured init (all-ones fusion kernels and alpha would
    hide swapped dilations), in float64."""
    g = torch.Generator().manual_seed(1)
    model = model.double()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g, dtype=t.dtype)
                t.add_(0.2 * noise) if not name.endswith("running_var") else t.mul_(1 + 0.5 * noise.abs())
    return model


def _classifier():
    torch.manual_seed(0)
    return _randomised(SpatialMamba(dims=DIMS, depths=DEPTHS, num_classes=5, drop_path_rate=0.0))


SIZES = [(37, 29), (45, 61)]


@pytest.mark.parametrize("size", SIZES)
def test_eval_logits_match_the_float64_transcription(size):
    model = _classifier().eval()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    sd = model.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(sd, x, train=False), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_train_logits_and_gradients_match_the_float64_transcription(checkpointing, monkeypatch):
    """Train mode (batch-statistics BN, the training fusion path) with dropout and drop path off; with gradient
    checkpointing every block runs twice (its forward is recomputed in the backward pass; module hooks do not see
    the recomputation, so the forward itself is counted)."""
    model = _classifier().train()
    model.set_grad_checkpointing(checkpointing)
    calls = []
    forward = SpatialMambaBlock.forward

    def counted(self, x):
        calls.append(1)
        return forward(self, x)

    monkeypatch.setattr(SpatialMambaBlock, "forward", counted)
    x = torch.randn(2, 3, *SIZES[0], dtype=torch.float64)
    logits = model(x)
    logits.logsumexp(1).sum().backward()
    assert len(calls) == sum(DEPTHS) * (2 if checkpointing else 1)

    sd = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in model.state_dict().items()}
    expected = reference_logits(sd, x, train=True)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-10)
    expected.logsumexp(1).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, sd[name].grad, rtol=1e-7, atol=1e-9, msg=name)


@pytest.mark.parametrize("train", [False, True])
def test_backbone_outputs_match_the_float64_transcription(train):
    torch.manual_seed(0)
    backbone = _randomised(SpatialMambaBackbone(dims=DIMS, depths=DEPTHS, out_indices=(0, 2, 3), drop_path_rate=0.0))
    backbone.train(train)
    x = torch.randn(2, 3, *SIZES[1], dtype=torch.float64)
    sd = backbone.state_dict()
    with torch.no_grad():
        outs = backbone(x)
        stages = reference_stages(sd, x, train)
    assert len(outs) == 3
    for out, i in zip(outs, (0, 2, 3)):
        expected = _layer_norm(stages[i], sd, f"outnorm{i}.").permute(0, 3, 1, 2)
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
