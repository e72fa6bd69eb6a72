"""What a training run prints: a step progress bar, one line per validation, little else."""

from __future__ import annotations

import logging
import warnings
from typing import Any

from pytorch_lightning import Callback, LightningModule, Trainer
from tqdm import tqdm

log = logging.getLogger(__name__)

# Lightning warnings that are not the user's business in this project's runs
_IGNORED_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*module\(s\) in eval mode at the start of training.*",  # stage 2's frozen parts
    r".*smaller than the logging interval.*",
    r".*your dataloader is not resumable.*",  # the DataModule's sampler restores the position
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


def quiet_lightning(resuming: bool) -> None:
    """Silence Lightning's deprecation, eval-mode, log-interval and advertising lines (and,
    when resuming, that the checkpoint folder is not empty)."""
    resume_patterns = (r".*Checkpoint directory .* exists and is not empty.*",) if resuming else ()
    for pattern in (*_IGNORED_WARNINGS, *resume_patterns):
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        rank_zero_log = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in rank_zero_log.filters):
            rank_zero_log.addFilter(_DropTips())


def validation_line(step: int, metrics: dict[str, float]) -> str:
    """`step 100: val/psnr 24.31  val/ssim 0.7120  val/loss 0.0123` (PSNR first)."""
    order = sorted(metrics, key=lambda k: (k != "val/psnr", k != "val/ssim", k))
    values = "  ".join(f"{k} {metrics[k]:.4g}" for k in order)
    return f"step {step}: {values}"


class ConsoleProgress(Callback):
    """A tqdm bar over the optimizer steps (to `max_steps`) and a line after each validation.

    Args:
        bar: show the progress bar (the validation lines are logged either way).
    """

    def __init__(self, bar: bool = True) -> None:
        self.bar = bar
        self._tqdm: tqdm | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.bar and trainer.is_global_zero:
            total = trainer.max_steps if trainer.max_steps > 0 else None
            self._tqdm = tqdm(
                total=total, initial=trainer.global_step, desc="training", unit="step"
            )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *_: Any
    ) -> None:
        if self._tqdm is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._tqdm.set_postfix(loss=f"{float(loss):.4g}", refresh=False)
        self._tqdm.update(trainer.global_step - self._tqdm.n)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if not metrics:
            return
        line = validation_line(trainer.global_step, metrics)
        if self._tqdm is not None:
            self._tqdm.write(line)
        else:
            log.info(line)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
