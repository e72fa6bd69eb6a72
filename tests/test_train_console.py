"""Training's console and loggers: validation metrics on the console, a step progress bar,
metric history kept across restarts, wandb continuing its run."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from model.train.console import ConsoleProgress
from model.train.loggers import build_logger


def fake_trainer(**kwargs) -> SimpleNamespace:
    defaults = {"is_global_zero": True, "sanity_checking": False, "global_step": 50,
                "max_steps": 100, "callback_metrics": {}}  # fmt: skip
    return SimpleNamespace(**{**defaults, **kwargs})


def test_each_validation_prints_psnr_and_ssim_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    metrics = {"train/loss": torch.tensor(0.5), "val/loss": torch.tensor(0.01),
               "val/ssim": torch.tensor(0.7123), "val/psnr": torch.tensor(24.314)}  # fmt: skip
    console = ConsoleProgress(bar=False)
    console.on_validation_end(fake_trainer(sanity_checking=True, callback_metrics=metrics), None)
    assert not caplog.records  # not for the sanity check
    console.on_validation_end(fake_trainer(callback_metrics=metrics), None)
    (record,) = caplog.records
    assert record.getMessage() == "step 50: val/psnr 24.31  val/ssim 0.7123  val/loss 0.01"


def test_the_progress_bar_counts_steps_to_max_steps() -> None:
    console = ConsoleProgress(bar=True)
    trainer = fake_trainer(global_step=30)  # a resumed run starts at its step
    console.on_train_start(trainer, None)
    assert (console._tqdm.n, console._tqdm.total) == (30, 100)
    trainer.global_step = 31
    console.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.25)})
    assert console._tqdm.n == 31 and "0.25" in console._tqdm.postfix
    console.on_train_end(trainer, None)


def test_csv_metrics_survive_a_restart(tmp_path: Path) -> None:
    first = build_logger({"type": "csv", "name": "tiny"}, tmp_path, resuming=False)
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.save()
    again = build_logger({"type": "csv", "name": "tiny"}, tmp_path, resuming=True)
    again.log_metrics({"train/loss": 0.5, "val/psnr": 20.0}, step=1)  # a new column too
    again.save()
    with (tmp_path / "logs" / "tiny" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["train/loss"], r["val/psnr"]) for r in rows] == [
        ("0", "1.0", ""), ("1", "0.5", "20.0")
    ]  # fmt: skip


def test_wandb_resumes_the_stored_run(tmp_path: Path) -> None:
    cfg = {"type": "wandb", "name": "run", "project": "p"}
    first = build_logger(cfg, tmp_path, resuming=False)
    resumed = build_logger(cfg, tmp_path, resuming=True)
    fresh = build_logger(cfg, tmp_path, resuming=False)
    assert resumed._wandb_init["id"] == first._wandb_init["id"]
    assert resumed._wandb_init["resume"] == "allow"
    assert fresh._wandb_init["id"] != first._wandb_init["id"]


def test_tensorboard_keeps_one_version_folder(tmp_path: Path) -> None:
    first = build_logger({"name": "run"}, tmp_path, resuming=False)
    resumed = build_logger({"name": "run"}, tmp_path, resuming=True)
    assert first.log_dir == resumed.log_dir == str(tmp_path / "logs" / "run")
