"""The configuration tree: every default in one place (``_C``, the official ``classification/config.py``), YAML
files that override it (with ``BASE`` inheritance), then ``--opts KEY VALUE`` pairs and the command-line flags,
in that order.

Keys marked "ours" are not in the official tree; every other key keeps its official name and default. Keys the
official tree carries but never reads (SimMIM and MoE leftovers) are kept so that official YAML files still load.
"""

from __future__ import annotations

import ast
import difflib
import os
from typing import Any, Iterable, List

import yaml
from yacs.config import CfgNode as CN

__all__ = ["UsageError", "get_config", "load_config", "check_config", "default_config"]


class UsageError(ValueError):
    """A bad value from the user (flag, config key, data folder, checkpoint): stop with this message, no traceback."""


_C = CN()
_C.BASE = [""]

# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128  # per process
_C.DATA.DATA_PATH = ""
_C.DATA.DATASET = "imagenet"  # an ImageFolder tree DATA_PATH/{train,val}/<class>/<image>
_C.DATA.IMG_SIZE = 224
_C.DATA.INTERPOLATION = "bicubic"
_C.DATA.ZIP_MODE = False  # DATA_PATH/{train,val}.zip with {train,val}_map.txt (Swin's layout)
_C.DATA.CACHE_MODE = "part"  # zip mode only: no | part (this rank's shard in memory) | full
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8
_C.DATA.MASK_PATCH_SIZE = 32  # unused (SimMIM)
_C.DATA.MASK_RATIO = 0.6  # unused (SimMIM)
_C.DATA.PERSISTENT_WORKERS = False

# -----------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------
_C.MODEL = CN()
_C.MODEL.TYPE = "spatial_mamba"
_C.MODEL.NAME = "spatial_mamba_tiny"
_C.MODEL.PRETRAINED = ""
_C.MODEL.RESUME = ""
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.DROP_RATE = 0.0
_C.MODEL.DROP_PATH_RATE = 0.1
_C.MODEL.LABEL_SMOOTHING = 0.1
_C.MODEL.DDP = "torch"
_C.MODEL.MMCKPT = False  # unused

_C.MODEL.SPATIALMAMBA = CN()
_C.MODEL.SPATIALMAMBA.PATCH_SIZE = 4
_C.MODEL.SPATIALMAMBA.IMAGE_SIZE = 224  # unused: the model takes any input size (docs/official_bugs.md, #24)
_C.MODEL.SPATIALMAMBA.IN_CHANS = 3
_C.MODEL.SPATIALMAMBA.DEPTHS = [2, 4, 8, 4]
_C.MODEL.SPATIALMAMBA.EMBED_DIM = 64
# The official default is 16, which its scan kernel cannot run (docs/official_bugs.md, #4); every official YAML sets 1.
_C.MODEL.SPATIALMAMBA.D_STATE = 1
_C.MODEL.SPATIALMAMBA.MLP_RATIO = 4.0
_C.MODEL.SPATIALMAMBA.DT_INIT = "random"  # random | constant | simple | zero (the official choices)

# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
_C.TRAIN.BASE_LR = 5e-4  # for a total batch of 512; scaled linearly with the real one
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
_C.TRAIN.CLIP_GRAD = 5.0  # 0 or None: no clipping (the norm is still logged)
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.ACCUMULATION_STEPS = 1
_C.TRAIN.USE_CHECKPOINT = False

_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = "cosine"
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30  # step
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1  # step
_C.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = True
_C.TRAIN.LR_SCHEDULER.GAMMA = 0.1  # multistep
_C.TRAIN.LR_SCHEDULER.MULTISTEPS = []  # multistep

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = "adamw"
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9  # sgd

_C.TRAIN.LAYER_DECAY = 1.0  # unused
_C.TRAIN.MOE = CN()
_C.TRAIN.MOE.SAVE_MASTER = False  # unused
# MESA (EMA self-distillation): weight of the EMA-teacher loss from 25% of training on; <= 0 turns it off.
_C.TRAIN.MESA = -1.0
# Ours, off by default: reproduce the official training dynamics of docs/official_bugs.md #1 bit for bit, i.e. evaluate
# (validation, best-checkpoint choice, EMA, MESA teacher) with each state-fusion kernel frozen at its first
# evaluation in the process. Only for comparing with official training logs; the trained weights are not affected.
_C.TRAIN.STALE_FUSION_KERNEL = False

