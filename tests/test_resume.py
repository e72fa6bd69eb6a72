"""Exact resume: a run stopped at step k and resumed with `--resume last` logs the same per-step
losses as an uninterrupted run (CPU, fp32, bit-exact), with the Real-ESRGAN batch transform and
its pair queue on; `last.ckpt` never lags a step checkpoint; a finished run says so.
"""

from __future__ import annotations

import csv
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

import train
from model.train.checkpointing import StepCheckpoint

STEPS, STOP = 3, 2  # the queue (two batches) swaps from step 2 on: after the stop


def realesrgan_config(
    base: str, out: Path, demo: Path, tiny_weights: Path | None, batch_size: int = 1
) -> Path:
    """The tiny config with Real-ESRGAN training data: kernels in the dataset, degradations
    and a queue of two batches in the batch transform."""
    cfg = OmegaConf.load(base)
    cfg.data.params.train_dataset = {
        "target": "dataset.paired_dataset.RealESRGANDataset",
        "params": {
            "source": str(demo / "train"), "out_size": 64, "crop_type": "random",
            "use_hflip": True,
            "kernels": {"target": "dataset.realesrgan.RealESRGANKernels",
                        "params": {"blur_kernel_size": 11, "blur_kernel_size2": 11}},
        },
    }  # fmt: skip
    cfg.data.params.batch_transform = {
        "target": "dataset.batch_transform.RealESRGANBatchTransform",
        "params": {"queue_size": 2 * batch_size, "seed": 5, "resize_range": [0.5, 1.5],
                   "resize_range2": [0.5, 1.2]},
    }  # fmt: skip
    cfg.data.params.batch_size = batch_size
    cfg.data.params.val_dataset.params.source = str(demo / "val")
    if tiny_weights is not None:
        cfg.system.params.cldm.params.sd_path = str(tiny_weights / "v2-1_512-ema-pruned.ckpt")
        cfg.system.params.stage1.params.path = str(tiny_weights / "general_swinir_v1.ckpt")
    cfg.trainer.update(log_every_n_steps=1, limit_val_batches=0, num_sanity_val_steps=0,
                       enable_progress_bar=False)  # fmt: skip
    cfg.checkpoint.every_n_train_steps = STOP
    path = out / "config.yaml"
    OmegaConf.save(cfg, path)
    return path


def losses(run: Path) -> list[tuple[int, str]]:
    """(step, train/loss as logged) rows of a run's metrics.csv, in file order."""
    with (run / "logs" / "tiny" / "metrics.csv").open() as f:
        return [(int(r["step"]), r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]]


def run(config: Path, out: Path, steps: int, *extra: str) -> int:
    return train.main(["--config", str(config), "--output-dir", str(out), *extra,
                       f"trainer.max_steps={steps}"])  # fmt: skip


def stopped_and_resumed(config: Path, tmp_path: Path) -> tuple[list, list]:
    assert run(config, tmp_path / "full", STEPS) == 0
    assert run(config, tmp_path / "part", STOP) == 0
    assert run(config, tmp_path / "part", STEPS, "--resume", "last") == 0
    return losses(tmp_path / "full"), losses(tmp_path / "part")


def test_stage1_resume_is_exact_with_the_realesrgan_queue(
    demo_images: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = realesrgan_config("configs/tiny/stage1.yaml", tmp_path, demo_images, None)
    full, resumed = stopped_and_resumed(config, tmp_path)
    assert [s for s, _ in full] == list(range(STEPS))
    assert resumed == full  # the first rows were written before the stop: nothing deleted
    ckpt = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == STEPS
    state = next(v for k, v in ckpt.items() if "RestorationDataModule" in k)
    (transform,) = state["batch_transform"]  # one process
    assert transform["queue_ptr"] == 2 and transform["generator"] is not None
    caplog.set_level(logging.INFO)
    assert run(config, tmp_path / "part", STEPS, "--resume", "last") == 0
    assert f"the run is finished (trainer.max_steps={STEPS})" in caplog.text
    assert "trainer.max_steps=<N>" in caplog.text
    assert losses(tmp_path / "part") == full  # nothing trained, nothing logged


@pytest.mark.slow
def test_stage2_resume_is_exact_with_the_realesrgan_queue(
    demo_images: Path, tiny_weights: Path, tmp_path: Path
) -> None:
    config = realesrgan_config(
        "configs/tiny/stage2.yaml", tmp_path, demo_images, tiny_weights, batch_size=2
    )  # a group norm of the tiny LAControlNet sees 1 x 1 maps: one sample is too few
    full, resumed = stopped_and_resumed(config, tmp_path)
    assert len(full) == STEPS and resumed == full


@pytest.mark.slow
def test_sigkill_then_resume_matches_the_uninterrupted_run(
    demo_images: Path, tmp_path: Path
) -> None:
    """SIGKILL right after the step-2 checkpoint appears, then `--resume last` to the end."""
    config = realesrgan_config("configs/tiny/stage1.yaml", tmp_path, demo_images, None)
    assert run(config, tmp_path / "full", STEPS) == 0
    cmd = [sys.executable, "train.py", "--config", str(config), "--output-dir",
           str(tmp_path / "killed"), f"trainer.max_steps={STEPS}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    step_file = tmp_path / "killed" / "checkpoints" / f"step{STOP:08d}.ckpt"
    while not step_file.exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert subprocess.run([*cmd, "--resume", "last"], env=env).returncode == 0
    full = dict(losses(tmp_path / "full"))
    rows = losses(tmp_path / "killed")
    assert {s for s, _ in rows} == set(full)
    assert all(full[s] == loss for s, loss in rows)  # repeated steps repeat their loss too


# ------------------------------------------------------------------------ checkpoint files


class _Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return ((self.w - batch[0]) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 1)), batch_size=1)


def test_last_checkpoint_is_written_before_each_step_file_and_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[tuple[int, str]] = []
    save = pl.Trainer.save_checkpoint

    def recording_save(self, filepath, *args, **kwargs):
        written.append((self.global_step, Path(filepath).name))
        save(self, filepath, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", recording_save)
    trainer = pl.Trainer(
        max_steps=5, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[StepCheckpoint(tmp_path, every_n_train_steps=2)],
    )  # fmt: skip
    trainer.fit(_Regression())
    assert written == [
        (2, "last.ckpt"), (2, "step00000002.ckpt"),
        (4, "last.ckpt"), (4, "step00000004.ckpt"),
        (5, "last.ckpt"),  # the end falls between two step checkpoints
    ]  # fmt: skip
