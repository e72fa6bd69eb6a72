"""Run an image → image function over overlapping tiles and blend the results.

Used for the stage-1 SwinIR and the VAE (and the same tile layout and weights for tiled
diffusion): memory is bounded by one tile's computation plus the output accumulators.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

# Gaussian blending width relative to the tile side (the choice of DiffBIR/CCSR): a tile's
# border pixels get ~4e-6 of its centre weight, so a neighbouring tile's centre dominates there.
_SIGMA = 0.1


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Offsets of tiles of length `tile` covering [0, size); the last tile ends at `size`."""
    if tile >= size:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


TILE_WEIGHTS = ("symmetric", "original")


def gaussian_weights(
    h: int, w: int, device: torch.device | str | None = None, centre: str = "symmetric"
) -> Tensor:
    """(h, w) float32 blending weights, peaked at the centre and positive everywhere.

    "symmetric" centres both axes at (n − 1)/2; "original" centres y at h/2 and x at
    (w − 1)/2 as the original's `gaussian_weights` (half a pixel off in y). Scale is arbitrary
    (tiles are blended by weighted mean).
    """
    if centre not in TILE_WEIGHTS:
        raise ValueError(f"tile weights must be one of {TILE_WEIGHTS}, got {centre!r}")

    def profile(n: int, mid: float) -> Tensor:
        x = (torch.arange(n, dtype=torch.float64, device=device) - mid) / n
        return torch.exp(-(x**2) / (2 * _SIGMA**2))

    y_mid = h / 2 if centre == "original" else (h - 1) / 2
    return torch.outer(profile(h, y_mid), profile(w, (w - 1) / 2)).float()


def _scaled(n: int, scale: float) -> int:
    value = n * scale
    if abs(value - round(value)) > 1e-6:
        raise ValueError(f"tile coordinate {n} times scale {scale} is not an integer")
    return round(value)


def _check_layout(h: int, w: int, tile_size: int, tile_stride: int, multiple: int) -> None:
    if not 0 < tile_stride <= tile_size:
        raise ValueError(f"tile_stride must be in (0, tile_size={tile_size}], got {tile_stride}")
    if tile_size % multiple:
        raise ValueError(f"tile_size {tile_size} must be a multiple of {multiple}")
    if h % multiple or w % multiple:
        raise ValueError(f"image size {h}x{w} must be a multiple of {multiple}; pad it first")


def tiled_forward(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    tile_size: int,
    tile_stride: int,
    scale: float = 1,
    multiple: int = 1,
    progress: bool = True,
    desc: str = "tiles",
) -> Tensor:
    """Apply `fn` to overlapping square tiles of `x` (B, C, H, W) and blend the outputs.

    Args:
        fn: maps a (B, C, h, w) tile to (B, C', h·scale, w·scale); C' may differ from C.
        x: input; H and W must be multiples of `multiple`.
        tile_size, tile_stride: tile side (a multiple of `multiple`) and step in input pixels;
            tiles are clipped to the image, and the last tile of a row/column touches the border.
            Offsets times `scale` must be integers.
        scale: output size / input size (e.g. 8 for a decoder, 1/8 for an encoder).
        multiple: every tile side is a multiple of this (e.g. 64 for SwinIR).
        progress: show a tqdm bar. desc: its label.

    Returns fn(x) itself when one tile covers the image; otherwise the Gaussian-weighted mean
    of the tile outputs, accumulated in float32 and returned in fn's output dtype.
    """
    h, w = x.shape[-2:]
    if tile_size >= h and tile_size >= w:
        return fn(x)
    _check_layout(h, w, tile_size, tile_stride, multiple)
    th, tw = min(tile_size, h), min(tile_size, w)
    rows, cols = tile_starts(h, th, tile_stride), tile_starts(w, tw, tile_stride)
    # (input offset, output offset) pairs, checked before any work is done
    coords = [((y, x0), (_scaled(y, scale), _scaled(x0, scale))) for y in rows for x0 in cols]
    oth, otw = _scaled(th, scale), _scaled(tw, scale)
    acc = weight_sum = weights = None
    for (y, x0), (oy, ox) in tqdm(coords, desc=desc, disable=not progress, leave=False):
        out = fn(x[..., y : y + th, x0 : x0 + tw])
        if out.shape[-2:] != (oth, otw):
            raise ValueError(f"fn returned {tuple(out.shape[-2:])} for a tile needing {(oth, otw)}")
        if acc is None:
            # Allocated from the first output: fn decides channels, device and dtype.
            acc = out.new_zeros(
                (*out.shape[:-2], _scaled(h, scale), _scaled(w, scale)),
                dtype=torch.promote_types(out.dtype, torch.float32),
            )
            weight_sum = torch.zeros(acc.shape[-2:], dtype=acc.dtype, device=acc.device)
            weights = gaussian_weights(oth, otw, acc.device).to(acc.dtype)
        acc[..., oy : oy + oth, ox : ox + otw] += out * weights
        weight_sum[oy : oy + oth, ox : ox + otw] += weights
    return (acc / weight_sum).to(out.dtype)
