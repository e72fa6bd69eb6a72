"""Lightning DataModule: loaders, device-side batch transforms, resumable data order.

Resuming: the DataModule counts the training samples handed to the model in the current epoch
and saves (epoch, samples) in its `state_dict`, which Lightning stores in every checkpoint. After
a restart the training sampler skips the samples already consumed, so training continues with
exactly the batches the interrupted run would have seen next. An `ImageDataset` gets
`SeededIndex` keys, so its crops, flips and degradations are a function of (seed, epoch,
position) and replay exactly, with or without workers. The state also holds every rank's batch
transform state (a `RealESRGANBatchTransform`'s generator and pair queue). Resume with the same
number of processes for an exact continuation.

Unreadable files: each sample carries `skipped` (files replaced while loading it); the DataModule
sums it for training batches into `num_skipped`, removes the key, keeps the count across resumes
and logs the total when fitting ends. This works with worker processes because the count travels
inside the batches.

Distributed training: the samplers shard by rank themselves, so build the Trainer with
`use_distributed_sampler=False`. The LightningModule must not override the batch-transfer hooks
(the DataModule's take precedence).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from dataset.paired_dataset import ImageDataset
from dataset.sampler import ResumableSampler
from model.io.ranks import gather_to_rank0

logger = logging.getLogger(__name__)

BatchTransform = Callable[[dict[str, Any]], dict[str, Any]]


class RestorationDataModule(pl.LightningDataModule):
    """Training and validation loaders for restoration datasets.

    Args:
        train_dataset: built training dataset (e.g. `PairedDataset`, `RealESRGANDataset`).
        val_dataset: built validation dataset (give it a `seed` for a fixed LQ per image), or None.
        batch_size: training batch size per process.
        val_batch_size: validation batch size per process (default: batch_size).
        num_workers: DataLoader worker processes.
        batch_transform: callable applied to training batches on the training device, after
            the transfer (e.g. `RealESRGANBatchTransform`); None: batches pass unchanged.
        val_batch_transform: the same for validation batches (use a deterministic one).
        seed: seed of the training order.
        pin_memory: pin host memory (when CUDA is available).
        persistent_workers: keep workers alive between epochs (when num_workers > 0).
        prefetch_factor: batches prefetched per worker (when num_workers > 0).
        drop_last: drop the last incomplete training batch.
    """

    def __init__(
        self,
        train_dataset: Dataset,
        val_dataset: Dataset | None = None,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        batch_transform: BatchTransform | None = None,
        val_batch_transform: BatchTransform | None = None,
        seed: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int | None = None,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.batch_transform = batch_transform
        self.val_batch_transform = val_batch_transform
        self.seed = seed
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        self.drop_last = drop_last
        self.num_skipped = 0
        self._epoch = 0
        self._samples_in_epoch = 0
        self.train_sampler: ResumableSampler | None = None

    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(
        self, dataset: Dataset, sampler: ResumableSampler, batch_size: int, drop_last: bool
    ):
        workers = self.num_workers > 0
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            drop_last=drop_last,
            persistent_workers=self.persistent_workers and workers,
            prefetch_factor=self.prefetch_factor if workers else None,
            # the workers' base seed comes from here, not from the training's global generator
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        replicas, rank = self._replicas()
        self.train_sampler = ResumableSampler(
            len(self.train_dataset),
            shuffle=True,
            seed=self.seed,
            num_replicas=replicas,
            rank=rank,
            seeded=isinstance(self.train_dataset, ImageDataset),
        )
        self.train_sampler.resume(self._epoch, self._samples_in_epoch)
        return self._loader(self.train_dataset, self.train_sampler, self.batch_size, self.drop_last)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        replicas, rank = self._replicas()
        sampler = ResumableSampler(
            len(self.val_dataset), shuffle=False, num_replicas=replicas, rank=rank
        )
        return self._loader(self.val_dataset, sampler, self.val_batch_size, drop_last=False)

    def _training(self) -> bool:
        return self.trainer is not None and self.trainer.training

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count consumed training batches and skipped files (on the CPU, before transfer)."""
        skipped = batch.pop("skipped", None) if isinstance(batch, dict) else None
        if self._training():
            epoch = self.trainer.current_epoch
            if epoch != self._epoch:
                self._epoch, self._samples_in_epoch = epoch, 0
            self._samples_in_epoch += self.batch_size
            if skipped is not None:
                self.num_skipped += int(torch.as_tensor(skipped).sum())
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Apply the batch transform of the current stage, on the training device."""
        trainer = self.trainer
        if trainer is None:
            return batch
        if trainer.training and self.batch_transform is not None:
            return self.batch_transform(batch)
        evaluating = trainer.validating or trainer.sanity_checking
        if evaluating and self.val_batch_transform is not None:
            return self.val_batch_transform(batch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Data position (epoch, samples of this process consumed in it), seed, skipped files,
        and every rank's batch transform state (a list in rank order)."""
        transform_state = getattr(self.batch_transform, "state_dict", None)
        return {
            "epoch": self._epoch,
            "samples_in_epoch": self._samples_in_epoch,
            "seed": self.seed,
            "num_skipped": self.num_skipped,
            "batch_transform": gather_to_rank0(transform_state() if transform_state else None),
        }

    def _load_transform_state(self, per_rank: list[Any] | None) -> None:
        replicas, rank = self._replicas()
        if per_rank is None or per_rank[0] is None or self.batch_transform is None:
            return
        if len(per_rank) != replicas:
            logger.warning(
                "the checkpoint holds batch transform states of %d processes, this run has %d: "
                "the degradations start afresh",
                len(per_rank),
                replicas,
            )
            return
        self.batch_transform.load_state_dict(per_rank[rank])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the data position; the next training loader resumes from it."""
        if state_dict["seed"] != self.seed:
            logger.warning(
                "data order seed changed since the checkpoint (%s -> %s); the resumed epoch "
                "does not continue the interrupted order",
                state_dict["seed"],
                self.seed,
            )
        self._epoch = state_dict["epoch"]
        self._samples_in_epoch = state_dict["samples_in_epoch"]
        self.num_skipped = state_dict["num_skipped"]
        self._load_transform_state(state_dict.get("batch_transform"))

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self.num_skipped:
            logger.warning("%d unreadable training images were skipped", self.num_skipped)
