"""What the three DiffIR training systems share: the EMA generator, validation, export and
checkpoint contents, the learning-rate steps and the private x_T noise stream (one per rank,
seeded from (noise_seed, global rank) when training starts, every rank's state checkpointed)."""

from __future__ import annotations

import bisect
import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule
from torch import nn

from model.diffir.dirformer import IPR_DIM
from model.eval.metrics import psnr, ssim
from model.io.ranks import gather_to_rank0
from model.train.image_log import image_grid, log_image_grid
from model.train.seeding import rank_seed, rank_state

# Frozen helpers (stage-1 teacher, VGG) are rebuilt from the config, not saved in checkpoints.
FROZEN_PREFIXES = ("teacher.", "perceptual.")


def step_lr(step: int, lr: float, milestones: Sequence[int], gamma: float) -> float:
    """basicsr's MultiStepLR as a function: lr * gamma ** (milestones passed by `step`)."""
    return lr * gamma ** bisect.bisect_right(sorted(milestones), step)


def adam(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Adam:
    """The original's optimizer: Adam, betas (0.9, 0.99), no weight decay."""
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class DiffIRSystem(LightningModule):
    """Base system: `network` trains, `network_ema` (its EMA) is validated and exported.

    Subclasses implement `training_step` and `restore(network, batch)`.

    Args:
        network: the generator (DiffIRS1 or DiffIRS2).
        ema_decay: EMA decay per optimizer step (basicsr averages parameters only).
        noise_seed: seed of the x_T noise streams, one per rank (saved in checkpoints for an
            exact resume).
        val_crop_border: pixels ignored at each border by validation PSNR / SSIM.
        val_images: images in the logged LQ / output / HQ grid.
    """

    def __init__(
        self,
        network: nn.Module,
        ema_decay: float = 0.999,
        noise_seed: int = 0,
        val_crop_border: int = 4,
        val_images: int = 4,
    ) -> None:
        super().__init__()
        self.network = network
        self.network_ema = copy.deepcopy(network).requires_grad_(False).eval()
        self.strict_loading = False  # checkpoints leave out the frozen helpers
        self._noise = torch.Generator()  # seeded per rank when training starts
        self._restored_noise: list[torch.Tensor] | None = None

    def train(self, mode: bool = True) -> DiffIRSystem:
        """Train mode for the generator (and discriminator); EMA and frozen helpers stay in eval."""
        super().train(mode)
        self.network_ema.eval()
        for name, child in self.named_children():
            if f"{name}." in FROZEN_PREFIXES:
                child.eval()
        return self

    def on_train_start(self) -> None:
        """Continue this rank's checkpointed noise stream, or seed it from (noise_seed, rank)."""
        restored, self._restored_noise = self._restored_noise, None
        trainer = self.trainer
        state = rank_state(restored, trainer.global_rank, trainer.world_size, "x_T noise states")
        if state is not None:
            self._noise.set_state(state)
        else:
            self._noise.manual_seed(rank_seed(self.hparams.noise_seed, trainer.global_rank))

    def draw_noise(self, batch_size: int) -> torch.Tensor:
        """x_T noise (B, 256) from the system's own stream, on the training device."""
        return torch.randn((batch_size, IPR_DIM), generator=self._noise).to(self.device)

    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMA step after the generator's optimizer step (manual systems call it themselves;
        it must come before the checkpoint callbacks, which export the EMA weights)."""
        decay = self.hparams.ema_decay
        for ema, param in zip(
            self.network_ema.parameters(), self.network.parameters(), strict=True
        ):
            ema.lerp_(param.detach(), 1.0 - decay)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    def restore(self, network: nn.Module, batch: dict, batch_idx: int) -> torch.Tensor:
        """SR of a validation batch with `network` (the EMA one)."""
        raise NotImplementedError

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        lq, hq = batch["lq"], batch["hq"]
        pred = self.restore(self.network_ema, batch, batch_idx).clamp(0, 1)
        border = self.hparams.val_crop_border
        metrics = {
            "val/psnr": psnr(pred, hq, crop_border=border).mean(),
            "val/ssim": ssim(pred, hq, crop_border=border).mean(),
            "val/l1": F.l1_loss(pred, hq),
        }
        self.log_dict(metrics, batch_size=lq.shape[0], sync_dist=True)
        if batch_idx == 0 and self.global_rank == 0:
            lq_up = F.interpolate(lq, size=hq.shape[-2:], mode="nearest")
            grid = image_grid([lq_up, pred, hq], self.hparams.val_images)
            log_image_grid(self.logger, "val/lq_output_hq", grid, self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen helpers from the state; keep every rank's noise stream position."""
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(FROZEN_PREFIXES)
        }
        checkpoint["diffir_noise_states"] = gather_to_rank0(self._noise.get_state())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the noise streams for `on_train_start`; every trained tensor must be in the
        checkpoint."""
        saved = checkpoint.get("state_dict", {})
        missing = [
            k for k in self.state_dict() if not k.startswith(FROZEN_PREFIXES) and k not in saved
        ]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trained tensor(s): {missing[:3]}")
        self._restored_noise = checkpoint.get("diffir_noise_states")

    def export_state(self) -> dict[str, torch.Tensor]:
        """The EMA generator (what the original evaluates and releases), our layout."""
        return self.network_ema.state_dict()

    def export_config(self) -> dict[str, Any]:
        """`model.diffir.load_diffir` rebuilds the network from this."""
        return self.network.config
