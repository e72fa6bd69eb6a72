"""The original's test-time padding: reflect-pad the LQ bottom/right, restore, crop back."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from model.diffir.dirformer import unshuffle_factor
from model.ops.sizing import crop_to, pad_to_multiple


def pad_window(scale: int) -> int:
    """LQ side multiple the DIRformer needs: 8 (x4), 16 (x2), 32 (x1)."""
    return 8 * unshuffle_factor(scale)


def restore_padded(fn: Callable[[Tensor], Tensor], lq: Tensor, scale: int) -> Tensor:
    """`fn(lq)` for any LQ size: reflect padding to `pad_window(scale)`, output cropped to
    (scale H, scale W). CPEN sees the padded LQ too, as in the original's `pad_test`."""
    padded, (h, w) = pad_to_multiple(lq, pad_window(scale), mode="reflect")
    return crop_to(fn(padded), h * scale, w * scale)