# -----------------------------------------------------------------------------
# Augmentation (timm's implementations)
# -----------------------------------------------------------------------------
_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4  # timm applies it only when AUTO_AUGMENT is off
_C.AUG.AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = "pixel"
_C.AUG.RECOUNT = 1
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
_C.AUG.CUTMIX_MINMAX = None
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
_C.AUG.MIXUP_MODE = "batch"

# -----------------------------------------------------------------------------
# Testing
# -----------------------------------------------------------------------------
_C.TEST = CN()
_C.TEST.CROP = True  # resize to IMG_SIZE/0.875, then center-crop IMG_SIZE
_C.TEST.SEQUENTIAL = False  # every rank evaluates the whole val set in order (else: each image on one rank)
_C.TEST.SHUFFLE = False  # order of the val images: no effect on the accuracy, so not used

# -----------------------------------------------------------------------------
# Misc
# -----------------------------------------------------------------------------
_C.ENABLE_AMP = False  # unused (SimMIM)
_C.AMP_ENABLE = True
_C.AMP_OPT_LEVEL = ""  # unused (apex)
_C.AMP_DTYPE = "float16"  # ours: float16 (with a grad scaler) or bfloat16; fp16 AMP is turned off on the CPU
_C.MODEL_EMA = True  # ours: the --model_ema flag as a config key
_C.MODEL_EMA_DECAY = 0.9999  # ours: --model_ema_decay
_C.MODEL_EMA_FORCE_CPU = False  # ours: --model_ema_force_cpu
_C.OUTPUT = "exclude/output"  # the official --output default (relative to the working directory)
_C.TAG = "default"  # --tag defaults to the launch time, agreed by all ranks
_C.SAVE_FREQ = 1  # unused: latest_ckpt.pth is written every epoch
_C.PRINT_FREQ = 10
_C.SEED = 0
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False
_C.THROUGHPUT_WARMUP = 50  # ours: untimed forwards before timing
_C.THROUGHPUT_ITERS = 30  # ours: timed forwards
_C.TRAINCOST_MODE = False  # unused
_C.FUSED_LAYERNORM = False  # unused: the model has no fused LayerNorm


def default_config() -> CN:
    return _C.clone()


def _decode(value: Any) -> Any:
    """Parses a command-line string the way yacs does (Python literals), leaving other strings as they are."""
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _coerce(value: Any, default: Any, key: str, source: str) -> Any:
    """Returns ``value`` converted to the type of the default, or raises naming the key and where it came from."""
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if isinstance(default, str) and not isinstance(value, (dict, CN)):
        return str(value)
    raise UsageError(
        f"{source}: {key} must be a {type(default).__name__} like its default {default!r}, "
        f"got {value!r} ({type(value).__name__})"
    )


