"""The few collectives training state needs: per-rank objects gathered for the checkpoint."""

from __future__ import annotations

import functools
from typing import Any

import torch.distributed as td


def distributed() -> bool:
    """True inside an initialised process group (DDP, FSDP, DeepSpeed)."""
    return td.is_available() and td.is_initialized()


def global_rank() -> int:
    return td.get_rank() if distributed() else 0


def world_size() -> int:
    return td.get_world_size() if distributed() else 1


@functools.cache
def _cpu_group() -> td.ProcessGroup | None:
    """A gloo group for gathering on the CPU (None: the default group already is gloo)."""
    return None if td.get_backend() == "gloo" else td.new_group(backend="gloo")


def gather_to_rank0(value: Any) -> list[Any] | None:
    """Every process's `value` (picklable) in rank order on rank 0, None on the others.

    Call it on every process at once (Lightning builds checkpoints on every rank). The objects
    travel over a gloo group, so large states (the pair queue) never go through GPU memory.
    """
    if not distributed():
        return [value]
    rank = td.get_rank()
    gathered: list[Any] | None = [None] * td.get_world_size() if rank == 0 else None
    td.gather_object(value, gathered, dst=0, group=_cpu_group())
    return gathered
