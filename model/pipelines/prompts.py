"""Text conditions of a pipeline call: prompts joined with captions, encoded once per distinct
prompt and cached, or embeddings given by the caller."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# Distinct prompts whose embeddings are kept.
PROMPT_CACHE_SIZE = 64


class PromptCache:
    """Text contexts by prompt, each distinct prompt encoded once.

    Args:
        encode: list of prompts -> (N, 77, D) contexts (the text encoder).
        capacity: distinct prompts kept; the cache is emptied when it would overflow.
    """

    def __init__(
        self, encode: Callable[[list[str]], Tensor], capacity: int = PROMPT_CACHE_SIZE
    ) -> None:
        self.encode, self.capacity = encode, capacity
        self._cache: dict[str, Tensor] = {}

    def clear(self) -> None:
        self._cache.clear()

    def __call__(self, prompts: Sequence[str], device: torch.device) -> Tensor:
        """(B, 77, D) contexts of `prompts` on `device`."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            encoded = self.encode(missing).to(device)
            if len(self._cache) + len(missing) > self.capacity:
                self._cache.clear()
            self._cache.update(zip(missing, encoded.split(1), strict=True))
        return torch.cat([self._cache[p].to(device) for p in prompts])


def join_caption(caption: str | None, prompt: str) -> str:
    """The original's joining of a per-image caption and the positive prompt."""
    return ", ".join(p for p in (caption, prompt) if p)


@dataclasses.dataclass
class TextConditions:
    """Where a call's text contexts come from: captions + prompts, or given embeddings.

    Args:
        captions: per-image captions (joined with the positive prompt), or None.
        prompt_embeds: (1 or B, 77, D) positive contexts instead of encoding, or None.
        negative_prompt_embeds: (1 or B, 77, D) negative contexts, or None.
    """

    captions: Sequence[str] | None = None
    prompt_embeds: Tensor | None = None
    negative_prompt_embeds: Tensor | None = None

    def positive(
        self, encode: Callable[[Sequence[str]], Tensor], prompt: str, batch: int
    ) -> Tensor:
        if self.prompt_embeds is not None:
            return _expand(self.prompt_embeds, batch)
        if self.captions is None:
            return encode([prompt] * batch)
        return encode([join_caption(c, prompt) for c in self.captions])

    def negative(
        self, encode: Callable[[Sequence[str]], Tensor], prompt: str, batch: int
    ) -> Tensor:
        if self.negative_prompt_embeds is not None:
            return _expand(self.negative_prompt_embeds, batch)
        return encode([prompt] * batch)


def _expand(embeds: Tensor, batch: int) -> Tensor:
    if embeds.shape[0] not in (1, batch):
        raise ValueError(f"prompt embeddings for 1 or {batch} images, got {embeds.shape[0]}")
    return embeds.expand(batch, *embeds.shape[1:])


def run_prompts(pos_prompt: str, neg_prompt: str, cfg_scale: float) -> list[str]:
    """The prompts a run without per-image captions encodes: the positive one, and the
    negative one only under classifier-free guidance."""
    return [pos_prompt] + ([neg_prompt] if cfg_scale != 1 else [])
