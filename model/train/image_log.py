"""Logging image grids to whichever Lightning logger is active."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from pytorch_lightning.loggers import Logger, TensorBoardLogger, WandbLogger
from torchvision.utils import make_grid, save_image

log = logging.getLogger(__name__)


def image_grid(rows: list[torch.Tensor], max_images: int = 4) -> torch.Tensor:
    """Stack equal-sized NCHW [0, 1] batches as grid rows (one row per tensor)."""
    n = min(max_images, rows[0].shape[0])
    tiles = torch.cat([r[:n].detach().float().clamp(0, 1).cpu() for r in rows])
    return make_grid(tiles, nrow=n, padding=2)


def log_image_grid(logger: Logger | None, tag: str, grid: torch.Tensor, step: int) -> None:
    """Send a CHW [0, 1] grid to TensorBoard or wandb; other loggers get a PNG in their dir."""
    if logger is None:
        return
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, grid, global_step=step)
    elif isinstance(logger, WandbLogger):
        logger.log_image(key=tag, images=[grid.permute(1, 2, 0).numpy()], step=step)
    else:
        out = Path(logger.log_dir or ".") / "images" / f"{tag.replace('/', '_')}_{step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, out)
        log.debug("wrote %s", out)
