"""The frozen Stable Diffusion 2.1 text encoder: the OpenCLIP ViT-H/14 text tower.

Built on open_clip's `Transformer` (packed `attn.in_proj_weight`, exact GELU, LayerNorm eps
1e-5) with the original parameter names, so an original `cond_stage_model.model.*` state dict
(prefix removed) loads as it is. SD 2.1 conditions on the penultimate layer: every residual
block except the last, then `ln_final`, giving one context vector per token position.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import LayerNorm, Transformer
from torch import nn

StateDict = dict[str, torch.Tensor]

LAYERS = ("last", "penultimate")

# text_cfg entries of the original (open_clip CLIPTextCfg) that this tower reproduces.
_TEXT_CFG_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int) -> SimpleTokenizer:
    # Shared: reading the BPE merges shipped inside open_clip takes a noticeable fraction of a second.
    return SimpleTokenizer(context_length=context_length, clean="lower")


class FrozenOpenCLIPText(nn.Module):
    """OpenCLIP text tower returning per-token features; parameters are frozen.

    Args:
        context_length: tokens per prompt (77).
        vocab_size: BPE vocabulary size (49408).
        width: transformer width = context feature size (1024 for SD 2.1).
        heads: attention heads (16).
        layers: residual attention blocks (24).
        embed_dim: output size of `text_projection` (stored for checkpoint compatibility only).
        layer: "penultimate" (SD 2.x) skips the last block; "last" runs all blocks.
        mlp_ratio: MLP hidden size / width.
    """

    def __init__(
        self,
        context_length: int = 77,
        vocab_size: int = 49408,
        width: int = 1024,
        heads: int = 16,
        layers: int = 24,
        embed_dim: int = 1024,
        layer: str = "penultimate",
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"text encoder: layer must be one of {LAYERS}, got {layer!r}")
        self.context_length = context_length
        self.layer = layer
        self.num_blocks = layers - 1 if layer == "penultimate" else layers
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(
            width,
            layers,
            heads,
            mlp_ratio,
            act_layer=nn.GELU,
            norm_layer=LayerNorm,
            batch_first=True,
        )
        self.ln_final = LayerNorm(width)
        # Unused for conditioning but part of the original checkpoints (CLIP's pooled output).
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # Additive causal mask; not saved (the original does not save it either).
        causal = torch.full((context_length, context_length), float("-inf")).triu(1)
        self.register_buffer("attn_mask", causal, persistent=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)
        self.requires_grad_(False)

    def tokenize(self, prompts: list[str] | str) -> torch.Tensor:
        """OpenCLIP BPE tokens (B, context_length) int64: start 49406, end 49407, zero padding.

        Text is cleaned with ftfy, HTML-unescaped twice, whitespace-collapsed and lower-cased;
        prompts that are too long are cut with the last position forced to the end token.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return _tokenizer(self.context_length)(prompts)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token features (B, context_length, width) for token ids (B, context_length)."""
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(
                f"text encoder: tokens must have shape (B, {self.context_length}), got {list(tokens.shape)}"
            )
        tokens = tokens.to(self.positional_embedding.device)
        x = self.token_embedding(tokens) + self.positional_embedding  # (B, L, width)
        for block in self.transformer.resblocks[: self.num_blocks]:
            x = block(x, attn_mask=self.attn_mask)
        return self.ln_final(x)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        """Context (B, context_length, width) for a list of prompts."""
        return self.encode_tokens(self.tokenize(prompts))


def build_text_encoder(
    embed_dim: int,
    text_cfg: Mapping[str, Any],
    layer: str = "penultimate",
    vision_cfg: Mapping[str, Any] | None = None,
) -> FrozenOpenCLIPText:
    """Build the text tower from the original `FrozenOpenCLIPEmbedder` arguments.

    `vision_cfg` is accepted so that the original config can be passed whole; the image tower
    is not built (the original drops it too).
    """
    del vision_cfg
    unknown = sorted(set(text_cfg) - _TEXT_CFG_KEYS)
    if unknown:
        raise ValueError(f"text encoder text_cfg: unknown entries {unknown}")
    return FrozenOpenCLIPText(embed_dim=embed_dim, layer=layer, **text_cfg)
