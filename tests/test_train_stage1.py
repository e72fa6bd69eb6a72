"""End-to-end stage-1 training with the tiny config: loss goes down, PSNR beats the LQ, resume."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import train
from model.nets.swinir import load_swinir
from scripts import make_demo_images


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "logs" / "tiny" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    assert make_demo_images.main(["--out", str(root), "--count", "24", "--val-count", "4"]) == 0
    return root


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config",
        "configs/tiny/stage1.yaml",
        "--output-dir",
        str(out),
        f"data.params.train_dataset.params.source={data / 'train'}",
        f"data.params.val_dataset.params.source={data / 'val'}",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained_run(demo_data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert train.main(overrides(demo_data, out)) == 0
    return out


def test_loss_decreases_and_psnr_beats_degraded_input(trained_run: Path) -> None:
    rows = read_metrics(trained_run)
    losses = [v for _, v in column(rows, "train/loss")]
    assert len(losses) >= 10
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first
    (step, psnr), (_, psnr_lq) = column(rows, "val/psnr")[-1], column(rows, "val/psnr_lq")[-1]
    assert step == 99 and psnr > psnr_lq


def test_exported_weights_load_into_swinir(trained_run: Path) -> None:
    model = load_swinir(trained_run / "weights" / "swinir_last.safetensors")
    assert model.config["embed_dim"] == 24
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_resume_continues_from_saved_step(trained_run: Path, demo_data: Path) -> None:
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 100 and ckpt["optimizer_states"]
    assert (
        train.main(overrides(demo_data, trained_run, "--resume", "last", "trainer.max_steps=110"))
        == 0
    )
    resumed = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 110
    datamodule_state = next(v for k, v in resumed.items() if "RestorationDataModule" in k)
    assert datamodule_state["samples_in_epoch"] > 0 or datamodule_state["epoch"] > 0


def test_resume_names_a_missing_checkpoint(tmp_path: Path, demo_data: Path) -> None:
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        train.main(overrides(demo_data, tmp_path, "--resume", "last"))
