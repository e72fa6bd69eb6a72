"""The run's metric logger; a resumed run continues the same run and never deletes its history.

- TensorBoard: the fixed version folder `<output_dir>/logs/<name>`; a resumed run adds an
  events file next to the earlier ones.
- CSV: `<output_dir>/logs/<name>/metrics.csv` is appended to (Lightning's CSVLogger deletes it).
  Rows of an interrupted run after its last checkpoint stay, followed by the resumed rows.
- wandb: the run id is stored in `<output_dir>/logs/<name>/wandb_run_id`; a resumed run passes
  it with `resume="allow"`, so wandb continues the same run.
"""

from __future__ import annotations

import csv
import secrets
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.utilities import rank_zero_only

LOGGERS = ("tensorboard", "wandb", "csv")


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing an existing metrics.csv instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class AppendingCSVLogger(CSVLogger):
    """A CSVLogger whose metrics.csv survives restarts (new rows and columns are added)."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def _wandb_run_id(log_dir: Path, resuming: bool) -> str:
    """The stored id when resuming (if any), else a new one, stored for the next resume."""
    id_file = log_dir / "wandb_run_id"
    if resuming and id_file.is_file():
        return id_file.read_text().strip()
    run_id = secrets.token_hex(4)
    if rank_zero_only.rank == 0:  # only rank 0 talks to wandb
        log_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    return run_id


def build_logger(cfg: dict[str, Any], output_dir: Path, resuming: bool) -> Logger:
    """TensorBoard by default; `logger.type` selects wandb or csv (see the module docstring)."""
    kind = cfg.get("type", "tensorboard")
    name = cfg.get("name", "run")
    if kind == "tensorboard":
        return TensorBoardLogger(save_dir=str(output_dir), name="logs", version=name)
    if kind == "csv":
        return AppendingCSVLogger(save_dir=str(output_dir), name="logs", version=name)
    if kind == "wandb":
        run_id = _wandb_run_id(output_dir / "logs" / name, resuming)
        project = cfg.get("project", "diffbir")
        return WandbLogger(
            save_dir=str(output_dir), project=project, name=name, id=run_id, resume="allow"
        )
    raise ValueError(f"logger.type must be one of {LOGGERS}, got {kind!r}")
