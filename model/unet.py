"""The frozen Stable Diffusion UNet (diffusers) built from the original config vocabulary.

Also holds the key conversion between the original latent-diffusion layout
(`input_blocks` / `middle_block` / `output_blocks` / `time_embed` / `out`, without the
`model.diffusion_model.` prefix) and diffusers' `UNet2DConditionModel` layout. The renames
are declared as data: a table of block prefixes built from the layout, plus the
sub-module renames inside each kind of block. The LAControlNet reuses the encoder half.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel

StateDict = dict[str, torch.Tensor]
Renames = tuple[tuple[str, str], ...]
# One table row: (original block prefix, diffusers block prefix, sub-module renames).
Row = tuple[str, str, Renames]

# Inside a ResBlock (original) / ResnetBlock2D (diffusers).
RESNET_RENAMES: Renames = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
)
# SpatialTransformer and Transformer2DModel share every sub-module name.
SAME_NAMES: Renames = (("", ""),)
DOWNSAMPLE_RENAMES: Renames = (("op.", "conv."),)

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


def encoder_rows(layout: UNetLayout) -> list[Row]:
    """Rows for time embedding, input blocks and middle block (UNet and ControlNet)."""
    rows: list[Row] = [
        ("time_embed.0.", "time_embedding.linear_1.", SAME_NAMES),
        ("time_embed.2.", "time_embedding.linear_2.", SAME_NAMES),
        ("input_blocks.0.0.", "conv_in.", SAME_NAMES),
    ]
    index = 1
    for level in range(layout.num_levels):
        for j in range(layout.num_res_blocks):
            rows.append(
                (f"input_blocks.{index}.0.", f"down_blocks.{level}.resnets.{j}.", RESNET_RENAMES)
            )
            if layout.attention_levels[level]:
                rows.append(
                    (f"input_blocks.{index}.1.", f"down_blocks.{level}.attentions.{j}.", SAME_NAMES)
                )
            index += 1
        if level != layout.num_levels - 1:
            rows.append(
                (
                    f"input_blocks.{index}.0.",
                    f"down_blocks.{level}.downsamplers.0.",
                    DOWNSAMPLE_RENAMES,
                )
            )
            index += 1
    rows += [
        ("middle_block.0.", "mid_block.resnets.0.", RESNET_RENAMES),
        ("middle_block.1.", "mid_block.attentions.0.", SAME_NAMES),
        ("middle_block.2.", "mid_block.resnets.1.", RESNET_RENAMES),
    ]
    return rows


def decoder_rows(layout: UNetLayout) -> list[Row]:
    """Rows for the output blocks and the final norm/conv (UNet only)."""
    rows: list[Row] = []
    index = 0
    for up, level in enumerate(reversed(range(layout.num_levels))):
        # Each decoder level has one more ResBlock than the encoder (it also consumes the
        # skip of the downsample / input conv).
        for j in range(layout.num_res_blocks + 1):
            rows.append(
                (f"output_blocks.{index}.0.", f"up_blocks.{up}.resnets.{j}.", RESNET_RENAMES)
            )
            sub = 1
            if layout.attention_levels[level]:
                rows.append(
                    (f"output_blocks.{index}.1.", f"up_blocks.{up}.attentions.{j}.", SAME_NAMES)
                )
                sub = 2
            if level != 0 and j == layout.num_res_blocks:
                rows.append(
                    (f"output_blocks.{index}.{sub}.", f"up_blocks.{up}.upsamplers.0.", SAME_NAMES)
                )
            index += 1
    rows += [("out.0.", "conv_norm_out.", SAME_NAMES), ("out.2.", "conv_out.", SAME_NAMES)]
    return rows


def _rename_key(key: str, rows: Sequence[Row], reverse: bool) -> str | None:
    src_col, dst_col = (1, 0) if reverse else (0, 1)
    for row in rows:
        src = row[src_col]
        if not key.startswith(src):
            continue
        rest = key[len(src) :]
        for rename in row[2]:
            sub_src, sub_dst = (rename[1], rename[0]) if reverse else rename
            if rest.startswith(sub_src):
                return row[dst_col] + sub_dst + rest[len(sub_src) :]
        return None
    return None


def convert_state(
    sd: Mapping[str, torch.Tensor], rows: Sequence[Row], reverse: bool = False
) -> StateDict:
    """Rename every key of `sd` with a row table (original -> diffusers, or back if `reverse`).

    Tensors are passed through unchanged. Raises KeyError naming the keys no row covers.
    """
    out: StateDict = {}
    unmatched = []
    for key, value in sd.items():
        new_key = _rename_key(key, rows, reverse)
        if new_key is None:
            unmatched.append(key)
        else:
            out[new_key] = value
    if unmatched:
        shown = ", ".join(unmatched[:8]) + (" ..." if len(unmatched) > 8 else "")
        raise KeyError(f"{len(unmatched)} keys have no conversion rule: {shown}")
    if len(out) != len(sd):
        raise KeyError("key conversion mapped two keys onto the same name")
    return out


def unet_state_from_original(sd: Mapping[str, torch.Tensor], layout: UNetLayout) -> StateDict:
    """Original UNet keys (without `model.diffusion_model.`) -> diffusers keys."""
    return convert_state(sd, encoder_rows(layout) + decoder_rows(layout))


def unet_state_to_original(sd: Mapping[str, torch.Tensor], layout: UNetLayout) -> StateDict:
    """diffusers UNet keys -> original keys (without `model.diffusion_model.`)."""
    return convert_state(sd, encoder_rows(layout) + decoder_rows(layout), reverse=True)
