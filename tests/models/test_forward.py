"""The token mixer computes the paper's equations exactly (``StructureAwareSSM`` in
``classification/models/spatialmamba.py``), for any input size, in train and eval mode."""

import copy

import pytest
import torch
import torch.nn.functional as F

from spatial_mamba import SpatialMamba
from spatial_mamba.models import SpatialMambaBlock, StructureAwareSSM
from spatial_mamba.ops import state_fusion


def paper_ssm_forward(ssm: StructureAwareSSM, x: torch.Tensor) -> torch.Tensor:
    """The paper's equations written out step by step: sequential raster scan, three replicate-padded dilated convs."""
    b, h, w, _ = x.shape
    d, n, r, L = ssm.d_inner, ssm.d_state, ssm.dt_rank, h * w
    xz = x @ ssm.in_proj.weight.T
    xs, z = xz[..., :d], xz[..., d:]
    xs = F.silu(F.conv2d(xs.permute(0, 3, 1, 2), ssm.conv2d.weight, ssm.conv2d.bias, padding=1, groups=d))
    u = xs.reshape(b, d, L)
    x_dbl = torch.einsum("cd,bdl->bcl", ssm.x_proj_weight, u)
    dts, Bs, Cs = x_dbl[:, :r], x_dbl[:, r : r + n], x_dbl[:, r + n :]
    delta = F.softplus(torch.einsum("dr,brl->bdl", ssm.dt_projs_weight, dts) + ssm.dt_projs_bias[:, None])
    A = -torch.exp(ssm.A_logs)
    state = torch.zeros(b, d, n, dtype=x.dtype)
    hs = []
    for t in range(L):
        state = (
            torch.exp(delta[:, :, t, None] * A) * state + delta[:, :, t, None] * Bs[:, None, :, t] * u[:, :, t, None]
        )
        hs.append(state)
    hs = torch.stack(hs, dim=-1)  # (b, d, n, L)
    fusion = ssm.state_fusion
    maps = hs.reshape(b, d * n, h, w)
    fused = 0
    for alpha, kernel, dil in zip(fusion.alpha, (fusion.kernel_3, fusion.kernel_3_1, fusion.kernel_3_2), (1, 3, 5)):
        kernel = kernel.repeat_interleave(n, 0)
        padded = F.pad(maps, (dil,) * 4, mode="replicate")
        fused = fused + alpha * F.conv2d(padded, kernel, dilation=dil, groups=d * n)
    fused = fused.reshape(b, d, n, L)
    y = (fused * Cs[:, None]).sum(2) + u * ssm.Ds[:, None]
    y = F.layer_norm(y.transpose(1, 2).reshape(b, h, w, d), (d,), ssm.out_norm.weight, ssm.out_norm.bias, 1e-5)
    return (y * F.silu(z)) @ ssm.out_proj.weight.T


def _randomise(module):
    """Moves every parameter away from its structured init so that no term can hide behind ones or zeros."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("d_state", [1, 2])
@pytest.mark.parametrize("size", [(1, 1), (1, 7), (5, 3), (6, 6), (13, 9)])
@pytest.mark.parametrize("train", [True, False])
def test_ssm_matches_the_paper_equations(size, train, d_state):
    torch.manual_seed(0)
    ssm = StructureAwareSSM(16, d_state=d_state).double()
    _randomise(ssm)
    ssm.train(train)
    x = torch.randn(2, *size, 16, dtype=torch.float64)
    torch.testing.assert_close(ssm(x), paper_ssm_forward(ssm, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (17, 31), (32, 32), (64, 48)])
def test_model_accepts_any_input_size(size):
    torch.manual_seed(0)
    model = SpatialMamba(dims=16, depths=(1, 1, 1, 1), num_classes=7)
    for train in (True, False):
        model.train(train)
        out = model(torch.randn(2, 3, *size))
        assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_merged_fusion_kernel_follows_weight_updates_after_evaluation():
    """docs/official_bugs.md, #1: the merged kernel was cached at the first evaluation and never rebuilt."""
    torch.manual_seed(0)
    model = SpatialMamba(dims=16, depths=(1, 1, 1, 1), num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    before = model(x)
    ema = copy.deepcopy(model)  # an EMA copy made after the first evaluation must not freeze its kernel either
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).logsumexp(1).sum().backward()
    opt.step()
    model.eval()
    after = model(x)
    assert not torch.allclose(after, before)
    ema.load_state_dict(model.state_dict())
    torch.testing.assert_close(ema(x), after)
    # and the merged kernel in use is the one built from the updated weights
    fusion = model.layers[0].blocks[0].self_attention.state_fusion
    h = torch.randn(1, fusion.kernel_3.shape[0], 9, 7)
    expected = state_fusion(h, fusion.kernel_3, fusion.kernel_3_1, fusion.kernel_3_2, fusion.alpha, path="branches")
    torch.testing.assert_close(fusion(h), expected, rtol=1e-5, atol=1e-5)


