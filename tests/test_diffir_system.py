"""The DiffIR stage-2 system on a fixed batch: the prior phase trains CPEN_S2 and the denoiser
only and brings the IPR towards the stage-1 target; the joint phase then trains the DIRformer
too; the EMA follows the trained weights; each DDP rank draws its own x_T noise and resumes
it. (The full tiny chain is in test_diffir_train.py.)"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import distributed as td
from torch.utils.data import DataLoader

from model.diffir import DiffIRS1, DiffIRS2
from model.train.diffir import DiffIRS1System, DiffIRS2System
from tests.folder_runs import start_ranks

TINY = {"n_encoder_res": 1, "dim": 8, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1,
        "heads": [1, 1, 2, 2], "ffn_expansion_factor": 2.0, "layer_norm": "BiasFree"}  # fmt: skip
ENCODER_STEPS, STEPS = 3, 5


class _Snapshots(pl.Callback):
    def __init__(self) -> None:
        self.restorer: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, system, outputs, batch, batch_idx) -> None:
        self.restorer.append(
            {k: v.clone() for k, v in system.network.restorer.state_dict().items()}
        )


def test_stage2_phases_train_the_right_parts() -> None:
    torch.manual_seed(0)
    batch = {"lq": torch.rand(2, 3, 16, 16), "hq": torch.rand(2, 3, 64, 64)}
    teacher, network = DiffIRS1(**TINY).eval(), DiffIRS2(**TINY)
    system = DiffIRS2System(network, teacher, encoder_steps=ENCODER_STEPS, lr_encoder=1e-3,
                            lr_sr=1e-3, ema_decay=0.5)  # fmt: skip
    assert all(torch.equal(v, teacher.restorer.state_dict()[k])
               for k, v in network.restorer.state_dict().items())  # fmt: skip
    noise = torch.randn(2, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = teacher.cpen_s1(batch["lq"], batch["hq"])
        gap_before = F.l1_loss(network.sample_ipr(batch["lq"], noise)[-1], target).item()
    cpen_before = {k: v.clone() for k, v in network.cpen.state_dict().items()}
    denoiser_before = network.denoiser.layers[0].weight.detach().clone()
    snapshots = _Snapshots()
    trainer = pl.Trainer(
        max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[snapshots],
    )  # fmt: skip
    trainer.fit(system, DataLoader([batch] * STEPS, batch_size=None))
    start = teacher.restorer.state_dict()
    frozen = [all(torch.equal(s[k], start[k]) for k in start) for s in snapshots.restorer]
    assert frozen == [True] * ENCODER_STEPS + [False] * (STEPS - ENCODER_STEPS)
    assert any(not torch.equal(v, cpen_before[k]) for k, v in network.cpen.state_dict().items())
    with torch.no_grad():
        gap_after = F.l1_loss(network.sample_ipr(batch["lq"], noise)[-1], target).item()
    assert gap_after < 0.8 * gap_before, (gap_before, gap_after)
    ema = system.network_ema.denoiser.layers[0].weight
    trained = network.denoiser.layers[0].weight.detach()
    assert not torch.equal(ema, trained) and not torch.equal(ema, denoiser_before)


def _started(rank: int, world_size: int, saved: list | None = None) -> DiffIRS1System:
    """A tiny system whose training starts as rank `rank` of `world_size` (resumed from the
    per-rank noise states `saved`, if any)."""
    system = DiffIRS1System(DiffIRS1(**TINY), noise_seed=5)
    if saved is not None:
        system.on_load_checkpoint({"state_dict": system.state_dict(), "diffir_noise_states": saved})
    system.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
    system.on_train_start()
    return system


def _noise_on_rank(argv: list[str]) -> int:
    """Run by each forked rank: x_T noise drawn before and after a checkpoint."""
    td.init_process_group("gloo")
    rank = td.get_rank()
    system = _started(rank, td.get_world_size())
    before = system.draw_noise(2)
    checkpoint = {"state_dict": system.state_dict()}
    system.on_save_checkpoint(checkpoint)
    record = {"before": before, "after": system.draw_noise(2)}
    torch.save({**record, "saved": checkpoint["diffir_noise_states"]}, f"{argv[0]}/rank{rank}.pt")
    td.destroy_process_group()
    return 0


def test_each_rank_draws_its_own_noise_and_resumes_it(tmp_path: Path) -> None:
    processes = start_ranks([str(tmp_path)], tmp_path / "logs", 2, main=_noise_on_rank)
    for process in processes:
        process.join(timeout=60)
    assert [p.exitcode for p in processes] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(ranks[0]["before"], ranks[1]["before"])
    saved = ranks[0]["saved"]  # every rank's stream, gathered on rank 0
    assert ranks[1]["saved"] is None and len(saved) == 2
    for rank in (0, 1):
        assert torch.equal(_started(rank, 2, saved).draw_noise(2), ranks[rank]["after"])
    # Another world size starts afresh; the stream is a function of (seed, rank).
    assert torch.equal(_started(0, 1, saved).draw_noise(2), ranks[0]["before"])
