"""Tiny DiffIR training chain S1 -> S2 -> S2-GAN through train.py: each stage improves what it
trains, exports EMA weights that `load_diffir` reads, and resumes from its checkpoint.

One chain (configs/tiny/diffir_*.yaml, a few steps each) is shared by the module; it takes
about half a minute, so the module is slow-marked (tests/test_diffir_system.py is the fast check).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

import inference
import train
from model.diffir import load_diffir
from model.train.diffir_gan import DiffIRS2GANSystem
from model.train.instantiate import instantiate

pytestmark = pytest.mark.slow

STEPS = {"s1": 16, "s2": 10, "s2_gan": 6}
ENCODER_STEPS = 6


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "logs" / "tiny" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def stage_args(stage: str, out: Path, demo: Path, runs: dict[str, Path], steps: int) -> list[str]:
    args = [
        "--config", f"configs/tiny/diffir_{stage}.yaml", "--output-dir", str(out),
        f"data.params.train_dataset.params.source={demo / 'train'}",
        f"data.params.val_dataset.params.source={demo / 'val'}",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
        f"checkpoint.every_n_train_steps={steps}",
    ]  # fmt: skip
    if stage != "s1":
        args.append(f"system.params.teacher.params.path={export(runs['s1'], 's1')}")
    if stage == "s2":
        args.append(f"system.params.encoder_steps={ENCODER_STEPS}")
    if stage == "s2_gan":
        args.append(f"system.params.network.params.path={export(runs['s2'], 's2')}")
    return args


def export(run: Path, stage: str) -> Path:
    return run / "weights" / f"diffir_{stage}_last.safetensors"


@pytest.fixture(scope="module")
def chain(demo_images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    runs: dict[str, Path] = {}
    for stage, steps in STEPS.items():
        out = tmp_path_factory.mktemp(f"diffir_{stage}")
        assert train.main(stage_args(stage, out, demo_images, runs, steps)) == 0
        runs[stage] = out
    return runs


def val_batch(run: Path) -> dict:
    """The (deterministic) validation batch of a run, from its saved config."""
    datamodule = instantiate(train.load_config(str(run / "config.yaml"), []).data)
    datamodule.setup("fit")
    (batch,) = list(datamodule.val_dataloader())
    return datamodule.val_batch_transform(batch)


def initial_network(run: Path) -> torch.nn.Module:
    """The network the run started from (seeded as train.py does)."""
    cfg = train.load_config(str(run / "config.yaml"), [])
    pl.seed_everything(cfg.seed)
    return instantiate(cfg.system).network.eval()


@torch.no_grad()
def test_stage1_lowers_the_validation_l1(chain: dict[str, Path]) -> None:
    batch = val_batch(chain["s1"])
    trained = load_diffir(export(chain["s1"], "s1"))
    l1 = {
        name: F.l1_loss(net.forward_s1(batch["lq"], batch["hq"]).clamp(0, 1), batch["hq"]).item()
        for name, net in (("initial", initial_network(chain["s1"])), ("trained", trained))
    }
    assert l1["trained"] < 0.9 * l1["initial"], l1
    assert column(read_metrics(chain["s1"]), "val/l1")[-1] == pytest.approx(l1["trained"], rel=1e-4)


@torch.no_grad()
def test_stage2_prior_learns_the_stage1_ipr(chain: dict[str, Path]) -> None:
    batch = val_batch(chain["s2"])
    teacher = load_diffir(export(chain["s1"], "s1"))
    target = teacher.cpen_s1(batch["lq"], batch["hq"])
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    gap = {
        name: F.l1_loss(net.sample_ipr(batch["lq"], noise)[-1], target).item()
        for name, net in (("initial", initial_network(chain["s2"])),
                          ("trained", load_diffir(export(chain["s2"], "s2"))))
    }  # fmt: skip
    assert gap["trained"] < 0.7 * gap["initial"], gap
    rows = read_metrics(chain["s2"])
    assert len(column(rows, "train/l_pix")) == STEPS["s2"] - ENCODER_STEPS  # joint phase only


def test_gan_stage_keeps_lowering_the_validation_l1(chain: dict[str, Path]) -> None:
    rows = read_metrics(chain["s2_gan"])
    assert len(column(rows, "train/l_d_fake")) == STEPS["s2_gan"]  # one step per batch
    gan_l1 = column(rows, "val/l1")[-1]
    assert gan_l1 < column(read_metrics(chain["s2"]), "val/l1")[-1]  # the same validation crops
    exported = load_diffir(export(chain["s2_gan"], "s2_gan"))
    before = load_diffir(export(chain["s2"], "s2"))
    changed = [
        k for k, v in exported.state_dict().items() if not torch.equal(v, before.state_dict()[k])
    ]
    assert any(k.startswith("cpen.") for k in changed) and any(
        k.startswith("restorer.") for k in changed
    )


def test_resume_restores_weights_optimizers_and_noise_stream(
    chain: dict[str, Path], demo_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(chain["s2_gan"], run)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    steps = STEPS["s2_gan"]
    assert ckpt["global_step"] == steps and len(ckpt["optimizer_states"]) == 2
    assert not any(k.startswith(("teacher.", "perceptual.")) for k in ckpt["state_dict"])
    at_start: list[tuple[dict, torch.Tensor]] = []
    start = DiffIRS2GANSystem.on_train_start
    monkeypatch.setattr(
        DiffIRS2GANSystem, "on_train_start",
        lambda self: (start(self),
                      at_start.append(({k: v.clone() for k, v in self.state_dict().items()},
                                       self._noise.get_state()))),
    )  # fmt: skip
    assert (
        train.main([*stage_args("s2_gan", run, demo_images, chain, steps + 2), "--resume", "last"])
        == 0
    )
    ((state, noise_state),) = at_start
    assert all(torch.equal(state[k], v) for k, v in ckpt["state_dict"].items())
    assert torch.equal(noise_state, ckpt["diffir_noise_states"][0])  # the one rank's stream
    assert (
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
        == steps + 2
    )


def test_exported_weights_restore_a_folder(
    chain: dict[str, Path], demo_images: Path, tmp_path: Path
) -> None:
    weights = export(chain["s2_gan"], "s2_gan")
    args = ["--input", str(demo_images / "val"), "--output", str(tmp_path), "--method", "diffir",
            "--diffir-ckpt", str(weights), "--device", "cpu", "--no-progress"]  # fmt: skip
    assert inference.main(args) == 0
    assert len(list(tmp_path.glob("*.png"))) == len(list((demo_images / "val").iterdir()))
