"""Scoring a folder of restored images: pairing with ground truth, metrics, summaries.

Results are matched to ground truth by relative path without extension (`sub/0001.png` ↔
`sub/0001.jpg`), falling back to the bare file stem when that is unique in the GT folder.
Missing or differently sized GT images are reported by name and skipped for full-reference
metrics. PSNR/SSIM come from `model.eval.metrics` (BasicSR conventions); the learned metrics come
from pyiqa (`model.eval.iqa`), reading weights from a local folder (torch-hub layout) when given.
Outputs: a per-image metrics.csv, a summary.json (means, counts, settings, versions) and a
paper-style summary.md. Under torchrun the images are dealt out in blocks of `batch_size`
(block k to rank k mod world size, a batch never crossing a block), so every rank scores the
batches one process would, and the merged report equals one process's; rank 0 computes FID and
writes the outputs.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.eval.iqa import PYIQA_NAMES, MetricUnavailable, build_pyiqa_metric
from model.eval.metrics import psnr, ssim
from model.io.atomic import is_partial
from model.io.images import IMAGE_EXTENSIONS, ImageReadError, read_image
from model.pipelines.distributed import SINGLE, Dist, all_gather

log = logging.getLogger(__name__)

FULL_REFERENCE = ("psnr", "ssim", "lpips", "lpips_vgg")
NO_REFERENCE = ("niqe", "musiq", "maniqa", "clipiqa")
ALL_METRICS = (*FULL_REFERENCE, *NO_REFERENCE, "fid")
DEFAULT_METRICS = "psnr,ssim,lpips,musiq,maniqa,clipiqa"  # the DiffBIR paper's table
LOWER_IS_BETTER = frozenset({"lpips", "lpips_vgg", "niqe", "fid"})


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation run (recorded in the JSON summary); checked on creation.

    Args:
        results: folder of restored images (searched recursively).
        gt: ground-truth folder, or None (full-reference metrics and FID are skipped).
        metrics: names from `ALL_METRICS`.
        y_channel: PSNR/SSIM on the BT.601 Y channel (else RGB).
        crop_border: pixels cut from each edge for PSNR/SSIM.
        metric_weights_dir: pyiqa weights in torch-hub layout (no downloads), or None.
        device: a torch device name ("cpu", "cuda", "cuda:1"; see `metric_device`).
        batch_size: images of one size per forward pass.
        seed: seed set before every metric call.
    """

    results: Path
    gt: Path | None
    metrics: tuple[str, ...]
    y_channel: bool = True
    crop_border: int = 4
    metric_weights_dir: Path | None = None
    device: str = "cpu"
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in ALL_METRICS]
        if unknown or not self.metrics:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {','.join(ALL_METRICS)}")
        if self.batch_size < 1 or self.crop_border < 0:
            raise ValueError("batch_size must be >= 1 and crop_border >= 0")


