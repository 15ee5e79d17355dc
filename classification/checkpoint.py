"""Training checkpoints in the official layout and names (official ``classification/utils/utils.py``),
written atomically, and the ways to read them back: ``--resume`` and auto-resume (everything), ``--pretrained``
(weights of the model and its EMA).

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed over the old one, so a
kill during a save leaves the previous file intact. Both spellings of the best EMA accuracy are written: the
official misspelled ``max_accuray_ema`` (which official tools read) and ``max_accuracy_ema``; either is read back,
where the official code looked up the correct one it never wrote and reset the value on every resume
(docs/official_bugs.md, #14).

``--resume`` and ``--pretrained`` also take a URL (``https://``, ``http://``, ``file://``), as the official
``--resume`` took ``https`` URLs: the file is downloaded once into torch's hub cache (``$TORCH_HOME/hub/checkpoints``)
and read from there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import urllib.error
import urllib.parse
from typing import Any, Dict, Mapping

import torch
from torch import nn

from spatial_mamba.checkpoint import CheckpointError, extract_state_dict, load_file

__all__ = [
    "LATEST",
    "BEST",
    "BEST_EMA",
    "atomic_save",
    "save_checkpoint",
    "find_resume_file",
    "check_fits",
    "read_checkpoint",
    "best_ema_accuracy",
    "is_url",
    "fetch",
    "weights_fingerprint",
    "state_fingerprint",
]

LATEST, BEST, BEST_EMA = "latest_ckpt.pth", "best_ckpt.pth", "best_ckpt_ema.pth"

logger = logging.getLogger("classification")


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` so that readers see the old file or the complete new one, never a partial one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes the file private; a checkpoint gets the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # makes the rename itself durable
    finally:
        os.close(dir_fd)


def save_checkpoint(
    path: str,
    config,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    loss_scaler,
    max_accuracy: float,
    model_ema: nn.Module | None = None,
    max_accuracy_ema: float = 0.0,
) -> None:
    """Writes the official layout: model, optimizer, lr_scheduler, max_accuracy, scaler, epoch, config (the yacs
    CfgNode), steps, and with an EMA model_ema and the best EMA accuracy under both spellings."""
    state: Dict[str, Any] = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "max_accuracy": float(max_accuracy),
        "scaler": loss_scaler.state_dict(),
        "epoch": int(epoch),
        "config": config,
        "steps": 0,
    }
    if model_ema is not None:
        state["model_ema"] = model_ema.state_dict()
        state["max_accuray_ema"] = state["max_accuracy_ema"] = float(max_accuracy_ema)
    atomic_save(state, path)
    logger.info("saved %s (epoch %d)", path, epoch)


def find_resume_file(output_dir: str) -> str | None:
    """The checkpoint auto-resume continues from: ``latest_ckpt.pth`` (written last in each epoch, so it holds the
    newest complete state), else the newest ``*.pth`` in ``output_dir``."""
    if not os.path.isdir(output_dir):
        return None
    latest = os.path.join(output_dir, LATEST)
    if os.path.isfile(latest):
        return latest
    candidates = [os.path.join(output_dir, n) for n in os.listdir(output_dir) if n.endswith(".pth")]
    return max(candidates, key=os.path.getmtime) if candidates else None


def _architecture(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """What a Spatial-Mamba state dict says about the config that built it, for error messages."""
    arch: Dict[str, Any] = {}
    stem = state_dict.get("patch_embed.conv3.1.conv.weight")
    if stem is not None:
        arch["EMBED_DIM"] = stem.shape[0]
    blocks: Dict[int, set] = {}
    for key in state_dict:
        match = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key)
        if match:
            blocks.setdefault(int(match[1]), set()).add(int(match[2]))
    if blocks:
        arch["DEPTHS"] = [len(blocks.get(i, ())) for i in range(max(blocks) + 1)]
    a_logs = state_dict.get("layers.0.blocks.0.self_attention.A_logs")
    if a_logs is not None:
        arch["D_STATE"] = a_logs.shape[-1]
    head = state_dict.get("head.weight")
    if head is not None:
        arch["NUM_CLASSES"] = head.shape[0]
    return arch


def check_fits(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raises :class:`CheckpointError` unless ``state_dict`` has exactly the model's keys and shapes; the message
    names the checkpoint, the architecture it was saved from and the one the config builds."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    theirs, ours = _architecture(state_dict), _architecture(own)
    differs = {k: (theirs[k], ours[k]) for k in ours if k in theirs and theirs[k] != ours[k]}
    if differs:
        what = "; ".join(f"{k} {a} in the checkpoint vs {b} in the config" for k, (a, b) in differs.items())
        raise CheckpointError(
            f"{source} is from another architecture or width ({what}): pass the --cfg it was trained with"
        )
    if not theirs:
        raise CheckpointError(f"{source} is not a Spatial-Mamba classifier (its first keys: {list(state_dict)[:3]})")
    details = [f"{len(mismatched)} shape mismatches {mismatched[:3]}"] if mismatched else []
    details += [f"{len(missing)} missing keys {missing[:3]}"] if missing else []
    details += [f"{len(unexpected)} unexpected keys {unexpected[:3]}"] if unexpected else []
    raise CheckpointError(f"{source} does not fit the model the config builds: {', '.join(details)}")


def is_url(path: str) -> bool:
    return urllib.parse.urlparse(str(path)).scheme in ("http", "https", "file")


def fetch(path: str) -> str:
    """A local file for ``path``: the path itself, or for a URL its copy in torch's hub cache (downloaded once)."""
    if not is_url(path):
        return path
    name = os.path.basename(urllib.parse.urlparse(path).path)
    if not name:
        raise CheckpointError(f"checkpoint URL {path!r} names no file (it must end with the file name)")
    local = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    if not os.path.isfile(local):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        logger.info("downloading %s to %s", path, local)
        try:
            torch.hub.download_url_to_file(path, local, progress=False)
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise CheckpointError(f"could not download checkpoint {path!r}: {err}") from err
    return local


