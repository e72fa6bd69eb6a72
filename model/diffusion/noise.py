"""Standard normal noise drawn per image: one generator for the batch, or one per row."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def randn_rows(
    like: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None
) -> Tensor:
    """N(0, I) shaped like `like` (its device and dtype), drawn on each generator's device:
    the whole batch from one generator (or the global RNG), or row i from generator[i]."""
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else like.device
        return torch.randn(like.shape, generator=generator, device=device).to(like)
    rows = [torch.randn((1, *like.shape[1:]), generator=g, device=g.device) for g in generator]
    return torch.cat(rows).to(like)
