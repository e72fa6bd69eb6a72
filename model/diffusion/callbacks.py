"""Per-step callbacks of the sampler loops: progress reports, previews and stopping a run."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

StepCallback = Callable[[int, int, Tensor], bool | None]
"""callback(step, t, latents) after every sampler step: `step` counts from 0, `t` is the
original timestep just used, `latents` the VP latent after the step. Returning True stops the
run (the loop raises `SamplingStopped`)."""


class SamplingStopped(Exception):
    """A step callback asked to stop; `steps_done` steps had run."""

    def __init__(self, steps_done: int) -> None:
        super().__init__(f"sampling stopped by the callback after {steps_done} step(s)")
        self.steps_done = steps_done


def report_step(callback: StepCallback | None, step: int, t: int, latents: Tensor) -> None:
    """Call `callback` (if any) and raise `SamplingStopped` when it returns True."""
    if callback is not None and callback(step, t, latents):
        raise SamplingStopped(step + 1)
