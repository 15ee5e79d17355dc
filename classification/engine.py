"""One training epoch, validation and the throughput measurement of the official recipe (the official
``classification/main.py``), logging the official lines word for word: scripts that parse official logs read ours.

Extra information (the loss of the validation, the all-epochs ETA, images/s) goes on lines of its own."""

from __future__ import annotations

import contextlib
import datetime
import logging
import random
import resource
import time
from dataclasses import dataclass
from typing import Dict

import numpy as np
import torch
import torch.distributed as dist
from timm.loss import SoftTargetCrossEntropy
from timm.utils import AverageMeter
from torch import nn

from spatial_mamba import compat

from .distributed import all_reduce_sum

__all__ = [
    "Amp",
    "resolve_amp",
    "GradScalerWithNorm",
    "seed_everything",
    "sync_buffers",
    "train_one_epoch",
    "validate",
    "measure_throughput",
]

logger = logging.getLogger("classification")

MODEL_TIME_WARMUP = 50  # iterations of each epoch left out of the "model time" average (official)


@dataclass(frozen=True)
class Amp:
    """Mixed precision: autocast to ``dtype`` on ``device_type`` when enabled."""

    enabled: bool
    dtype: torch.dtype
    device_type: str

    def autocast(self, device_type: str | None = None):
        """Autocast for tensors on ``device_type`` (default: the AMP device); no autocast on any other device.

        Disabled, it is no context at all: torch < 2.2 refuses a CPU autocast with a float16 dtype even when disabled.
        """
        if not self.enabled or (device_type or self.device_type) != self.device_type:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def needs_scaler(self) -> bool:
        return self.enabled and self.dtype == torch.float16


def resolve_amp(config, device: torch.device) -> Amp:
    """AMP_ENABLE with AMP_DTYPE; float16 autocast is a GPU feature, so on the CPU only bfloat16 is used."""
    dtype = getattr(torch, config.AMP_DTYPE)
    enabled = config.AMP_ENABLE
    if enabled and device.type == "cpu" and dtype == torch.float16:
        logger.info("AMP: float16 autocast is for GPUs; running in float32 on the CPU (AMP_DTYPE bfloat16 for AMP)")
        enabled = False
    logger.info("AMP: %s", f"autocast to {config.AMP_DTYPE} on {device.type}" if enabled else "off (float32)")
    return Amp(enabled, dtype, device.type)


