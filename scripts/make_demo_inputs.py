"""Write the degraded demo inputs under inputs/demo/ from scikit-image's bundled sample photos.

    python scripts/make_demo_inputs.py --out inputs/demo

One folder per task: sr (×4 low-resolution crops), denoise (noisy crops at full size),
face (a 512×512 face crop, degraded CodeFormer-style) and face_background (a whole degraded
portrait). The degradations are the project's own (dataset/degradations.py) with fixed
parameters and a fixed seed, so the files are reproducible.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import skimage.data

from dataset.degradations import (
    CodeformerDegradation,
    FirstOrderParams,
    KernelParams,
    add_gaussian_noise,
    jpeg_compress,
)
from model.io.images import write_image

# (photo, top, left, size) of the crops; every photo is public domain or CC0 (see README).
SR_CROPS = (("astronaut", 0, 128, 256), ("coffee", 100, 200, 256), ("chelsea", 40, 120, 256))
DENOISE_CROPS = (("rocket", 100, 200, 256), ("coffee", 0, 0, 256), ("astronaut", 256, 0, 256))
FACE_CROP = ("astronaut", 10, 130, 240)


def crop(name: str, top: int, left: int, size: int) -> np.ndarray:
    """A float32 RGB [0, 1] crop of a scikit-image sample photo."""
    photo = getattr(skimage.data, name)()[top : top + size, left : left + size]
    return photo.astype(np.float32) / 255.0


def low_resolution(hq: np.ndarray, scale: int, rng: np.random.Generator) -> np.ndarray:
    """Blur, downsample by `scale`, add mild noise and JPEG: a typical ×`scale` SR input."""
    blur = CodeformerDegradation(blur_kernel_size=21)
    params = FirstOrderParams(KernelParams("iso", 1.2, 1.2, 0.0), scale, 5.0, 75)
    lq = blur.apply(hq, params, rng)
    h, w = hq.shape[:2]
    return cv2.resize(lq, (w // scale, h // scale), interpolation=cv2.INTER_AREA)


def noisy(hq: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Strong colour Gaussian noise (σ = 25/255) then JPEG 70, at full size."""
    return jpeg_compress(add_gaussian_noise(hq, 25.0, rng), 70)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="inputs/demo", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
    args = parser.parse_args(argv)
    out, rng = Path(args.out), np.random.default_rng(args.seed)

    for name, *box in SR_CROPS:
        write_image(out / "sr" / f"{name}.png", low_resolution(crop(name, *box), 4, rng))
    for name, *box in DENOISE_CROPS:
        write_image(out / "denoise" / f"{name}.png", noisy(crop(name, *box), rng))
    face = cv2.resize(crop(*FACE_CROP), (512, 512), interpolation=cv2.INTER_CUBIC)
    degrade = FirstOrderParams(KernelParams("iso", 3.0, 3.0, 0.0), 4.0, 10.0, 60)
    write_image(
        out / "face" / "astronaut_face.png",
        CodeformerDegradation().apply(face, degrade, rng),
    )
    portrait = crop("astronaut", 0, 0, 512)
    write_image(out / "face_background" / "astronaut.png", low_resolution(portrait, 2, rng))
    return 0


if __name__ == "__main__":
    sys.exit(main())
