"""DiffIR stage 2 with GAN fine-tuning: L1 + IPR L1 + VGG19 perceptual + U-Net discriminator.

Per batch (as DiffIRGANS2Model): the generator step with the discriminator frozen, loss
L1(SR, HQ) + L1(IPR_S2, IPR_S1) + perceptual(SR, HQ) + gan_weight * BCE(D(SR), real); then
the discriminator step, BCE(D(HQ), real) + BCE(D(SR.detach()), fake). The "v2" variant
compares against USM-sharpened HQ (`l1_gt_usm`, `percep_gt_usm`, `gan_gt_usm`); the LQ is
always degraded from the plain HQ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from basicsr.utils.img_process_util import USMSharp
from torch import nn

from model.diffir.models import DiffIRS1, DiffIRS2
from model.train.diffir import restore_s2
from model.train.diffir_base import DiffIRSystem, adam, set_lr, step_lr
from model.train.diffir_losses import VGGPerceptualLoss, ipr_distill_losses


def _bce(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """basicsr's vanilla GANLoss: BCE with logits against an all-1 (real) or all-0 target."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


class DiffIRS2GANSystem(DiffIRSystem):
    """GAN fine-tuning of a trained DiffIRS2 (all of it), with a frozen stage-1 teacher.

    Args:
        network: the DiffIRS2 to fine-tune (e.g. `load_diffir` of the stage-2 export).
        teacher: the trained stage-1 network (frozen).
        discriminator: e.g. basicsr's `UNetDiscriminatorSN(3, 64, skip_connection=True)`.
        perceptual: the VGG19 perceptual loss.
        lr_g, g_milestones, gamma_g: the generator's Adam and step decay.
        lr_d, d_milestones, gamma_d: the discriminator's.
        gan_weight: weight of the generator's adversarial term.
        l1_gt_usm, percep_gt_usm, gan_gt_usm: compare against the USM-sharpened HQ ("v2").
        kd_temperature: temperature of the logged KL term.
        ema_decay, noise_seed, val_crop_border, val_images: see `DiffIRSystem`.
    """

    def __init__(
        self,
        network: DiffIRS2,
        teacher: DiffIRS1,
        discriminator: nn.Module,
        perceptual: VGGPerceptualLoss,
        lr_g: float = 1e-4,
        g_milestones: Sequence[int] = (300_000,),
        gamma_g: float = 0.5,
        lr_d: float = 1e-4,
        d_milestones: Sequence[int] = (400_000,),
        gamma_d: float = 0.5,
        gan_weight: float = 1.0,
        l1_gt_usm: bool = False,
        percep_gt_usm: bool = False,
        gan_gt_usm: bool = False,
        kd_temperature: float = 0.15,
        ema_decay: float = 0.999,
        noise_seed: int = 0,
        val_crop_border: int = 4,
        val_images: int = 4,
    ) -> None:
        super().__init__(network, ema_decay, noise_seed, val_crop_border, val_images)
        self.teacher = teacher.requires_grad_(False).eval()
        self.discriminator = discriminator
        self.perceptual = perceptual.requires_grad_(False).eval()
        self.usm = USMSharp()
        self.save_hyperparameters(ignore=["network", "teacher", "discriminator", "perceptual"])
        self.automatic_optimization = False  # generator and discriminator steps per batch

    def _targets(self, hq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.hparams
        sharp = self.usm(hq) if h.l1_gt_usm or h.percep_gt_usm or h.gan_gt_usm else hq
        return tuple(sharp if flag else hq for flag in (h.l1_gt_usm, h.percep_gt_usm, h.gan_gt_usm))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        h, step = self.hparams, self.global_step
        lq = batch["lq"]
        l1_gt, percep_gt, gan_gt = self._targets(batch["hq"])
        opt_g, opt_d = self.optimizers()
        set_lr(opt_g, step_lr(step, h.lr_g, h.g_milestones, h.gamma_g))
        set_lr(opt_d, step_lr(step, h.lr_d, h.d_milestones, h.gamma_d))
        # generator step, discriminator frozen
        with torch.no_grad():
            ipr_s1 = self.teacher.cpen_s1(lq, l1_gt)
        ipr_s2 = self.network.train_ipr(lq, ipr_s1, self.draw_noise(lq.shape[0]))[-1]
        sr = self.network.restorer(lq, ipr_s2)
        l_kd, l_abs = ipr_distill_losses(ipr_s2, ipr_s1, h.kd_temperature)
        self.discriminator.requires_grad_(False)
        losses = {
            "l_pix": F.l1_loss(sr, l1_gt),
            "l_abs": l_abs,
            "l_percep": self.perceptual(sr, percep_gt),
            "l_gan": h.gan_weight * _bce(self.discriminator(sr), real=True),
        }
        loss_g = sum(losses.values())
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self.update_ema()
        # discriminator step; its optimizer is stepped directly so that Lightning's global
        # step counts generator steps only (one per batch, as the original's iterations)
        self.discriminator.requires_grad_(True)
        l_d_real = _bce(self.discriminator(gan_gt), real=True)
        l_d_fake = _bce(self.discriminator(sr.detach()), real=False)
        opt_d.zero_grad()
        self.manual_backward(l_d_real + l_d_fake)
        opt_d.optimizer.step()
        logs = {f"train/{k}": v for k, v in losses.items()}
        logs.update({"train/l_kd": l_kd, "train/l_d_real": l_d_real, "train/l_d_fake": l_d_fake})
        self.log_dict({**logs, "train/loss": loss_g}, prog_bar=True, batch_size=lq.shape[0])
        return loss_g

    def restore(self, network: nn.Module, batch: dict, batch_idx: int) -> torch.Tensor:
        return restore_s2(network, batch["lq"], seed=batch_idx)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [adam(self.network.parameters(), self.hparams.lr_g),
                adam(self.discriminator.parameters(), self.hparams.lr_d)]  # fmt: skip