def metric_device(device: str) -> str:
    """The device metrics run on: "auto" is cuda when available, else cpu."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Item:
    """One result image, its matched GT (if any) and its scores."""

    name: str
    path: Path
    gt_path: Path | None = None
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class Report:
    """Everything the outputs are written from."""

    items: list[Item]
    missing_gt: list[str] = field(default_factory=list)
    size_mismatch: list[dict] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    skipped_metrics: list[str] = field(default_factory=list)
    fid: float | None = None


# --------------------------------------------------------------------------- pairing


def list_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, sorted (unfinished writes left out)."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not is_partial(p.name)
    )


def _key(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def pair_images(results: Path, gt: Path | None) -> tuple[list[Item], list[str]]:
    """Match every result image to a GT image; returns (items, names without GT)."""
    items = [Item(p.relative_to(results).as_posix(), p) for p in list_images(results)]
    if gt is None:
        return items, []
    by_key: dict[str, Path] = {}
    by_stem: dict[str, list[Path]] = {}
    for p in list_images(gt):
        if _key(p, gt) in by_key:
            log.warning("GT %s and %s share a name; using the first", by_key[_key(p, gt)], p)
            continue
        by_key[_key(p, gt)] = p
        by_stem.setdefault(p.stem, []).append(p)
    missing = []
    for item in items:
        stem_matches = by_stem.get(item.path.stem, [])
        item.gt_path = by_key.get(_key(item.path, results))
        if item.gt_path is None and len(stem_matches) == 1:
            item.gt_path = stem_matches[0]
        if item.gt_path is None:
            missing.append(item.name)
    return items, missing


# --------------------------------------------------------------------------- evaluation


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def _load(
    items: list[Item], report: Report
) -> Iterator[tuple[Item, torch.Tensor, torch.Tensor | None]]:
    """Decode each item and its GT; unreadable or mismatched files are reported, not fatal."""
    for item in items:
        try:
            img = _to_tensor(read_image(item.path))
        except ImageReadError as e:
            log.error("%s", e)
            report.unreadable.append(item.name)
            continue
        gt = None
        if item.gt_path is not None:
            try:
                gt = _to_tensor(read_image(item.gt_path))
            except ImageReadError as e:
                log.error("%s", e)
                report.unreadable.append(str(item.gt_path))
            if gt is not None and gt.shape != img.shape:
                sizes = {"result": list(img.shape[1:]), "gt": list(gt.shape[1:])}
                log.warning("size mismatch for %s: %s; skipped for FR metrics", item.name, sizes)
                report.size_mismatch.append({"name": item.name, **sizes})
                gt = None
        yield item, img, gt


def _batches(
    loaded: Iterator[tuple[Item, torch.Tensor, torch.Tensor | None]], batch_size: int
) -> Iterator[list[tuple[Item, torch.Tensor, torch.Tensor | None]]]:
    """Group consecutive images of one size (and GT availability) into batches."""
    batch: list = []
    for entry in loaded:
        if batch and (
            len(batch) == batch_size
            or entry[1].shape != batch[0][1].shape
            or (entry[2] is None) != (batch[0][2] is None)
        ):
            yield batch
            batch = []
        batch.append(entry)
    if batch:
        yield batch


def _score_batch(
    batch: list, models: dict[str, torch.nn.Module], cfg: EvalConfig, report: Report
) -> None:
    """Fill `item.scores` for every metric of `cfg` that applies to the batch."""
    x = torch.stack([img for _, img, _ in batch]).to(cfg.device)
    ref = torch.stack([g for _, _, g in batch]).to(cfg.device) if batch[0][2] is not None else None
    for metric in cfg.metrics:
        if metric in FULL_REFERENCE and ref is None:
            continue
        if metric not in ("psnr", "ssim") and metric not in models:
            continue
        _seed_everything(cfg.seed)
        try:
            values = _run_metric(metric, x, ref, models, cfg)
        except Exception as e:  # report the images and go on with the other metrics
            names = ", ".join(item.name for item, _, _ in batch)
            message = f"{metric}: failed on {names} ({str(e).strip() or type(e).__name__})"
            log.error("%s", message)
            report.errors.setdefault(metric, message)  # keep the first; all are logged
            continue
        for (item, _, _), v in zip(batch, values.reshape(len(batch)).tolist(), strict=True):
            item.scores[metric] = float(v)


def _run_metric(
    metric: str, x: torch.Tensor, ref: torch.Tensor | None, models: dict, cfg: EvalConfig
) -> torch.Tensor:
    if metric == "psnr":
        return psnr(x, ref, crop_border=cfg.crop_border, y_channel=cfg.y_channel)
    if metric == "ssim":
        return ssim(x, ref, crop_border=cfg.crop_border, y_channel=cfg.y_channel)
    with torch.no_grad():
        return models[metric](x, ref) if metric in FULL_REFERENCE else models[metric](x)


def _fid(cfg: EvalConfig, model: torch.nn.Module) -> float:
    """FID between the results folder and the GT folder (pyiqa's clean-fid mode)."""
    device = torch.device(cfg.device)
    kwargs = {"batch_size": cfg.batch_size, "num_workers": 0, "verbose": False}
    return float(model(str(cfg.results), str(cfg.gt), device=device, **kwargs))


def _score_blocks(
    items: list[Item], models: dict[str, torch.nn.Module], cfg: EvalConfig, dist: Dist
) -> list[tuple[int, dict[str, dict[str, float]], Report]]:
    """(block index, scores by image, what went wrong) of each block of this rank."""
    size, done = cfg.batch_size, []
    starts = range(dist.rank * size, len(items), dist.world_size * size)
    total = sum(len(items[start : start + size]) for start in starts)
    with tqdm(total=total, desc="evaluate", unit="img", disable=not dist.is_main) as bar:
        for start in starts:
            block = Report(items=items[start : start + size])
            for batch in _batches(_load(block.items, block), size):
                _score_batch(batch, models, cfg, block)
            done.append((start, {it.name: it.scores for it in block.items}, block))
            bar.update(len(block.items))
    return done


def _merge_blocks(report: Report, dist: Dist, blocks: list) -> None:
    """Every rank's blocks into `report`, in image order (as one process would fill it)."""
    merged = sorted((b for rank_blocks in all_gather(dist, blocks) for b in rank_blocks),
                    key=lambda b: b[0])  # fmt: skip
    scores = {
        name: values for _, block_scores, _ in merged for name, values in block_scores.items()
    }
    for item in report.items:
        item.scores = scores.get(item.name, {})
    for _, _, block in merged:
        report.unreadable += block.unreadable
        report.size_mismatch += block.size_mismatch
        for metric, message in block.errors.items():
            report.errors.setdefault(metric, message)


def evaluate(cfg: EvalConfig, dist: Dist = SINGLE) -> Report:
    """Pair, load and score every image of `cfg.results` (this rank's share, merged over the
    ranks); never stops on one bad metric/file."""
    items, missing = pair_images(cfg.results, cfg.gt)
    report = Report(items=items, missing_gt=missing)
    for name in missing:
        log.warning("no GT for %s: skipped for full-reference metrics", name)
    if cfg.gt is None:
        report.skipped_metrics = [m for m in cfg.metrics if m in (*FULL_REFERENCE, "fid")]
        if report.skipped_metrics:
            log.warning("no GT folder: skipping %s", ", ".join(report.skipped_metrics))
    models: dict[str, torch.nn.Module] = {}
    for metric in cfg.metrics:
        if metric in ("psnr", "ssim") or metric in report.skipped_metrics:
            continue
        try:
            models[metric] = build_pyiqa_metric(metric, cfg.device, cfg.metric_weights_dir)
        except MetricUnavailable as e:
            report.errors[metric] = str(e)
            log.error("%s", e)
    _merge_blocks(report, dist, _score_blocks(items, models, cfg, dist))
    if "fid" in models:
        fid, error = None, None
        if dist.is_main:
            try:
                fid = _fid(cfg, models["fid"])
            except Exception as e:  # e.g. too few images for a covariance
                error = f"fid: failed ({str(e).strip() or type(e).__name__})"
        report.fid, error = all_gather(dist, (fid, error))[0]
        if error:
            report.errors["fid"] = error
    return report


# --------------------------------------------------------------------------- outputs


def _versions() -> dict[str, str | None]:
    import cv2

    found: dict[str, str | None] = {"python": sys.version.split()[0], "opencv": cv2.__version__}
    for package in ("torch", "torchvision", "numpy", "pyiqa", "timm"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def summarize(report: Report, cfg: EvalConfig) -> dict:
    """The JSON summary: means, counts, skipped images, errors, settings and versions."""
    means: dict[str, float] = {}
    counts: dict[str, int] = {}
    for metric in cfg.metrics:
        values = [it.scores[metric] for it in report.items if metric in it.scores]
        counts[metric] = len(values)
        if values:
            means[metric] = float(np.mean(values))
    if report.fid is not None:  # a distance between the two sets, not a per-image mean
        means["fid"], counts["fid"] = report.fid, len(report.items)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()}
    settings["pyiqa_models"] = {m: PYIQA_NAMES[m] for m in cfg.metrics if m in PYIQA_NAMES}
    return {
        "means": means,
        "counts": counts,
        "images": len(report.items),
        "missing_gt": report.missing_gt,
        "size_mismatch": report.size_mismatch,
        "unreadable": report.unreadable,
        "errors": report.errors,
        "skipped_metrics": report.skipped_metrics,
        "settings": settings,
        "versions": _versions(),
    }


def _finite_or_str(value):
    """JSON has no inf/nan: write them as strings (PSNR of identical images is inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_or_str(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_str(v) for v in value]
    return value


def markdown_table(summary: dict) -> str:
    """A paper-style one-row table (arrows: which direction is better) and notes."""
    settings = summary["settings"]
    metrics = settings["metrics"]
    head = [f"{m.upper()}{'↓' if m in LOWER_IS_BETTER else '↑'}" for m in metrics]
    row = [f"{summary['means'][m]:.4f}" if m in summary["means"] else "–" for m in metrics]
    lines = [
        f"| results | {' | '.join(head)} |",
        f"|---|{'---|' * len(metrics)}",
        f"| {Path(settings['results']).name} | {' | '.join(row)} |",
        "",
        f"- images: {summary['images']}; per-metric counts: "
        + ", ".join(f"{m} {n}" for m, n in summary["counts"].items()),
        f"- PSNR/SSIM: {'Y channel (BT.601)' if settings['y_channel'] else 'RGB'}, "
        f"crop border {settings['crop_border']}",
    ]
    if summary["missing_gt"]:
        lines.append(f"- no GT (skipped for FR metrics): {', '.join(summary['missing_gt'])}")
    if summary["size_mismatch"]:
        names = ", ".join(
            f"{e['name']} {e['result']} vs GT {e['gt']}" for e in summary["size_mismatch"]
        )
        lines.append(f"- size mismatch (skipped for FR metrics): {names}")
    if summary["unreadable"]:
        lines.append(f"- unreadable: {', '.join(summary['unreadable'])}")
    if summary["skipped_metrics"]:
        lines.append(f"- skipped (no GT folder): {', '.join(summary['skipped_metrics'])}")
    lines += [f"- error: {message}" for message in summary["errors"].values()]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, report: Report, summary: dict, table: str) -> None:
    """metrics.csv (per image), summary.json and summary.md under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in summary["settings"]["metrics"] if m != "fid"]
    with open(out / "metrics.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "gt", *metrics])
        for it in report.items:
            gt = str(it.gt_path) if it.gt_path is not None else ""
            writer.writerow(
                [it.name, gt, *(repr(it.scores[m]) if m in it.scores else "" for m in metrics)]
            )
    text = json.dumps(_finite_or_str(summary), indent=2, ensure_ascii=False, allow_nan=False)
    (out / "summary.json").write_text(text + "\n", encoding="utf-8")
    (out / "summary.md").write_text(table, encoding="utf-8")


def evaluate_folder(
    cfg: EvalConfig, out: Path | None = None, dist: Dist = SINGLE
) -> tuple[Report, dict, str]:
    """`evaluate`, then the summary and its markdown table, written under `out` when given
    (by rank 0)."""
    report = evaluate(cfg, dist)
    if not report.items:
        log.error("%s: no images found (extensions %s)", cfg.results, ", ".join(IMAGE_EXTENSIONS))
    summary = summarize(report, cfg)
    table = markdown_table(summary)
    if out is not None and dist.is_main:
        write_outputs(out, report, summary, table)
    return report, summary, table