def test_merged_kernel_is_not_part_of_the_state_dict():
    model = SpatialMamba(dims=16, depths=(1, 1, 1, 1), num_classes=7).eval()
    keys_before = list(model.state_dict())
    model(torch.randn(1, 3, 16, 16))
    assert list(model.state_dict()) == keys_before
    assert not any("merge" in k for k in keys_before)


# Largest |bf16 autocast - float32| logit difference measured over seeds 0-2 of this model (logits up to 0.62):
# 0.0021 in eval, 0.028 in train (where the fusion convolutions run in bf16, as in the official training).
# The tolerances are twice that.
_BF16_LOGIT_ATOL = {False: 0.004, True: 0.06}


def test_cpu_bf16_autocast_runs_close_to_float32():
    torch.manual_seed(0)
    model = SpatialMamba(dims=16, depths=(1, 1, 1, 1), num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    fusion = model.layers[0].blocks[0].self_attention.state_fusion
    seen = {}
    fusion.register_forward_hook(lambda module, args, out: seen.update(h=args[0], out=out))
    for train in (True, False):
        model.train(train)
        torch.manual_seed(1)
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(1)
            out = model(x)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=_BF16_LOGIT_ATOL[train])
    # The eval fusion runs in float32 even under autocast, as the official fp32-only kernel did: its output is the
    # float32 fusion of its input, to float32 rounding (bf16 would be off by about 1e-2 relative).
    assert seen["out"].dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(seen["out"], fusion(seen["h"].float()), rtol=1e-6, atol=1e-6)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(1).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("grad", [False, True])
def test_block_sums_keep_a_float32_input_float32_under_autocast(grad):
    """The block adds each branch into the branch's output where it can (a temporary); under autocast the branches
    come out bf16, and a float32 input must still give the float32 sum, as ``x + branch`` does, and the same values."""
    torch.manual_seed(0)
    block = SpatialMambaBlock(16).eval()
    x = torch.randn(2, 5, 7, 16)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
        cpe = block.cpe1(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert cpe.dtype == torch.bfloat16 and out.dtype == torch.float32
    # Out of place, step by step: the sums in float32, the branches as autocast runs them.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = x + block.cpe1(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = y + block.self_attention(block.ln_1(y))
        y = y + block.cpe2(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = y + block.mlp(block.ln_2(y))
    torch.testing.assert_close(out.detach(), y, rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (torch.randn(3, 32, 32), ValueError, "4-D"),
        (torch.randn(1, 1, 32, 32), ValueError, "3 input channels"),
        (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), TypeError, "floating-point"),
        ([[0.0]], TypeError, "image tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(bad, error, match):
    model = SpatialMamba(dims=16, depths=(1, 1, 1, 1), num_classes=7)
    with pytest.raises(error, match=match):
        model(bad)


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="dims"):
        SpatialMamba(dims=(16, 32), depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="dt_init"):
        SpatialMamba(dims=16, depths=(1, 1, 1, 1), dt_init="fancy")
