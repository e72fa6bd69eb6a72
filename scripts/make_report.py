"""Write an HTML comparison page: metric tables of several methods and side-by-side crops.

The page is built by `model.eval.report`: images of the columns are matched by relative path
without extension (falling back to a unique file stem), the same centred region is cut from
every image and every crop links to its full image; metric tables come from the summary.json
files of `scripts.evaluate`, per-image scores from the metrics.csv next to them.

    python -m scripts.make_report --out report/ --lq testset/lq --stage1 out/stage1 \
        --method diffbir=out/diffbir --method bsrgan=out/bsrgan --gt testset/gt \
        --summary diffbir=eval/diffbir/summary.json --summary bsrgan=eval/bsrgan/summary.json
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from model.eval.report import ReportConfig, build_report
from model.io.logs import setup_logging

log = logging.getLogger(__name__)


def _named_path(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")[0]
    p = argparse.ArgumentParser(description=doc, prog="python -m scripts.make_report")
    p.add_argument("--out", type=Path, required=True, help="output folder (index.html, crops/)")
    p.add_argument("--lq", type=Path, help="folder of LQ inputs (first column)")
    p.add_argument("--stage1", type=Path, help="folder of stage-1 outputs")
    p.add_argument(
        "--method", type=_named_path, action="append", default=[], help="NAME=FOLDER, repeatable"
    )
    p.add_argument("--gt", type=Path, help="folder of ground truth (last column)")
    p.add_argument(
        "--summary",
        type=_named_path,
        action="append",
        default=[],
        help="NAME=summary.json of scripts.evaluate, repeatable; NAME as in --method for scores",
    )
    p.add_argument("--crop-size", type=int, default=128, help="centred crop in pixels (0: whole)")
    p.add_argument("--display-size", type=int, default=256, help="shown size of every crop")
    p.add_argument("--max-images", type=int, help="number of image rows (default: all)")
    p.add_argument("--embed", action="store_true", help="embed crops as base64 (one file)")
    p.add_argument("--title", default="Restoration report", help="page title")
    return p


def main(argv: list[str] | None = None) -> int:
    """Write the report; returns 0."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    columns = [("LQ", args.lq), ("stage 1", args.stage1), *args.method, ("GT", args.gt)]
    columns = [(title, folder) for title, folder in columns if folder is not None]
    if not columns:
        parser.error("give at least one of --lq, --stage1, --method, --gt")
    for title, folder in columns:
        if not folder.is_dir():
            parser.error(f"{title} {folder}: not a folder")
    for name, path in args.summary:
        if not path.is_file():
            parser.error(f"--summary {name}={path}: not a file")
    if args.display_size < 1 or (args.max_images is not None and args.max_images < 1):
        parser.error("--display-size and --max-images must be >= 1")
    cfg = ReportConfig(
        out=args.out,
        columns=tuple(columns),
        summaries=tuple(args.summary),
        crop_size=args.crop_size,
        display_size=args.display_size,
        max_images=args.max_images,
        embed=args.embed,
        title=args.title,
    )
    log.info("wrote %s", build_report(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
