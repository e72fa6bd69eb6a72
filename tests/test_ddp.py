"""Distributed training: every rank draws its own random streams (restored exactly on resume),
and a 2-process DDP step (gloo, CPU) equals one process on the concatenated batch."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

import train
from dataset.sampler import ResumableSampler
from model.train.instantiate import instantiate
from model.train.seeding import RandomStreams


def draws() -> tuple[float, float, float]:
    return torch.rand(1).item(), float(np.random.rand()), random.random()


def start(streams: RandomStreams, rank: int, world_size: int = 2) -> None:
    trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
    streams.on_train_start(trainer, None)


def test_each_rank_draws_its_own_streams_and_resumes_them() -> None:
    per_rank = []
    for rank in (0, 1):
        start(RandomStreams(seed=231), rank)
        per_rank.append(draws())
    assert all(a != b for a, b in zip(*per_rank, strict=True))  # torch, numpy and python
    start(RandomStreams(seed=231), 0)
    assert draws() == per_rank[0]  # a function of (seed, rank)

    streams = RandomStreams(seed=231)
    start(streams, 0)
    draws()
    saved = streams.state_dict()
    expected = draws()
    torch.manual_seed(0)  # whatever happens before the resumed run starts
    resumed = RandomStreams(seed=231)
    resumed.load_state_dict(saved)
    start(resumed, 0, world_size=1)
    assert draws() == expected


def test_each_rank_gets_other_sample_entropy() -> None:
    keys = [list(ResumableSampler(8, seed=3, num_replicas=2, rank=r, seeded=True)) for r in (0, 1)]
    entropies = [k.entropy for shard in keys for k in shard]
    assert len(set(entropies)) == 8
    assert sorted(k.index for shard in keys for k in shard) == list(range(8))


def ddp_step(tmp_path: Path, config: str, overrides: list[str]) -> list[dict]:
    """Run one float64 training step with 2 gloo processes; return each rank's record.

    Float64, because float32 sums over batches of 2 + 2 and of 4 already differ by ~2e-6 in
    the zero-conv gradients (each of them also differs that much from the float64 result)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "tests/ddp_worker.py", str(tmp_path), "--config", config, "--output-dir",
           str(tmp_path / "run"), *overrides, "trainer.strategy=ddp", "trainer.devices=2",
           "trainer.accelerator=cpu", "trainer.precision=64-true", "trainer.max_steps=1",
           "trainer.num_sanity_val_steps=0",
           "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false"]  # fmt: skip
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def reference_system(config: str, overrides: list[str]) -> pl.LightningModule:
    """The system as every rank builds it (same seed, same initial weights)."""
    cfg = train.load_config(config, overrides)
    pl.seed_everything(cfg.seed, verbose=False)
    return instantiate(cfg.system).double().train()


def assert_same_grads(system: pl.LightningModule, ranks: list[dict]) -> None:
    grads = {n: p.grad for n, p in system.named_parameters() if p.grad is not None}
    assert grads and set(grads) == set(ranks[0]["grads"])
    for rank in ranks:
        for name, grad in grads.items():
            torch.testing.assert_close(rank["grads"][name], grad, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_ddp_stage1_step_equals_one_process_on_the_whole_batch(
    tmp_path: Path, demo_images: Path
) -> None:
    overrides = [
        f"data.params.train_dataset.params.source={demo_images / 'train'}",
        f"data.params.val_dataset.params.source={demo_images / 'val'}",
        "data.params.batch_size=2", "system.params.network.params.drop_path_rate=0",
    ]  # fmt: skip
    ranks = ddp_step(tmp_path, "configs/tiny/stage1.yaml", overrides)
    assert not torch.equal(ranks[0]["rng"], ranks[1]["rng"])
    assert not torch.equal(ranks[0]["batch"]["lq"], ranks[1]["batch"]["lq"])
    system = reference_system("configs/tiny/stage1.yaml", overrides)
    batch = {k: torch.cat([r["batch"][k] for r in ranks]) for k in ("lq", "hq")}
    system.training_step(batch, 0).backward()
    assert_same_grads(system, ranks)


@pytest.mark.slow
def test_ddp_stage2_step_equals_one_process_on_the_whole_batch(
    tmp_path: Path, demo_images: Path, tiny_weights: Path
) -> None:
    overrides = [
        f"system.params.cldm.params.sd_path={tiny_weights / 'v2-1_512-ema-pruned.ckpt'}",
        f"system.params.stage1.params.path={tiny_weights / 'general_swinir_v1.ckpt'}",
        f"data.params.train_dataset.params.source={demo_images / 'train'}",
        f"data.params.val_dataset.params.source={demo_images / 'val'}",
        "data.params.batch_size=2",
    ]
    ranks = ddp_step(tmp_path, "configs/tiny/stage2.yaml", overrides)
    for key in ("t", "noise", "z_0"):  # timesteps, ε and posterior samples differ per rank
        assert not torch.equal(ranks[0][key], ranks[1][key])
    system = reference_system("configs/tiny/stage2.yaml", overrides)
    whole = {k: torch.cat([r[k] for r in ranks]) for k in ("z_0", "t", "c_img", "c_txt", "noise")}
    cond = {"c_img": whole["c_img"], "c_txt": whole["c_txt"]}
    system.diffusion.loss(system.cldm, whole["z_0"], whole["t"], cond, whole["noise"]).backward()
    assert_same_grads(system, ranks)
