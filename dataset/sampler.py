"""A seeded, distributed-aware sampler that can resume in the middle of an epoch."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils.data import Sampler


class SeededIndex(NamedTuple):
    """A dataset index with the entropy of that sample's random draws (crop, flips, degradation).

    The entropy is (seed, epoch, position in the epoch's global order): every sample of a run,
    on every rank, draws from its own stream, whichever worker loads it and whenever.
    """

    index: int
    entropy: tuple[int, int, int]


class ResumableSampler(Sampler[int]):
    """Yields this replica's share of a seeded permutation of range(num_samples) per epoch.

    The order depends only on (seed, epoch), so after `resume(epoch, consumed)` the next pass
    yields exactly the indices an uninterrupted run would still have yielded in that epoch.
    Sharding follows `DistributedSampler`: the permutation is padded (or truncated with
    `drop_last`) to a multiple of `num_replicas`, and replica r takes every r-th index.

    Args:
        num_samples: dataset length.
        shuffle: permute per epoch (False: 0, 1, 2, ... every epoch).
        seed: base seed of the permutation.
        num_replicas: number of distributed processes.
        rank: this process's rank.
        drop_last: drop the tail instead of padding when sharding.
        seeded: yield `SeededIndex` keys instead of plain indices.
    """

    def __init__(
        self,
        num_samples: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        seeded: bool = False,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.seeded = seeded
        self.epoch = 0
        self._resume_epoch = 0
        self._resume_consumed = 0

    def __len__(self) -> int:
        """Indices per replica and full epoch (also after a resume, as Lightning counts them)."""
        if self.drop_last:
            return self.num_samples // self.num_replicas
        return math.ceil(self.num_samples / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next pass yields (called by Lightning)."""
        self.epoch = epoch

    def resume(self, epoch: int, consumed: int) -> None:
        """Make the next pass over `epoch` skip its first `consumed` indices of this replica."""
        self.epoch = self._resume_epoch = epoch
        self._resume_consumed = consumed

    def indices(self, epoch: int) -> list[int]:
        """This replica's full index list for `epoch`."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        total = len(self) * self.num_replicas
        if total > len(order):
            order += (order * math.ceil(total / max(1, len(order))))[: total - len(order)]
        return order[:total][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int | SeededIndex]:
        skip = self._resume_consumed if self.epoch == self._resume_epoch else 0
        self._resume_consumed = 0  # a resume point applies to one pass only
        epoch = self.epoch
        indices = self.indices(epoch)[skip:]
        if not self.seeded:
            return iter(indices)
        return (
            SeededIndex(index, (self.seed, epoch, position * self.num_replicas + self.rank))
            for position, index in enumerate(indices, start=skip)
        )