def read_checkpoint(path: str, model: nn.Module, model_ema: nn.Module | None) -> Dict[str, Any]:
    """Loads ``path`` and checks that its weights (and EMA weights) fit ``model`` before anything is changed.

    Returns the checkpoint dict with ``model`` and ``model_ema`` replaced by the checked state dicts; a file
    without EMA weights gives its model weights for the EMA (as the official loader does).
    """
    checkpoint = load_file(fetch(path))
    source = f"checkpoint {path!r}"
    state_dict = extract_state_dict(checkpoint, "model", source=source)
    check_fits(model, state_dict, source)
    result = dict(checkpoint) if isinstance(checkpoint, Mapping) else {}
    result["model"] = state_dict
    if model_ema is not None:
        has_ema = isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model_ema"), Mapping)
        if has_ema:
            result["model_ema"] = extract_state_dict(checkpoint, "model_ema", source=source)
            check_fits(model_ema, result["model_ema"], f"{source} (key 'model_ema')")
        else:
            logger.warning("%s has no 'model_ema' weights: the EMA starts from its 'model' weights", source)
            result["model_ema"] = state_dict
    return result


def best_ema_accuracy(checkpoint: Mapping[str, Any]) -> float:
    """The best EMA accuracy under either spelling (the official files carry only ``max_accuray_ema``)."""
    for key in ("max_accuracy_ema", "max_accuray_ema"):
        if key in checkpoint:
            return float(checkpoint[key])
    return 0.0


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of every parameter and buffer: equal on all ranks exactly when their weights are equal."""
    return state_fingerprint(model.state_dict())


def state_fingerprint(state_dict) -> str:
    """:func:`weights_fingerprint` of a state dict (e.g. the ``model`` entry of a checkpoint)."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
