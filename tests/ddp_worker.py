"""One DDP training step of a tiny config, run by tests/test_ddp.py under torchrun.

    torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py OUT_DIR train.py-arguments...

Every rank saves to OUT_DIR/rank<r>.pt its training batch, its stage-2 draws (z_0, t, cond,
noise), its global generator state when training starts, and the gradients of the trainable
parameters right before the optimizer step (after DDP's all-reduce).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from model.diffusion.schedule import Diffusion  # noqa: E402
from model.train.stage1 import Stage1System  # noqa: E402
from model.train.stage2 import Stage2System  # noqa: E402

record: dict = {}


def _recording_loss(loss):
    def wrapped(self, model_fn, x_0, t, cond, noise=None):
        noise = torch.randn_like(x_0) if noise is None else noise
        record.update(z_0=x_0, t=t, c_img=cond["c_img"], c_txt=cond["c_txt"], noise=noise)
        return loss(self, model_fn, x_0, t, cond, noise)

    return wrapped


def _recording_step(step):
    def wrapped(self, batch, batch_idx):
        record["batch"] = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        return step(self, batch, batch_idx)

    return wrapped


def _on_train_start(self) -> None:
    record["rng"] = torch.get_rng_state()


def _on_before_optimizer_step(self, optimizer) -> None:
    record["grads"] = {
        n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None
    }


def main() -> int:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    Diffusion.loss = _recording_loss(Diffusion.loss)
    for system in (Stage1System, Stage2System):
        system.training_step = _recording_step(system.training_step)
        system.on_train_start = _on_train_start
        system.on_before_optimizer_step = _on_before_optimizer_step
    rc = train.main(argv)
    torch.save(record, out / f"rank{os.environ['RANK']}.pt")
    return rc


if __name__ == "__main__":
    sys.exit(main())
