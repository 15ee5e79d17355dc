"""``python -m spatial_mamba.info``: which backend each op runs on here, and why, as the dispatcher decides it."""

from __future__ import annotations

import os
import sys

import torch

from .ops import backend


def _probe(device: str):
    """One float32 input on ``device``: what a model call with typical inputs asks the dispatcher."""
    return torch.empty(0, device=device)


def report() -> str:
    lines = [
        f"spatial_mamba: python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"CUDA available: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""),
        f"{backend.ENV_VAR}={os.environ.get(backend.ENV_VAR, '') or '(unset: automatic choice)'}",
    ]
    for op, backends in backend.describe().items():
        lines.append(f"{op}:")
        for name, status in backends.items():
            lines.append(f"  {name:<9} {status}")
        for device in ("cpu", "cuda"):
            if device == "cuda" and not torch.cuda.is_available():
                lines.append("  -> on CUDA tensors: no GPU here")
                continue
            try:
                choice = backend.explain(op, _probe(device), build=False)
                lines.append(f"  -> on {device.upper()} tensors: {choice.summary()}")
            except RuntimeError as err:
                lines.append(f"  -> on {device.upper()} tensors: error: {err}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
