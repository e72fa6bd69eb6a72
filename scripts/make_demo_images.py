"""Write small HQ training/validation images cut from scikit-image's bundled sample photos.

    python scripts/make_demo_images.py --out data/demo --count 24 --val-count 4 --size 96

The photos ship inside scikit-image (public-domain / CC0 sample data), so this works offline.
It gives the tiny configs real photographic content to train on in seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import skimage.data
from tqdm import tqdm

SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def random_crops(count: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Cut `count` RGB uint8 crops of `size`×`size` from the sample photos, cycling through them."""
    photos = [getattr(skimage.data, name)() for name in SOURCES]
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        y = int(rng.integers(0, photo.shape[0] - size + 1))
        x = int(rng.integers(0, photo.shape[1] - size + 1))
        crops.append(photo[y : y + size, x : x + size])
    return crops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    parser.add_argument("--count", type=int, default=24, help="number of training images")
    parser.add_argument("--val-count", type=int, default=4, help="number of validation images")
    parser.add_argument("--size", type=int, default=96, help="side of the square crops in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crop positions")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    crops = random_crops(args.count + args.val_count, args.size, rng)
    for i, crop in enumerate(tqdm(crops, desc="writing demo images")):
        split = "train" if i < args.count else "val"
        path = Path(args.out) / split / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    return 0


if __name__ == "__main__":
    sys.exit(main())
