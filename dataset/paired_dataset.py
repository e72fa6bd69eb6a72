"""Training/validation datasets: HQ images from a source, cropped, augmented and degraded.

Each sample is a dict (collated by the default DataLoader collate):

- `hq`: float32 (3, S, S) in [0, 1]; `txt`: caption (str, "" for none); `path`: the image file;
  `index`: int, the index of the image actually used; `skipped`: int, how many unreadable files
  were replaced while producing this sample (the DataModule sums it over the run).
- `PairedDataset` adds `lq`: float32 (3, S, S) in [0, 1], at the HQ size.
- `RealESRGANDataset` adds `kernel1`, `kernel2`, `sinc_kernel`: float32 (K, K); the LQ image is
  made on the training device by `dataset.batch_transform.RealESRGANBatchTransform`.

An unreadable image (missing, empty, corrupt, or of the wrong size for `crop_type="none"`) is
logged with its path and replaced by another random image, so one bad file never stops a run.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.file_sources import ImageList, load_image_list
from dataset.sampler import SeededIndex
from model.io.images import ImageReadError, read_image

logger = logging.getLogger(__name__)

CROP_TYPES = ("none", "center", "random")


def resize_short_side(img: np.ndarray, short: int) -> np.ndarray:
    """Resize so that the short side is `short`, halving with box filtering first when large."""
    while min(img.shape[:2]) >= 2 * short:
        img = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)
    scale = short / min(img.shape[:2])
    if scale == 1:
        return img
    size = (max(short, round(img.shape[1] * scale)), max(short, round(img.shape[0] * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return np.clip(cv2.resize(img, size, interpolation=interpolation), 0.0, 1.0)


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to `size`, then take the central size x size square."""
    img = resize_short_side(img, size)
    top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return img[top : top + size, left : left + size]


def random_crop(
    img: np.ndarray, size: int, rng: np.random.Generator, min_crop_frac: float = 0.7
) -> np.ndarray:
    """Resize the short side to a random length in [size, size / min_crop_frac], crop randomly."""
    short = int(rng.integers(size, math.ceil(size / min_crop_frac), endpoint=True))
    img = resize_short_side(img, short)
    top = int(rng.integers(img.shape[0] - size, endpoint=True))
    left = int(rng.integers(img.shape[1] - size, endpoint=True))
    return img[top : top + size, left : left + size]


def augment(img: np.ndarray, rng: np.random.Generator, hflip: bool, rotation: bool) -> np.ndarray:
    """Random horizontal flip; random vertical flip and transpose (the 8 dihedral transforms)."""
    if hflip and rng.uniform() < 0.5:
        img = img[:, ::-1]
    if rotation and rng.uniform() < 0.5:
        img = img[::-1]
    if rotation and rng.uniform() < 0.5:
        img = img.transpose(1, 0, 2)
    return img


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float array -> float32 (3, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))


