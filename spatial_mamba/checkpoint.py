"""Reading checkpoints: the official training layout (``save_checkpoint_ema`` in ``classification/utils/utils.py``
of the official repository), plain state dicts and DDP ``module.`` prefixes.

Official classification checkpoints pickle a yacs ``CfgNode`` under ``'config'``. With torch's ``weights_only``
default such a file does not load; we allow-list exactly that class (and nothing else) instead of unpickling
arbitrary objects, so loading a downloaded checkpoint never runs code from it.

torch's own ``weights_only`` unpickler cannot rebuild a ``CfgNode`` (a dict subclass) at all, and timm loads
``pretrained_cfg_overlay=dict(file=...)`` and ``checkpoint_path=`` with it. Importing this module therefore tells
that unpickler to read ``yacs.config.CfgNode`` as a plain ``OrderedDict`` (its items and attributes, nothing
executed), so official checkpoints load through timm's own paths too; the config then comes back as nested
``OrderedDict``s.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import zipfile
from typing import Any, Dict, Mapping

import torch
from torch import nn

from . import compat

__all__ = ["CheckpointError", "load_file", "extract_state_dict", "checkpoint_filter_fn", "load_checkpoint"]

logger = logging.getLogger("spatial_mamba")

# Keys under which training scripts store weights, in order of preference for key="model".
_STATE_DICT_KEYS = ("model", "state_dict", "module")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


def _allowed_globals() -> Dict[str, Any]:
    """What ``weights_only`` allows (tensors, containers, torch types), plus yacs ``CfgNode`` and ``set``."""
    allowed = dict(torch._weights_only_unpickler._get_allowed_globals())
    for obj in compat.safe_globals():
        if not isinstance(obj, tuple):
            allowed[f"{obj.__module__}.{obj.__qualname__}"] = obj
    for module in ("builtins", "__builtin__"):  # protocol 2 pickles name the Python 2 module
        allowed[f"{module}.set"] = set
        allowed[f"{module}.frozenset"] = frozenset
    try:
        from yacs.config import CfgNode

        allowed["yacs.config.CfgNode"] = CfgNode
    except ImportError:  # the checkpoint's config cannot be rebuilt; find_class then names the missing package
        pass
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals, so unpickling cannot call arbitrary code (torch's ``weights_only``
    unpickler cannot rebuild ``CfgNode``, a dict subclass, which official checkpoints store under ``'config'``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        if key in self._allowed:
            return self._allowed[key]
        hint = " (install yacs)" if key == "yacs.config.CfgNode" else ""
        raise pickle.UnpicklingError(f"Unsupported global: {key}{hint}")


# The stand-in for torch.load(weights_only=True), see the module docstring. torch < 2.4 cannot extend that loader;
# there timm's paths load with weights_only=False and read CfgNode itself (yacs installed), and load_file below
# works alike on every torch.
compat.add_safe_globals([(collections.OrderedDict, "yacs.config.CfgNode")])


class _restricted_pickle:  # a ``pickle_module`` for torch.load
    Unpickler = _RestrictedUnpickler
    load = staticmethod(pickle.load)
    __name__ = "spatial_mamba.checkpoint._restricted_pickle"


def load_file(path: str, trusted: bool = False) -> Any:
    """Loads a checkpoint file onto the CPU.

    By default only tensors, containers and the official yacs ``CfgNode`` are unpickled (what torch's
    ``weights_only`` allows, plus ``CfgNode``).
    ``trusted=True`` unpickles anything; use it only for files you wrote yourself (e.g. resuming your own run).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path!r}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint file is empty: {path!r}")
    try:
        if trusted:
            return torch.load(path, map_location="cpu", weights_only=False)
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise CheckpointError(
                f"checkpoint {path!r} holds Python objects that are not allowed when loading untrusted files "
                f"({str(err).splitlines()[0]}); if you wrote this file yourself, load it with trusted=True"
            ) from err
        raise CheckpointError(f"could not read checkpoint {path!r}: it is not a PyTorch checkpoint ({err})") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(
            f"could not read checkpoint {path!r}: the file is truncated or not a PyTorch checkpoint ({err})"
        ) from err


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> Dict[str, Any]:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def extract_state_dict(checkpoint: Any, key: str = "model", source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """Returns the state dict stored under ``key`` (``model``, ``model_ema``, ...) or the checkpoint itself when it
    is a plain state dict; strips DDP's ``module.`` prefix."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source} holds a {type(checkpoint).__name__}, expected a dict of tensors")
    if key in checkpoint and isinstance(checkpoint[key], Mapping):
        state_dict = checkpoint[key]
    elif all(isinstance(v, torch.Tensor) for v in checkpoint.values()) and checkpoint:
        state_dict = checkpoint
    elif key == "model" and any(k in checkpoint for k in _STATE_DICT_KEYS):
        state_dict = next(checkpoint[k] for k in _STATE_DICT_KEYS if k in checkpoint)
    else:
        raise CheckpointError(
            f"{source} has no state dict under key {key!r}; its keys are {sorted(map(str, checkpoint))[:10]}"
        )
    return _strip_prefix(state_dict, "module.")


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module | None = None) -> Dict[str, Any]:
    """timm ``pretrained_filter_fn``: accepts the official layout as well as plain state dicts."""
    return extract_state_dict(state_dict, "model")


def load_checkpoint(
    model: nn.Module, path: str, key: str = "model", strict: bool = True
) -> torch.nn.modules.module._IncompatibleKeys:
    """Loads weights from ``path`` (official layout, plain or ``module.``-prefixed state dict) into ``model``.

    ``strict=True`` fails on any missing or unexpected key. With ``strict=False`` the missing and unexpected keys are
    logged and returned; a tensor whose shape differs (another width) is always an error naming the file.
    """
    state_dict = extract_state_dict(load_file(path), key, source=f"checkpoint {os.fspath(path)!r}")
    own = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    ]
    if mismatched:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} does not fit this model ({len(mismatched)} shape mismatches, "
            f"e.g. {mismatched[0]}); is it another variant or width?"
        )
    if not any(k in own for k in state_dict):
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} shares no parameter names with this model "
            f"(its first keys: {list(state_dict)[:3]}); is it a Spatial-Mamba checkpoint?"
        )
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} (key {key!r}) does not match the model strictly: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    result = model.load_state_dict(state_dict, strict=False)
    logger.info(
        "loaded %s (key %r): %d missing keys %s, %d unexpected keys %s",
        os.fspath(path),
        key,
        len(result.missing_keys),
        result.missing_keys,
        len(result.unexpected_keys),
        result.unexpected_keys,
    )
    return result
