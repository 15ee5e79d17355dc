"""FLOP counting the way the official code reports it (``flops()`` in ``classification/models/spatialmamba.py``):
fvcore conventions, i.e. one multiply-add counts as one FLOP; matmuls and convolutions by their MACs,
LayerNorm/BatchNorm (train mode) as 5 per element, element-wise ops and pooling not counted, and the hidden-state
scan as 7·B·L·D·N. Like the official ``flops()``, the model is measured in train mode, so the state fusion counts its
three dilated 3x3 branches (``path="branches"``); evaluation (``train=False``) counts the merged 11x11 kernel of the
official evaluation path.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .models.ssm import StateFusion, StructureAwareSSM

__all__ = ["count_params", "count_flops", "scan_flops"]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def scan_flops(batch: int, length: int, d_inner: int, d_state: int) -> int:
    """The official count of the hidden-state scan without C and D: 7·B·L·D·N."""
    return 7 * batch * length * d_inner * d_state


def count_flops(
    model: nn.Module,
    input_shape: Tuple[int, int, int] = (3, 224, 224),
    train: bool = True,
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> int:
    """Returns the FLOPs (fvcore multiply-add convention) of one forward pass on a single image.

    ``train=False`` measures inference (the merged 11x11 state-fusion kernel); ``forward(model, image)`` replaces
    ``model(image)`` for models that take more than an image (OpenMMLab detectors and segmentors).
    """
    model = copy.deepcopy(model).train(train)
    for module in model.modules():
        if isinstance(module, StateFusion):
            module.path = "branches" if train else "merged"  # the official paths, whatever the default path is
        # BN statistics do not change the count, and eval-mode BN also runs on 1x1 maps of a single image.
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    extra = [0]

    def norm_hook(module: nn.Module, inputs, output):
        affine = getattr(module, "weight", None) is not None
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not train:
            extra[0] += inputs[0].numel() * (2 if affine else 1)
        else:
            extra[0] += inputs[0].numel() * (5 if affine else 4)

    def ssm_hook(module: StructureAwareSSM, inputs, output):
        batch, height, width, _ = inputs[0].shape
        extra[0] += scan_flops(batch, height * width, module.d_inner, module.d_state)

    handles = []
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
            handles.append(module.register_forward_hook(norm_hook))
        elif isinstance(module, StructureAwareSSM):
            handles.append(module.register_forward_hook(ssm_hook))
    image = torch.zeros(1, *input_shape)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(image) if forward is None else forward(model, image)
    for handle in handles:
        handle.remove()
    # FlopCounterMode counts a multiply-add as 2 FLOPs; the official (fvcore) numbers count it as 1.
    return counter.get_total_flops() // 2 + extra[0]
