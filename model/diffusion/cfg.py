"""Guidance that wraps a model function: classifier-free guidance (Ho & Salimans 2022).

A wrapper takes model_fn(z_t, t, cond) and returns another function with the same signature,
so every sampler gets guidance without a flag in its loop.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from model.diffusion.schedule import ModelFn


def rescaled_cfg_scale(scale: float, t: torch.Tensor, num_timesteps: int = 1000) -> torch.Tensor:
    """DiffBIR's `rescale_cfg` schedule: 1 + s·(1 − cos(π·((T − t)/T)^5))/2 per timestep t (B,).

    Rises from 1 at t = T − 1 to 1 + s at t = 0; float64 on the CPU (some devices lack float64).
    """
    frac = (num_timesteps - t.detach().cpu().to(torch.float64)) / num_timesteps
    return 1.0 + scale * (1.0 - torch.cos(math.pi * frac**5)) / 2.0


def classifier_free_guidance(
    model_fn: ModelFn,
    uncond: Any,
    scale: float,
    rescale: bool = False,
    num_timesteps: int = 1000,
    batched: bool = False,
) -> ModelFn:
    """Wrap a network with classifier-free guidance: uncond + s·(cond − uncond).

    Args:
        model_fn: network, called as model_fn(x, t, cond).
        uncond: conditions of the unconditional branch (negative prompt, same c_img).
        scale: guidance scale s; 1 calls the network once with `cond` only.
        rescale: for s > 1, replace s by `rescaled_cfg_scale(s, t)` (t = original timestep).
        num_timesteps: T of the training schedule, for the rescale.
        batched: run both branches in one call of batch 2B (conditional first); `cond` and
            `uncond` must then be dicts of tensors with the batch first. Else two calls of B
            (less memory). The two differ by matmul rounding only.
    """

    def both_branches(x: torch.Tensor, t: torch.Tensor, cond: Any) -> tuple[torch.Tensor, ...]:
        if not batched:
            return model_fn(x, t, cond), model_fn(x, t, uncond)
        stacked = {key: torch.cat([cond[key], uncond[key]]) for key in cond}
        return model_fn(torch.cat([x, x]), torch.cat([t, t]), stacked).chunk(2)

    def guided(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        s: float | torch.Tensor = scale
        if rescale and scale > 1:
            s = rescaled_cfg_scale(scale, t, num_timesteps)
            s = 1.0 if bool(torch.all(s == 1.0)) else s.to(x).reshape(-1, *[1] * (x.ndim - 1))
        if not isinstance(s, torch.Tensor) and s == 1:
            return model_fn(x, t, cond)
        out_cond, out_uncond = both_branches(x, t, cond)
        return out_uncond + s * (out_cond - out_uncond)

    return guided
