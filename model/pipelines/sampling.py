"""The sampling step of the pipeline: start latents, the wrapped model function and the run.

The model function is the ControlLDM under autocast (the frozen UNet alone outside the
control steps), wrapped with tiled diffusion, then classifier-free guidance, then latent image
guidance — each wrapper from `model.diffusion`. Every image draws from its own generator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from model.diffusion.callbacks import StepCallback
from model.diffusion.cfg import classifier_free_guidance
from model.diffusion.latent_guidance import latent_image_guidance
from model.diffusion.noise import randn_rows
from model.diffusion.samplers import Sampler, SpacedDDPM, start_latent
from model.diffusion.schedule import Diffusion, ModelFn
from model.diffusion.tiled import tiled_model_fn
from model.nets.cldm import ControlLDM
from model.pipelines.options import PipelineOptions

Generators = torch.Generator | Sequence[torch.Generator]


def per_image_seeds(batch: int, default_seed: int, seeds: Sequence[int] | None) -> list[int]:
    """One seed per image: `seeds` (checked to be `batch` long) or `default_seed` for all."""
    seeds = [default_seed] * batch if seeds is None else [int(s) for s in seeds]
    if len(seeds) != batch:
        raise ValueError(f"need {batch} seeds, got {len(seeds)}")
    return seeds


def per_image_generators(
    batch: int,
    default_seed: int,
    seeds: Sequence[int] | None = None,
    generator: Generators | None = None,
) -> tuple[list[torch.Generator], list[int | None]]:
    """One generator per image and its seed (None where given): the given generator(s), or
    CPU generators seeded per image (so results do not depend on the device)."""
    if generator is not None:
        gens = [generator] * batch if isinstance(generator, torch.Generator) else list(generator)
        if len(gens) != batch:
            raise ValueError(f"need 1 or {batch} generators, got {len(gens)}")
        return gens, [None] * batch
    seeds = per_image_seeds(batch, default_seed, seeds)
    return [torch.Generator().manual_seed(s) for s in seeds], list(seeds)


def start_latents(
    sampler: Sampler,
    diffusion: Diffusion,
    c_img: Tensor,
    options: PipelineOptions,
    generators: list[torch.Generator],
) -> Tensor:
    """x_T per image from its own generator (contiguous, see `start_latent`)."""
    rows = [
        start_latent(sampler, diffusion, c_img[i : i + 1], options.steps, options.start, g)
        for i, g in enumerate(generators)
    ]
    return torch.cat(rows)


def build_model_fn(
    cldm: ControlLDM,
    diffusion: Diffusion,
    sampler: Sampler,
    options: PipelineOptions,
    uncond: dict | None,
    guidance_target: Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> ModelFn:
    """The network the sampler calls, model_fn(z_t, t, cond), for one pipeline call.

    Args:
        cldm: the ControlLDM (control scales set by the caller).
        diffusion: the training schedule.
        sampler: the run's sampler (its timesteps decide the control steps).
        options: tiles, CFG, guidance and control window of the call.
        uncond: the unconditional branch's conditions, or None without CFG.
        guidance_target: what latent image guidance pulls toward (latent or RGB).
        autocast: wraps every network call.
    """
    timesteps = sampler.timesteps(options.steps)
    controlled = {timesteps[k] for k in options.control_steps(len(timesteps))}
    every_step = len(controlled) == len(set(timesteps))
    # the window's timestep range: evaluations between steps (Heun, DPM-2, ...) follow it too
    low, high = (min(controlled), max(controlled)) if controlled else (1, 0)

    def network(x: Tensor, t: Tensor, cond: dict) -> Tensor:
        with autocast():
            # reading t is a host synchronisation: only when some steps run without control
            if every_step or low <= int(t[0]) <= high:
                return cldm(x, t, cond).float()
            return cldm.unet_forward(x, t, cond["c_txt"]).float()

    model_fn: ModelFn = network
    tile_size, tile_stride = options.tiles("diffusion")
    if tile_size is not None:
        model_fn = tiled_model_fn(
            model_fn, tile_size // 8, tile_stride // 8, options.diffusion_tile_batch_size,
            weights=options.tile_weights,
        )  # fmt: skip
    if uncond is not None:
        model_fn = classifier_free_guidance(
            model_fn,
            uncond,
            options.cfg_scale,
            options.rescale_cfg,
            diffusion.num_timesteps,
            batched=options.cfg_batched,
        )
    guidance = options.guidance
    if guidance is not None and guidance.scale > 0:
        model_fn = latent_image_guidance(
            model_fn,
            diffusion,
            guidance_target,
            guidance,
            timesteps=timesteps,
            decode=lambda z: (_decode(cldm, z, autocast) + 1) / 2,
        )
    return model_fn


def _decode(
    cldm: ControlLDM, z: Tensor, autocast: Callable[[], contextlib.AbstractContextManager]
) -> Tensor:
    with autocast():
        return cldm.vae_decode(z).float()


def run_sampler(
    sampler: Sampler,
    model_fn: ModelFn,
    x_T: Tensor,
    options: PipelineOptions,
    cond: dict,
    generators: list[torch.Generator],
    callback: StepCallback | None = None,
) -> Tensor:
    """z_0 from x_T with per-image random streams."""
    if isinstance(sampler, SpacedDDPM):
        # The respaced sampler takes one generator; pass its per-step noise precomputed.
        noise = [randn_rows(x_T, generators) for _ in range(options.steps)]
        return sampler.sample(
            model_fn, x_T, options.steps, cond, progress=options.progress,
            callback=callback, noise=noise,
        )  # fmt: skip
    # diffusers draws per-image noise from a list of generators (randn_tensor).
    generator: Any = generators if len(set(map(id, generators))) > 1 else generators[0]
    return sampler.sample(model_fn, x_T, options.steps, cond, generator, options.progress, callback)
