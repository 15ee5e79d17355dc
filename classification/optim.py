"""Optimizer, learning-rate scaling and schedule of the official recipe (official
``classification/utils/optimizer.py`` and ``classification/utils/lr_scheduler.py``)."""

from __future__ import annotations

from typing import List, Tuple

import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler, StepLRScheduler
from torch import nn

__all__ = ["lr_scale", "split_weight_decay", "build_optimizer", "build_scheduler"]


def lr_scale(config, world_size: int) -> float:
    """The factor the official code applies to BASE_LR, WARMUP_LR and MIN_LR: total batch / 512."""
    return config.DATA.BATCH_SIZE * world_size * config.TRAIN.ACCUMULATION_STEPS / 512.0


def split_weight_decay(model: nn.Module) -> Tuple[List[str], List[str]]:
    """Names of the parameters with and without weight decay, by the official rule: no decay for 1-D tensors,
    biases, names listed by ``model.no_weight_decay()`` and names containing a keyword of
    ``model.no_weight_decay_keywords()``. So A_logs (D, 1) is decayed, as in the official runs
    (docs/official_bugs.md, #10)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    keywords = model.no_weight_decay_keywords() if hasattr(model, "no_weight_decay_keywords") else ()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 1 or name.endswith(".bias") or name in skip or any(k in name for k in keywords):
            no_decay.append(name)
        else:
            decay.append(name)
    return decay, no_decay


def build_optimizer(config, model: nn.Module) -> torch.optim.Optimizer:
    params = dict(model.named_parameters())
    decay, no_decay = split_weight_decay(model)
    groups = [{"params": [params[n] for n in decay]}, {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    opt = config.TRAIN.OPTIMIZER
    name = opt.NAME.lower()
    if name == "adamw":
        return torch.optim.AdamW(
            groups, lr=config.TRAIN.BASE_LR, betas=tuple(opt.BETAS), eps=opt.EPS, weight_decay=config.TRAIN.WEIGHT_DECAY
        )
    if name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=config.TRAIN.BASE_LR,
            momentum=opt.MOMENTUM,
            nesterov=True,
            weight_decay=config.TRAIN.WEIGHT_DECAY,
        )
    raise ValueError(f"TRAIN.OPTIMIZER.NAME must be adamw or sgd, got {opt.NAME!r}")


def build_scheduler(config, optimizer: torch.optim.Optimizer, n_iter_per_epoch: int):
    """A timm scheduler stepped once per optimizer step (``step_update``), as the official code does."""
    train, sched = config.TRAIN, config.TRAIN.LR_SCHEDULER
    num_steps = int(train.EPOCHS * n_iter_per_epoch)
    warmup_steps = int(train.WARMUP_EPOCHS * n_iter_per_epoch)
    common = dict(warmup_lr_init=train.WARMUP_LR, warmup_t=warmup_steps, t_in_epochs=False)
    if sched.NAME == "cosine":
        return CosineLRScheduler(
            optimizer,
            t_initial=num_steps - warmup_steps if sched.WARMUP_PREFIX else num_steps,
            lr_min=train.MIN_LR,
            cycle_mul=1.0,
            cycle_limit=1,
            warmup_prefix=sched.WARMUP_PREFIX,
            **common,
        )
    if sched.NAME == "linear":  # Swin's linear decay to 1% of the peak after warm-up
        return PolyLRScheduler(
            optimizer,
            t_initial=num_steps - warmup_steps,
            power=1.0,
            lr_min=0.01 * train.BASE_LR,
            warmup_prefix=True,
            **common,
        )
    if sched.NAME == "step":
        return StepLRScheduler(
            optimizer,
            decay_t=int(sched.DECAY_EPOCHS * n_iter_per_epoch),
            decay_rate=sched.DECAY_RATE,
            warmup_prefix=False,
            **common,
        )
    if sched.NAME == "multistep":
        return MultiStepLRScheduler(
            optimizer,
            decay_t=[int(epoch * n_iter_per_epoch) for epoch in sched.MULTISTEPS],
            decay_rate=sched.GAMMA,
            warmup_prefix=False,
            **common,
        )
    raise ValueError(f"TRAIN.LR_SCHEDULER.NAME must be cosine, linear, step or multistep, got {sched.NAME!r}")
