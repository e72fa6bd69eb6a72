"""The original v2.1 EDM sampler: a VP network run by k-diffusion solvers on σ (`EDMSampler`).

Sigma schedule ("original", the default, as DiffBIR's `EDMSampler.make_schedule`):
timesteps = int(linspace(T − 1, 0, steps, endpoint=False)), ᾱ read at them with the first one
(t = T − 1) raised to 1e-8 when it is smaller (zero SNR; the original also lowers a larger one
to 1e-8), σ = sqrt((1 − ᾱ)/ᾱ), then a final σ = 0 at timestep 0. "karras"
and "exponential" (Karras et al. 2022) span the same σ range instead.

The denoiser at σ feeds the network the VP latent z = x/sqrt(1 + σ²) at the timestep of the
nearest schedule σ (the run's own grid for "original", all T training sigmas otherwise) and
returns x̂_0 = c_skip·x + c_out·output (ε: 1, −σ; v: 1/(σ²+1), −σ/sqrt(σ²+1)). The state is
variance-exploding, x = z·sqrt(1 + σ²); x_T and the result are VP latents, as for every sampler.
Noise between two sigmas is a Brownian increment (`BrownianNoise`), as the original's SDE solvers
use; on disjoint steps those are independent unit normals.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from model.diffusion.callbacks import StepCallback, report_step
from model.diffusion.k_solvers import SOLVER_HPARAMS, SOLVERS, Noise
from model.diffusion.noise import randn_rows
from model.diffusion.schedule import Diffusion, ModelFn

SigmaSchedule = Literal["original", "karras", "exponential"]
# The original CLI's solver settings (only those a solver takes are passed to it).
DEFAULT_HPARAMS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 300.0, "s_noise": 1.0, "eta": 1.0,
                   "order": 1}  # fmt: skip
# The original clamps ᾱ at the first (pure-noise) timestep to this.
FIRST_ALPHA_CUMPROD = 1e-8
KARRAS_RHO = 7.0


def original_sigmas(alphas_cumprod: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas, timesteps) of the original rule, both `steps + 1` long (last σ 0, t 0)."""
    timesteps = np.linspace(len(alphas_cumprod) - 1, 0, steps, endpoint=False).astype(int)
    ab = alphas_cumprod[timesteps].copy()
    # The original sets ᾱ to 1e-8 here for every schedule; only a zero-SNR one needs it (on
    # SD 2.1's ε schedule it would start at σ = 1e4 instead of 14.6, see the README).
    ab[0] = max(ab[0], FIRST_ALPHA_CUMPROD)
    sigmas = np.sqrt((1 - ab) / ab)
    return np.append(sigmas, 0.0), np.append(timesteps, 0)


def training_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """σ of every training timestep (t = 0 … T − 1), the last ᾱ clamped as the original."""
    ab = alphas_cumprod.copy()
    ab[-1] = max(ab[-1], FIRST_ALPHA_CUMPROD)
    return np.sqrt((1 - ab) / ab)


def spaced_sigmas(
    kind: SigmaSchedule, sigma_min: float, sigma_max: float, steps: int
) -> np.ndarray:
    """Karras (ρ = 7) or exponential sigmas from σ_max to σ_min, then 0."""
    ramp = np.linspace(0, 1, steps)
    if kind == "karras":
        lo, hi = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
        sigmas = (hi + ramp * (lo - hi)) ** KARRAS_RHO
    elif kind == "exponential":
        sigmas = np.exp(np.log(sigma_max) + ramp * (np.log(sigma_min) - np.log(sigma_max)))
    else:
        raise ValueError(f"sigma schedule must be original, karras or exponential, got {kind!r}")
    return np.append(sigmas, 0.0)


def nearest_timestep(sigma: float, table: np.ndarray, timesteps: np.ndarray) -> int:
    """The timestep of the σ in `table` nearest to `sigma` (how the denoiser picks its t)."""
    return int(timesteps[np.abs(table - sigma).argmin()])


