"""Per-sample blur kernels of the Real-ESRGAN second-order degradation (CPU, in the dataset).

Sampling the kernels is cheap and happens in the dataset; the two rounds of
blur -> resize -> noise -> JPEG are expensive and run batched on the training device
(`dataset.batch_transform.RealESRGANBatchTransform`). Keyword names follow the original
DiffBIR / Real-ESRGAN YAML files.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dataset.degradations import (
    KERNEL_KINDS,
    build_kernel,
    check_kernel_list,
    pad_kernel,
    sample_kernel_params,
    sample_sinc_cutoff,
    sinc_kernel,
)

_KERNEL_PROB_ALL = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
_MIN_KERNEL_SIZE = 7


class BlurKernelSampler:
    """Draws one blur kernel: a random odd size in [7, kernel_size], sinc or mixed Gaussian.

    Args:
        kernel_size: largest kernel size (odd); every kernel is zero-padded to it.
        kernel_list, kernel_prob: kernel kinds and their probabilities.
        sigma_range: [min, max] sigma in pixels.
        betag_range, betap_range: shape ranges of generalized-Gaussian / plateau kernels.
        sinc_prob: probability of a sinc (ringing) kernel instead.
    """

    def __init__(
        self,
        kernel_size: int,
        kernel_list: Sequence[str],
        kernel_prob: Sequence[float],
        sigma_range: Sequence[float],
        betag_range: Sequence[float],
        betap_range: Sequence[float],
        sinc_prob: float,
    ) -> None:
        check_kernel_list(kernel_list, kernel_prob)
        if kernel_size % 2 != 1 or kernel_size < _MIN_KERNEL_SIZE:
            raise ValueError(
                f"kernel size must be odd and >= {_MIN_KERNEL_SIZE}, got {kernel_size}"
            )
        self.kernel_size = kernel_size
        self.sizes = list(range(_MIN_KERNEL_SIZE, kernel_size + 1, 2))
        self.kernel_list, self.kernel_prob = list(kernel_list), list(kernel_prob)
        self.sigma_range, self.sinc_prob = tuple(sigma_range), sinc_prob
        self.betag_range, self.betap_range = tuple(betag_range), tuple(betap_range)

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """Return a float32 (kernel_size, kernel_size) kernel summing to 1."""
        size = int(rng.choice(self.sizes))
        if rng.uniform() < self.sinc_prob:
            kernel = sinc_kernel(sample_sinc_cutoff(rng, size), size)
        else:
            params = sample_kernel_params(
                rng,
                self.kernel_list,
                self.kernel_prob,
                self.sigma_range,
                self.betag_range,
                self.betap_range,
            )
            kernel = build_kernel(params, size)
        return pad_kernel(kernel, self.kernel_size)


class RealESRGANKernels:
    """Per-sample kernels of the Real-ESRGAN degradation, drawn in the dataset (CPU).

    Arguments ending in 2 configure the second round. Defaults are DiffBIR's general settings.
    Returns `{"kernel1", "kernel2", "sinc_kernel"}`, float32 (K, K) tensors; the final sinc
    kernel is a unit pulse (no filtering) with probability 1 - final_sinc_prob.
    """

    def __init__(
        self,
        blur_kernel_size: int = 21,
        kernel_list: Sequence[str] = KERNEL_KINDS,
        kernel_prob: Sequence[float] = _KERNEL_PROB_ALL,
        blur_sigma: Sequence[float] = (0.2, 3.0),
        betag_range: Sequence[float] = (0.5, 4.0),
        betap_range: Sequence[float] = (1.0, 2.0),
        sinc_prob: float = 0.1,
        blur_kernel_size2: int = 21,
        kernel_list2: Sequence[str] = KERNEL_KINDS,
        kernel_prob2: Sequence[float] = _KERNEL_PROB_ALL,
        blur_sigma2: Sequence[float] = (0.2, 1.5),
        betag_range2: Sequence[float] = (0.5, 4.0),
        betap_range2: Sequence[float] = (1.0, 2.0),
        sinc_prob2: float = 0.1,
        final_sinc_prob: float = 0.8,
    ) -> None:
        self.first = BlurKernelSampler(
            blur_kernel_size,
            kernel_list,
            kernel_prob,
            blur_sigma,
            betag_range,
            betap_range,
            sinc_prob,
        )
        self.second = BlurKernelSampler(
            blur_kernel_size2,
            kernel_list2,
            kernel_prob2,
            blur_sigma2,
            betag_range2,
            betap_range2,
            sinc_prob2,
        )
        self.final_sinc_prob = final_sinc_prob

    def final_sinc(self, rng: np.random.Generator) -> np.ndarray:
        """The final sinc kernel (cutoff in [pi/3, pi]) or a unit pulse, padded to size K."""
        k = self.first.kernel_size
        if rng.uniform() < self.final_sinc_prob:
            size = int(rng.choice(self.first.sizes))
            return sinc_kernel(float(rng.uniform(np.pi / 3, np.pi)), size, pad_to=k)
        pulse = np.zeros((k, k), dtype=np.float32)
        pulse[k // 2, k // 2] = 1.0
        return pulse

    def __call__(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return {
            "kernel1": torch.from_numpy(self.first(rng)).float(),
            "kernel2": torch.from_numpy(self.second(rng)).float(),
            "sinc_kernel": torch.from_numpy(self.final_sinc(rng)).float(),
        }
