"""The frozen Stable Diffusion VAE: diffusers' `AutoencoderKL` built and loaded from the
original latent-diffusion configuration and key layout.

The original `AutoencoderKL` (`embed_dim`, `ddconfig`) and diffusers' `AutoencoderKL` compute
the same function for the SD layout (GroupNorm(32, eps 1e-6), single-head mid-block attention,
encoder downsampling padded (0, 1, 0, 1), nearest upsampling, `num_res_blocks + 1` decoder
ResNets per level); only the parameter names differ, plus one shape: the attention q/k/v/proj_out
are 1x1 `Conv2d` ([C, C, 1, 1]) in the original and `Linear` ([C, C]) in diffusers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import AutoencoderKL

from model.nets.lean_inference import make_lean

StateDict = dict[str, torch.Tensor]

LATENT_SCALE_FACTOR = 0.18215

# ddconfig entries that the diffusers architecture reproduces; anything else is rejected.
_DDCONFIG_KEYS = {
    "double_z",
    "z_channels",
    "resolution",
    "in_channels",
    "out_ch",
    "ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "dropout",
}


def build_vae(
    embed_dim: int, ddconfig: Mapping[str, Any], scaling_factor: float = LATENT_SCALE_FACTOR
) -> AutoencoderKL:
    """Build a diffusers `AutoencoderKL` equal to the original `AutoencoderKL(ddconfig, embed_dim)`.

    Args:
        embed_dim: latent channels (the original `embed_dim`).
        ddconfig: the original encoder/decoder config (`double_z, z_channels, resolution,
            in_channels, out_ch, ch, ch_mult, num_res_blocks, attn_resolutions, dropout`).
        scaling_factor: latent scale factor stored in the diffusers config.

    Raises:
        ValueError: for a config the diffusers VAE cannot reproduce exactly.
    """
    unknown = sorted(set(ddconfig) - _DDCONFIG_KEYS)
    if unknown:
        raise ValueError(f"VAE ddconfig: unknown entries {unknown}")
    if not ddconfig["double_z"]:
        raise ValueError("VAE ddconfig: double_z=False is not supported (KL posterior needs it)")
    if ddconfig["z_channels"] != embed_dim:
        # diffusers uses one latent width for the encoder output and the quant convs.
        raise ValueError(
            f"VAE ddconfig: z_channels ({ddconfig['z_channels']}) must equal embed_dim ({embed_dim})"
        )
    if list(ddconfig["attn_resolutions"]):
        raise ValueError(
            "VAE ddconfig: attention outside the mid-block (attn_resolutions) is not supported"
        )
    if ddconfig["dropout"] != 0.0:
        raise ValueError(f"VAE ddconfig: dropout {ddconfig['dropout']} is not supported (only 0.0)")
    levels = len(ddconfig["ch_mult"])
    vae = AutoencoderKL(
        in_channels=ddconfig["in_channels"],
        out_channels=ddconfig["out_ch"],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(ddconfig["ch"] * m for m in ddconfig["ch_mult"]),
        layers_per_block=ddconfig["num_res_blocks"],
        act_fn="silu",
        latent_channels=embed_dim,
        norm_num_groups=32,
        sample_size=ddconfig["resolution"],
        scaling_factor=scaling_factor,
        mid_block_add_attention=True,
    )
    make_lean(vae)  # same values, less memory at inference (model/nets/lean_inference.py)
    return vae
