"""Image size helpers shared by stage 1, the VAE and the diffusion pipeline (NCHW tensors)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


def pad_to_multiple(
    x: Tensor, multiple: int, mode: str = "constant"
) -> tuple[Tensor, tuple[int, int]]:
    """Pad bottom/right so H and W are multiples of `multiple` (zeros by default, as the
    original pipeline). Returns the padded tensor and the original (H, W)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


def crop_to(x: Tensor, h: int, w: int) -> Tensor:
    """Keep the top-left (h, w) of `x`, undoing `pad_to_multiple`."""
    if h > x.shape[-2] or w > x.shape[-1]:
        raise ValueError(f"cannot crop {tuple(x.shape[-2:])} to the larger size ({h}, {w})")
    return x[..., :h, :w]


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic antialiased resize to `size` (a no-op at the same size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", antialias=True)


def resize_pil(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resize of the 8-bit images with PIL, as the original resizes the LQ by the
    upscale factor (x in [0, 1], rounded to 8 bits first; a no-op at the same size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    rows = []
    for img in x:
        array = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        resized = Image.fromarray(array).resize((size[1], size[0]), Image.Resampling.BICUBIC)
        rows.append(torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1))
    return torch.stack(rows).to(x.device, torch.float32) / 255


RESIZES = {"pil": resize_pil, "torch": resize}
"""Resize backends of the LQ upscale by name."""


def short_side_size(h: int, w: int, side: int) -> tuple[int, int]:
    """The size with short side `side` and the long side scaled and truncated (the original's)."""
    if h == w:
        return side, side
    return (side, int(w * side / h)) if h < w else (int(h * side / w), side)


def resize_short_side_to(x: Tensor, min_side: int = 512) -> Tensor:
    """Upscale (bicubic, antialiased) so the short side is `min_side`, if it is smaller."""
    h, w = x.shape[-2:]
    if min(h, w) >= min_side:
        return x
    return resize(x, short_side_size(h, w, min_side))
