"""Samplers by name: the original's EDM family, DiffBIR's respaced DDPM and diffusers'
schedulers behind one interface.

Every sampler has `sample(model_fn, x_T, steps, cond, generator, progress)` and
`timesteps(steps)`, so the pipeline switches samplers by name (`make_sampler`). The diffusers
schedulers are configured from a `Diffusion`: its float64 betas go in as `trained_betas`
(exact for SD's scaled-linear and for the zero-SNR rescale, which is therefore not applied a
second time), the prediction type follows its parameterization, samples are never clipped.

x_T and the result are always VP latents (z_t = α_t·z_0 + σ_t·ε). The loop converts x_T into
the scheduler's own space: Euler and Heun keep z_t/α_t (variance-exploding form), which the
scheduler's `scale_model_input` maps back to z_t before every network call.

Zero terminal SNR (ᾱ_{T−1} = 0) gives the sigma-based schedulers (Euler, Euler-a, Heun,
DPM-Solver++, UniPC) σ = sqrt((1 − ᾱ)/ᾱ) = ∞ and NaNs. For those only, the last ᾱ is clamped
to 2^−24, as diffusers' own `rescale_betas_zero_snr` does (σ_max ≈ 4096, the same clamp
for Heun, which lacks that option). DDPM and DDIM handle ᾱ = 0 under v-prediction and keep
the exact schedule. The default "trailing" spacing starts every scheduler at t = T − 1, the
pure-noise step of a zero-SNR schedule (Lin et al. 2023, "Common diffusion noise schedules
and sample steps are flawed", Sec. 3.3).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import numpy as np
import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm.auto import tqdm

from model.diffusion.callbacks import StepCallback, report_step
from model.diffusion.ddim import DDIMSampler, DDIMSpacing
from model.diffusion.edm import EDMSampler
from model.diffusion.k_solvers import SOLVER_HPARAMS, SOLVERS
from model.diffusion.schedule import Diffusion, ModelFn
from model.diffusion.spaced_ddpm import SpacedSampler, space_timesteps

# diffusers' clamp of ᾱ_{T−1} for zero-SNR schedules (the smallest positive fp16 subnormal).
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24
TimestepSpacing = Literal["linspace", "leading", "trailing"]
StartMode = Literal["noise", "cond"]


class Sampler(Protocol):
    """What the pipeline needs from a sampler."""

    def timesteps(self, steps: int) -> list[int]:
        """Original timesteps passed to the network, in call order."""

    def sample(
        self,
        model_fn: ModelFn,
        x_T: torch.Tensor,
        steps: int,
        cond: Any = None,
        generator: torch.Generator | None = None,
        progress: bool = True,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Run the reverse process from the VP latent x_T and return z_0 (`callback` after
        every step, see `model.diffusion.callbacks`)."""


def scheduler_betas(diffusion: Diffusion, clamp_zero_snr: bool) -> np.ndarray:
    """The training betas (float64); with `clamp_zero_snr` a last ᾱ of 0 becomes 2^−24."""
    betas = diffusion.betas.copy()
    alphas_cumprod = diffusion.alphas_cumprod
    if clamp_zero_snr and alphas_cumprod[-1] < ZERO_SNR_ALPHA_CUMPROD:
        # only the last β changes: ᾱ_{T−1} = ᾱ_{T−2}·(1 − β_{T−1})
        betas[-1] = 1.0 - ZERO_SNR_ALPHA_CUMPROD / alphas_cumprod[-2]
    return betas


