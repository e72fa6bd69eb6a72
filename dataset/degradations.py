"""Blur kernels and the CodeFormer-style first-order degradation (numpy, CPU).

Every random choice is drawn from an explicit `numpy.random.Generator`, so a degradation is
reproducible from a seed. basicsr's `random_*` helpers draw from numpy's global RNG; here only
its deterministic kernel builders are used, with parameters sampled from `rng`.

Images are float32 (H, W, 3) RGB in [0, 1]; noise levels are in 0-255 units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from basicsr.data.degradations import (
    bivariate_Gaussian,
    bivariate_generalized_Gaussian,
    bivariate_plateau,
    circular_lowpass_kernel,
)

KERNEL_KINDS = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)


@dataclass(frozen=True)
class KernelParams:
    """Parameters of one blur kernel (Real-ESRGAN's kernel family).

    Args:
        kind: one of `KERNEL_KINDS`.
        sigma_x, sigma_y: standard deviations in pixels (equal for isotropic kinds).
        theta: rotation in radians (0 for isotropic kinds).
        beta: shape of generalized-Gaussian / plateau kernels (1 for plain Gaussians).
    """

    kind: str
    sigma_x: float
    sigma_y: float
    theta: float
    beta: float = 1.0


def check_kernel_list(kernel_list: Sequence[str], kernel_prob: Sequence[float]) -> None:
    """Raise ValueError for unknown kernel kinds or mismatched probabilities."""
    unknown = [k for k in kernel_list if k not in KERNEL_KINDS]
    if unknown:
        raise ValueError(f"unknown kernel kinds {unknown}; choose from {KERNEL_KINDS}")
    if len(kernel_list) != len(kernel_prob) or sum(kernel_prob) <= 0:
        raise ValueError(f"kernel_prob {list(kernel_prob)} does not match kernel_list")


def _uniform(rng: np.random.Generator, bounds: Sequence[float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _sample_beta(rng: np.random.Generator, beta_range: Sequence[float]) -> float:
    # as in Real-ESRGAN: half of the draws below 1 (sharper), half above (flatter)
    if rng.uniform() < 0.5:
        return _uniform(rng, (beta_range[0], 1.0))
    return _uniform(rng, (1.0, beta_range[1]))


def sample_kernel_params(
    rng: np.random.Generator,
    kernel_list: Sequence[str],
    kernel_prob: Sequence[float],
    sigma_range: Sequence[float],
    betag_range: Sequence[float] = (0.5, 4.0),
    betap_range: Sequence[float] = (1.0, 2.0),
) -> KernelParams:
    """Draw a kernel kind with `kernel_prob`, then its sigmas, rotation and shape."""
    prob = np.asarray(kernel_prob, dtype=np.float64)
    kind = str(kernel_list[rng.choice(len(kernel_list), p=prob / prob.sum())])
    sigma_x = _uniform(rng, sigma_range)
    if not kind.endswith("aniso"):
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y, theta = _uniform(rng, sigma_range), _uniform(rng, (-math.pi, math.pi))
    beta = 1.0
    if kind.startswith("generalized"):
        beta = _sample_beta(rng, betag_range)
    elif kind.startswith("plateau"):
        beta = _sample_beta(rng, betap_range)
    return KernelParams(kind, sigma_x, sigma_y, theta, beta)


def build_kernel(params: KernelParams, kernel_size: int) -> np.ndarray:
    """Build the normalised (kernel_size, kernel_size) float32 kernel of `params`."""
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    p = params
    isotropic = not p.kind.endswith("aniso")
    if p.kind.startswith("generalized"):
        k = bivariate_generalized_Gaussian(
            kernel_size, p.sigma_x, p.sigma_y, p.theta, p.beta, isotropic=isotropic
        )
    elif p.kind.startswith("plateau"):
        k = bivariate_plateau(
            kernel_size, p.sigma_x, p.sigma_y, p.theta, p.beta, isotropic=isotropic
        )
    else:
        k = bivariate_Gaussian(kernel_size, p.sigma_x, p.sigma_y, p.theta, isotropic=isotropic)
    return k.astype(np.float32)


def sample_sinc_cutoff(rng: np.random.Generator, kernel_size: int) -> float:
    """Cutoff frequency (radians) of a sinc kernel; small kernels avoid very low cutoffs."""
    low = math.pi / 3 if kernel_size < 13 else math.pi / 5
    return _uniform(rng, (low, math.pi))


def sinc_kernel(cutoff: float, kernel_size: int, pad_to: int = 0) -> np.ndarray:
    """Circular low-pass (2-D sinc) kernel, zero-padded to `pad_to` when larger."""
    return circular_lowpass_kernel(cutoff, kernel_size, pad_to=pad_to).astype(np.float32)


def pad_kernel(kernel: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad an odd square kernel to (size, size), keeping it centred."""
    pad = (size - kernel.shape[0]) // 2
    return np.pad(kernel, ((pad, pad), (pad, pad)))


def add_gaussian_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add i.i.d. colour Gaussian noise of std `sigma` (0-255 units) and clip to [0, 1]."""
    noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma / 255.0)
    return np.clip(img + noise, 0.0, 1.0)


def jpeg_compress(img: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip an RGB [0, 1] image through 8-bit JPEG at `quality` (1-100)."""
    # basicsr's add_jpg_compression passes float pixels (OpenCV 5 warns on every call) and
    # fails with a float quality, so the 8-bit conversion is done here.
    bgr = (np.clip(img[:, :, ::-1], 0.0, 1.0) * 255.0).round().astype(np.uint8)
    ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    return np.ascontiguousarray(decoded[:, :, ::-1], dtype=np.float32) / 255.0


@dataclass(frozen=True)
class FirstOrderParams:
    """One draw of the first-order degradation.

    Args:
        kernel: blur kernel parameters.
        scale: downsampling factor (>1 shrinks, <1 enlarges).
        noise_sigma: Gaussian noise std in 0-255 units, or None for no noise.
        jpeg_quality: JPEG quality, or None for no compression.
    """

    kernel: KernelParams
    scale: float
    noise_sigma: float | None
    jpeg_quality: int | None


class CodeformerDegradation:
    """CodeFormer/DiffBIR first-order degradation: blur -> downsample -> noise -> JPEG -> resize back.

    The defaults are DiffBIR's general (ImageNet) stage-1 settings.

    Args:
        blur_kernel_size: odd kernel size in pixels.
        kernel_list: kernel kinds to draw from (see `KERNEL_KINDS`).
        kernel_prob: probability of each kind.
        blur_sigma: [min, max] blur sigma in pixels.
        downsample_range: [min, max] downsampling factor.
        noise_range: [min, max] Gaussian noise std in 0-255 units, or None.
        jpeg_range: [min, max] JPEG quality, or None.
    """

    def __init__(
        self,
        blur_kernel_size: int = 41,
        kernel_list: Sequence[str] = ("iso", "aniso"),
        kernel_prob: Sequence[float] = (0.5, 0.5),
        blur_sigma: Sequence[float] = (0.1, 12.0),
        downsample_range: Sequence[float] = (1.0, 12.0),
        noise_range: Sequence[float] | None = (0.0, 15.0),
        jpeg_range: Sequence[int] | None = (30, 100),
    ) -> None:
        check_kernel_list(kernel_list, kernel_prob)
        if blur_kernel_size % 2 != 1:
            raise ValueError(f"blur_kernel_size must be odd, got {blur_kernel_size}")
        self.blur_kernel_size = blur_kernel_size
        self.kernel_list = list(kernel_list)
        self.kernel_prob = list(kernel_prob)
        self.blur_sigma = tuple(blur_sigma)
        self.downsample_range = tuple(downsample_range)
        self.noise_range = None if noise_range is None else tuple(noise_range)
        self.jpeg_range = None if jpeg_range is None else tuple(jpeg_range)

    def sample_params(self, rng: np.random.Generator) -> FirstOrderParams:
        """Draw kernel, scale, noise level and JPEG quality."""
        kernel = sample_kernel_params(rng, self.kernel_list, self.kernel_prob, self.blur_sigma)
        scale = _uniform(rng, self.downsample_range)
        sigma = None if self.noise_range is None else _uniform(rng, self.noise_range)
        # quality is truncated to an integer, as the original's OpenCV 4 call did
        quality = None if self.jpeg_range is None else int(_uniform(rng, self.jpeg_range))
        return FirstOrderParams(kernel, scale, sigma, quality)

    def apply(
        self, hq: np.ndarray, params: FirstOrderParams, rng: np.random.Generator
    ) -> np.ndarray:
        """Degrade `hq` (H, W, 3) with fixed `params`; `rng` only draws the noise pixels."""
        h, w = hq.shape[:2]
        lq = cv2.filter2D(hq, -1, build_kernel(params.kernel, self.blur_kernel_size))
        size = (max(1, int(w // params.scale)), max(1, int(h // params.scale)))
        lq = cv2.resize(lq, size, interpolation=cv2.INTER_LINEAR)
        if params.noise_sigma is not None:
            lq = add_gaussian_noise(lq, params.noise_sigma, rng)
        if params.jpeg_quality is not None:
            lq = jpeg_compress(lq, params.jpeg_quality)
        lq = cv2.resize(lq, (w, h), interpolation=cv2.INTER_LINEAR)
        return np.clip(lq, 0.0, 1.0).astype(np.float32)

    def __call__(self, hq: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Return a degraded copy of `hq` (float32 (H, W, 3) in [0, 1]) at the same size."""
        return self.apply(hq, self.sample_params(rng), rng)
