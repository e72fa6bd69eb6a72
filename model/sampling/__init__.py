"""Samplers: loops over a noise schedule that call a model function model_fn(x, t, cond).

Guidance (classifier-free guidance, ...) wraps the model function instead of living in the loop.
"""

from __future__ import annotations

from model.sampling.guidance import classifier_free_guidance, rescaled_cfg_scale
from model.sampling.spaced_ddpm import (
    BUFFER_NAMES,
    SpacedSampler,
    SpacedSchedule,
    make_spaced_schedule,
    space_timesteps,
)

__all__ = [
    "BUFFER_NAMES",
    "SpacedSampler",
    "SpacedSchedule",
    "classifier_free_guidance",
    "make_spaced_schedule",
    "rescaled_cfg_scale",
    "space_timesteps",
]
