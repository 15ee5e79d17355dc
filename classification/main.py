"""Train Spatial-Mamba on ImageNet-1K, evaluate checkpoints, measure throughput (the official
``classification/main.py``).

Launch it as the official README does, with torchrun (one node or several), or as one plain process::

    cd classification
    python -m torch.distributed.launch --nproc_per_node=8 main.py \
        --cfg configs/spatialmamba/spatialmamba_tiny.yaml --batch-size 128 --data-path /imagenet --output /tmp
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29501 main.py --cfg ...
    python main.py --cfg configs/spatialmamba/spatialmamba_tiny.yaml --pretrained ckpt.pth --eval --data-path /imagenet
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import logging
import os
import sys
import time

if __package__ in (None, ""):
    # Run as a script (`cd classification && python main.py`): import this folder as the package `classification`
    # rather than putting its generic module names (config, data, ...) on the import path.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from classification.checkpoint import (
    BEST,
    BEST_EMA,
    LATEST,
    best_ema_accuracy,
    find_resume_file,
    read_checkpoint,
    save_checkpoint,
    weights_fingerprint,
)
from classification.config import UsageError, get_config
from classification.data import build_dataset, build_loader, check_data_path
from classification.distributed import DistInfo, barrier, broadcast_object, cleanup, init_distributed
from classification.engine import (
    GradScalerWithNorm,
    measure_throughput,
    resolve_amp,
    seed_everything,
    sync_buffers,
    train_one_epoch,
    validate,
)
from classification.logger import FILE_ONLY, append_metrics, close_logger, create_logger, read_metrics
from classification.models import build_model
from classification.optim import build_optimizer, build_scheduler, lr_scale
from classification.plot import plot_training_curves
from classification.stale_fusion import freeze_fusion_kernels_at_first_eval
from spatial_mamba.checkpoint import CheckpointError
from spatial_mamba.flops import count_flops, count_params

CURVES_PNG = "training_curves.png"
METRICS = "metrics.jsonl"

logger = logging.getLogger("classification")
_DDP_ARGS = inspect.signature(DistributedDataParallel.__init__).parameters


def str2bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {value!r}")


def parse_option(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("Spatial-Mamba training and evaluation script")
    parser.add_argument("--cfg", type=str, required=True, metavar="FILE", help="path to the config file")
    parser.add_argument("--opts", nargs="+", default=None, help="modify config options: KEY VALUE pairs")
    parser.add_argument("--batch-size", type=int, help="batch size per process")
    parser.add_argument("--data-path", type=str, help="ImageFolder root with train/ and val/")
    parser.add_argument("--zip", action="store_true", help="read DATA_PATH/{train,val}.zip (Swin's layout)")
    parser.add_argument("--cache-mode", type=str, choices=["no", "full", "part"], help="zip mode: image cache")
    parser.add_argument("--pretrained", help="checkpoint to evaluate (or, with --finetune, to train from)")
    parser.add_argument("--resume", help="checkpoint to resume training from")
    parser.add_argument("--accumulation-steps", type=int, help="gradient accumulation steps")
    parser.add_argument("--use-checkpoint", action="store_true", help="gradient checkpointing to save memory")
    parser.add_argument("--disable_amp", "--disable-amp", action="store_true", help="train and test in float32")
    parser.add_argument("--output", type=str, metavar="PATH", help="root of the output folder (OUTPUT)")
    parser.add_argument("--tag", help="name of this run's folder under OUTPUT/MODEL.NAME (default: launch time)")
    parser.add_argument("--eval", action="store_true", help="evaluate the checkpoint and exit")
    parser.add_argument("--throughput", action="store_true", help="measure inference throughput and exit")
    parser.add_argument("--finetune", action="store_true", help="train from --pretrained (else it only evaluates)")
    parser.add_argument("--fused_layernorm", action="store_true", help="official flag; this model has none")
    parser.add_argument("--optim", type=str, help="adamw or sgd (TRAIN.OPTIMIZER.NAME)")
    parser.add_argument("--model_ema", type=str2bool, help="keep an EMA of the weights (default True)")
    parser.add_argument("--model_ema_decay", type=float, help="EMA decay (default 0.9999)")
    parser.add_argument("--model_ema_force_cpu", type=str2bool, help="keep the EMA on the CPU (default False)")
    parser.add_argument("--memory_limit_rate", type=float, default=-1, help="cap this process's GPU memory (0-1)")
    parser.add_argument("--ddp", type=str, choices=["torch"], default="torch", help="DDP implementation")
    parser.add_argument("--enable_persistance", action="store_true", help="persistent data-loader workers")
    parser.add_argument(
        "--enable_preload",
        action="store_true",
        help="official flag, accepted for official command lines; no effect here (use --zip --cache-mode to hold "
        "the images in memory)",
    )
    parser.add_argument("--local-rank", "--local_rank", type=int, dest="local_rank", help="set by the launcher")
    return parser.parse_args(argv)


def scaled_config(config, world_size: int):
    """Scales BASE_LR, WARMUP_LR and MIN_LR by total batch / 512 (and by the accumulation steps), as the official
    ``classification/main.py`` does."""
    factor = lr_scale(config, world_size)
    config.defrost()
    config.TRAIN.BASE_LR *= factor
    config.TRAIN.WARMUP_LR *= factor
    config.TRAIN.MIN_LR *= factor
    config.freeze()
    return config


def choose_checkpoint(config, training: bool):
    """The checkpoint a run starts from, and whether it is resumed (everything) or only supplies weights.

    Training: auto-resume from the run's own folder first (so the same command continues after a kill), then
    --resume, then --pretrained (weights only). Evaluation: what was named (--resume, --pretrained), else the
    auto-resume file."""
    auto = find_resume_file(config.OUTPUT) if config.TRAIN.AUTO_RESUME else None
    if training:
        if auto:
            if config.MODEL.RESUME and os.path.abspath(config.MODEL.RESUME) != os.path.abspath(auto):
                logger.warning("auto-resume: continuing from %s instead of --resume %s", auto, config.MODEL.RESUME)
            return auto, True
        if config.MODEL.RESUME:
            return config.MODEL.RESUME, True
        return (config.MODEL.PRETRAINED or None), False
    named = config.MODEL.RESUME or config.MODEL.PRETRAINED
    return (named or auto or None), bool(config.MODEL.RESUME)


def run_throughput(config, model, dist_info: DistInfo, amp) -> int:
    """Measures on rank 0 only (one process is what the numbers mean); the other ranks wait and exit cleanly."""
    if config.DATA.DATA_PATH:
        check_data_path(config)  # on every rank, so that none is left waiting for a rank that stopped
    if dist_info.is_main:
        if config.DATA.DATA_PATH:
            dataset = build_dataset(False, config)
            loader = torch.utils.data.DataLoader(dataset, batch_size=config.DATA.BATCH_SIZE, shuffle=False)
            images = next(iter(loader))[0]
        else:
            logger.info("no --data-path: measuring on random images of size %d", config.DATA.IMG_SIZE)
            size = config.DATA.IMG_SIZE
            images = torch.randn(config.DATA.BATCH_SIZE, config.MODEL.SPATIALMAMBA.IN_CHANS, size, size)
        throughput = measure_throughput(config, model, images.to(dist_info.device), amp)
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(os.path.join(config.OUTPUT, "tensorboard")) as writer:
            writer.add_scalar("throughput", throughput, 0)
    else:
        logger.info("throughput is measured on rank 0 only; rank %d has nothing to do", dist_info.rank)
    barrier()
    return 0


def run(args: argparse.Namespace, dist_info: DistInfo) -> int:
    if args.tag is None:
        args.tag = broadcast_object(time.strftime("%Y%m%d%H%M%S"))  # one folder for all ranks, even across nodes
    config = scaled_config(get_config(args), dist_info.world_size)
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE) and (not config.MODEL.PRETRAINED or args.finetune)
    if config.THROUGHPUT_MODE and config.EVAL_MODE:
        raise UsageError("--eval and --throughput are separate modes: pass one of them")

    os.makedirs(config.OUTPUT, exist_ok=True)
    create_logger(config.OUTPUT, dist_info.rank, name=config.MODEL.NAME)
    if args.enable_preload:
        logger.warning("--enable_preload is accepted for official command lines and has no effect here")
    logger.info(
        "rank %d of %d (local rank %d) on %s; output %s",
        dist_info.rank,
        dist_info.world_size,
        dist_info.local_rank,
        dist_info.device,
        config.OUTPUT,
    )
    if args.memory_limit_rate > 0 and dist_info.device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(args.memory_limit_rate, dist_info.device)
    if config.FUSED_LAYERNORM:
        logger.warning("--fused_layernorm has no effect: Spatial-Mamba uses torch's LayerNorm")
    amp = resolve_amp(config, dist_info.device)
    if dist_info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the official script (fixed input size)

    torch.manual_seed(config.SEED)  # the same initial weights on every rank, so each rank's EMA starts equal
    model = build_model(config)
    if dist_info.is_main and training:
        shape = (config.MODEL.SPATIALMAMBA.IN_CHANS, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE)
        logger.info("number of params: %d", count_params(model))
        try:
            logger.info("number of GFLOPs: %.3f", count_flops(model, shape) / 1e9)
        except ValueError as err:  # train-mode BatchNorm on a 1x1 map (images of 32 px or less)
            logger.warning("GFLOPs not counted at %s: %s", shape, err)
    model.to(dist_info.device)
    model_ema = None
    if config.MODEL_EMA:
        ema_device = torch.device("cpu") if config.MODEL_EMA_FORCE_CPU else None
        model_ema = ModelEmaV3(model, decay=config.MODEL_EMA_DECAY, device=ema_device)
        logger.info("EMA of the weights with decay %g%s", config.MODEL_EMA_DECAY, " on the CPU" if ema_device else "")
    # Every rank built the same initial weights (seeded with SEED alone): logged per rank so that it can be checked.
    logger.info("initial weights fingerprint %s (rank %d)", weights_fingerprint(model), dist_info.rank)
    if config.TRAIN.STALE_FUSION_KERNEL:
        frozen = freeze_fusion_kernels_at_first_eval(model, model_ema.module if model_ema is not None else None)
        logger.warning(
            "TRAIN.STALE_FUSION_KERNEL is on: %d state-fusion modules evaluate with the kernel of their first "
            "evaluation in this process, reproducing the official training dynamics (docs/official_bugs.md, #1); "
            "validation accuracies, the best-checkpoint choice and the MESA teacher are those of the official code, "
            "not of the current weights",
            frozen,
        )
    seed_everything(config.SEED, dist_info.rank)

    if config.THROUGHPUT_MODE:
        if config.MODEL.PRETRAINED:
            model.load_state_dict(read_checkpoint(config.MODEL.PRETRAINED, model, None)["model"])
        return run_throughput(config, model, dist_info, amp)

    loader_train, loader_val, mixup_fn = build_loader(config, dist_info, train=training)
    ckpt_path, resuming = choose_checkpoint(config, training)
    if config.EVAL_MODE and not ckpt_path:
        raise UsageError("--eval needs weights to evaluate: pass --pretrained CKPT or --resume CKPT")
    checkpoint = read_checkpoint(ckpt_path, model, model_ema.module if model_ema else None) if ckpt_path else None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        if model_ema is not None:
            model_ema.module.load_state_dict(checkpoint["model_ema"])
        logger.info("loaded the weights of %s%s", ckpt_path, " (and its EMA)" if model_ema is not None else "")
        logger.info("weights fingerprint after loading %s", weights_fingerprint(model))

    if not training:
        validate(config, loader_val, model, amp)
        if model_ema is not None:
            validate(config, loader_val, model_ema.module, amp, name="network ema")
        if not config.EVAL_MODE:
            logger.warning(
                "--pretrained without --eval: evaluated and stopping (the official script went on to train a new "
                "run from these weights); pass --finetune to train from them"
            )
        return 0
    return train(config, dist_info, model, model_ema, checkpoint, resuming, loader_train, loader_val, mixup_fn, amp)


def train(config, dist_info, model, model_ema, checkpoint, resuming, loader_train, loader_val, mixup_fn, amp) -> int:
    device = dist_info.device
    model_without_ddp = model
    if dist_info.world_size > 1:
        device_ids = [dist_info.local_rank] if device.type == "cuda" else None
        # No buffer broadcast in the forward pass, as the official run (torch 2.14 renamed the argument).
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_ARGS else "broadcast_buffers"
        model = DistributedDataParallel(model, device_ids=device_ids, **{no_sync: False})
    optimizer = build_optimizer(config, model_without_ddp)
    loss_scaler = GradScalerWithNorm(amp)
    n_iter_per_epoch = len(loader_train) // config.TRAIN.ACCUMULATION_STEPS
    if n_iter_per_epoch == 0:
        raise UsageError(
            f"an epoch has {len(loader_train)} batches per process, fewer than TRAIN.ACCUMULATION_STEPS="
            f"{config.TRAIN.ACCUMULATION_STEPS}: lower the accumulation steps or the batch size"
        )
    lr_scheduler = build_scheduler(config, optimizer, n_iter_per_epoch)
    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()
    elif config.MODEL.LABEL_SMOOTHING > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    start_epoch, max_accuracy, max_accuracy_ema = config.TRAIN.START_EPOCH, 0.0, 0.0
    if checkpoint is not None and resuming:
        if all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
            try:
                optimizer.load_state_dict(checkpoint["optimizer"])
            except (ValueError, KeyError) as err:
                raise CheckpointError(
                    f"the optimizer state in the checkpoint does not fit TRAIN.OPTIMIZER.NAME="
                    f"{config.TRAIN.OPTIMIZER.NAME!r}: {err}"
                ) from err
            lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
            loss_scaler.load_state_dict(checkpoint.get("scaler") or {})
            start_epoch = int(checkpoint["epoch"]) + 1
            max_accuracy = float(checkpoint.get("max_accuracy", 0.0))
            max_accuracy_ema = best_ema_accuracy(checkpoint)
            logger.info(
                "resumed at epoch %d (max accuracy %.2f%%, EMA %.2f%%)", start_epoch, max_accuracy, max_accuracy_ema
            )
        else:
            logger.warning("the checkpoint has no optimizer/scheduler state: training its weights from epoch 0")
    elif checkpoint is not None:
        validate(config, loader_val, model_without_ddp, amp)
        if model_ema is not None:
            validate(config, loader_val, model_ema.module, amp, name="network ema")

    writer = None
    if dist_info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        with open(os.path.join(config.OUTPUT, "config.json"), "w") as f:
            f.write(config.dump())
        writer = SummaryWriter(os.path.join(config.OUTPUT, "tensorboard"))
        logger.info("full config:\n%s", config.dump())
    if start_epoch >= config.TRAIN.EPOCHS:
        logger.info("already trained for all %d epochs", config.TRAIN.EPOCHS)

    logger.info("start training")
    start_time = time.time()
    epoch_time = None
    for epoch in range(start_epoch, config.TRAIN.EPOCHS):
        seed_everything(config.SEED, dist_info.rank, epoch)
        loader_train.sampler.set_epoch(epoch)
        stats = train_one_epoch(
            config,
            model,
            model_without_ddp,
            criterion,
            loader_train,
            optimizer,
            epoch,
            mixup_fn,
            lr_scheduler,
            loss_scaler,
            model_ema,
            amp,
            device,
            writer,
            epoch_time,
        )
        epoch_time = stats["epoch_time"]
        sync_buffers(model_without_ddp, device)
        val = validate(config, loader_val, model_without_ddp, amp)
        improved = val["acc1"] > max_accuracy
        max_accuracy = max(max_accuracy, val["acc1"])
        if improved:
            logger.info(f"New max accuracy: {max_accuracy:.2f}%")  # official: printed on improvement only
        record = {
            "epoch": epoch,
            "train_loss": stats["loss"],
            "lr": stats["lr"],
            "train_throughput": stats["throughput"],
            "val_loss": val["loss"],
            "val_acc1": val["acc1"],
            "val_acc5": val["acc5"],
        }
        improved_ema = False
        if model_ema is not None:
            sync_buffers(model_ema.module, device)
            val_ema = validate(config, loader_val, model_ema.module, amp, name="network ema")
            improved_ema = val_ema["acc1"] > max_accuracy_ema
            max_accuracy_ema = max(max_accuracy_ema, val_ema["acc1"])
            logger.info(f"best accuracy so far: {max_accuracy:.2f}% (EMA {max_accuracy_ema:.2f}%)")
            record.update(val_acc1_ema=val_ema["acc1"], val_acc5_ema=val_ema["acc5"])
        if dist_info.is_main:
            # latest_ckpt.pth goes last: it is what auto-resume continues from, so it must not claim a best
            # checkpoint that was never written.
            ema_module = model_ema.module if model_ema is not None else None
            common = (config, epoch, model_without_ddp, optimizer, lr_scheduler, loss_scaler, max_accuracy)
            for name, due in ((BEST, improved), (BEST_EMA, improved_ema), (LATEST, True)):
                if due:
                    save_checkpoint(os.path.join(config.OUTPUT, name), *common, ema_module, max_accuracy_ema)
            append_metrics(os.path.join(config.OUTPUT, METRICS), record)
            writer.add_scalar("Accuracy/val", val["acc1"], epoch)
            writer.add_scalar("Loss/val", val["loss"], epoch)
            writer.add_scalar("Loss/train", stats["loss"], epoch)
            writer.add_scalar("throughput/train", stats["throughput"], epoch)
            if model_ema is not None:
                writer.add_scalar("Accuracy_ema/val", record["val_acc1_ema"], epoch)
            writer.flush()

    total = datetime.timedelta(seconds=int(time.time() - start_time))
    logger.info(f"Training time {total}")
    if dist_info.is_main:
        writer.close()
        records = read_metrics(os.path.join(config.OUTPUT, METRICS))
        if records:
            plot_training_curves(records, os.path.join(config.OUTPUT, CURVES_PNG), title=config.MODEL.NAME)
        logger.info(
            "max accuracy %.2f%% (EMA %.2f%%); checkpoints, logs and %s are in %s",
            max_accuracy,
            max_accuracy_ema,
            CURVES_PNG,
            config.OUTPUT,
        )
    barrier()
    return 0


def main(argv=None) -> int:
    args = parse_option(argv)
    dist_info = None
    try:
        dist_info = init_distributed(args.local_rank)
        return run(args, dist_info)
    except (UsageError, CheckpointError) as err:
        prefix = f"[rank {dist_info.rank}] " if dist_info is not None and dist_info.world_size > 1 else ""
        if logger.handlers:  # the run's log file exists: record why it stopped there too
            logger.error("%s", err, extra={FILE_ONLY: True})
        print(f"{prefix}error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        close_logger()
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