def sample(
    model_fn: ModelFn,
    scheduler: SchedulerMixin,
    x_T: torch.Tensor,
    steps: int,
    cond: Any = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    step_kwargs: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run a diffusers scheduler for `steps` steps from the VP latent x_T (B, C, H, W).

    Args:
        model_fn: network (wrapped with guidance / tiling as needed), called as
            model_fn(z_t, t, cond) with z_t the VP latent and t (B,) int64 original timesteps.
        scheduler: a diffusers scheduler; `set_timesteps` resets its state, so it may be reused.
        x_T: start latent, e.g. N(0, I) or `start_latent(..., mode="cond")`.
        steps: number of scheduler steps (Heun calls the network about twice per step).
        cond: conditions passed through to the network.
        generator: source of the scheduler's noise (stochastic schedulers); global RNG if None.
        progress: show a tqdm progress bar.
        step_kwargs: extra arguments of `scheduler.step` (e.g. DDIM's eta).
        callback: called after every step (`model.diffusion.callbacks.StepCallback`).
    """
    scheduler.set_timesteps(steps, device=x_T.device)
    kwargs = dict(step_kwargs or {})
    if "generator" in inspect.signature(scheduler.step).parameters:
        kwargs["generator"] = generator
    batch = x_T.shape[0]
    # The scheduler's sample is z_t / (its model-input scale): z_t/α_t for Euler/Heun, z_t else.
    x = x_T / scheduler.scale_model_input(torch.ones_like(x_T[:1]), scheduler.timesteps[0])
    label = type(scheduler).__name__
    for k, t in enumerate(tqdm(scheduler.timesteps, desc=label, disable=not progress)):
        z_t = scheduler.scale_model_input(x, t)
        # Fractional timesteps (Karras sigmas, linspace) are rounded for the network.
        step_t = round(float(t))
        model_t = torch.full((batch,), step_t, dtype=torch.long, device=x.device)
        x = scheduler.step(model_fn(z_t, model_t, cond), t, x, **kwargs).prev_sample
        # The callback sees the scheduler's sample (z/α for Euler and Heun until the end).
        report_step(callback, k, step_t, x)
    return x


@dataclasses.dataclass(frozen=True)
class DiffusersSampler:
    """A diffusers scheduler type with a fixed configuration, behind the `Sampler` interface.

    Args:
        scheduler_cls: the diffusers scheduler class.
        config: its constructor arguments (built afresh for every run: schedulers keep state).
        step_kwargs: extra arguments of `scheduler.step`.
        stochastic: whether the scheduler draws noise at each step (uses the generator).
    """

    scheduler_cls: type[SchedulerMixin]
    config: dict[str, Any]
    step_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    stochastic: bool = False

    def make_scheduler(self) -> SchedulerMixin:
        """A new scheduler with this configuration."""
        return self.scheduler_cls(**self.config)

    def timesteps(self, steps: int) -> list[int]:
        """Original timesteps passed to the network, in call order (Heun repeats them)."""
        scheduler = self.make_scheduler()
        scheduler.set_timesteps(steps)
        return [round(float(t)) for t in scheduler.timesteps]

    def sample(
        self,
        model_fn: ModelFn,
        x_T: torch.Tensor,
        steps: int,
        cond: Any = None,
        generator: torch.Generator | None = None,
        progress: bool = True,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Run `steps` scheduler steps from the VP latent x_T and return z_0 (see `sample`)."""
        return sample(
            model_fn, self.make_scheduler(), x_T, steps, cond, generator, progress,
            self.step_kwargs, callback,
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SpacedDDPM:
    """DiffBIR's respaced ancestral DDPM (`SpacedSampler`) behind the `Sampler` interface.

    Args:
        sampler: the respaced sampler of a training schedule.
    """

    sampler: SpacedSampler

    def timesteps(self, steps: int) -> list[int]:
        """The kept original timesteps, from T − 1 down to 0."""
        return space_timesteps(len(self.sampler.training_alphas_cumprod), steps)[::-1]

    def sample(
        self,
        model_fn: ModelFn,
        x_T: torch.Tensor,
        steps: int,
        cond: Any = None,
        generator: torch.Generator | None = None,
        progress: bool = True,
        callback: StepCallback | None = None,
        noise: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run `steps` respaced DDPM steps from x_T and return z_0 (`noise`: per-step noise
        instead of draws from `generator`)."""
        return self.sampler.sample(model_fn, x_T, steps, cond, generator, noise, progress, callback)


def _spaced(diffusion: Diffusion) -> SpacedDDPM:
    return SpacedDDPM(SpacedSampler.from_diffusion(diffusion))


def _diffusers(
    scheduler_cls: type[SchedulerMixin],
    fixed: dict[str, Any],
    sigma_based: bool,
    stochastic: bool,
    diffusion: Diffusion,
    timestep_spacing: TimestepSpacing = "trailing",
    **scheduler_kwargs: Any,
) -> DiffusersSampler:
    config = {
        "num_train_timesteps": diffusion.num_timesteps,
        "trained_betas": scheduler_betas(diffusion, clamp_zero_snr=sigma_based),
        "prediction_type": "epsilon" if diffusion.parameterization == "eps" else "v_prediction",
        "timestep_spacing": timestep_spacing,
        **fixed,
        **scheduler_kwargs,
    }
    return DiffusersSampler(scheduler_cls, config, stochastic=stochastic)


def _ddim(diffusion: Diffusion, eta: float = 0.0, timestep_spacing: DDIMSpacing = "original"):
    return DDIMSampler(diffusion, eta, timestep_spacing)


def _dpm(order: int, sde: bool) -> Callable[..., DiffusersSampler]:
    fixed = {"algorithm_type": "sde-dpmsolver++" if sde else "dpmsolver++", "solver_order": order}
    return functools.partial(_diffusers, DPMSolverMultistepScheduler, fixed, True, sde)


def _edm(solver: str) -> Callable[..., EDMSampler]:
    def build(diffusion: Diffusion, sigma_schedule: str = "original", **hparams: Any) -> EDMSampler:
        unknown = sorted(set(hparams) - set(SOLVER_HPARAMS[solver]))
        if unknown:
            raise ValueError(
                f"sampler edm_{solver} takes {list(SOLVER_HPARAMS[solver]) or 'no options'} "
                f"besides sigma_schedule, got {unknown}"
            )
        return EDMSampler(solver, diffusion, sigma_schedule, hparams)

    return build


SAMPLERS: dict[str, Callable[..., Sampler]] = {
    **{f"edm_{solver}": _edm(solver) for solver in SOLVERS},
    "spaced": _spaced,
    "ddpm": functools.partial(_diffusers, DDPMScheduler, {"clip_sample": False}, False, True),
    "ddim": _ddim,
    "dpm++_2m": _dpm(2, sde=False),
    "dpm++_2m_sde": _dpm(2, sde=True),
    "dpm++_3m_sde": _dpm(3, sde=True),
    "euler": functools.partial(_diffusers, EulerDiscreteScheduler, {}, True, False),
    "euler_a": functools.partial(_diffusers, EulerAncestralDiscreteScheduler, {}, True, True),
    "heun": functools.partial(_diffusers, HeunDiscreteScheduler, {}, True, False),
    "unipc": functools.partial(_diffusers, UniPCMultistepScheduler, {}, True, False),
}
"""Sampler builders by name: builder(diffusion, **options) -> Sampler. "edm_*" are the
original v2.1 samplers (`model.diffusion.edm`; options `sigma_schedule` and solver settings such
as `eta`, `s_churn`); "spaced" is the paper's respaced DDPM (no options); the others are
diffusers schedulers taking `timestep_spacing` ("trailing" by default) and further keyword
arguments of their scheduler (e.g. `use_karras_sigmas=True`); "ddim" is
`model.diffusion.ddim` (`eta`, `timestep_spacing` "original" or "trailing")."""


def make_sampler(name: str, diffusion: Diffusion, **options: Any) -> Sampler:
    """Build the sampler `name` (a key of `SAMPLERS`) for the schedule of `diffusion`."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    if name == "spaced" and options:
        raise ValueError(f"sampler 'spaced' takes no options, got {sorted(options)}")
    return SAMPLERS[name](diffusion, **options)


def start_latent(
    sampler: Sampler,
    diffusion: Diffusion,
    c_img: torch.Tensor,
    steps: int,
    mode: StartMode = "noise",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The start latent x_T, shaped like the condition latent c_img (B, 4, h, w).

    "noise": ε ~ N(0, I). "cond": q_sample(c_img, t_start, ε), with t_start the first timestep
    the sampler uses for `steps` steps (T − 1 for "spaced" and "trailing" spacing). ε is drawn
    with `generator` on its device and moved to c_img's device. The result is contiguous
    whatever c_img's memory format: a channels-last x_T (as a VAE may return) would make the
    network pick other conv kernels and change the sample slightly.
    """
    device = generator.device if generator is not None else c_img.device
    noise = torch.randn(c_img.shape, generator=generator, device=device, dtype=c_img.dtype)
    noise = noise.to(c_img.device)
    if mode == "noise":
        return noise
    if mode != "cond":
        raise ValueError(f"start mode must be 'noise' or 'cond', got {mode!r}")
    # q_sample's α_t·c_img + σ_t·ε with the (float32) coefficients read as scalars, so the
    # diffusion's buffers may stay on another device.
    t_start = sampler.timesteps(steps)[0]
    alpha = diffusion.sqrt_alphas_cumprod[t_start].item()
    sigma = diffusion.sqrt_one_minus_alphas_cumprod[t_start].item()
    return (alpha * c_img + sigma * noise).contiguous()
