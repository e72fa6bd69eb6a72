"""Measure restored images: PSNR/SSIM/LPIPS against ground truth, NIQE/MUSIQ/MANIQA/CLIP-IQA
without it, and FID between the two folders.

Pairing, metrics and outputs are `model.eval.scoring`: results are matched to ground truth by
relative path without extension, falling back to a unique file stem; missing or differently
sized GT images are reported and skipped for full-reference metrics. The learned metrics come
from pyiqa, reading weights from `--metric-weights-dir` (torch-hub layout) when given.

    python -m scripts.evaluate --results out/ --gt data/gt --out eval/ --metrics psnr,ssim,lpips
    torchrun --nproc-per-node 4 -m scripts.evaluate --results out/ --gt data/gt --out eval/

Under torchrun each process scores its share of the images on its own device and rank 0 writes
the merged results, equal to one process's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.eval.scoring import (
    ALL_METRICS,
    DEFAULT_METRICS,
    EvalConfig,
    evaluate_folder,
    metric_device,
)
from model.io.logs import setup_logging
from model.pipelines.distributed import device_for, from_env, shutdown


def _metric_list(text: str) -> tuple[str, ...]:
    """Comma-separated names, lower-cased, duplicates dropped (EvalConfig checks them)."""
    return tuple(dict.fromkeys(m.strip().lower() for m in text.split(",") if m.strip()))


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")[0]
    p = argparse.ArgumentParser(description=doc, prog="python -m scripts.evaluate")
    p.add_argument("--results", type=Path, required=True, help="folder of restored images")
    p.add_argument("--gt", type=Path, help="ground-truth folder (psnr, ssim, lpips, fid need it)")
    metrics_help = f"comma-separated, from {','.join(ALL_METRICS)} (default {DEFAULT_METRICS})"
    p.add_argument("--metrics", type=_metric_list, default=DEFAULT_METRICS, help=metrics_help)
    channel = p.add_mutually_exclusive_group()
    channel.add_argument(
        "--y-channel", dest="y_channel", action="store_true", help="PSNR/SSIM on BT.601 Y (default)"
    )
    channel.add_argument("--rgb", dest="y_channel", action="store_false", help="PSNR/SSIM on RGB")
    p.set_defaults(y_channel=True)
    p.add_argument(
        "--crop-border", type=int, default=4, help="pixels cut from each edge (PSNR/SSIM)"
    )
    p.add_argument(
        "--metric-weights-dir",
        type=Path,
        help="metric weights in torch-hub layout (pyiqa/, checkpoints/, clip/); no downloads",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=4, help="images of one size per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed set before every metric call")
    p.add_argument("--out", type=Path, help="folder for metrics.csv, summary.json, summary.md")
    return p


def main(argv: list[str] | None = None) -> int:
    """Evaluate a results folder; returns 0, or 1 when a metric or the input failed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    for flag, folder in (
        ("--results", args.results),
        ("--gt", args.gt),
        ("--metric-weights-dir", args.metric_weights_dir),
    ):
        if folder is not None and not folder.is_dir():
            parser.error(f"{flag} {folder}: not a folder")
    dist = from_env()
    try:
        cfg = EvalConfig(
            results=args.results,
            gt=args.gt,
            metrics=args.metrics,
            y_channel=args.y_channel,
            crop_border=args.crop_border,
            metric_weights_dir=args.metric_weights_dir,
            device=device_for(metric_device(args.device), dist),
            batch_size=args.batch_size,
            seed=args.seed,
        )
    except ValueError as e:
        parser.error(str(e))
    report, _, table = evaluate_folder(cfg, args.out, dist)
    if dist.is_main:
        print(table)
    shutdown(dist)
    return 1 if report.errors or not report.items else 0


if __name__ == "__main__":
    sys.exit(main())
