"""Per-rank random streams of training, saved in every checkpoint and restored on resume.

The networks are built under `seed_everything(seed)`, so every rank starts from the same
weights. When training starts, each rank re-seeds torch (CPU and CUDA), numpy and Python's
`random` from (seed, global rank): the stage-2 timesteps, noise, VAE posterior samples and
caption dropout, and SwinIR's drop-path, differ between ranks (DiffIR's private x_T noise
generator is seeded the same way, see `model.train.diffir_base`). A checkpoint stores every rank's
generator states, and a resumed run continues each stream where it stopped. The data draws
(crops, flips, degradations) have their own seeds (see `dataset.sampler.SeededIndex`).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from pytorch_lightning import Callback, LightningModule, Trainer

from model.io.ranks import gather_to_rank0

log = logging.getLogger(__name__)


def rank_seed(seed: int, rank: int) -> int:
    """A 32-bit seed for process `rank` of a run seeded with `seed` (distinct per rank)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def rank_state(saved: list[Any] | None, rank: int, world_size: int, what: str) -> Any | None:
    """This rank's entry of `saved` (per-rank states from a checkpoint), or None when nothing was
    saved or a run with another number of processes saved it (logged, naming `what`)."""
    if saved is None:
        return None
    if len(saved) == world_size:
        return saved[rank]
    log.warning(
        "the checkpoint holds %s of %d processes, this run has %d: new random streams "
        "(the resumed run is not an exact continuation)",
        what,
        len(saved),
        world_size,
    )
    return None


def seed_all(seed: int) -> None:
    """Seed torch (every device), numpy's and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_states() -> dict[str, Any]:
    """The global generators' states, as tensors and plain numbers (loadable weights-only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RandomStreams(Callback):
    """Seeds each rank's global generators when training starts; checkpoints their states.

    Args:
        seed: the run's seed.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._restored: list[dict[str, Any]] | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        restored, self._restored = self._restored, None
        state = rank_state(restored, trainer.global_rank, trainer.world_size, "random states")
        if state is not None:
            set_rng_states(state)
        else:
            seed_all(rank_seed(self.seed, trainer.global_rank))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "ranks": gather_to_rank0(rng_states())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict["ranks"]
