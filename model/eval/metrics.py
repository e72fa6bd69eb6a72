"""Full-reference image metrics (PSNR, SSIM) with the conventions of the SR literature.

These follow BasicSR's `calculate_psnr` / `calculate_ssim`, which most restoration papers use:
optionally crop `crop_border` pixels from every edge, optionally keep only the luma Y of
YCbCr (ITU-R BT.601, "studio swing" 16-235 on the [0, 255] scale, as MATLAB's `rgb2ycbcr`),
then compute in float64 on the [0, 255] scale. SSIM uses an 11x11 Gaussian window
(sigma 1.5), "valid" filtering and the constants K1 = 0.01, K2 = 0.03 (Wang et al., 2004),
averaged over pixels and channels. Pure torch, so training validation can use them cheaply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# BT.601 luma for R, G, B in [0, 1], giving Y on the [0, 255] scale with 16 added.
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0
_PEAK = 255.0
_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """Luma Y of BT.601 YCbCr: (B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) in [16, 235]."""
    w = torch.tensor(_Y_WEIGHTS, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    return (img * w).sum(dim=1, keepdim=True) + _Y_OFFSET


def _prepare(
    x: torch.Tensor, y: torch.Tensor, crop_border: int, y_channel: bool, data_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate, crop, convert to float64 and to the [0, 255] scale (Y channel if asked)."""
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected (B, 1 or 3, H, W) images, got shape {tuple(x.shape)}")
    if crop_border < 0 or 2 * crop_border >= min(x.shape[-2:]):
        raise ValueError(
            f"crop_border={crop_border} leaves nothing of a {tuple(x.shape[-2:])} image"
        )
    if crop_border:
        x = x[..., crop_border:-crop_border, crop_border:-crop_border]
        y = y[..., crop_border:-crop_border, crop_border:-crop_border]
    x = x.to(torch.float64) / data_range
    y = y.to(torch.float64) / data_range
    # A single-channel image is already luminance; only RGB is converted.
    if y_channel and x.shape[1] == 3:
        return rgb_to_y(x), rgb_to_y(y)
    return x * _PEAK, y * _PEAK


def psnr(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    crop_border: int = 0,
    y_channel: bool = False,
    data_range: float = 1.0,
) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB.

    Args:
        x, y: (B, C, H, W) images with C in {1, 3}, values in [0, data_range].
        crop_border: pixels removed from each edge before measuring.
        y_channel: measure the BT.601 Y channel (RGB input) instead of all channels.
        data_range: the peak value of the input scale (1.0 for [0, 1] images).

    Returns:
        float64 tensor (B,); +inf for identical images.
    """
    x, y = _prepare(x, y, crop_border, y_channel, data_range)
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(_PEAK**2 / mse)


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised (1, 1, 11, 11) Gaussian with sigma 1.5 (as `cv2.getGaussianKernel`)."""
    r = torch.arange(_SSIM_WINDOW, dtype=dtype, device=device) - (_SSIM_WINDOW - 1) / 2
    g = torch.exp(-(r**2) / (2 * _SSIM_SIGMA**2))
    g = g / g.sum()
    return torch.outer(g, g).view(1, 1, _SSIM_WINDOW, _SSIM_WINDOW)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    crop_border: int = 0,
    y_channel: bool = False,
    data_range: float = 1.0,
) -> torch.Tensor:
    """Structural similarity per image (mean SSIM over pixels and channels).

    Args:
        x, y: (B, C, H, W) images with C in {1, 3}, values in [0, data_range]; after cropping
            both sides must be at least 11 pixels.
        crop_border: pixels removed from each edge before measuring.
        y_channel: measure the BT.601 Y channel (RGB input) instead of all channels.
        data_range: the peak value of the input scale (1.0 for [0, 1] images).

    Returns:
        float64 tensor (B,); 1 for identical images.
    """
    x, y = _prepare(x, y, crop_border, y_channel, data_range)
    if min(x.shape[-2:]) < _SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {_SSIM_WINDOW}x{_SSIM_WINDOW} pixels after cropping")
    c = x.shape[1]
    window = _gaussian_window(x.dtype, x.device).expand(c, 1, -1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # depthwise, "valid": no padding artefacts
        return F.conv2d(t, window, groups=c)

    c1 = (0.01 * _PEAK) ** 2
    c2 = (0.03 * _PEAK) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov_xy = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return ssim_map.mean(dim=(1, 2, 3))
