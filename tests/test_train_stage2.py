"""Stage-2 training: only the LAControlNet learns, the loss goes down, checkpoints stay small."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from omegaconf import OmegaConf

import train
from model.io.cldm_files import load_controlnet
from model.train.instantiate import instantiate
from model.train.stage2 import TRAINABLE_PREFIX


def tiny_config(weights: Path, demo: Path) -> list[str]:
    return [
        f"system.params.cldm.params.sd_path={weights / 'v2-1_512-ema-pruned.ckpt'}",
        f"system.params.stage1.params.path={weights / 'general_swinir_v1.ckpt'}",
        f"data.params.train_dataset.params.source={demo / 'train'}",
        f"data.params.val_dataset.params.source={demo / 'val'}",
    ]


def test_one_step_changes_only_the_lacontrolnet(tiny_weights: Path, demo_images: Path) -> None:
    cfg = OmegaConf.merge(
        OmegaConf.load("configs/tiny/stage2.yaml"),
        OmegaConf.from_dotlist(tiny_config(tiny_weights, demo_images)),
    )
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


def test_tiny_run_lowers_loss_and_saves_trainable_weights_only(
    tiny_weights: Path, demo_images: Path, tmp_path: Path
) -> None:
    args = ["--config", "configs/tiny/stage2.yaml", "--output-dir", str(tmp_path)]
    overrides = [*tiny_config(tiny_weights, demo_images), "trainer.enable_progress_bar=false"]
    overrides += ["trainer.max_steps=30", "trainer.val_check_interval=30"]
    overrides += ["checkpoint.every_n_train_steps=30", "trainer.log_every_n_steps=2"]
    overrides += ["trainer.num_sanity_val_steps=0"]
    assert train.main(args + overrides) == 0

    with (tmp_path / "logs" / "tiny" / "metrics.csv").open() as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3

    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 30
    assert ckpt["state_dict"] and all(k.startswith(TRAINABLE_PREFIX) for k in ckpt["state_dict"])
    controlnet = load_controlnet(tmp_path / "weights" / "controlnet_last.safetensors")
    exported = {TRAINABLE_PREFIX + k: v for k, v in controlnet.state_dict().items()}
    assert all(torch.equal(exported[k], v) for k, v in ckpt["state_dict"].items())

    assert train.main([*args, "--resume", "last", *overrides, "trainer.max_steps=32"]) == 0
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 32


def test_gradient_checkpointing_gives_the_same_gradients(tiny_weights: Path) -> None:
    cfg = OmegaConf.merge(
        OmegaConf.load("configs/tiny/stage2.yaml"),
        OmegaConf.from_dotlist(tiny_config(tiny_weights, Path("unused"))),
    )
    batch = {"lq": torch.rand(2, 3, 128, 128), "hq": torch.rand(2, 3, 128, 128), "txt": ["", ""]}
    grads = []
    for checkpointing in (False, True):
        cfg.system.params.gradient_checkpointing = checkpointing
        system = instantiate(cfg.system).train()
        torch.manual_seed(0)
        system.training_step(batch, 0).backward()
        grads.append([p.grad.clone() for p in system.cldm.controlnet.parameters()])
    assert system.cldm.unet.is_gradient_checkpointing
    assert system.cldm.controlnet.is_gradient_checkpointing
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))
    assert any(g.abs().sum() > 0 for g in grads[1])
