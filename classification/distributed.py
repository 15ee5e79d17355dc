"""Process-group set-up from the launcher's environment, and the few collectives the trainer needs.

Works under ``torch.distributed.launch``, ``torchrun`` (one node or several) and as a single process without a
launcher. The device comes from LOCAL_RANK: the official code used the global rank, which names a GPU that does not
exist on the second node (docs/official_bugs.md, #15).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .config import UsageError

__all__ = ["DistInfo", "init_distributed", "all_reduce_sum", "broadcast_object", "barrier", "cleanup"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(local_rank_flag: int | None = None) -> DistInfo:
    """Joins the process group the launcher set up (NCCL on GPUs, gloo on the CPU); one process needs none."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", local_rank_flag if local_rank_flag is not None else 0)
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs: "
                f"launch at most {torch.cuda.device_count()} processes per node (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over all ranks (in place) and returns it."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any) -> Any:
    """Returns rank 0's ``obj`` on every rank."""
    if not _active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if _active():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