def _unknown_key(node: CN, full_key: str, name: str, source: str) -> UsageError:
    close = difflib.get_close_matches(name, list(node.keys()), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UsageError(f"{source}: unknown config key {full_key!r}{hint}")


def _merge_dict(cfg: CN, values: dict, source: str, prefix: str = "") -> None:
    for name, value in values.items():
        full_key = prefix + str(name)
        if name not in cfg:
            raise _unknown_key(cfg, full_key, str(name), source)
        if isinstance(cfg[name], CN):
            if not isinstance(value, dict):
                raise UsageError(f"{source}: {full_key} is a section of keys, got the value {value!r}")
            _merge_dict(cfg[name], value, source, full_key + ".")
        else:
            cfg[name] = _coerce(value, cfg[name], full_key, source)


def _yaml_error_message(cfg_file: str, err: yaml.YAMLError) -> str:
    """One line naming the file, the line and column, what the parser found and what it expected."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    context = getattr(err, "context", None)
    found = f"{problem} ({context})" if context else problem
    return (
        f"config file {cfg_file!r} is not valid YAML{where}: {found}; expected a mapping of config keys, "
        f"one 'KEY: value' per line, nested sections indented by two spaces (e.g. 'MODEL:' then '  NAME: tiny')"
    )


def _merge_file(cfg: CN, cfg_file: str, seen: tuple = ()) -> None:
    """Merges a YAML file, after the files named in its ``BASE`` list (paths relative to the file)."""
    cfg_file = os.path.abspath(cfg_file)
    if cfg_file in seen:
        raise UsageError(f"config file {cfg_file!r} includes itself through BASE")
    if not os.path.isfile(cfg_file):
        raise UsageError(f"config file not found: {cfg_file!r}")
    with open(cfg_file) as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise UsageError(_yaml_error_message(cfg_file, err)) from None
    if not isinstance(values, dict):
        raise UsageError(
            f"config file {cfg_file!r} must hold a mapping of config keys (e.g. 'MODEL:' then '  NAME: tiny' "
            f"on the next line), got a {type(values).__name__}"
        )
    bases = values.pop("BASE", [""])
    for base in [bases] if isinstance(bases, str) else bases:
        if base:
            _merge_file(cfg, os.path.join(os.path.dirname(cfg_file), base), seen + (cfg_file,))
    _merge_dict(cfg, values, f"config file {cfg_file!r}")


def _merge_opts(cfg: CN, opts: List[str]) -> None:
    if len(opts) % 2:
        raise UsageError(f"--opts takes KEY VALUE pairs, got an odd number of items: {opts}")
    for full_key, raw in zip(opts[0::2], opts[1::2]):
        node, names = cfg, full_key.split(".")
        for depth, name in enumerate(names):
            if name not in node:
                raise _unknown_key(node, full_key, name, "--opts")
            if depth < len(names) - 1:
                node = node[name]
                if not isinstance(node, CN):
                    raise UsageError(f"--opts: {'.'.join(names[: depth + 1])} is a value, not a section ({full_key})")
        if isinstance(node[names[-1]], CN):
            raise UsageError(f"--opts: {full_key} is a section of keys; set one of {sorted(node[names[-1]])}")
        node[names[-1]] = _coerce(_decode(raw), node[names[-1]], full_key, "--opts")


def check_config(config: CN) -> None:
    """Rejects values the trainer cannot run with, naming the key, before anything is built."""

    def expect(ok: bool, message: str) -> None:
        if not ok:
            raise UsageError(message)

    expect(config.MODEL.TYPE == "spatial_mamba", f"MODEL.TYPE must be 'spatial_mamba', got {config.MODEL.TYPE!r}")
    expect(config.MODEL.DDP == "torch", f"MODEL.DDP must be 'torch' (the only one supported), got {config.MODEL.DDP!r}")
    expect(
        config.DATA.DATASET == "imagenet",
        f"DATA.DATASET must be 'imagenet' (an ImageFolder tree with train/ and val/), got {config.DATA.DATASET!r}",
    )
    expect(
        config.DATA.CACHE_MODE in ("no", "part", "full"),
        f"DATA.CACHE_MODE must be no, part or full, got {config.DATA.CACHE_MODE!r}",
    )
    expect(config.DATA.BATCH_SIZE >= 1, f"DATA.BATCH_SIZE must be >= 1, got {config.DATA.BATCH_SIZE}")
    expect(config.DATA.IMG_SIZE >= 1, f"DATA.IMG_SIZE must be >= 1, got {config.DATA.IMG_SIZE}")
    expect(config.DATA.NUM_WORKERS >= 0, f"DATA.NUM_WORKERS must be >= 0, got {config.DATA.NUM_WORKERS}")
    expect(config.MODEL.NUM_CLASSES >= 1, f"MODEL.NUM_CLASSES must be >= 1, got {config.MODEL.NUM_CLASSES}")
    sm = config.MODEL.SPATIALMAMBA
    expect(
        len(sm.DEPTHS) == 4 and all(d >= 1 for d in sm.DEPTHS),
        f"MODEL.SPATIALMAMBA.DEPTHS must be 4 positive block counts, got {list(sm.DEPTHS)}",
    )
    expect(sm.EMBED_DIM >= 1, f"MODEL.SPATIALMAMBA.EMBED_DIM must be >= 1, got {sm.EMBED_DIM}")
    expect(sm.D_STATE >= 1, f"MODEL.SPATIALMAMBA.D_STATE must be >= 1, got {sm.D_STATE}")
    expect(
        sm.DT_INIT in ("random", "constant", "simple", "zero"),
        f"MODEL.SPATIALMAMBA.DT_INIT must be random, constant, simple or zero, got {sm.DT_INIT!r}",
    )
    train = config.TRAIN
    expect(train.EPOCHS >= 1, f"TRAIN.EPOCHS must be >= 1, got {train.EPOCHS}")
    expect(
        0 <= train.WARMUP_EPOCHS < train.EPOCHS,
        f"TRAIN.WARMUP_EPOCHS must be in [0, TRAIN.EPOCHS={train.EPOCHS}), got {train.WARMUP_EPOCHS}",
    )
    expect(train.ACCUMULATION_STEPS >= 1, f"TRAIN.ACCUMULATION_STEPS must be >= 1, got {train.ACCUMULATION_STEPS}")
    expect(
        train.OPTIMIZER.NAME.lower() in ("adamw", "sgd"),
        f"TRAIN.OPTIMIZER.NAME (--optim) must be adamw or sgd, got {train.OPTIMIZER.NAME!r}",
    )
    expect(
        train.LR_SCHEDULER.NAME in ("cosine", "linear", "step", "multistep"),
        f"TRAIN.LR_SCHEDULER.NAME must be cosine, linear, step or multistep, got {train.LR_SCHEDULER.NAME!r}",
    )
    expect(
        config.AMP_DTYPE in ("float16", "bfloat16"),
        f"AMP_DTYPE must be float16 or bfloat16, got {config.AMP_DTYPE!r}",
    )
    aug = config.AUG
    if aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None:
        expect(
            config.DATA.BATCH_SIZE % 2 == 0,
            f"DATA.BATCH_SIZE (--batch-size) must be even when Mixup/CutMix is on, got {config.DATA.BATCH_SIZE}",
        )
    expect(
        train.MESA <= 0 or config.MODEL_EMA,
        f"TRAIN.MESA={train.MESA} distils from the EMA model: turn it on (--model_ema True) or set TRAIN.MESA -1",
    )
    expect(0.0 <= config.MODEL_EMA_DECAY < 1.0, f"MODEL_EMA_DECAY must be in [0, 1), got {config.MODEL_EMA_DECAY}")
    expect(
        config.THROUGHPUT_WARMUP >= 0 and config.THROUGHPUT_ITERS >= 1,
        f"THROUGHPUT_WARMUP must be >= 0 and THROUGHPUT_ITERS >= 1, got "
        f"{config.THROUGHPUT_WARMUP} and {config.THROUGHPUT_ITERS}",
    )


def load_config(cfg_file: str | None = None, opts: Iterable[str] = ()) -> CN:
    """The defaults, then ``cfg_file`` (and its BASE files), then ``opts``; not yet checked nor frozen."""
    config = default_config()
    if cfg_file:
        _merge_file(config, cfg_file)
    _merge_opts(config, list(opts))
    return config


# Command-line flags that set one config key each (flag attribute -> key); None means "not given".
_FLAG_KEYS = {
    "batch_size": "DATA.BATCH_SIZE",
    "data_path": "DATA.DATA_PATH",
    "cache_mode": "DATA.CACHE_MODE",
    "pretrained": "MODEL.PRETRAINED",
    "resume": "MODEL.RESUME",
    "accumulation_steps": "TRAIN.ACCUMULATION_STEPS",
    "optim": "TRAIN.OPTIMIZER.NAME",
    "output": "OUTPUT",
    "tag": "TAG",
    "model_ema": "MODEL_EMA",
    "model_ema_decay": "MODEL_EMA_DECAY",
    "model_ema_force_cpu": "MODEL_EMA_FORCE_CPU",
}
# Switches that turn a key on (or, for --disable_amp, off) when present.
_SWITCH_KEYS = {
    "zip": ("DATA.ZIP_MODE", True),
    "use_checkpoint": ("TRAIN.USE_CHECKPOINT", True),
    "disable_amp": ("AMP_ENABLE", False),
    "eval": ("EVAL_MODE", True),
    "throughput": ("THROUGHPUT_MODE", True),
    "fused_layernorm": ("FUSED_LAYERNORM", True),
    "enable_persistance": ("DATA.PERSISTENT_WORKERS", True),
}


def get_config(args) -> CN:
    """The config of a run: defaults < ``--cfg`` < ``--opts`` < flags; OUTPUT becomes OUTPUT/MODEL.NAME/TAG.

    Returns a frozen, checked config; raises :class:`UsageError` naming the bad key or value.
    """
    config = load_config(args.cfg, args.opts or ())
    overrides = []
    for attr, key in _FLAG_KEYS.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides += [key, value]
    for attr, (key, value) in _SWITCH_KEYS.items():
        if getattr(args, attr, False):
            overrides += [key, value]
    for key, value in zip(overrides[0::2], overrides[1::2]):
        node, names = config, key.split(".")
        for name in names[:-1]:
            node = node[name]
        node[names[-1]] = _coerce(value, node[names[-1]], key, "command line")
    config.OUTPUT = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    check_config(config)
    config.freeze()
    return config
