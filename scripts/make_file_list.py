"""Write train/val file lists from folders of images.

Example:
    python -m scripts.make_file_list --folders data/ffhq --out-dir data/lists --val-size 500
"""

from __future__ import annotations

import argparse
import logging
import os
import random
from pathlib import Path

from model.io.file_lists import list_image_files
from model.io.logs import setup_logging

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--folders", nargs="+", required=True, help="folders searched for images")
    p.add_argument("--out-dir", required=True, help="folder to write train.list and val.list to")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--val-size", type=int, help="number of validation images")
    split.add_argument(
        "--val-fraction", type=float, help="fraction of validation images, in [0, 1)"
    )
    p.add_argument("--seed", type=int, default=231, help="shuffle seed (default: 231)")
    p.add_argument(
        "--no-recursive", action="store_true", help="only take images directly in each folder"
    )
    p.add_argument(
        "--relative",
        action="store_true",
        help="write paths relative to --out-dir (lists stay valid when the tree moves)",
    )
    return p.parse_args(argv)


def split_files(
    files: list[str], seed: int, val_size: int | None, val_fraction: float | None
) -> tuple[list[str], list[str]]:
    """Shuffle `files` (duplicates removed) with `seed` and split them into (train, val)."""
    files = sorted(set(files))
    random.Random(seed).shuffle(files)
    if val_fraction is not None:
        if not 0 <= val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
        val_size = round(len(files) * val_fraction)
    val_size = val_size or 0
    if not 0 <= val_size < len(files):
        raise ValueError(f"--val-size {val_size} leaves no training images out of {len(files)}")
    return files[val_size:], files[:val_size]


def _write(path: Path, files: list[str]) -> None:
    path.write_text("".join(f"{f}\n" for f in files), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(logging.INFO, "%(message)s")
    files: list[str] = []
    for folder in args.folders:
        if not Path(folder).is_dir():
            logger.error("%s: not a folder", folder)
            return 1
        files += [os.path.abspath(f) for f in list_image_files(folder, not args.no_recursive)]
    if not files:
        logger.error("no images found under %s", " ".join(args.folders))
        return 1
    try:
        train, val = split_files(files, args.seed, args.val_size, args.val_fraction)
    except ValueError as e:
        logger.error("%s", e)
        return 1
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.relative:
        train, val = ([os.path.relpath(f, out_dir) for f in part] for part in (train, val))
    _write(out_dir / "train.list", train)
    _write(out_dir / "val.list", val)
    logger.info("wrote %d train and %d val paths to %s", len(train), len(val), out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
