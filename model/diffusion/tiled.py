"""Tiled diffusion (MultiDiffusion-style): run the network on overlapping latent tiles.

A wrapper around the model function: z_t is cut into overlapping tiles, the network sees each
tile with the matching crop of c_img (c_txt unchanged) and the outputs are blended with
Gaussian weights that are positive everywhere, so network memory scales with the tile, not
the image. Tile layout and weights are those of `model.ops.tiling` (stage-1 and VAE tiling).

Wrap the raw network: `classifier_free_guidance(tiled_model_fn(network, ...), uncond, s)`, so
that the conditional and the unconditional calls are both cropped.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from model.diffusion.schedule import ModelFn
from model.ops.tiling import gaussian_weights, tile_starts

# cond entries cropped with the tile; every other tensor entry is repeated per tile.
SPATIAL_KEYS = ("c_img",)


def _tile_cond(cond: Any, boxes: list[tuple[int, int, int, int]]) -> Any:
    """The conditions of a batch of tiles, stacked tile-major along the batch dimension."""
    if cond is None:
        return None
    if not isinstance(cond, dict):
        raise TypeError(f"tiled diffusion needs cond as a dict or None, got {type(cond).__name__}")
    tiled = {}
    for key, value in cond.items():
        if key in SPATIAL_KEYS:
            tiled[key] = torch.cat([value[..., y0:y1, x0:x1] for y0, y1, x0, x1 in boxes])
        elif isinstance(value, torch.Tensor):
            tiled[key] = torch.cat([value] * len(boxes))
        else:
            tiled[key] = value
    return tiled


def tiled_model_fn(
    model_fn: ModelFn,
    tile_size: int,
    tile_stride: int,
    tile_batch_size: int = 1,
    progress: bool = False,
    weights: str = "symmetric",
) -> ModelFn:
    """Wrap a network so that it runs on overlapping tiles of the latent.

    Args:
        model_fn: network, called as model_fn(z_tile, t, cond_tile).
        tile_size: tile side in latent pixels (e.g. 64 for 512-pixel tiles); a latent side
            shorter than the tile is taken whole.
        tile_stride: step between tiles in latent pixels, 0 < stride ≤ tile_size; the last
            tile of a row/column ends at the border.
        tile_batch_size: tiles stacked into one network call (batch B·n).
        progress: show a tqdm bar over the tiles of each call.
        weights: Gaussian tile weights, "symmetric" or "original" (`gaussian_weights`).

    When one tile covers the latent the wrapper returns model_fn(z_t, t, cond) itself;
    otherwise the Gaussian-weighted mean of the tile outputs (accumulated in float32).
    """
    if not 0 < tile_stride <= tile_size:
        raise ValueError(f"tile_stride must be in (0, tile_size={tile_size}], got {tile_stride}")
    if tile_batch_size < 1:
        raise ValueError(f"tile_batch_size must be >= 1, got {tile_batch_size}")

    def tiled(z_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        h, w = z_t.shape[-2:]
        if tile_size >= h and tile_size >= w:
            return model_fn(z_t, t, cond)
        th, tw = min(tile_size, h), min(tile_size, w)
        boxes = [
            (y, y + th, x, x + tw)
            for y in tile_starts(h, th, tile_stride)
            for x in tile_starts(w, tw, tile_stride)
        ]
        batch = z_t.shape[0]
        tile_weights = gaussian_weights(th, tw, z_t.device, weights)  # (th, tw) float32, > 0
        acc = torch.zeros(z_t.shape, dtype=torch.float32, device=z_t.device)
        weight_sum = torch.zeros((h, w), dtype=torch.float32, device=z_t.device)
        chunks = [boxes[i : i + tile_batch_size] for i in range(0, len(boxes), tile_batch_size)]
        for chunk in tqdm(chunks, desc="latent tiles", disable=not progress, leave=False):
            z_tiles = torch.cat([z_t[..., y0:y1, x0:x1] for y0, y1, x0, x1 in chunk])
            out = model_fn(z_tiles, t.repeat(len(chunk)), _tile_cond(cond, chunk))
            for (y0, y1, x0, x1), out_tile in zip(chunk, out.split(batch), strict=True):
                acc[..., y0:y1, x0:x1] += out_tile.float() * tile_weights
                weight_sum[y0:y1, x0:x1] += tile_weights
        return (acc / weight_sum).to(out.dtype)

    return tiled
