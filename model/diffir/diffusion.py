"""Diffusion over the 256-d IPR: the schedule buffers, the denoiser and the reverse chain.

DiffIR's DDPM (ldm/ddpm.py of the original) with the x0 parameterisation, T = 4 steps in the
released models, and reverse steps that return the posterior mean only (no variance noise):

    x0_hat  = denoiser(x_t, t, c)
    x_{t-1} = coef1[t] * x0_hat + coef2[t] * x_t         (coef2[0] = 0: x_0 = coef1[0] * x0_hat)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.diffir.dirformer import IPR_DIM


def ipr_schedule(timesteps: int, linear_start: float, linear_end: float) -> dict[str, Tensor]:
    """The 12 DDPM buffers in float64: betas linear in sqrt space ("linear" of ldm), v_posterior 0."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    acp = torch.cumprod(1.0 - betas, dim=0)
    acp_prev = torch.cat([acp.new_ones(1), acp[:-1]])
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    return {
        "betas": betas,
        "alphas_cumprod": acp,
        "alphas_cumprod_prev": acp_prev,
        "sqrt_alphas_cumprod": acp.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - acp).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - acp).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / acp).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / acp - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * acp_prev.sqrt() / (1.0 - acp),
        "posterior_mean_coef2": (1.0 - acp_prev) * (1.0 - betas).sqrt() / (1.0 - acp),
    }


class IPRSchedule(nn.Module):
    """The schedule as float32 buffers (saved in checkpoints, as the original does)."""

    def __init__(self, timesteps: int, linear_start: float, linear_end: float) -> None:
        super().__init__()
        self.timesteps = timesteps
        for name, value in ipr_schedule(timesteps, linear_start, linear_end).items():
            self.register_buffer(name, value.float())

    def q_sample(self, x_0: Tensor, t: int, noise: Tensor) -> Tensor:
        """x_t = sqrt(acp[t]) x_0 + sqrt(1 - acp[t]) noise."""
        return self.sqrt_alphas_cumprod[t] * x_0 + self.sqrt_one_minus_alphas_cumprod[t] * noise


class IPRDenoiser(nn.Module):
    """x0-predicting MLP on concat(c, t / (10 T), x_t): (B, 513) -> (B, 256).

    Linear + LeakyReLU(0.1), then `n_denoise_res` more Linear + LeakyReLU layers (the
    original calls them ResMLP but they have no residual connection).
    """

    def __init__(self, n_denoise_res: int = 1, timesteps: int = 4) -> None:
        super().__init__()
        self.max_period = timesteps * 10
        self.layers = nn.Sequential(
            nn.Linear(2 * IPR_DIM + 1, IPR_DIM),
            nn.LeakyReLU(0.1, inplace=True),
            *(
                nn.Sequential(nn.Linear(IPR_DIM, IPR_DIM), nn.LeakyReLU(0.1, inplace=True))
                for _ in range(n_denoise_res)
            ),
        )

    def forward(self, x_t: Tensor, t: int, c: Tensor) -> Tensor:
        time = x_t.new_full((x_t.shape[0], 1), t / self.max_period)
        return self.layers(torch.cat([c, time, x_t], dim=1))


def reverse_chain(
    denoiser: IPRDenoiser, schedule: IPRSchedule, x_t: Tensor, c: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """All T reverse steps from `x_t` (t = T-1) under condition `c`.

    Returns (IPR after each step, x0 prediction of each step), both in order t = T-1 .. 0;
    the last IPR is the restorer's prior. Differentiable (the S2 training path uses it).
    """
    iprs, x0s = [], []
    for t in reversed(range(schedule.timesteps)):
        x0 = denoiser(x_t, t, c)
        x_t = schedule.posterior_mean_coef1[t] * x0 + schedule.posterior_mean_coef2[t] * x_t
        iprs.append(x_t)
        x0s.append(x0)
    return iprs, x0s