class GradScalerWithNorm:
    """The official ``NativeScalerWithGradNormCount``: scaled backward, then on optimizer steps unscale, clip to
    ``clip_grad`` (or only measure the norm), step and update the scale. A disabled scaler is a plain backward."""

    def __init__(self, amp: Amp):
        self._scaler = compat.grad_scaler(amp.device_type, enabled=amp.needs_scaler)

    def __call__(self, loss, optimizer, parameters, clip_grad: float | None, update_grad: bool):
        self._scaler.scale(loss).backward()
        if not update_grad:
            return None
        self._scaler.unscale_(optimizer)
        grads = [p for p in parameters if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(grads, clip_grad if clip_grad else float("inf"))
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    def get_scale(self) -> float:
        return self._scaler.get_scale() if self._scaler.is_enabled() else 1.0

    def state_dict(self) -> dict:
        return self._scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._scaler.load_state_dict(state)


def seed_everything(*parts: int) -> None:
    """Seeds torch, numpy and random from ``parts`` (e.g. seed, rank, epoch): each rank draws its own stream, and
    reseeding at every epoch makes a resumed run draw the same augmentations as an uninterrupted one."""
    seed = int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sync_buffers(module: nn.Module, device: torch.device) -> None:
    """Copies rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP runs with ``broadcast_buffers=False`` (official), so each rank's BN statistics drift apart; synchronising
    them before validation and saving makes every rank evaluate the weights that are saved."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).to(device, torch.float32) for b in buffers])
    dist.broadcast(flat, src=0)
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak resident memory, kB on Linux


def train_one_epoch(
    config,
    model: nn.Module,
    model_without_ddp: nn.Module,
    criterion: nn.Module,
    data_loader,
    optimizer,
    epoch: int,
    mixup_fn,
    lr_scheduler,
    loss_scaler: GradScalerWithNorm,
    model_ema,
    amp: Amp,
    device: torch.device,
    writer=None,
    epoch_time_estimate: float | None = None,
) -> Dict[str, float]:
    """Trains one epoch; returns the mean loss, the last learning rate and the throughput in images/s."""
    model.train()
    optimizer.zero_grad()
    num_steps = len(data_loader)
    accum = config.TRAIN.ACCUMULATION_STEPS
    epochs = config.TRAIN.EPOCHS
    # MESA: distil from the EMA teacher from 25% of training on (official classification/main.py).
    mesa = config.TRAIN.MESA if epoch >= int(0.25 * epochs) else -1.0
    distill = SoftTargetCrossEntropy()
    params = [p for p in model.parameters() if p.requires_grad]
    batch_time, data_time, model_time = AverageMeter(), AverageMeter(), AverageMeter()
    loss_meter, norm_meter, scale_meter = AverageMeter(), AverageMeter(), AverageMeter()
    images_seen = 0
    start = end = time.time()
    for idx, (samples, targets) in enumerate(data_loader):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        data_time.update(time.time() - end)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        with amp.autocast():
            outputs = model(samples)
            loss = criterion(outputs, targets)
        if mesa > 0:
            teacher = model_ema.module
            teacher_device = next(teacher.parameters()).device
            with torch.no_grad(), amp.autocast(teacher_device.type):
                teacher_out = teacher(samples.to(teacher_device)).to(device)
            loss = loss + mesa * distill(outputs.float(), teacher_out.float().softmax(dim=-1))
        update = (idx + 1) % accum == 0
        grad_norm = loss_scaler(loss / accum, optimizer, params, config.TRAIN.CLIP_GRAD, update)
        step = (epoch * num_steps + idx) // accum
        if update:
            optimizer.zero_grad()
            lr_scheduler.step_update(step)
            if model_ema is not None:
                model_ema.update(model_without_ddp)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        loss_value = loss.item()
        loss_meter.update(loss_value, targets.size(0))
        if grad_norm is not None:
            norm_meter.update(float(grad_norm))
        images_seen += targets.size(0)
        batch_time.update(time.time() - end)
        end = time.time()
        scale_meter.update(loss_scaler.get_scale())
        if idx > MODEL_TIME_WARMUP:  # as the official loop: the first iterations are not counted as model time
            model_time.update(batch_time.val - data_time.val)
        lr = optimizer.param_groups[0]["lr"]
        if writer is not None and update:
            writer.add_scalar("train/loss", loss_value, step)
            writer.add_scalar("train/lr", lr, step)
            if grad_norm is not None:
                writer.add_scalar("train/grad_norm", float(grad_norm), step)
        if idx % config.PRINT_FREQ == 0 or idx == num_steps - 1:
            eta = batch_time.avg * (num_steps - idx)
            wd = optimizer.param_groups[0]["weight_decay"]
            # The official line, field for field (scripts parse it).
            logger.info(
                f"Train: [{epoch}/{epochs}][{idx}/{num_steps}]\t"
                f"eta {datetime.timedelta(seconds=int(eta))} lr {lr:.6f}\t wd {wd:.4f}\t"
                f"time {batch_time.val:.4f} ({batch_time.avg:.4f})\t"
                f"data time {data_time.val:.4f} ({data_time.avg:.4f})\t"
                f"model time {model_time.val:.4f} ({model_time.avg:.4f})\t"
                f"loss {loss_meter.val:.4f} ({loss_meter.avg:.4f})\t"
                f"grad_norm {norm_meter.val:.4f} ({norm_meter.avg:.4f})\t"
                f"loss_scale {scale_meter.val:.4f} ({scale_meter.avg:.4f})\t"
                f"mem {_memory_mb(device):.0f}MB"
            )
    epoch_time = time.time() - start
    per_epoch = epoch_time_estimate or epoch_time
    remaining = datetime.timedelta(seconds=int(per_epoch * (epochs - epoch - 1)))
    if mesa > 0:
        logger.info(f"MESA: distilled from the EMA teacher with weight {mesa} in epoch {epoch}")
    world = dist.get_world_size() if dist.is_initialized() else 1
    throughput = images_seen * world / epoch_time
    logger.info(f"EPOCH {epoch} training takes {datetime.timedelta(seconds=int(epoch_time))}")
    logger.info(f"training speed {throughput:.1f} images/s over all processes; eta of the other epochs {remaining}")
    return {
        "loss": loss_meter.avg,
        "lr": optimizer.param_groups[0]["lr"],
        "throughput": throughput,
        "epoch_time": epoch_time,
    }


@torch.no_grad()
def validate(config, data_loader, model: nn.Module, amp: Amp, name: str = "network") -> Dict[str, float]:
    """Top-1/top-5 accuracy and loss over the whole val set, every image counted once across ranks.

    ``name`` is the official wording: ``network`` or ``network ema``. With TEST.SEQUENTIAL every rank evaluates the
    whole val set (the official sequential sampler), so the totals are not summed over ranks."""
    model.eval()
    device = next(model.parameters()).device
    criterion = nn.CrossEntropyLoss(reduction="sum")
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images
    start = time.time()
    for images, targets in data_loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with amp.autocast(device.type):
            outputs = model(images)
        outputs = outputs.float()
        topk = outputs.topk(min(5, outputs.shape[1]), dim=1).indices
        hits = topk.eq(targets[:, None])
        totals += torch.stack(
            [
                criterion(outputs, targets).double(),
                hits[:, :1].sum().double(),
                hits.sum().double(),
                torch.tensor(float(targets.numel()), dtype=torch.float64, device=device),
            ]
        )
    if dist.is_initialized() and dist.get_backend() == "nccl":
        totals = totals.to(torch.device("cuda", torch.cuda.current_device()))  # NCCL reduces GPU tensors only
    if not config.TEST.SEQUENTIAL:
        totals = all_reduce_sum(totals)
    totals = totals.cpu()
    loss_sum, top1, top5, count = totals.tolist()
    count = int(count)
    result = {
        "acc1": 100.0 * top1 / max(count, 1),
        "acc5": 100.0 * top5 / max(count, 1),
        "loss": loss_sum / max(count, 1),
        "count": count,
    }
    logger.info(f" * Acc@1 {result['acc1']:.3f} Acc@5 {result['acc5']:.3f}")
    logger.info(f"validation of the {name}: loss {result['loss']:.4f}, {count} images, {time.time() - start:.1f}s")
    logger.info(f"Accuracy of the {name} on the {count} test images: {result['acc1']:.1f}%")
    return result


@torch.no_grad()
def measure_throughput(config, model: nn.Module, images: torch.Tensor, amp: Amp) -> float:
    """Inference images/s the official way: THROUGHPUT_WARMUP untimed forwards, then THROUGHPUT_ITERS timed ones,
    with the device synchronised around the timed loop (official classification/main.py ``throughput``)."""
    model.eval()
    device = images.device

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with amp.autocast():
        for _ in range(config.THROUGHPUT_WARMUP):
            model(images)
        sync()
        start = time.perf_counter()
        for _ in range(config.THROUGHPUT_ITERS):
            model(images)
        sync()
        elapsed = time.perf_counter() - start
    batch = images.shape[0]
    throughput = config.THROUGHPUT_ITERS * batch / elapsed
    logger.info(f"throughput averaged with {config.THROUGHPUT_ITERS} times")
    logger.info(f"batch_size {batch} throughput {throughput}")
    logger.info(f"batch_size {batch} mem cost {_memory_mb(device)} MB")
    logger.info(f"({config.THROUGHPUT_WARMUP} untimed warm-up forwards; throughput in images/s)")
    return throughput
