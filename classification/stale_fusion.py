"""The official evaluation of the state fusion, stale kernel included, for researchers who compare with official
training logs (off by default: config key TRAIN.STALE_FUSION_KERNEL).

The official ``StateFusion`` merged its three dilated kernels into one 11x11 kernel at its first evaluation and never
rebuilt it (docs/official_bugs.md, #1), so every later validation, the EMA's validations and the MESA teacher of an
official run saw the kernels of that first evaluation. Our ``StateFusion`` merges the current kernels on every call.
:func:`freeze_fusion_kernels_at_first_eval` brings the official behaviour back without touching the model code: a
forward hook on every state-fusion module recomputes its eval-mode output with copies of the kernels and weights
taken at that module's first eval-mode call. Training-mode outputs are left as they are (the official training path
never used the cached kernel).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from spatial_mamba.models import StateFusion

__all__ = ["freeze_fusion_kernels_at_first_eval"]

_KERNELS = ("kernel_3", "kernel_3_1", "kernel_3_2")


def _frozen_output(frozen: Dict[int, Tuple[torch.Tensor, ...]]):
    def hook(module: nn.Module, inputs, output):
        if module.training:
            return None
        if id(module) not in frozen:  # first evaluation of this module: its kernels are cached from now on
            frozen[id(module)] = tuple(getattr(module, k).detach().clone() for k in _KERNELS) + (
                module.alpha.detach().clone(),
            )
        (h,) = inputs
        weights = frozen[id(module)]
        fused = StateFusion.fuse(h.float(), *(w.float() for w in weights), path="merged")
        return fused.to(output.dtype)

    return hook


def freeze_fusion_kernels_at_first_eval(*models: nn.Module | None) -> int:
    """Registers the hook on every state-fusion module of ``models`` (the model, its EMA copy, which is also the
    MESA teacher); returns how many modules it covers. Call it after the EMA copy is made, so that each copy
    freezes its own kernels at its own first evaluation."""
    frozen: Dict[int, Tuple[torch.Tensor, ...]] = {}
    count = 0
    for model in models:
        if model is None:
            continue
        for module in model.modules():
            if isinstance(module, StateFusion):
                module.register_forward_hook(_frozen_output(frozen))
                count += 1
    if count == 0:
        raise ValueError("TRAIN.STALE_FUSION_KERNEL: the model has no StateFusion module to freeze")
    return count
