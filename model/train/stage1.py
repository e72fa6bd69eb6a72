"""Stage-1 training system: the restoration network trained alone with an L2 pixel loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule
from torch import nn

from model.eval.iqa import build_pyiqa_metric
from model.eval.metrics import psnr, ssim
from model.nets.stage1 import restore_stage1
from model.train.image_log import image_grid, log_image_grid
from model.train.optim import build_optimizer


class Stage1System(LightningModule):
    """Trains an image-to-image network (the modified SwinIR) with MSE against HQ.

    Args:
        network: built restoration network mapping [0, 1] LQ to [0, 1] HQ of the same size.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up length in optimizer steps.
        decay_steps: cosine decay length (None keeps the rate constant after warm-up).
        val_crop_border: pixels ignored at each border by validation PSNR/SSIM.
        val_images: how many validation images go into the logged LQ / output / HQ grid.
        lpips_weights_dir: folder with pyiqa's LPIPS weights (torch-hub layout, see
            scripts/evaluate.py); when set, validation also logs LPIPS.
    """

    def __init__(
        self,
        network: nn.Module,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        decay_steps: int | None = None,
        val_crop_border: int = 4,
        val_images: int = 4,
        lpips_weights_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.network = network
        self.save_hyperparameters(ignore=["network"])
        # A plain dict keeps the metric out of the state dict: it is a measure, not a trained part.
        self._iqa: dict[str, nn.Module] = {}

    def setup(self, stage: str) -> None:
        weights = self.hparams.lpips_weights_dir
        if weights is not None and "lpips" not in self._iqa:
            metric = build_pyiqa_metric("lpips", str(self.device), Path(weights))
            self._iqa["lpips"] = metric.requires_grad_(False).eval()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        pred = self.network(batch["lq"])
        loss = F.mse_loss(pred, batch["hq"])
        self.log("train/loss", loss, prog_bar=True, batch_size=pred.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        lq, hq = batch["lq"], batch["hq"]
        pred = restore_stage1(self.network, lq).clamp(0, 1)
        border = self.hparams.val_crop_border
        metrics = {
            "val/psnr": psnr(pred, hq, crop_border=border).mean(),
            "val/ssim": ssim(pred, hq, crop_border=border).mean(),
            "val/psnr_lq": psnr(lq, hq, crop_border=border).mean(),
            "val/loss": F.mse_loss(pred, hq),
        }
        if "lpips" in self._iqa:
            metrics["val/lpips"] = self._iqa["lpips"].to(pred.device)(pred, hq).mean()
        self.log_dict(metrics, batch_size=lq.shape[0], sync_dist=True)
        if batch_idx == 0 and self.global_rank == 0:
            grid = image_grid([lq, pred, hq], self.hparams.val_images)
            log_image_grid(self.logger, "val/lq_output_hq", grid, self.global_step)

    def export_state(self) -> dict[str, torch.Tensor]:
        """Weights to export as safetensors: the whole restoration network."""
        return self.network.state_dict()

    def export_config(self) -> dict[str, Any]:
        """Constructor arguments stored with the exported weights (`load_swinir` reads them)."""
        return self.network.config

    def configure_optimizers(self) -> dict:
        return build_optimizer(
            self.network.parameters(),
            self.hparams.learning_rate,
            self.hparams.weight_decay,
            self.hparams.warmup_steps,
            self.hparams.decay_steps,
        )
