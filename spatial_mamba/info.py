"""``python -m spatial_mamba.info``: which backend each op runs on here, and why."""

from __future__ import annotations

import os
import sys

import torch

from .ops import backend


def report() -> str:
    lines = [
        f"spatial_mamba: python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"CUDA available: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""),
        f"{backend.ENV_VAR}={os.environ.get(backend.ENV_VAR, '') or '(unset: automatic choice)'}",
    ]
    forced = backend.forced_backend()
    for op, backends in backend.describe().items():
        lines.append(f"{op}:")
        for name, status in backends.items():
            lines.append(f"  {name:<9} {status}")
        for device in ("cpu", "cuda"):
            if device == "cuda" and not torch.cuda.is_available():
                lines.append("  -> on CUDA tensors: no GPU here")
                continue
            probe = torch.empty(0, device=device)
            try:
                chosen = backend.choose(op, probe)[0]
                if forced:
                    why = f"forced by {backend.ENV_VAR}"
                elif device == "cpu":
                    why = "CPU tensors use the reference unless a backend is forced"
                else:
                    why = "first available in the order cuda, triton, reference"
                lines.append(f"  -> on {device.upper()} tensors: {chosen} ({why})")
            except RuntimeError as err:
                lines.append(f"  -> on {device.upper()} tensors: error: {err}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
