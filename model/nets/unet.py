"""The frozen Stable Diffusion UNet (diffusers) built from the original config vocabulary.

`UNetLayout` (levels, ResBlocks per level, attention per level) is what the key tables of
`model.convert.unet` and `model.convert.controlnet` are built from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel

StateDict = dict[str, torch.Tensor]


# Original config keys that do not change the network (or are handled elsewhere).
_IGNORED_KEYS = {"image_size", "use_fp16", "use_checkpoint", "legacy", "hint_channels"}
# Original config keys whose non-default values this implementation does not support.
_FIXED_KEYS = {
    "dropout": 0.0,
    "conv_resample": True,
    "dims": 2,
    "num_classes": None,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "use_spatial_transformer": True,
    "disable_self_attentions": None,
    "num_attention_blocks": None,
    "use_new_attention_order": False,
    "num_heads_upsample": -1,
    "n_embed": None,
}
_KNOWN_KEYS = {
    "in_channels",
    "out_channels",
    "model_channels",
    "attention_resolutions",
    "num_res_blocks",
    "channel_mult",
    "num_heads",
    "num_head_channels",
    "transformer_depth",
    "context_dim",
    "use_linear_in_transformer",
}


def sd21_unet_cfg() -> dict[str, Any]:
    """The Stable Diffusion 2.1-base UNet config in the original vocabulary."""
    return {
        "use_checkpoint": True,
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 320,
        "attention_resolutions": [4, 2, 1],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 4, 4],
        "num_head_channels": 64,
        "use_spatial_transformer": True,
        "use_linear_in_transformer": True,
        "transformer_depth": 1,
        "context_dim": 1024,
        "legacy": False,
    }


@dataclass(frozen=True)
class UNetLayout:
    """What the key tables depend on: levels, ResBlocks per level, attention per level."""

    num_res_blocks: int
    attention_levels: tuple[bool, ...]

    @property
    def num_levels(self) -> int:
        return len(self.attention_levels)

    @property
    def num_control_tensors(self) -> int:
        """Encoder outputs (input conv, ResBlocks, downsamples) plus the middle block."""
        return 1 + self.num_levels * self.num_res_blocks + (self.num_levels - 1) + 1

    @classmethod
    def from_original(cls, cfg: Mapping[str, Any]) -> UNetLayout:
        """Layout of an original `unet_cfg` / `controlnet_cfg` mapping."""
        levels = len(cfg["channel_mult"])
        # Level i works at downsample factor 2**i; it has attention if that factor is listed.
        attention = tuple(2**i in set(cfg["attention_resolutions"]) for i in range(levels))
        return cls(num_res_blocks=int(cfg["num_res_blocks"]), attention_levels=attention)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> UNetLayout:
        """Layout of a diffusers UNet / LAControlNet config."""
        attention = tuple("CrossAttn" in t for t in config["down_block_types"])
        return cls(num_res_blocks=int(config["layers_per_block"]), attention_levels=attention)


def encoder_kwargs_from_original(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Translate the encoder part of an original UNet config to diffusers keyword arguments.

    Shared by the UNet and the LAControlNet. Raises ValueError for unsupported settings.
    """
    unknown = set(cfg) - _KNOWN_KEYS - _IGNORED_KEYS - set(_FIXED_KEYS)
    if unknown:
        raise ValueError(f"unet config: unknown keys {sorted(unknown)}")
    for key, value in _FIXED_KEYS.items():
        if key in cfg and cfg[key] != value:
            raise ValueError(f"unet config: {key}={cfg[key]!r} is not supported (only {value!r})")
    layout = UNetLayout.from_original(cfg)
    channels = [int(cfg["model_channels"]) * int(m) for m in cfg["channel_mult"]]
    num_head_channels = int(cfg.get("num_head_channels", -1))
    if num_head_channels == -1:
        heads = [int(cfg["num_heads"])] * len(channels)
    else:
        heads = [c // num_head_channels for c in channels]
    depth = cfg.get("transformer_depth", 1)
    return {
        "in_channels": int(cfg["in_channels"]),
        "block_out_channels": tuple(channels),
        "down_block_types": tuple(
            "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.attention_levels
        ),
        "layers_per_block": layout.num_res_blocks,
        # diffusers' UNet2DConditionModel calls the number of heads `attention_head_dim`.
        "attention_head_dim": tuple(heads),
        "cross_attention_dim": int(cfg["context_dim"]),
        "use_linear_projection": bool(cfg.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": depth if isinstance(depth, int) else tuple(depth),
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        # Original timestep embedding: cos half first, exponent divided by half (no shift).
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def build_unet(**unet_cfg: Any) -> UNet2DConditionModel:
    """Build a diffusers UNet from an original `unet_cfg` (e.g. `sd21_unet_cfg()`).

    `use_checkpoint: True` turns on diffusers' gradient checkpointing, which only acts when
    gradients are being computed.
    """
    kwargs = encoder_kwargs_from_original(unet_cfg)
    attention = UNetLayout.from_original(unet_cfg).attention_levels
    up_types = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    unet = UNet2DConditionModel(
        sample_size=unet_cfg.get("image_size"),
        out_channels=int(unet_cfg["out_channels"]),
        up_block_types=up_types,
        mid_block_type="UNetMidBlock2DCrossAttn",
        act_fn="silu",
        **kwargs,
    )
    if unet_cfg.get("use_checkpoint", False):
        unet.enable_gradient_checkpointing()
    return unet
