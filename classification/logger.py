"""Per-rank log files, console output on rank 0, and the per-epoch metrics file the training-curve plot reads."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Dict, List

__all__ = ["FILE_ONLY", "create_logger", "close_logger", "append_metrics", "read_metrics"]

# ``logger.error(..., extra={FILE_ONLY: True})`` goes to the log file but not to the console.
FILE_ONLY = "file_only"

_FORMAT = "[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s"
# Loggers whose records go to the run's files: the trainer, the model package (backend choice) and warnings.
_LOGGERS = ("classification", "spatial_mamba", "py.warnings")


def create_logger(output_dir: str, rank: int, name: str | None = None) -> logging.Logger:
    """Appends to ``output_dir/log_rank{rank}.txt`` on every rank and prints to the console on rank 0.

    Each record starts with ``[time name]``, where ``name`` is the model name (MODEL.NAME) as in the official logs;
    without it, the logger's own name.

    Calling it again (a second run in the same process) replaces the handlers of the previous call."""
    logging.captureWarnings(True)
    handlers: List[logging.Handler] = []
    file_handler = logging.FileHandler(os.path.join(output_dir, f"log_rank{rank}.txt"), mode="a")
    file_handler.setLevel(logging.DEBUG)
    handlers.append(file_handler)
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(logging.INFO)
        console.addFilter(lambda record: not getattr(record, FILE_ONLY, False))
        handlers.append(console)
    for handler in handlers:
        fmt = _FORMAT if name is None else _FORMAT.replace("%(name)s", name.replace("%", "%%"))
        handler.setFormatter(logging.Formatter(fmt, datefmt="%Y-%m-%d %H:%M:%S"))
        handler._classification_run = True  # marks the handlers this function owns
    close_logger()
    for name in _LOGGERS:
        log = logging.getLogger(name)
        log.setLevel(logging.INFO)
        log.propagate = False
        for handler in handlers:
            log.addHandler(handler)
    return logging.getLogger("classification")


def close_logger() -> None:
    """Detaches and closes the handlers of :func:`create_logger` (the end of a run)."""
    for name in _LOGGERS:
        log = logging.getLogger(name)
        for handler in [h for h in log.handlers if getattr(h, "_classification_run", False)]:
            log.removeHandler(handler)
            handler.close()


def append_metrics(path: str, record: Dict[str, float]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> List[Dict[str, float]]:
    """The per-epoch records of ``metrics.jsonl``, one per epoch (the last one wins when an epoch was redone after
    a resume), in epoch order."""
    by_epoch: Dict[int, Dict[str, float]] = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    by_epoch[int(record["epoch"])] = record
    return [by_epoch[e] for e in sorted(by_epoch)]
