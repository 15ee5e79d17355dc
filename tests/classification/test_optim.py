"""The official no-decay rule and the per-step learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from classification.config import load_config
from classification.models import build_model
from classification.optim import build_optimizer, build_scheduler, split_weight_decay


def tiny_config(*opts):
    base = ["MODEL.SPATIALMAMBA.EMBED_DIM", "8", "MODEL.SPATIALMAMBA.DEPTHS", "[1, 1, 1, 1]", "MODEL.NUM_CLASSES", "4"]
    return load_config(None, [*base, *opts])


def test_no_decay_groups_follow_the_official_rule():
    model = build_model(tiny_config())
    decay, no_decay = split_weight_decay(model)
    assert set(decay) | set(no_decay) == {n for n, _ in model.named_parameters()}
    block = "layers.0.blocks.0."
    # Decayed: every 2-D+ weight, including A_logs (D, 1), as in the official runs (docs/official_bugs.md, #10).
    decayed = [
        "self_attention.A_logs",
        "self_attention.x_proj_weight",
        "self_attention.dt_projs_weight",
        "self_attention.state_fusion.kernel_3",
        "self_attention.in_proj.weight",
        "cpe1.weight",
        "mlp.fc1.weight",
    ]
    assert all(block + name in decay for name in decayed)
    assert "patch_embed.conv1.conv.weight" in decay and "head.weight" in decay
    # Not decayed: 1-D tensors and biases.
    not_decayed = [
        "self_attention.Ds",
        "self_attention.dt_projs_bias",
        "self_attention.state_fusion.alpha",
        "self_attention.out_norm.weight",
        "ln_1.weight",
        "ln_1.bias",
        "cpe1.bias",
        "mlp.fc1.bias",
    ]
    assert all(block + name in no_decay for name in not_decayed)
    assert "patch_embed.conv1.norm.weight" in no_decay and "head.bias" in no_decay and "norm.weight" in no_decay


def test_optimizer_groups_carry_the_weight_decay():
    config = tiny_config("TRAIN.WEIGHT_DECAY", "0.05")
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = split_weight_decay(model)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(decay), len(no_decay)]
    sgd = build_optimizer(tiny_config("TRAIN.OPTIMIZER.NAME", "sgd"), model)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9


def lrs(config, n_iter_per_epoch):
    """The learning rate in force after each optimizer step, stepped the way train_one_epoch does."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.TRAIN.BASE_LR)
    scheduler = build_scheduler(config, optimizer, n_iter_per_epoch)
    values = [optimizer.param_groups[0]["lr"]]
    for step in range(config.TRAIN.EPOCHS * n_iter_per_epoch):
        scheduler.step_update(step)
        values.append(optimizer.param_groups[0]["lr"])
    return values


def test_cosine_schedule_warms_up_linearly_then_follows_the_cosine_per_step():
    base, warm, low, n = 1e-3, 1e-6, 1e-5, 10
    config = tiny_config(
        "TRAIN.EPOCHS", "6", "TRAIN.WARMUP_EPOCHS", "2", "TRAIN.BASE_LR", str(base), "TRAIN.WARMUP_LR", str(warm),
        "TRAIN.MIN_LR", str(low),
    )  # fmt: skip
    values = lrs(config, n)
    warmup_steps, cosine_steps = 2 * n, 4 * n
    assert values[0] == pytest.approx(warm)
    for t in range(warmup_steps):  # linear warm-up over 2 epochs' worth of steps
        assert values[t + 1] == pytest.approx(warm + t * (base - warm) / warmup_steps)
    for t in range(cosine_steps):  # then cosine from base to min over the remaining 4 epochs (warmup_prefix)
        expected = low + 0.5 * (base - low) * (1 + math.cos(math.pi * t / cosine_steps))
        assert values[warmup_steps + t + 1] == pytest.approx(expected)
    assert values[warmup_steps + 1] == pytest.approx(base)


def test_step_and_multistep_schedules_decay_at_their_epochs():
    common = ["TRAIN.EPOCHS", "4", "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.BASE_LR", "0.1"]
    step = lrs(tiny_config(*common, "TRAIN.LR_SCHEDULER.NAME", "step", "TRAIN.LR_SCHEDULER.DECAY_EPOCHS", "2"), 5)
    assert step[1] == pytest.approx(0.1) and step[10] == pytest.approx(0.1) and step[11] == pytest.approx(0.01)
    multistep = ["TRAIN.LR_SCHEDULER.NAME", "multistep", "TRAIN.LR_SCHEDULER.MULTISTEPS", "[1, 3]"]
    multi = lrs(tiny_config(*common, *multistep), 5)
    # timm's multistep decays on the last step before each milestone epoch (bisect on t + 1).
    assert multi[4] == pytest.approx(0.1) and multi[6] == pytest.approx(0.01)
    assert multi[14] == pytest.approx(0.01) and multi[16] == pytest.approx(0.001)
