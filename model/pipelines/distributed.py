"""One command as several processes: torchrun's environment, one device per process, and a gloo
process group for the few small objects the processes exchange (run id, counts, failures,
metrics). The work itself needs no collective: the processes of a folder run share it through
claim files (`model.io.claims`), so gloo serves CPUs and GPUs, one machine or several.

    torchrun --nproc-per-node 4 inference.py --input photos/ --output restored/
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import secrets
from typing import Any

import torch
import torch.distributed as td

# a process waits for the others at the end of a run: at most the time of its slowest batch
TIMEOUT = datetime.timedelta(hours=6)


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place in the run (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()  # one process


def from_env() -> Dist:
    """The place torchrun gives this process (RANK, WORLD_SIZE, LOCAL_RANK), joining the gloo
    process group when there are several."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    if not td.is_initialized():
        td.init_process_group("gloo", timeout=TIMEOUT)
    return Dist(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_gather(dist: Dist, value: Any) -> list[Any]:
    """Every process's `value` (picklable), in rank order, on every process."""
    if dist.world_size == 1:
        return [value]
    gathered: list[Any] = [None] * dist.world_size
    td.all_gather_object(gathered, value)
    return gathered


def run_id(dist: Dist) -> str:
    """An id shared by the processes of this run, new for every run."""
    return all_gather(dist, secrets.token_hex(8))[0]


def device_for(device: str, dist: Dist) -> str:
    """`device` ("auto", "cuda", ...) as this process's own: cuda:LOCAL_RANK when several
    processes share a machine's GPUs."""
    if dist.world_size == 1 or device not in ("auto", "cuda") or not torch.cuda.is_available():
        return device
    index = dist.local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def shutdown(dist: Dist) -> None:
    """Leave the process group (after the last exchange)."""
    if dist.world_size > 1 and td.is_initialized():
        td.destroy_process_group()
