"""Stage 1 on images of any size: pad, run the SwinIR cleaner (optionally tiled), crop."""

from __future__ import annotations

from torch import Tensor

from model.sizing import crop_to, pad_to_multiple
from model.swinir import SwinIR
from model.tiling import tiled_forward


def restore_stage1(
    model: SwinIR,
    lq: Tensor,
    tile_size: int | None = None,
    tile_stride: int | None = None,
    progress: bool = False,
) -> Tensor:
    """Restore `lq` (B, 3, H, W) in [0, 1] with the stage-1 SwinIR; any H, W.

    The image is zero-padded bottom/right to `model.size_multiple` (64 for DiffBIR: window 8 ×
    unshuffle 8), run whole or in tiles of `tile_size` with step `tile_stride` (default half a
    tile; `tile_size` a multiple of 64), and cropped back. Returns (B, 3, H·s, W·s) with
    s = `model.output_scale` (1 for DiffBIR), not clamped. Gradient mode is the caller's choice.
    """
    h, w = lq.shape[-2:]
    multiple, scale = model.size_multiple, model.output_scale
    padded, _ = pad_to_multiple(lq, multiple)
    if tile_size is None:
        out = model(padded)
    else:
        if tile_stride is None:
            tile_stride = tile_size // 2
        out = tiled_forward(
            model, padded, tile_size, tile_stride, scale=scale, multiple=multiple,
            progress=progress, desc="stage 1 tiles",
        )  # fmt: skip
    return crop_to(out, h * scale, w * scale)
