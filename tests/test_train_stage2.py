"""Stage-2 training: only the LAControlNet learns, the loss goes down, checkpoints stay small and
a resume restores the LAControlNet exactly.

One tiny run (configs/tiny/stage2.yaml, 10 steps of 4 crops at a raised learning rate) is shared
by the tests of this module.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import train
from model.io.cldm_files import load_controlnet
from model.train.checkpointing import ResumeError
from model.train.instantiate import instantiate
from model.train.stage2 import TRAINABLE_PREFIX, Stage2System

CONFIG = "configs/tiny/stage2.yaml"
STEPS = 10


@pytest.fixture(scope="module")
def overrides(tiny_weights: Path, demo_images: Path) -> list[str]:
    return [
        f"system.params.cldm.params.sd_path={tiny_weights / 'v2-1_512-ema-pruned.ckpt'}",
        f"system.params.stage1.params.path={tiny_weights / 'general_swinir_v1.ckpt'}",
        f"data.params.train_dataset.params.source={demo_images / 'train'}",
        f"data.params.val_dataset.params.source={demo_images / 'val'}",
        "data.params.batch_size=4", "system.params.learning_rate=3e-3",
        "system.params.warmup_steps=2", "system.params.val_sample_steps=2",
        "trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1",
    ]  # fmt: skip


def run_args(out: Path, overrides: list[str], steps: int, *extra: str) -> list[str]:
    return ["--config", CONFIG, "--output-dir", str(out), *extra, *overrides,
            f"trainer.max_steps={steps}", f"trainer.val_check_interval={STEPS}",
            f"checkpoint.every_n_train_steps={STEPS // 2}"]  # fmt: skip


def logged_losses(run: Path) -> list[tuple[int, str]]:
    with (run / "logs" / "tiny" / "metrics.csv").open() as f:
        return [(int(r["step"]), r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]]


@pytest.fixture(scope="module")
def trained(overrides: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stage2_run")
    assert train.main(run_args(out, overrides, STEPS)) == 0
    return out


def fresh_system(overrides: list[str]) -> Stage2System:
    """The system as the run starts: LAControlNet initialised from the UNet, zero convs 0."""
    pl.seed_everything(231)
    return instantiate(train.load_config(CONFIG, overrides).system)


def controlnet_state(system: Stage2System) -> dict[str, torch.Tensor]:
    return {TRAINABLE_PREFIX + k: v.clone() for k, v in system.cldm.controlnet.state_dict().items()}


@torch.no_grad()
def fixed_loss(system: Stage2System, batch: dict) -> float:
    """The training objective on a fixed batch, timesteps spread over [20, 980], fixed noise."""
    system.eval()
    _, cond = system.condition(batch)
    z_0 = system.cldm.vae_encode(batch["hq"] * 2 - 1)
    t = torch.linspace(20, 980, z_0.shape[0]).long()
    noise = torch.randn(z_0.shape, generator=torch.Generator().manual_seed(0))
    return system.diffusion.loss(system.cldm, z_0, t, cond, noise).item()


def test_training_lowers_the_loss_and_saves_trainable_weights_only(
    trained: Path, overrides: list[str]
) -> None:
    with (trained / "logs" / "tiny" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    assert len(losses) == STEPS
    (psnr,) = [float(r["val/psnr"]) for r in rows if r.get("val/psnr")]  # of the samples
    assert 0 < psnr < 60
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == STEPS
    system = fresh_system(overrides)
    initial = controlnet_state(system)
    assert set(ckpt["state_dict"]) == set(initial)  # the LAControlNet, nothing else
    exported = load_controlnet(trained / "weights" / "controlnet_last.safetensors").state_dict()
    assert all(torch.equal(exported[k[len(TRAINABLE_PREFIX) :]], v) for k, v in ckpt["state_dict"].items())  # fmt: skip
    # every trained tensor moved, the zero-initialised output convs included
    zero_convs = [k for k, v in initial.items() if not v.any()]
    assert zero_convs and all(ckpt["state_dict"][k].abs().max() > 1e-4 for k in zero_convs)
    moved = [k for k, v in initial.items() if not torch.equal(ckpt["state_dict"][k], v)]
    assert len(moved) > 0.9 * len(initial)
    # the objective on a fixed batch (fixed timesteps and noise): measured 1.49 -> 0.94
    datamodule = instantiate(train.load_config(CONFIG, overrides).data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    before = fixed_loss(system, batch)
    system.cldm.controlnet.load_state_dict(exported)
    assert fixed_loss(system, batch) < 0.8 * before


def test_resume_restores_the_lacontrolnet_and_the_losses_exactly(
    trained: Path, overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    middle = run / "checkpoints" / f"step{STEPS // 2:08d}.ckpt"
    saved = torch.load(middle, weights_only=True)["state_dict"]
    at_start: list[dict[str, torch.Tensor]] = []
    monkeypatch.setattr(
        Stage2System, "on_train_start", lambda self: at_start.append(controlnet_state(self))
    )
    assert train.main(run_args(run, overrides, STEPS, "--resume", str(middle))) == 0
    (resumed,) = at_start
    assert set(resumed) == set(saved)
    assert all(torch.equal(resumed[k], v) for k, v in saved.items())
    initial = controlnet_state(fresh_system(overrides))
    assert not all(torch.equal(resumed[k], v) for k, v in initial.items())
    # the same timesteps, noise and posterior samples: the same losses, to the last bit
    rows = logged_losses(run)
    assert rows[STEPS:] == logged_losses(trained)[STEPS // 2 :]


def test_resume_from_a_checkpoint_missing_weights_fails_in_one_line(
    trained: Path, overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    dropped = sorted(ckpt["state_dict"])[3]
    del ckpt["state_dict"][dropped]
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    capsys.readouterr()
    rc = train.main(run_args(tmp_path / "run", overrides, STEPS + 1, "--resume", str(bad)))
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert line == f"error: --resume {bad}: checkpoint lacks 1 LAControlNet tensor(s): {dropped}"


def test_resume_checks_unexpected_tensors_and_the_frozen_weights(
    trained: Path, overrides: list[str]
) -> None:
    system = fresh_system(overrides)
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    system.on_load_checkpoint(ckpt)  # the same frozen files: accepted
    extra = {
        **ckpt,
        "state_dict": {**ckpt["state_dict"], TRAINABLE_PREFIX + "extra": torch.ones(1)},
    }
    with pytest.raises(ResumeError, match="has unexpected 1 LAControlNet tensor.*extra"):
        system.on_load_checkpoint(extra)
    with torch.no_grad():
        system.cldm.vae.decoder.conv_out.bias.add_(1e-3)  # as if another SD file were loaded
    system._frozen_digests = None
    with pytest.raises(ResumeError, match="frozen VAE weights differ"):
        system.on_load_checkpoint(ckpt)


def test_one_step_changes_only_the_lacontrolnet(overrides: list[str]) -> None:
    cfg = train.load_config(CONFIG, overrides)
    system = instantiate(cfg.system)
    datamodule = instantiate(cfg.data)
    batch = next(iter(datamodule.train_dataloader()))
    batch.pop("skipped")
    before = {k: v.clone() for k, v in system.state_dict().items()}
    optimizer = system.configure_optimizers()["optimizer"]
    system.train()
    loss = system.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    changed = {k for k, v in system.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(TRAINABLE_PREFIX) for k in changed)
    trainable = {n for n, p in system.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(TRAINABLE_PREFIX) for n in trainable)


def test_gradient_checkpointing_gives_the_same_gradients(overrides: list[str]) -> None:
    cfg = train.load_config(CONFIG, [*overrides, "system.params.gradient_checkpointing=true"])
    system = instantiate(cfg.system).train()
    assert system.cldm.unet.is_gradient_checkpointing
    assert system.cldm.controlnet.is_gradient_checkpointing
    batch = {"lq": torch.rand(2, 3, 64, 64), "hq": torch.rand(2, 3, 64, 64), "txt": ["", ""]}
    grads = []
    for checkpointing in (True, False):
        system.cldm.set_gradient_checkpointing(checkpointing)
        system.zero_grad()
        torch.manual_seed(0)
        system.training_step(batch, 0).backward()
        grads.append([p.grad.clone() for p in system.cldm.controlnet.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))
    assert any(g.abs().sum() > 0 for g in grads[0])
