"""Images in and out of the pipeline API: tensors, PIL images and numpy arrays.

Inputs become one (B, 3, H, W) float batch in [0, 1]; an alpha channel (RGBA / LA images and
4-channel arrays) is taken off and, for "pil" and "np" outputs, resized to the output size and
put back, as the CLI does with files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from model.io.images import quantise
from model.ops.sizing import resize

OutputType = Literal["pt", "pil", "np"]
Alphas = list[np.ndarray | None]


def _array_to_unit(array: np.ndarray) -> np.ndarray:
    """An HW / HWC uint8, uint16 or float array as float32 HWC in [0, 1]."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"image arrays must be HW or HWC with 1-4 channels, got {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32)
    raise ValueError(f"image arrays must be uint8, uint16 or float, got {array.dtype}")


def _pil_to_array(image: Image.Image) -> np.ndarray:
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        return np.asarray(image.convert("RGBA"))
    if image.mode in ("I;16", "I;16B", "I"):
        return np.asarray(image, dtype=np.float32) / (65535 if image.mode != "I" else 255)
    return np.asarray(image.convert("RGB"))


def _one_image(image: Any) -> tuple[Tensor, np.ndarray | None]:
    """(3, H, W) float in [0, 1] and the (H, W) alpha, if any."""
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"image tensors must be (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}"
            )
        return image.float(), None
    if isinstance(image, Image.Image):
        image = _pil_to_array(image)
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"images must be tensors, PIL images or numpy arrays, got {type(image).__name__}"
        )
    unit = _array_to_unit(image)
    alpha = None
    if unit.shape[-1] in (2, 4):
        unit, alpha = unit[..., :-1], np.ascontiguousarray(unit[..., -1])
    if unit.shape[-1] == 1:
        unit = np.repeat(unit, 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(unit.transpose(2, 0, 1))), alpha


def to_batch(images: Any) -> tuple[Tensor, Alphas]:
    """A (B, 3, H, W) float batch in [0, 1] and per-image alphas from any accepted input."""
    if isinstance(images, Tensor) and images.ndim == 4:
        if images.shape[1] != 3:
            raise ValueError(f"image batches must be (B, 3, H, W), got {tuple(images.shape)}")
        return images.float(), [None] * images.shape[0]
    items = list(images) if isinstance(images, Sequence) else [images]
    if not items:
        raise ValueError("no images given")
    converted = [_one_image(item) for item in items]
    sizes = {tuple(x.shape[-2:]) for x, _ in converted}
    if len(sizes) > 1:
        raise ValueError(f"a batch needs images of one size, got {sorted(sizes)}")
    return torch.stack([x for x, _ in converted]), [a for _, a in converted]


def resize_alpha(alpha: np.ndarray | None, size: tuple[int, int]) -> np.ndarray | None:
    """An (H, W) alpha channel resized like the images (bicubic, antialiased) to `size`."""
    if alpha is None:
        return None
    return resize(torch.from_numpy(alpha)[None, None], size)[0, 0].clamp(0, 1).numpy()


def to_uint8(image: Tensor, quantize: str = "truncate") -> np.ndarray:
    """(3, H, W) in [0, 1] -> HWC uint8, truncated as the original (or rounded)."""
    return quantise(image.detach().float().permute(1, 2, 0).cpu().numpy(), 8, quantize)


def to_output(images: Tensor, output_type: OutputType, alphas: Alphas) -> Any:
    """(B, 3, H, W) in [0, 1] as tensors ("pt"), PIL images or uint8 HWC arrays."""
    if output_type == "pt":
        return images
    if output_type not in ("pil", "np"):
        raise ValueError(f"output_type must be 'pt', 'pil' or 'np', got {output_type!r}")
    out = []
    for image, alpha in zip(images, alphas, strict=True):
        array = to_uint8(image)
        alpha = resize_alpha(alpha, tuple(image.shape[-2:]))
        if alpha is not None:
            array = np.concatenate([array, quantise(alpha, 8, "truncate")[..., None]], -1)
        out.append(Image.fromarray(array) if output_type == "pil" else array)
    return out


@dataclasses.dataclass
class PipelineResult:
    """Outputs of a pipeline call, at the output size.

    Args:
        images: the restored images: (B, 3, H, W) in [0, 1] on the device for output_type
            "pt", else a list of PIL images or of HWC uint8 arrays (alpha re-attached where
            the input had it).
        stage1: the stage-1 images (I_reg) in the same form.
        seeds: the seed of each image, None where a generator was given.
        tiles: the tile sizes `max_memory_gb` chose ({stage: side or None}), else None.
    """

    images: Any
    stage1: Any
    seeds: list[int | None]
    tiles: dict[str, int | None] | None = None