class BrownianNoise:
    """Unit-normal Brownian increments between sigmas, consistent across overlapping calls.

    W is sampled lazily at every σ asked for (a Brownian bridge between known points), so
    `noise(a, c)` after `noise(a, b)` shares the part over [a, b] as a Brownian tree does.
    """

    def __init__(self, like: Tensor, generator: torch.Generator | list | None = None) -> None:
        self.like, self.generator = torch.zeros_like(like), generator
        self.points: list[float] = []
        self.values: list[Tensor] = []

    def _value(self, s: float) -> Tensor:
        i = bisect.bisect_left(self.points, s)
        if i < len(self.points) and self.points[i] == s:
            return self.values[i]
        z = randn_rows(self.like, self.generator)
        if not self.points:
            w = torch.zeros_like(self.like)
        elif i == 0:
            w = self.values[0] - math.sqrt(self.points[0] - s) * z
        elif i == len(self.points):
            w = self.values[-1] + math.sqrt(s - self.points[-1]) * z
        else:
            a, b = self.points[i - 1], self.points[i]
            wa, wb = self.values[i - 1], self.values[i]
            mean = wa + (s - a) / (b - a) * (wb - wa)
            w = mean + math.sqrt((s - a) * (b - s) / (b - a)) * z
        self.points.insert(i, s)
        self.values.insert(i, w)
        return w

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        return (self._value(sigma_next) - self._value(sigma)) / math.sqrt(abs(sigma_next - sigma))


@dataclasses.dataclass(frozen=True)
class EDMSampler:
    """The original's `edm_<solver>` samplers behind the `Sampler` interface.

    Args:
        solver: a `model.diffusion.k_solvers.SOLVERS` name, e.g. "dpm++_3m_sde".
        diffusion: the training schedule (ᾱ and the parameterization).
        sigma_schedule: "original" (default), "karras" or "exponential".
        hparams: solver settings overriding DEFAULT_HPARAMS (s_churn, s_tmin, s_tmax, s_noise,
            eta, order).
    """

    solver: str
    diffusion: Diffusion
    sigma_schedule: SigmaSchedule = "original"
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown EDM solver {self.solver!r}; choose one of {list(SOLVERS)}")

    def schedule(self, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sigmas of the run, σ table and timestep table the denoiser looks up)."""
        ab = self.diffusion.alphas_cumprod
        if self.sigma_schedule == "original":
            sigmas, timesteps = original_sigmas(ab, steps)
            return sigmas, sigmas, timesteps
        table = training_sigmas(ab)
        sigmas = spaced_sigmas(self.sigma_schedule, table.min(), table.max(), steps)
        return sigmas, table, np.arange(len(ab))

    def timesteps(self, steps: int) -> list[int]:
        """The timesteps the network sees, in call order (a dry run of the solver on a
        scalar: the sigmas it evaluates do not depend on the data)."""
        sigmas, table, timesteps = self.schedule(steps)
        seen: list[float] = []

        def denoise(x: Tensor, sigma: float) -> Tensor:
            seen.append(sigma)
            return torch.zeros_like(x)

        SOLVERS[self.solver](denoise, torch.zeros(1), [float(s) for s in sigmas],
                             lambda s, s_next: torch.zeros(1), lambda i, x: None,
                             **self._hparams())  # fmt: skip
        return [nearest_timestep(s, table, timesteps) for s in seen]

    def _hparams(self) -> dict[str, Any]:
        merged = {**DEFAULT_HPARAMS, **self.hparams}
        return {k: v for k, v in merged.items() if k in SOLVER_HPARAMS[self.solver]}

    def sample(
        self,
        model_fn: ModelFn,
        x_T: Tensor,
        steps: int,
        cond: Any = None,
        generator: torch.Generator | list | None = None,
        progress: bool = True,
        callback: StepCallback | None = None,
        noise: Noise | None = None,
    ) -> Tensor:
        """Run `steps` solver steps from the VP latent x_T and return z_0.

        `noise(σ, σ_next)` replaces the Brownian noise drawn from `generator`.
        """
        sigmas, table, timesteps = self.schedule(steps)
        v = self.diffusion.parameterization == "v"
        batch = x_T.shape[0]

        def denoise(x: Tensor, sigma: float) -> Tensor:
            t = nearest_timestep(sigma, table, timesteps)
            scale = math.sqrt(sigma**2 + 1)
            t_batch = torch.full((batch,), t, dtype=torch.long, device=x.device)
            out = model_fn(x / scale, t_batch, cond)
            if v:
                return x / (sigma**2 + 1) - sigma / scale * out
            return x - sigma * out

        bar = tqdm(total=steps, desc=f"EDM {self.solver}", disable=not progress)

        def step_done(i: int, x: Tensor) -> None:
            bar.update(1)
            z = x / math.sqrt(sigmas[i + 1] ** 2 + 1)
            report_step(callback, i, nearest_timestep(sigmas[i], table, timesteps), z)

        x = x_T * math.sqrt(1 + sigmas[0] ** 2)
        noise = noise or BrownianNoise(x_T, generator)
        try:
            return SOLVERS[self.solver](denoise, x, [float(s) for s in sigmas], noise,
                                        step_done, **self._hparams())  # fmt: skip
        finally:
            bar.close()
