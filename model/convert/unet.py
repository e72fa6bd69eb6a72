"""Key table between the original latent-diffusion UNet layout (`input_blocks` /
`middle_block` / `output_blocks` / `time_embed` / `out`, without `model.diffusion_model.`) and
diffusers' `UNet2DConditionModel`, declared as data: rows of block prefixes built from the
layout, plus the sub-module renames inside each kind of block. The LAControlNet reuses the
encoder half.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from model.nets.unet import StateDict, UNetLayout

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
