"""Optimizer and learning-rate schedule shared by both training systems."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    learning_rate: float,
    weight_decay: float,
    warmup_steps: int,
    decay_steps: int | None,
) -> dict:
    """AdamW with linear warm-up, then constant (`decay_steps=None`) or cosine decay to zero.

    Returns the dict Lightning's `configure_optimizers` expects; the scheduler steps per
    optimizer step so that resuming restores it exactly.
    """
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay_steps is None:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
    }
