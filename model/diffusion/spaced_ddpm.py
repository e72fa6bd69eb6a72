"""DiffBIR's respaced DDPM sampler.

The sampler keeps `steps` of the T training timesteps (guided-diffusion respacing), derives a
shorter DDPM process from the kept ᾱ and runs ancestral sampling on it (Ho et al. 2020, eq. 6-7):

    β'_k  = 1 − ᾱ[t_k] / ᾱ[t_{k−1}]            (ᾱ before the first kept timestep = 1)
    ẑ_0   = sqrt(1/ᾱ'_k)·z − sqrt(1/ᾱ'_k − 1)·ε̂    (ε)      or   sqrt(ᾱ'_k)·z − sqrt(1 − ᾱ'_k)·v̂  (v)
    μ     = coef1_k·ẑ_0 + coef2_k·z,   z_prev = μ + sqrt(β̃_k)·noise   (no noise at k = 0)

with coef1 = β'·sqrt(ᾱ'_prev)/(1 − ᾱ'), coef2 = (1 − ᾱ'_prev)·sqrt(1 − β')/(1 − ᾱ') and
β̃ = β'·(1 − ᾱ'_prev)/(1 − ᾱ'). ẑ_0 is not clipped. The network sees the original timestep
t_k (e.g. 999) while the coefficients are read at the respaced index k.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from model.diffusion.callbacks import StepCallback, report_step
from model.diffusion.schedule import Diffusion, ModelFn, Parameterization, coef_at

# The float32 coefficient buffers of a respaced schedule, indexed by the respaced index k.
BUFFER_NAMES = (
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Pick `steps` roughly evenly spaced timesteps of [0, num_timesteps − 1], ascending.

    A float position advances by (T − 1)/(steps − 1) and each position is rounded with
    Python's `round` (half to even), so both ends are kept; steps = 1 gives [0].
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    stride = (num_timesteps - 1) / (steps - 1) if steps > 1 else 1.0
    picked, position = [], 0.0
    for _ in range(steps):
        picked.append(round(position))
        position += stride
    return sorted(set(picked))


@dataclasses.dataclass(frozen=True)
class SpacedSchedule:
    """A respaced DDPM process: kept timesteps, float64 β'/ᾱ' and float32 coefficients (steps,)."""

    timesteps: np.ndarray  # int32, ascending original timesteps t_k
    betas: np.ndarray  # float64 β'
    alphas_cumprod: np.ndarray  # float64 ᾱ'
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    def to(self, device: torch.device | str) -> SpacedSchedule:
        """Move the float32 coefficient buffers to `device`."""
        return dataclasses.replace(
            self, **{name: getattr(self, name).to(device) for name in BUFFER_NAMES}
        )


def make_spaced_schedule(training_alphas_cumprod: np.ndarray, steps: int) -> SpacedSchedule:
    """Respace a training schedule (ᾱ, float64, length T) to `steps` timesteps.

    All arithmetic is float64; the coefficients are then stored as float32. With a zero-SNR
    schedule the last `sqrt_recip(m1)_alphas_cumprod` are inf (only ε-prediction reads them).
    """
    timesteps = np.array(space_timesteps(len(training_alphas_cumprod), steps), dtype=np.int32)
    kept = np.asarray(training_alphas_cumprod, dtype=np.float64)[timesteps]
    betas = 1.0 - kept / np.append(1.0, kept[:-1])
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # β̃_0 = 0, so index 0 takes the value of index 1 before the log (as in guided-diffusion);
    # a single step keeps log(0) = −inf. The sampler itself never reads this buffer.
    clipped = posterior_variance
    if steps > 1:
        clipped = np.append(posterior_variance[1], posterior_variance[1:])
    with np.errstate(divide="ignore"):  # ᾱ' = 0 at the last step of a zero-SNR schedule
        recip = 1.0 / alphas_cumprod
        log_variance_clipped = np.log(clipped)
    coefs = {
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(recip),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(recip - 1.0),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": log_variance_clipped,
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev)
        * np.sqrt(alphas)
        / (1.0 - alphas_cumprod),
    }
    return SpacedSchedule(
        timesteps=timesteps,
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        **{name: torch.tensor(value, dtype=torch.float32) for name, value in coefs.items()},
    )


class SpacedSampler:
    """Ancestral DDPM sampling over a respaced schedule (DiffBIR's default "spaced" sampler).

    Args:
        training_alphas_cumprod: ᾱ of the training schedule, float64, length T.
        parameterization: what the network predicts, "eps" or "v".
    """

    def __init__(
        self, training_alphas_cumprod: np.ndarray, parameterization: Parameterization
    ) -> None:
        if parameterization not in ("eps", "v"):
            raise ValueError(f"parameterization must be 'eps' or 'v', got {parameterization!r}")
        self.training_alphas_cumprod = np.asarray(training_alphas_cumprod, dtype=np.float64)
        self.parameterization = parameterization

    @classmethod
    def from_diffusion(cls, diffusion: Diffusion) -> SpacedSampler:
        """A sampler for the schedule and parameterization of a training `Diffusion`."""
        return cls(diffusion.alphas_cumprod, diffusion.parameterization)

    def make_schedule(self, steps: int) -> SpacedSchedule:
        """The respaced schedule for `steps` sampling steps."""
        return make_spaced_schedule(self.training_alphas_cumprod, steps)

    def predict_x0(
        self,
        schedule: SpacedSchedule,
        x_t: torch.Tensor,
        t: torch.Tensor,
        model_output: torch.Tensor,
    ) -> torch.Tensor:
        """ẑ_0 from ε̂ (DDPM eq. 15) or v̂, with coefficients at respaced index t (B,)."""
        if self.parameterization == "eps":
            return (
                coef_at(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - coef_at(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * model_output
            )
        return (
            coef_at(schedule.sqrt_alphas_cumprod, t, x_t) * x_t
            - coef_at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * model_output
        )

    @staticmethod
    def q_posterior(
        schedule: SpacedSchedule, x_0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(z_prev | z_t, z_0) (DDPM eq. 6-7); variance is (B, 1, …, 1)."""
        mean = (
            coef_at(schedule.posterior_mean_coef1, t, x_t) * x_0
            + coef_at(schedule.posterior_mean_coef2, t, x_t) * x_t
        )
        return mean, coef_at(schedule.posterior_variance, t, x_t)

    def p_sample(
        self,
        model_fn: ModelFn,
        schedule: SpacedSchedule,
        x_t: torch.Tensor,
        model_t: torch.Tensor,
        t: torch.Tensor,
        cond: Any,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """One reverse step z_t → z_prev.

        Args:
            model_fn: network, called with the original timesteps `model_t` (B,).
            schedule: the respaced schedule (on x_t's device).
            x_t: current latent (B, C, H, W).
            model_t: original timesteps (B,), int64, e.g. 999.
            t: respaced indices (B,), int64, used for the coefficients.
            cond: conditions passed through to the network.
            noise: standard normal noise shaped like x_t; ignored where t = 0.
        """
        pred_x0 = self.predict_x0(schedule, x_t, t, model_fn(x_t, model_t, cond))
        mean, variance = self.q_posterior(schedule, pred_x0, x_t, t)
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return mean + nonzero * torch.sqrt(variance) * noise

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        x_T: torch.Tensor,
        steps: int,
        cond: Any = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | Sequence[torch.Tensor] | None = None,
        progress: bool = True,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Run `steps` reverse steps from x_T (B, C, H, W) and return z_0.

        Args:
            model_fn: network (wrap it with `classifier_free_guidance` for CFG).
            x_T: start latent, e.g. N(0, I) or q_sample(c_img, 999, ε).
            steps: number of sampling steps.
            cond: conditions passed through to the network.
            generator: source of the per-step noise (drawn on its device); global RNG if None.
            noise: per-step noise, noise[k] for loop position k (overrides `generator`).
            progress: show a tqdm progress bar.
            callback: called after every step (`model.diffusion.callbacks.StepCallback`).
        """
        schedule = self.make_schedule(steps).to(x_T.device)
        batch = x_T.shape[0]
        x = x_T
        timesteps = schedule.timesteps[::-1].tolist()  # t_{steps−1} (e.g. 999) down to 0
        for k, step in enumerate(tqdm(timesteps, desc="spaced DDPM", disable=not progress)):
            model_t = torch.full((batch,), step, dtype=torch.long, device=x.device)
            t = torch.full((batch,), steps - 1 - k, dtype=torch.long, device=x.device)
            step_noise = noise[k] if noise is not None else _randn_like(x, generator)
            x = self.p_sample(model_fn, schedule, x, model_t, t, cond, step_noise.to(x))
            report_step(callback, k, step, x)
        return x


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
