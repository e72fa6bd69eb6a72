"""Training checkpoints: step files plus a `last.ckpt` that never lags them, and resume checks."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run (wrong tensors, other frozen weights)."""


class StepCheckpoint(ModelCheckpoint):
    """`step<N>.ckpt` every `every_n_train_steps` steps and `last.ckpt` with each of them.

    `last.ckpt` is written before the step file (a process killed in between resumes from the
    newest state) and once more when training ends between two step checkpoints. Lightning
    writes each file atomically (temporary file, then rename).

    Args:
        dirpath: checkpoint folder.
        every_n_train_steps: optimizer steps between two checkpoints.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="step{step:08d}",
            auto_insert_metric_name=False,
            every_n_train_steps=every_n_train_steps,
            save_top_k=-1,
            save_last=True,
            # a resumed run (also one moved to another folder) updates last.ckpt instead of
            # writing last-v1.ckpt, which `--resume last` would never pick up
            enable_version_counter=False,
        )
        self._last_saved_at: int | None = None

    def _save_topk_checkpoint(self, trainer: Trainer, monitor_candidates: dict) -> None:
        self._save_last_checkpoint(trainer, monitor_candidates)
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict) -> None:
        if self._last_saved_at != trainer.global_step:
            super()._save_last_checkpoint(trainer, monitor_candidates)
            self._last_saved_at = trainer.global_step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._last_saved_at != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A BLAKE2 digest of a state dict's names, dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def resolve_resume(resume: str | None, ckpt_dir: Path) -> Path | None:
    """Map `--resume last` to `<ckpt_dir>/last.ckpt`; check that the file exists."""
    if resume is None:
        return None
    path = ckpt_dir / "last.ckpt" if resume == "last" else Path(resume)
    if not path.is_file():
        hint = " (start the run without --resume)" if resume == "last" else ""
        raise ResumeError(f"--resume {resume}: no checkpoint at {path}{hint}")
    return path


def checkpoint_step(path: Path) -> int:
    """The global step a Lightning checkpoint was saved at (memory-mapped, tensors not read)."""
    try:
        checkpoint: dict[str, Any] = torch.load(
            path, map_location="cpu", mmap=True, weights_only=True
        )
    except Exception as e:  # noqa: BLE001 - any unreadable file is one message
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ResumeError(f"--resume {path}: not a readable checkpoint ({reason})") from e
    if "global_step" not in checkpoint:
        raise ResumeError(f"--resume {path}: not a Lightning training checkpoint")
    return int(checkpoint["global_step"])
