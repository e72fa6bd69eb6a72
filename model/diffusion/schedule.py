"""Forward diffusion process and training objective of the latent diffusion model.

Notation (Ho et al. 2020, "DDPM"; Salimans & Ho 2022, "v-prediction"):
β_t the noise schedule, ᾱ_t = ∏_{s≤t} (1 − β_s), α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t).

- forward process (DDPM eq. 4):   z_t = α_t·z_0 + σ_t·ε
- ε-prediction target:            ε
- v-prediction target:            v = α_t·ε − σ_t·z_0
- x̂_0 from ε (DDPM eq. 15):        ẑ_0 = (z_t − σ_t·ε̂) / α_t
- x̂_0 from v:                      ẑ_0 = α_t·z_t − σ_t·v̂

Schedule arithmetic is done in float64 and only the per-timestep coefficients used
on tensors are stored as float32 buffers, exactly as the original implementation does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The 12 schedule buffers an original LDM/DDPM module registers (and its checkpoints hold).
LDM_SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)

Parameterization = Literal["eps", "v"]
# model_fn(z_t, t, cond) -> eps or v; t holds original (training) timesteps, shape (B,).
ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def scaled_linear_betas(
    num_timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012
) -> np.ndarray:
    """Stable Diffusion's "linear" schedule: β evenly spaced in sqrt space, float64.

    β_t = (sqrt(β_start) + t/(T−1)·(sqrt(β_end) − sqrt(β_start)))², t = 0 … T−1.
    """
    return np.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=np.float64) ** 2


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale β so that the last timestep has zero SNR (Lin et al. 2023, Algorithm 1).

    sqrt(ᾱ) is shifted so that its last entry is 0 and scaled so that its first entry is
    unchanged; β is recovered from the ratios of consecutive ᾱ. The last β is exactly 1
    and the last ᾱ exactly 0.
    """
    # float64 torch ops like the original: torch's vectorised sqrt is sometimes 1 ulp off
    # numpy's, and this keeps the schedule bit-identical to the released models' code.
    sqrt_ab = torch.from_numpy(1.0 - betas).cumprod(0).sqrt()
    first, last = sqrt_ab[0].item(), sqrt_ab[-1].item()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_cumprod = sqrt_ab**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return (1.0 - alphas).numpy()


