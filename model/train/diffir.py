"""DiffIR training systems for stage 1 (CPEN_S1 + DIRformer) and stage 2 (diffusion prior).

Stage 1: SR = DIRformer(LQ, CPEN_S1(LQ, HQ)), L1 against HQ.
Stage 2: the frozen stage-1 CPEN gives the target IPR_S1; x_T = q_sample(IPR_S1, T-1, noise);
all T reverse steps run with gradients to IPR_S2; loss L1(IPR_S2, IPR_S1) (the KL term is
logged only), plus L1(DIRformer(LQ, IPR_S2), HQ) after the first `encoder_steps` steps, in
which only CPEN_S2 and the denoiser train (with their own optimizer, as the original).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.diffir.models import DiffIRS1, DiffIRS2
from model.diffir.padding import restore_padded
from model.train.diffir_base import DiffIRSystem, adam, set_lr, step_lr
from model.train.diffir_losses import ipr_distill_losses


def restore_s2(network: DiffIRS2, lq: torch.Tensor, seed: int) -> torch.Tensor:
    """Validation SR of a stage-2 network: x_T from `seed`, the original's test-time padding."""
    generator = torch.Generator(lq.device).manual_seed(seed)
    return restore_padded(lambda x: network.forward_s2(x, generator=generator), lq, network.scale)


class DiffIRS1System(DiffIRSystem):
    """Stage 1: CPEN_S1 and the DIRformer with an L1 loss.

    Args:
        network: the DiffIRS1 to train.
        learning_rate, milestones, gamma: Adam (betas 0.9, 0.99) and its step decay.
        ema_decay, noise_seed, val_crop_border, val_images: see `DiffIRSystem`.
    """

    def __init__(
        self,
        network: DiffIRS1,
        learning_rate: float = 2e-4,
        milestones: Sequence[int] = (500_000, 700_000),
        gamma: float = 0.5,
        ema_decay: float = 0.999,
        noise_seed: int = 0,
        val_crop_border: int = 4,
        val_images: int = 4,
    ) -> None:
        super().__init__(network, ema_decay, noise_seed, val_crop_border, val_images)
        self.save_hyperparameters(ignore=["network"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        sr = self.network.forward_s1(batch["lq"], batch["hq"])
        loss = F.l1_loss(sr, batch["hq"])
        self.log("train/l_pix", loss, prog_bar=True, batch_size=sr.shape[0])
        return loss

    def restore(self, network: nn.Module, batch: dict, batch_idx: int) -> torch.Tensor:
        return network.forward_s1(batch["lq"], batch["hq"])

    def configure_optimizers(self) -> dict:
        h = self.hparams
        optimizer = adam(self.network.parameters(), h.learning_rate)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: step_lr(step, 1.0, h.milestones, h.gamma)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class DiffIRS2System(DiffIRSystem):
    """Stage 2: CPEN_S2 + denoiser alone for `encoder_steps`, then everything jointly.

    Args:
        network: the DiffIRS2 to train.
        teacher: the trained stage-1 network (frozen; its CPEN_S1 gives the target IPR).
        init_from_teacher: copy the teacher's DIRformer into `network` first (the original
            initialises stage 2 from DiffIRS1.pth, which matches the DIRformer only).
        encoder_steps: length of the first phase.
        lr_encoder, encoder_milestones, gamma_encoder: the first phase's Adam and decay.
        lr_sr, sr_milestones, gamma_sr: the joint phase's (milestones in global steps).
        kd_temperature: temperature of the logged KL term.
        ema_decay, noise_seed, val_crop_border, val_images: see `DiffIRSystem`.
    """

    def __init__(
        self,
        network: DiffIRS2,
        teacher: DiffIRS1,
        init_from_teacher: bool = True,
        encoder_steps: int = 100_000,
        lr_encoder: float = 2e-4,
        encoder_milestones: Sequence[int] = (60_000,),
        gamma_encoder: float = 0.1,
        lr_sr: float = 2e-4,
        sr_milestones: Sequence[int] = (700_000,),
        gamma_sr: float = 0.5,
        kd_temperature: float = 0.15,
        ema_decay: float = 0.999,
        noise_seed: int = 0,
        val_crop_border: int = 4,
        val_images: int = 4,
    ) -> None:
        if init_from_teacher:
            network.restorer.load_state_dict(teacher.restorer.state_dict())
        super().__init__(network, ema_decay, noise_seed, val_crop_border, val_images)
        self.teacher = teacher.requires_grad_(False).eval()
        self.save_hyperparameters(ignore=["network", "teacher"])
        self.automatic_optimization = False  # two optimizers, one step per batch

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        h, step = self.hparams, self.global_step
        lq, hq = batch["lq"], batch["hq"]
        with torch.no_grad():
            ipr_s1 = self.teacher.cpen_s1(lq, hq)
        ipr_s2 = self.network.train_ipr(lq, ipr_s1, self.draw_noise(lq.shape[0]))[-1]
        l_kd, l_abs = ipr_distill_losses(ipr_s2, ipr_s1, h.kd_temperature)
        opt_g, opt_e = self.optimizers()
        logs = {"train/l_kd": l_kd, "train/l_abs": l_abs}
        if step < h.encoder_steps:
            optimizer, loss = opt_e, l_abs
            set_lr(opt_e, step_lr(step, h.lr_encoder, h.encoder_milestones, h.gamma_encoder))
        else:
            l_pix = F.l1_loss(self.network.restorer(lq, ipr_s2), hq)
            optimizer, loss = opt_g, l_pix + l_abs
            set_lr(opt_g, step_lr(step, h.lr_sr, h.sr_milestones, h.gamma_sr))
            logs["train/l_pix"] = l_pix
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.update_ema()
        self.log_dict({**logs, "train/loss": loss}, prog_bar=True, batch_size=lq.shape[0])
        return loss

    def restore(self, network: nn.Module, batch: dict, batch_idx: int) -> torch.Tensor:
        return restore_s2(network, batch["lq"], seed=batch_idx)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        prior = [*self.network.cpen.parameters(), *self.network.denoiser.parameters()]
        return [
            adam(self.network.parameters(), self.hparams.lr_sr),
            adam(prior, self.hparams.lr_encoder),
        ]
