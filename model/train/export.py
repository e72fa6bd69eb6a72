"""Export the trained network's weights as safetensors whenever a checkpoint is saved."""

from __future__ import annotations

import logging
from pathlib import Path

from pytorch_lightning import Callback, LightningModule, Trainer

from model.io.checkpoint import save_safetensors

log = logging.getLogger(__name__)


class ExportWeights(Callback):
    """Write `<dirpath>/<prefix>_step<N>.safetensors` and `<prefix>_last.safetensors`.

    The system provides `export_state() -> dict[str, Tensor]` and `export_config() -> dict`
    (what the loader needs to rebuild the network); the config goes into the file's metadata.

    Args:
        dirpath: folder for the exported files.
        prefix: file name prefix, e.g. "swinir" or "controlnet".
    """

    def __init__(self, dirpath: str | Path, prefix: str) -> None:
        self.dirpath = Path(dirpath)
        self.prefix = prefix
        self._last_step: int | None = None

    def _export(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        state, config = pl_module.export_state(), pl_module.export_config()
        step_file = self.dirpath / f"{self.prefix}_step{trainer.global_step:08d}.safetensors"
        for path in (step_file, self.dirpath / f"{self.prefix}_last.safetensors"):
            save_safetensors(state, path, config)
        log.info("exported %d tensors to %s", len(state), step_file)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint) -> None:
        self._export(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._export(trainer, pl_module)