def coef_at(coef: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Read a per-timestep coefficient at `t` (B,) and shape it (B, 1, …, 1) to broadcast on x."""
    return coef[t].reshape(t.shape[0], *([1] * (x.ndim - 1)))


class Diffusion(nn.Module):
    """The forward (noising) process of latent diffusion and its training loss.

    Args:
        num_timesteps: number of training timesteps T (1000 for Stable Diffusion).
        linear_start: β_0 of the scaled-linear schedule.
        linear_end: β_{T−1} of the scaled-linear schedule (before any zero-SNR rescaling).
        zero_snr: rescale the schedule to zero terminal SNR (DiffBIR v2.1).
        parameterization: what the network predicts, "eps" (v1, v2) or "v" (v2.1).

    Attributes:
        betas, alphas_cumprod: float64 numpy arrays of length T.
        sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod: float32 buffers of length T
            (not saved in state dicts: they are derived from the constructor arguments).
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        zero_snr: bool = False,
        parameterization: Parameterization = "eps",
    ) -> None:
        super().__init__()
        if parameterization not in ("eps", "v"):
            raise ValueError(f"parameterization must be 'eps' or 'v', got {parameterization!r}")
        self.num_timesteps = num_timesteps
        self.zero_snr = zero_snr
        self.parameterization = parameterization
        betas = scaled_linear_betas(num_timesteps, linear_start, linear_end)
        if zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
        self.register_buffer(
            "sqrt_alphas_cumprod", _float32(np.sqrt(self.alphas_cumprod)), persistent=False
        )
        self.register_buffer(
            "sqrt_one_minus_alphas_cumprod",
            _float32(np.sqrt(1.0 - self.alphas_cumprod)),
            persistent=False,
        )

    def q_sample(self, x_0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw z_t ~ q(z_t | z_0) = N(α_t·z_0, σ_t²·I) as α_t·z_0 + σ_t·ε (DDPM eq. 4).

        Args are x_0 (B, C, H, W), t (B,) int64 training timesteps, noise shaped like x_0.
        """
        return (
            coef_at(self.sqrt_alphas_cumprod, t, x_0) * x_0
            + coef_at(self.sqrt_one_minus_alphas_cumprod, t, x_0) * noise
        )

    def training_target(
        self, x_0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """What the network should output for z_t = q_sample(x_0, t, noise): ε, or v = α_t·ε − σ_t·x_0."""
        if self.parameterization == "eps":
            return noise
        return (
            coef_at(self.sqrt_alphas_cumprod, t, x_0) * noise
            - coef_at(self.sqrt_one_minus_alphas_cumprod, t, x_0) * x_0
        )

    def predict_x0(
        self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor
    ) -> torch.Tensor:
        """Estimate z_0 from a network output: (z_t − σ_t·ε̂)/α_t for ε, α_t·z_t − σ_t·v̂ for v.

        Under ε-prediction this is undefined where α_t = 0 (last step of a zero-SNR schedule).
        """
        alpha = coef_at(self.sqrt_alphas_cumprod, t, x_t)
        sigma = coef_at(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if self.parameterization == "eps":
            return (x_t - sigma * model_output) / alpha
        return alpha * x_t - sigma * model_output

    def output_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x_0: torch.Tensor) -> torch.Tensor:
        """The network output that implies a given z_0 (inverse of `predict_x0`, for guidance).

        ε = (z_t − α_t·z_0)/σ_t; v = α_t·ε − σ_t·z_0 = (α_t·z_t − z_0)/σ_t since α_t² + σ_t² = 1.
        """
        alpha = coef_at(self.sqrt_alphas_cumprod, t, x_t)
        sigma = coef_at(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if self.parameterization == "eps":
            return (x_t - alpha * x_0) / sigma
        return (alpha * x_t - x_0) / sigma

    def sample_timesteps(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Training timesteps t ~ U{0, …, T−1}, shape (batch_size,), int64."""
        return torch.randint(
            0, self.num_timesteps, (batch_size,), generator=generator, device=device
        )

    def loss(
        self,
        model_fn: ModelFn,
        x_0: torch.Tensor,
        t: torch.Tensor,
        cond: Any,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The simple latent-diffusion objective E‖target − model_fn(z_t, t, cond)‖² (mean MSE).

        Args:
            model_fn: network, called as model_fn(z_t, t, cond).
            x_0: clean latents (B, C, H, W).
            t: training timesteps (B,), int64.
            cond: conditions passed through to the network.
            noise: ε shaped like x_0; drawn with torch.randn_like when None.
        """
        if noise is None:
            noise = torch.randn_like(x_0)
        x_t = self.q_sample(x_0, t, noise)
        return F.mse_loss(model_fn(x_t, t, cond), self.training_target(x_0, noise, t))


def _float32(values: np.ndarray) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def diffusion_sd21() -> Diffusion:
    """Schedule of DiffBIR v1 and v2 (SD 2.1-base): scaled-linear betas, ε-prediction."""
    return Diffusion(1000, 0.00085, 0.012, zero_snr=False, parameterization="eps")


def diffusion_sd21_zsnr() -> Diffusion:
    """Schedule of DiffBIR v2.1: scaled-linear betas rescaled to zero terminal SNR, v-prediction."""
    return Diffusion(1000, 0.00085, 0.012, zero_snr=True, parameterization="v")


DIFFUSION_PRESETS: dict[str, Callable[[], Diffusion]] = {
    "v1": diffusion_sd21,
    "v2": diffusion_sd21,
    "v2.1": diffusion_sd21_zsnr,
}
