"""``Run``: the settings, results and errors of one benchmark run, and the JSON report it rewrites."""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List

import timm
import torch

from . import device as device_facts
from .backends import model_backends
from .models import DEFAULT_MODELS, SMOKE_MODELS
from .targets import evaluate_targets
from .timing import time_ms

ROOT = Path(__file__).resolve().parents[2]


def log(message: str, start: float):
    print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)


class Run:
    """Settings, results and bookkeeping of one benchmark run; ``save`` rewrites the JSON file."""

    def __init__(self, args: argparse.Namespace):
        self.start = time.perf_counter()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        small = args.smoke
        self.batch_size = args.batch_size or (2 if small else 128)
        self.img_size = args.img_size or (32 if small else 224)
        # Kernel shapes: Spatial-Mamba-T's first stage at 224x224 (d_inner 128, 56x56 tokens, N 1).
        self.channels = 16 if small else 128
        self.side = 32 if small else 56
        self.d_state = 1
        self.kernel_warmup = args.warmup if args.warmup is not None else (1 if small else 20)
        self.kernel_iters = args.iters or (2 if small else 50)
        self.model_warmup = args.warmup if args.warmup is not None else (1 if small else 10)
        self.model_iters = args.iters or (2 if small else 30)
        self.models = args.models or (SMOKE_MODELS if small else DEFAULT_MODELS)
        self.sections = args.only
        self.time_budget = args.time_budget if args.time_budget is not None else (0 if small else 540)
        self.errors: List[Dict[str, object]] = []

        name, self.peak, peak_note, stem = device_facts.describe(self.device)
        self.path = Path(args.out) / f"{stem}{'-smoke' if small else ''}.json"
        self.results: Dict[str, object] = {
            "device": name,
            "device_type": self.device.type,
            "peak_bandwidth_bytes_per_s": self.peak,
            "peak_bandwidth_note": peak_note,
            "peak_bandwidth_from_device_properties_bytes_per_s": device_facts.bandwidth_from_properties(self.device),
            "torch": torch.__version__,
            "triton": _triton_version(),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if self.device.type == "cuda" else None,
            "timm": timm.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": _git_commit(),
            "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
            "smoke": small,
            "settings": {
                "batch_size": self.batch_size,
                "img_size": self.img_size,
                "kernel_warmup": self.kernel_warmup,
                "kernel_iters": self.kernel_iters,
                "model_warmup": self.model_warmup,
                "model_iters": self.model_iters,
                "time_budget_s": self.time_budget,
                "cudnn_benchmark": True,
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            },
            "backends": model_backends(self.device),
        }

    def time(self, step: Callable[[], object], kind: str) -> Dict[str, float]:
        """Times ``step`` with ``timing.time_ms`` and the run's counts for a ``"kernel"`` or a ``"model"`` step."""
        if kind == "kernel":
            return time_ms(step, self.kernel_warmup, self.kernel_iters, self.device)
        if kind == "model":
            return time_ms(step, self.model_warmup, self.model_iters, self.device)
        raise ValueError(f"Run.time: kind must be 'kernel' or 'model', got {kind!r}")

    def log(self, message: str):
        log(message, self.start)

    def over_budget(self) -> bool:
        return self.time_budget > 0 and time.perf_counter() - self.start > self.time_budget

    def skipped(self) -> Dict[str, str]:
        return {"skipped": f"the time budget of {self.time_budget} s (--time-budget) ran out before this started"}

    def failed(self, where: str, error: BaseException) -> Dict[str, object]:
        """Records a failed measurement (printed with its traceback, never silent) and returns its result entry."""
        oom = isinstance(error, torch.cuda.OutOfMemoryError)
        self.log(f"{where}: {'out of memory' if oom else 'FAILED'}: {error}")
        if not oom and error.__traceback__ is not None:  # a failed check is recorded without being raised
            traceback.print_exception(type(error), error, error.__traceback__)
        self.errors.append({"where": where, "error": f"{type(error).__name__}: {error}", "out_of_memory": oom})
        return {"error": f"{type(error).__name__}: {error}", "out_of_memory": oom}

    def free_memory(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def save(self):
        self.results["errors"] = self.errors
        self.results["targets"] = evaluate_targets(self.results)
        self.results["elapsed_s"] = time.perf_counter() - self.start
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=2) + "\n")
        tmp.replace(self.path)


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None
