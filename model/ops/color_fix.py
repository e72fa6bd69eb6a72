"""Colour correction of the restored image against the stage-1 image (from StableSR / DiffBIR).

The diffusion output may drift in colour; both corrections keep its detail and take the
colour from the reference (the stage-1 output I_reg):

- wavelet: a 5-level à-trous wavelet split (3×3 binomial blur, dilation 1, 2, 4, 8, 16); the
  output is the sum of the image's high-frequency bands plus the reference's residual low band.
- adain: per-channel mean and standard deviation of the image replaced by the reference's
  (adaptive instance normalization, Huang & Belongie 2017).

Images are NCHW floats (any channel count); nothing is clamped.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

ColorFix = Literal["wavelet", "adain", "none"]
COLOR_FIX_MODES: tuple[str, ...] = ("wavelet", "adain", "none")

# Separable binomial [1, 2, 1]/4 in 2-D: the B3-like kernel of the à-trous transform.
_BINOMIAL = ((0.0625, 0.125, 0.0625), (0.125, 0.25, 0.125), (0.0625, 0.125, 0.0625))


def wavelet_blur(image: Tensor, radius: int) -> Tensor:
    """Blur each channel with the 3×3 binomial kernel dilated by `radius` (replicate padding)."""
    channels = image.shape[1]
    kernel = torch.tensor(_BINOMIAL, dtype=image.dtype, device=image.device)
    kernel = kernel.expand(channels, 1, 3, 3)
    padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=radius)


def wavelet_decomposition(image: Tensor, levels: int = 5) -> tuple[Tensor, Tensor]:
    """Split `image` into (sum of the high-frequency bands, residual low-frequency band).

    Level i blurs with dilation 2^i; high + low equals `image` up to rounding.
    """
    high = torch.zeros_like(image)
    low = image
    for level in range(levels):
        blurred = wavelet_blur(low, 2**level)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_reconstruction(content: Tensor, style: Tensor, levels: int = 5) -> Tensor:
    """The high frequencies of `content` on the low frequencies (colour) of `style`."""
    content_high, _ = wavelet_decomposition(content, levels)
    _, style_low = wavelet_decomposition(style, levels)
    return content_high + style_low


def mean_std(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Per-image, per-channel mean and sqrt(unbiased variance + eps), each (B, C, 1, 1)."""
    flat = x.flatten(2)
    mean = flat.mean(dim=2)[..., None, None]
    std = (flat.var(dim=2) + eps).sqrt()[..., None, None]
    return mean, std


def adaptive_instance_normalization(content: Tensor, style: Tensor) -> Tensor:
    """`content` normalised per channel, then given the mean and std of `style`."""
    content_mean, content_std = mean_std(content)
    style_mean, style_std = mean_std(style)
    return (content - content_mean) / content_std * style_std + style_mean


def color_fix(image: Tensor, reference: Tensor, mode: ColorFix = "wavelet") -> Tensor:
    """Correct the colours of `image` (B, C, H, W) with `reference` of the same shape.

    Args:
        image: restored image.
        reference: image whose colours are kept (the stage-1 output).
        mode: "wavelet", "adain" or "none" (returns `image`).
    """
    if mode == "none":
        return image
    if image.shape != reference.shape:
        raise ValueError(
            f"colour fix needs equal shapes, got {tuple(image.shape)} and {tuple(reference.shape)}"
        )
    if mode == "wavelet":
        return wavelet_reconstruction(image, reference)
    if mode == "adain":
        return adaptive_instance_normalization(image, reference)
    raise ValueError(f"unknown colour fix {mode!r}; choose one of {COLOR_FIX_MODES}")
