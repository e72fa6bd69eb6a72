"""Stage-2 training system: the LAControlNet learns to steer a frozen SD UNet.

Per batch: the frozen stage-1 network cleans the LQ, its VAE latent (posterior mode) is the
condition c_img; the HQ latent (a posterior sample) is z_0; a random timestep and noise give
z_t; the loss is the latent-diffusion MSE against ε or v. Only LAControlNet weights train.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch
from pytorch_lightning import LightningModule
from torch import nn

from model.diffusion.schedule import Diffusion
from model.diffusion.spaced_ddpm import SpacedSampler
from model.eval.metrics import psnr, ssim
from model.io.cldm_files import controlnet_config
from model.nets.cldm import ControlLDM
from model.nets.stage1 import restore_stage1
from model.train.checkpointing import ResumeError, state_digest
from model.train.image_log import image_grid, log_image_grid
from model.train.optim import build_optimizer

TRAINABLE_PREFIX = "cldm.controlnet."
FROZEN_DIGESTS = "frozen_digests"

log = logging.getLogger(__name__)


def _listed(what: str, keys: list[str]) -> str:
    if not keys:
        return ""
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return f"{what} {len(keys)} LAControlNet tensor(s): {', '.join(keys[:3])}{more}"


class Stage2System(LightningModule):
    """Trains the LAControlNet of `cldm` on (LQ, HQ, caption) batches.

    Args:
        cldm: ControlLDM whose UNet, VAE and text encoder are frozen.
        stage1: frozen restoration network producing the condition image from LQ.
        diffusion: training noise schedule and parameterization (ε or v).
        learning_rate, weight_decay, warmup_steps, decay_steps: AdamW and its schedule.
        p_drop_caption: probability of replacing a caption by the empty prompt (v2.1 style).
        noise_aug_timesteps: if > 0, c_img is diffused to a random t < this value (augmentation).
        gradient_checkpointing: recompute UNet/LAControlNet activations to save memory.
        val_sample_steps: respaced DDPM steps for the validation samples (0: no sampling); the
            samples of the first validation batch also give val/psnr and val/ssim.
        val_images: images per validation grid (LQ / stage 1 / sample / HQ).
    """

    def __init__(
        self,
        cldm: ControlLDM,
        stage1: nn.Module,
        diffusion: Diffusion,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        decay_steps: int | None = None,
        p_drop_caption: float = 0.0,
        noise_aug_timesteps: int = 0,
        gradient_checkpointing: bool = False,
        val_sample_steps: int = 50,
        val_images: int = 4,
    ) -> None:
        super().__init__()
        self.cldm = cldm
        self.stage1 = stage1.requires_grad_(False).eval()
        self.diffusion = diffusion
        self.save_hyperparameters(ignore=["cldm", "stage1", "diffusion"])
        cldm.set_gradient_checkpointing(gradient_checkpointing)
        self.strict_loading = False  # checkpoints hold the trainable weights only
        self._empty_context: torch.Tensor | None = None
        self._frozen_digests: dict[str, str] | None = None

    def train(self, mode: bool = True) -> Stage2System:
        """Train mode for the LAControlNet; stage 1 and the frozen SD parts stay in eval mode."""
        super().train(mode)
        self.stage1.eval()
        return self

    def text_context(self, captions: list[str]) -> torch.Tensor:
        """Text context for a batch; the empty prompt's embedding is computed once and reused."""
        if self._empty_context is None or self._empty_context.device != self.device:
            self._empty_context = self.cldm.encode_text([""])
        p_drop = self.hparams.p_drop_caption if self.training else 0.0
        captions = ["" if random.random() < p_drop else c for c in captions]
        if not any(captions):
            return self._empty_context.expand(len(captions), -1, -1)
        return self.cldm.encode_text(captions)

    @torch.no_grad()
    def condition(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage-1 output I_reg and cond = {c_txt, c_img} for a batch (no autograd)."""
        clean = restore_stage1(self.stage1, batch["lq"]).clamp(0, 1)
        c_img = self.cldm.vae_encode(clean * 2 - 1)
        captions = batch.get("txt") or [""] * clean.shape[0]
        return clean, {"c_txt": self.text_context(list(captions)), "c_img": c_img}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        _, cond = self.condition(batch)
        z_0 = self.cldm.vae_encode(batch["hq"] * 2 - 1, sample=True)
        t = self.diffusion.sample_timesteps(z_0.shape[0], device=self.device)
        if self.hparams.noise_aug_timesteps > 0:
            t_aug = torch.randint_like(t, 0, self.hparams.noise_aug_timesteps)
            c_img = cond["c_img"]
            cond["c_img"] = self.diffusion.q_sample(c_img, t_aug, torch.randn_like(c_img))
        loss = self.diffusion.loss(self.cldm, z_0, t, cond)
        self.log("train/loss", loss, prog_bar=True, batch_size=z_0.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        clean, cond = self.condition(batch)
        z_0 = self.cldm.vae_encode(batch["hq"] * 2 - 1)
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        t = self.diffusion.sample_timesteps(z_0.shape[0], self.device, generator)
        noise = torch.randn(z_0.shape, generator=generator, device=self.device)
        loss = self.diffusion.loss(self.cldm, z_0, t, cond, noise)
        self.log("val/loss", loss, batch_size=z_0.shape[0], sync_dist=True)
        steps = self.hparams.val_sample_steps
        if batch_idx == 0 and steps > 0 and self.global_rank == 0:
            x_T = torch.randn(z_0.shape, generator=generator, device=self.device)
            sampler = SpacedSampler.from_diffusion(self.diffusion)
            z = sampler.sample(self.cldm, x_T, steps, cond, generator=generator, progress=False)
            sample = ((self.cldm.vae_decode(z) + 1) / 2).clamp(0, 1)
            hq = batch["hq"]
            # of the first batch's samples, on rank 0 only (sampling is the expensive part)
            sample_metrics = {
                "val/psnr": psnr(sample, hq).mean(),
                "val/ssim": ssim(sample, hq).mean(),
            }
            self.log_dict(sample_metrics, batch_size=hq.shape[0], rank_zero_only=True)
            grid = image_grid([batch["lq"], clean, sample, hq], self.hparams.val_images)
            log_image_grid(self.logger, "val/lq_stage1_sample_hq", grid, self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the LAControlNet in Lightning checkpoints (the rest is frozen and large),
        with a digest of each frozen part."""
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {
            k: v for k, v in state.items() if k.startswith(TRAINABLE_PREFIX)
        }
        checkpoint[FROZEN_DIGESTS] = self.frozen_digests()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Load the LAControlNet strictly and check the frozen parts against the checkpoint's.

        Lightning's own loading is not strict (the frozen parts are not saved), so a missing
        trainable tensor would silently keep its initial value: any missing, unexpected or
        reshaped LAControlNet tensor, or frozen weights whose digest differs from the one the
        checkpoint recorded (another SD or stage-1 file), is a `ResumeError`.
        """
        saved = checkpoint.get("state_dict", {})
        expected = {k: v for k, v in self.state_dict().items() if k.startswith(TRAINABLE_PREFIX)}
        problems = [
            _listed("lacks", [k for k in expected if k not in saved]),
            _listed("has unexpected", [k for k in saved if k not in expected]),
            _listed(
                "has wrongly shaped",
                [k for k, v in saved.items() if k in expected and v.shape != expected[k].shape],
            ),
        ]
        problems = [p for p in problems if p]
        if problems:
            raise ResumeError(f"checkpoint {'; '.join(problems)}")
        recorded = checkpoint.get(FROZEN_DIGESTS)
        if recorded is None:
            log.warning("checkpoint has no digests of the frozen weights; they are not checked")
            return
        changed = [k for k, v in self.frozen_digests().items() if recorded.get(k) != v]
        if changed:
            raise ResumeError(
                f"frozen {', '.join(changed)} weights differ from the checkpoint's run; "
                "use the same sd_path / stage-1 weights as the run that wrote it"
            )

    def frozen_digests(self) -> dict[str, str]:
        """A digest of each frozen part's weights (computed once, before any device move)."""
        if self._frozen_digests is None:
            parts = {
                "UNet": self.cldm.unet,
                "VAE": self.cldm.vae,
                "text encoder": self.cldm.text_encoder,
                "stage-1": self.stage1,
            }
            self._frozen_digests = {k: state_digest(m.state_dict()) for k, m in parts.items()}
        return self._frozen_digests

    def setup(self, stage: str) -> None:
        if stage == "fit":  # before the strategy moves, wraps or shards the modules
            self.frozen_digests()

    def export_state(self) -> dict[str, torch.Tensor]:
        """The LAControlNet weights in our layout (`model.io.cldm_files.load_controlnet` reads them)."""
        return self.cldm.controlnet.state_dict()

    def export_config(self) -> dict[str, Any]:
        return controlnet_config(self.cldm.controlnet)

    def configure_optimizers(self) -> dict:
        return build_optimizer(
            self.cldm.controlnet.parameters(),
            self.hparams.learning_rate,
            self.hparams.weight_decay,
            self.hparams.warmup_steps,
            self.hparams.decay_steps,
        )
