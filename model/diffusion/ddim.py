"""DDIM (Song et al. 2021) as one visible loop, with the original's or trailing timesteps.

"original" (the default, DiffBIR's `DDIMSampler`): timesteps range(0, T, T // steps) + 1 — so
7 requested steps take 8 and t = T − 1 is never used — and ᾱ_prev of the last step is ᾱ_0
(`set_alpha_to_one=False`). "trailing": round(arange(T, 0, −T/steps)) − 1, starting at
t = T − 1 (the pure-noise step of a zero-SNR schedule) and ending at ᾱ_prev = 1.

Per step: ε̂ from the output (v converted with the training ᾱ_t), x̂_0, then
z_prev = sqrt(ᾱ_prev)·x̂_0 + sqrt(1 − ᾱ_prev − σ_t²)·ε̂ + σ_t·noise with
σ_t = η·sqrt((1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev)).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from model.diffusion.callbacks import StepCallback, report_step
from model.diffusion.noise import randn_rows
from model.diffusion.schedule import Diffusion, ModelFn

DDIMSpacing = Literal["original", "trailing"]


def ddim_timesteps(num_timesteps: int, steps: int, spacing: DDIMSpacing) -> np.ndarray:
    """The DDIM timesteps in increasing order."""
    if spacing == "original":
        return np.arange(0, num_timesteps, num_timesteps // steps) + 1
    if spacing == "trailing":
        return np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)).astype(int)[::-1] - 1
    raise ValueError(f"DDIM spacing must be 'original' or 'trailing', got {spacing!r}")


@dataclasses.dataclass(frozen=True)
class DDIMSampler:
    """DDIM behind the `Sampler` interface.

    Args:
        diffusion: the training schedule.
        eta: 0 deterministic, 1 ancestral-like.
        spacing: "original" (default) or "trailing".
    """

    diffusion: Diffusion
    eta: float = 0.0
    spacing: DDIMSpacing = "original"

    def schedule(self, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(timesteps, ᾱ_t, ᾱ_prev, σ_t) in increasing t, float64."""
        ab = self.diffusion.alphas_cumprod
        ts = ddim_timesteps(len(ab), steps, self.spacing)
        alphas = ab[ts]
        first = ab[0] if self.spacing == "original" else 1.0
        prev = np.concatenate([[first], ab[ts[:-1]]])
        with np.errstate(divide="ignore", invalid="ignore"):
            sigmas = self.eta * np.sqrt((1 - prev) / (1 - alphas) * (1 - alphas / prev))
        return ts, alphas, prev, np.nan_to_num(sigmas)

    def timesteps(self, steps: int) -> list[int]:
        """The network timesteps in call order (decreasing)."""
        return self.schedule(steps)[0][::-1].tolist()

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        x_T: torch.Tensor,
        steps: int,
        cond: Any = None,
        generator: torch.Generator | list | None = None,
        progress: bool = True,
        callback: StepCallback | None = None,
        noise: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the DDIM steps from x_T and return z_0 (`noise[k]`: the draw of loop position
        k instead of `generator`'s; only drawn where σ_t > 0)."""
        ts, alphas, prev, sigmas = self.schedule(steps)
        v = self.diffusion.parameterization == "v"
        x = x_T
        order = range(len(ts) - 1, -1, -1)
        for k, i in enumerate(tqdm(order, desc="DDIM", disable=not progress)):
            a_t, a_prev, sigma = float(alphas[i]), float(prev[i]), float(sigmas[i])
            t = torch.full((x.shape[0],), int(ts[i]), dtype=torch.long, device=x.device)
            out = model_fn(x, t, cond)
            if v:
                eps = a_t**0.5 * out + (1 - a_t) ** 0.5 * x
                x0 = a_t**0.5 * x - (1 - a_t) ** 0.5 * out
            else:
                eps, x0 = out, (x - (1 - a_t) ** 0.5 * out) / a_t**0.5
            x = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
            if sigma > 0:
                x = x + sigma * (noise[k].to(x) if noise is not None else randn_rows(x, generator))
            report_step(callback, k, int(ts[i]), x)
        return x