class ImageDataset(Dataset):
    """Loads, crops and augments HQ images; subclasses add the degradation.

    Indexed by an int or by a `SeededIndex` (index plus the entropy of its random draws).

    Args:
        source: an `ImageList`, or what `load_image_list` accepts (file list, folder, table, or a
            list of them).
        out_size: side of the square HQ crop.
        crop_type: "center", "random" (short side resized to [1, 1/0.7] x out_size first) or
            "none" (images must already be out_size x out_size).
        use_hflip: random horizontal flips.
        use_rot: random 90-degree rotations and vertical flips.
        p_empty_prompt: probability of replacing the caption by "" (classifier-free guidance).
        caption_probs: probability of each caption column (e.g. [0.8, 0.2] for short/long);
            uniform when None.
        seed: None for fresh randomness on every access (training); an int makes every sample
            a function of (seed, index) only: the same crop and LQ every epoch (validation).
            A `SeededIndex` key (what the DataModule's training sampler yields) brings its own
            entropy, which takes precedence.
        max_retries: unreadable files replaced in a row before giving up.
    """

    def __init__(
        self,
        source: ImageList | str | os.PathLike | Sequence[str],
        out_size: int = 512,
        crop_type: str = "center",
        use_hflip: bool = False,
        use_rot: bool = False,
        p_empty_prompt: float = 0.0,
        caption_probs: Sequence[float] | None = None,
        seed: int | None = None,
        max_retries: int = 100,
    ) -> None:
        if crop_type not in CROP_TYPES:
            raise ValueError(f"crop_type must be one of {CROP_TYPES}, got {crop_type!r}")
        self.images = source if isinstance(source, ImageList) else load_image_list(source)
        n_cols = self.images.num_caption_columns
        if caption_probs is not None and len(caption_probs) != n_cols:
            raise ValueError(f"caption_probs has {len(caption_probs)} entries for {n_cols} columns")
        self.out_size = out_size
        self.crop_type = crop_type
        self.use_hflip = use_hflip
        self.use_rot = use_rot
        self.p_empty_prompt = p_empty_prompt
        self.caption_probs = (
            None if caption_probs is None else np.divide(caption_probs, sum(caption_probs))
        )
        self.seed = seed
        self.max_retries = max_retries

    def __len__(self) -> int:
        return len(self.images)

    def _rng(self, key: int | SeededIndex) -> tuple[int, np.random.Generator]:
        if isinstance(key, SeededIndex):  # training through the DataModule: exact on resume
            return key.index, np.random.default_rng(key.entropy)
        if self.seed is not None:
            return key, np.random.default_rng([self.seed, key])
        # torch's RNG is seeded per DataLoader worker (and by Lightning's seed_everything)
        return key, np.random.default_rng(int(torch.randint(2**62, (1,))))

    def _crop(self, img: np.ndarray, path: str, rng: np.random.Generator) -> np.ndarray:
        size = self.out_size
        if self.crop_type == "none" or img.shape[:2] == (size, size):
            if img.shape[:2] != (size, size):
                h, w = img.shape[:2]
                raise ImageReadError(f"{path}: size {w}x{h} is not {size}x{size} (crop_type none)")
            return img
        if self.crop_type == "center":
            return center_crop(img, size)
        return random_crop(img, size, rng)

    def _load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, int, str, int]:
        """Return (hq, index used, path used, number of files skipped)."""
        for skipped in range(self.max_retries + 1):
            path = self.images.path(index)
            try:
                hq = self._crop(read_image(path), path, rng)
            except ImageReadError as e:
                logger.warning("skipping unreadable image %s", e)
                index = int(rng.integers(len(self)))
                continue
            return augment(hq, rng, self.use_hflip, self.use_rot), index, path, skipped
        raise RuntimeError(f"{self.max_retries + 1} unreadable images in a row; check the data")

    def _caption(self, index: int, rng: np.random.Generator) -> str:
        captions = self.images.captions(index)
        if not captions or rng.uniform() < self.p_empty_prompt:
            return ""
        return captions[int(rng.choice(len(captions), p=self.caption_probs))]

    def degrade(self, hq: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        """Extra sample entries made from the HQ image (H, W, 3); none in the base class."""
        return {}

    def __getitem__(self, key: int | SeededIndex) -> dict[str, Any]:
        index, rng = self._rng(key)
        hq, index, path, skipped = self._load(index, rng)
        sample = {
            "hq": to_tensor(hq),
            "txt": self._caption(index, rng),
            "path": path,
            "index": index,
            "skipped": skipped,
        }
        sample.update(self.degrade(hq, rng))
        return sample


class PairedDataset(ImageDataset):
    """HQ crops with LQ images made on the CPU by a degradation (e.g. `CodeformerDegradation`).

    Args:
        degradation: callable `(hq (H, W, 3) float32, rng) -> lq (H, W, 3) float32`.
        **kwargs: `ImageDataset` arguments.
    """

    def __init__(
        self,
        source: ImageList | str | os.PathLike | Sequence[str],
        degradation: Callable[[np.ndarray, np.random.Generator], np.ndarray],
        **kwargs: Any,
    ) -> None:
        super().__init__(source, **kwargs)
        self.degradation = degradation

    def degrade(self, hq: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        return {"lq": to_tensor(self.degradation(hq, rng))}


class RealESRGANDataset(ImageDataset):
    """HQ crops with per-sample Real-ESRGAN kernels; the LQ is made by the batch transform.

    Args:
        kernels: callable `rng -> {"kernel1", "kernel2", "sinc_kernel"}`, e.g. `RealESRGANKernels`.
        **kwargs: `ImageDataset` arguments.
    """

    def __init__(
        self,
        source: ImageList | str | os.PathLike | Sequence[str],
        kernels: Callable[[np.random.Generator], dict[str, torch.Tensor]],
        **kwargs: Any,
    ) -> None:
        super().__init__(source, **kwargs)
        self.kernels = kernels

    def degrade(self, hq: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        return self.kernels(rng)
