"""Latent image guidance (DiffBIR's "restoration guidance"): pull x̂_0 toward the stage-1 image.

A wrapper around the model function. At guided timesteps it turns the network output into
x̂_0, takes `repeat` gradient steps on a fidelity loss between x̂_0 and the target, and returns
the output that implies the moved x̂_0 (`Diffusion.output_from_x0`), so any sampler continues
from the guided estimate. Following DiffBIR v2 (itself after GDP, Fei et al. 2023):

    L(x̂_0) = Σ_b mean_{c,h,w} w·(p(x̂_0) − y)²       p = identity (latent) or decode (RGB)
    x̂_0 ← x̂_0 − 3000·s·r_t·∇_{x̂_0} L

with y the target (RGB compared in [-1, 1]), w = 1 or edge weights (`edge_weights`) and
r_t = 1/coef1_t, the inverse of the DDPM posterior-mean weight of x̂_0 between t and the next
sampled timestep, so that the posterior mean itself moves by 3000·s·∇L (r_t = 1 without
`timesteps`). Guidance is active where t_stop < t + 1 < t_start (the original's t + 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from model.diffusion.schedule import Diffusion, ModelFn

# The original multiplies the user's scale by this constant (its `Guidance.scale = scale * 3000`).
SCALE_FACTOR = 3000.0
# ITU-R BT.601 luma weights, as used for the original's edge map.
_LUMA = (0.2989, 0.5870, 0.1140)

Decode = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class LatentGuidance:
    """Options of latent image guidance (defaults of DiffBIR's CLI, guidance off).

    Args:
        scale: gradient scale s ≥ 0 (0 disables guidance); the step is 3000·s·r_t·∇L.
        t_start, t_stop: guide while t_stop < t + 1 < t_start (t the original timestep).
        space: "latent" compares x̂_0 with a target latent; "rgb" decodes x̂_0 to an image
            (the gradient flows through the decoder) and compares it with a target image.
        loss: "mse", or "weighted_mse" with `edge_weights` of the target.
        repeat: gradient steps per guided timestep.
    """

    scale: float = 0.0
    t_start: int = 1001
    t_stop: int = -1
    space: Literal["latent", "rgb"] = "latent"
    loss: Literal["mse", "weighted_mse"] = "mse"
    repeat: int = 1

    def __post_init__(self) -> None:
        if self.scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {self.scale}")
        if self.space not in ("latent", "rgb"):
            raise ValueError(f"guidance space must be 'latent' or 'rgb', got {self.space!r}")
        if self.loss not in ("mse", "weighted_mse"):
            raise ValueError(f"guidance loss must be 'mse' or 'weighted_mse', got {self.loss!r}")
        if self.repeat < 1:
            raise ValueError(f"guidance repeat must be >= 1, got {self.repeat}")


def edge_weights(image: torch.Tensor, block_size: int = 2) -> torch.Tensor:
    """Weights (B, 1, H, W) that are ≈1 in flat regions and ≈0 on edges (DiffBIR's w_mse).

    The Sobel gradient magnitude of the grey image (luma for 3 channels, else the channel
    mean: our extension to latents) is summed over `block_size`² blocks; w = 1 − tanh(sum),
    constant per block. H and W must be multiples of `block_size`.
    """
    b, c, h, w = image.shape
    if h % block_size or w % block_size:
        raise ValueError(f"edge weights need H, W multiples of {block_size}, got {h}x{w}")
    if c == 3:
        luma = torch.tensor(_LUMA, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
        grey = (image * luma).sum(1, keepdim=True)
    else:
        grey = image.mean(1, keepdim=True)
    sobel_x = torch.tensor([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=image.dtype)
    kernels = torch.stack([sobel_x, sobel_x.T]).unsqueeze(1).to(image.device)  # (2, 1, 3, 3)
    gradient = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    magnitude = gradient.pow(2).sum(1, keepdim=True).sqrt()  # (B, 1, H, W)
    block_sum = F.avg_pool2d(magnitude, block_size) * block_size**2
    return 1.0 - F.interpolate(block_sum.tanh(), scale_factor=block_size, mode="nearest")


def posterior_rescale(
    alphas_cumprod: np.ndarray, timesteps: Sequence[int]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """r_t = 1/coef1 for t (B,): coef1 = β'·sqrt(ᾱ_prev)/(1 − ᾱ_t), β' = 1 − ᾱ_t/ᾱ_prev.

    ᾱ_prev is ᾱ at the largest of `timesteps` below t (1 if none), as in a DDPM respaced to
    `timesteps`; for DiffBIR's spaced sampler this is its `1/posterior_mean_coef1`.
    """
    kept = np.unique(np.asarray(timesteps, dtype=np.int64))  # ascending
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)

    def rescale(t: torch.Tensor) -> torch.Tensor:
        t_np = t.detach().cpu().numpy().astype(np.int64)
        below = np.searchsorted(kept, t_np, side="left") - 1
        ab = alphas_cumprod[t_np]
        ab_prev = np.where(below >= 0, alphas_cumprod[kept[np.maximum(below, 0)]], 1.0)
        coef1 = (1.0 - ab / ab_prev) * np.sqrt(ab_prev) / (1.0 - ab)
        # float32 coefficient, then its reciprocal, like the original's buffer arithmetic
        return 1.0 / torch.tensor(coef1, dtype=torch.float32)

    return rescale


def _loss_gradient(
    x_0: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None, decode: Decode | None
) -> torch.Tensor:
    """∇_{x_0} Σ_b mean w·(p(x_0) − y)², computed with autograd even inside no_grad."""
    # Samplers run under no_grad (maybe inference_mode); clones made outside inference mode
    # can be saved for backward.
    with torch.inference_mode(False), torch.enable_grad():
        x = x_0.detach().clone().requires_grad_(True)
        pred = x if decode is None else decode(x) * 2.0 - 1.0
        squared = (pred - target.clone()).pow(2)
        if weights is not None:
            squared = squared * weights.clone()
        loss = squared.mean(dim=tuple(range(1, squared.ndim))).sum()
        (gradient,) = torch.autograd.grad(loss, x)
    return gradient


def latent_image_guidance(
    model_fn: ModelFn,
    diffusion: Diffusion,
    target: torch.Tensor,
    options: LatentGuidance,
    timesteps: Sequence[int] | None = None,
    decode: Decode | None = None,
) -> ModelFn:
    """Wrap a network with latent image guidance toward `target`.

    Args:
        model_fn: network, possibly already wrapped with CFG / tiling.
        diffusion: the training schedule (its buffers on the sampling device), for
            x̂_0 ↔ output conversion.
        target: "latent" space: the stage-1 image's latent (B, 4, h, w) (c_img);
            "rgb" space: the stage-1 image (B, 3, H, W) in [0, 1].
        options: scale, timestep window, space, loss, repeat.
        timesteps: the sampler's timesteps (`sampler.timesteps(steps)`) for r_t; None: r_t = 1.
        decode: "rgb" space only: latent → image in [0, 1], differentiable.
    """
    if options.space == "rgb" and decode is None:
        raise ValueError("guidance in 'rgb' space needs a decode function")
    weights = edge_weights(target) if options.loss == "weighted_mse" else None
    reference = target * 2.0 - 1.0 if options.space == "rgb" else target
    rescale = (
        posterior_rescale(diffusion.alphas_cumprod, timesteps) if timesteps is not None else None
    )
    decoder = decode if options.space == "rgb" else None

    def guided(z_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        output = model_fn(z_t, t, cond)
        active = (options.t_stop < t + 1) & (t + 1 < options.t_start)  # (B,)
        if options.scale == 0 or not bool(active.any()):
            return output
        x_0 = diffusion.predict_x0(z_t, t, output)
        step = SCALE_FACTOR * options.scale * active.to(x_0.dtype)
        if rescale is not None:
            step = step * rescale(t).to(x_0)
        step = step.view(-1, *[1] * (x_0.ndim - 1))
        for _ in range(options.repeat):
            x_0 = x_0 - step * _loss_gradient(x_0, reference, weights, decoder)
        return diffusion.output_from_x0(z_t, t, x_0).to(output.dtype)

    return guided
