"""Make a synthetic test set (GT crops + degraded LQ) that every method is scored on.

The protocols (`realesrgan_x4`, `codeformer_face`, `bicubic_x4`), their sources and the
reproducibility rules are described in `dataset/testsets.py`. The same seed (and source folder)
gives byte-identical files; `meta.json` records the sampled parameters of every image.

    python -m scripts.make_testset --protocol realesrgan_x4 --gt data/DIV2K_valid_HR \
        --out data/testsets/div2k_realesrgan --crop center --crop-size 512 --seed 0
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dataset.testsets import CROPS, PROTOCOLS, TestsetConfig, make_testset
from model.io.logs import setup_logging

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")[0]
    p = argparse.ArgumentParser(description=doc, prog="python -m scripts.make_testset")
    p.add_argument("--protocol", choices=PROTOCOLS, required=True, help="degradation protocol")
    p.add_argument("--gt", type=Path, required=True, help="folder of ground-truth images")
    p.add_argument("--out", type=Path, required=True, help="output folder (gt/, lq/, meta.json)")
    p.add_argument("--seed", type=int, default=0, help="base seed of every random choice")
    p.add_argument(
        "--crop",
        choices=CROPS,
        help="crop of each source image (default: center for x4 protocols, none for faces)",
    )
    p.add_argument("--crop-size", type=int, default=512, help="side of square crops in pixels")
    p.add_argument("--crops-per-image", type=int, default=1, help="random crops per source image")
    p.add_argument("--limit", type=int, help="use only the first N source images (sorted)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Create a test set; returns 0, or 1 when a source image was skipped or none was found."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    if not args.gt.is_dir():
        parser.error(f"--gt {args.gt}: not a folder")
    for sub in ("gt", "lq"):
        folder = args.out / sub
        if folder.is_dir() and any(folder.iterdir()):
            parser.error(f"--out {args.out}: {sub}/ is not empty; choose a new folder")
    try:
        cfg = TestsetConfig(
            protocol=args.protocol,
            gt=args.gt,
            out=args.out,
            seed=args.seed,
            crop=args.crop,
            crop_size=args.crop_size,
            crops_per_image=args.crops_per_image,
            limit=args.limit,
        )
    except ValueError as e:
        parser.error(str(e))
    meta = make_testset(cfg)
    log.info("%s: %d image pairs written", args.out, len(meta["images"]))
    return 1 if meta["skipped"] or not meta["images"] else 0


if __name__ == "__main__":
    sys.exit(main())
