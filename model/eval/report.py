"""An HTML comparison page: metric tables of several methods and side-by-side crops.

Images of the columns (LQ / stage 1 / each method / GT) are matched by relative path without
extension, falling back to a unique file stem (as `model.eval.scoring` pairs results and GT).
The same region is cut from every image, scaled to each image's size (an x4 LQ gets a crop a
quarter as large), and shown at one display size; every crop links to its full image. Metric
tables come from `model.eval.scoring`'s summary.json files, per-image scores from the
metrics.csv next to them. The CLI is `scripts/make_report.py`.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np

from model.eval.scoring import LOWER_IS_BETTER, list_images
from model.io.images import ImageReadError, read_image

log = logging.getLogger(__name__)

_STYLE = """body{font-family:sans-serif;margin:1em}
table{border-collapse:collapse;margin-bottom:1.5em}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:center;vertical-align:top}
img{image-rendering:pixelated;display:block}.score{font-size:80%;color:#444}"""


@dataclass(frozen=True)
class ReportConfig:
    """Inputs of one report.

    Args:
        out: output folder (index.html and, unless `embed`, crops/).
        columns: (title, folder) pairs in display order.
        summaries: (method, summary.json path) pairs, one table row each.
        crop_size: side of the centred crop in pixels of the largest image of a row (0: whole).
        display_size: side in pixels at which every crop is shown.
        max_images: number of rows (None: all).
        embed: put the crops into the page as base64 PNG instead of files.
        title: page title.
    """

    out: Path
    columns: tuple[tuple[str, Path], ...]
    summaries: tuple[tuple[str, Path], ...] = ()
    crop_size: int = 128
    display_size: int = 256
    max_images: int | None = None
    embed: bool = False
    title: str = "Restoration report"


def index_folder(root: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """Images of `root` by relative path without extension, and by file stem."""
    by_key: dict[str, Path] = {}
    by_stem: dict[str, list[Path]] = {}
    for p in list_images(root):
        by_key.setdefault(p.relative_to(root).with_suffix("").as_posix(), p)
        by_stem.setdefault(p.stem, []).append(p)
    return by_key, by_stem


def match_rows(columns: tuple[tuple[str, Path], ...]) -> list[tuple[str, dict[str, Path]]]:
    """(row key, {column title: image}) for every image of the first non-empty column."""
    indexes = {title: index_folder(folder) for title, folder in columns}
    keys = next((list(ix[0]) for ix in indexes.values() if ix[0]), [])
    rows = []
    for key in keys:
        stem = Path(key).name
        found = {}
        for title, (by_key, by_stem) in indexes.items():
            path = by_key.get(key) or (
                by_stem[stem][0] if len(by_stem.get(stem, [])) == 1 else None
            )
            if path is not None:
                found[title] = path
        rows.append((key, found))
    return rows


def crop_region(img: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Cut `box` = (top, left, height, width) given as fractions of the image size."""
    h, w = img.shape[:2]
    top, left = round(box[0] * h), round(box[1] * w)
    ch, cw = max(1, round(box[2] * h)), max(1, round(box[3] * w))
    return img[top : top + ch, left : left + cw]


def to_display(img: np.ndarray, size: int) -> np.ndarray:
    """Scale so the long side is `size`: nearest when enlarging (pixels stay visible)."""
    scale = size / max(img.shape[:2])
    dsize = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
    interpolation = cv2.INTER_NEAREST if scale >= 1 else cv2.INTER_AREA
    return cv2.resize(img, dsize, interpolation=interpolation)


def _png_bytes(img: np.ndarray) -> bytes:
    bgr = (np.clip(img[:, :, ::-1], 0, 1) * 255).round().astype(np.uint8)
    ok, encoded = cv2.imencode(".png", bgr)
    if not ok:
        raise OSError("PNG encoding failed")
    return encoded.tobytes()


def _crop_box(images: dict[str, np.ndarray], crop_size: int) -> tuple[float, ...]:
    """The centred crop as fractions, measured on the largest image of the row."""
    h, w = max((img.shape[:2] for img in images.values()), key=lambda s: s[0] * s[1])
    ch, cw = (h, w) if crop_size <= 0 else (min(crop_size, h), min(crop_size, w))
    return ((h - ch) // 2 / h, (w - cw) // 2 / w, ch / h, cw / w)


def read_scores(summary: Path) -> dict[str, dict[str, str]]:
    """Per-image scores of the metrics.csv next to a summary.json, by name without extension."""
    path = summary.with_name("metrics.csv")
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {Path(row.pop("image")).with_suffix("").as_posix(): row for row in csv.DictReader(f)}


def _as_float(value: object) -> float | None:
    try:
        number = float(value)  # JSON writes inf as the string "inf"
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


# --------------------------------------------------------------------------- HTML


def metrics_table(summaries: dict[str, dict]) -> str:
    """One row per method, one column per metric (arrow: better direction), best in bold."""
    metrics: list[str] = []
    for summary in summaries.values():
        for m in [*summary["settings"]["metrics"], *summary["means"]]:
            if m not in metrics:
                metrics.append(m)
    values = {
        name: {m: _as_float(s["means"].get(m)) for m in metrics} for name, s in summaries.items()
    }
    best = {}
    for m in metrics:
        column = [v[m] for v in values.values() if v[m] is not None]
        if column:
            best[m] = min(column) if m in LOWER_IS_BETTER else max(column)
    arrows = {m: "↓" if m in LOWER_IS_BETTER else "↑" for m in metrics}
    head = "".join(f"<th>{html.escape(m.upper())}{arrows[m]}</th>" for m in metrics)
    lines = [f"<table><tr><th>method</th><th>images</th>{head}</tr>"]
    for name, summary in summaries.items():
        cells = []
        for m in metrics:
            v = values[name][m]
            text = "–" if v is None else f"{v:.4f}"
            cells.append(
                f"<td><b>{text}</b></td>" if v is not None and v == best[m] else f"<td>{text}</td>"
            )
        lines.append(
            f"<tr><th>{html.escape(name)}</th><td>{summary['images']}</td>{''.join(cells)}</tr>"
        )
    return "\n".join([*lines, "</table>"])


def _href(path: Path, out: Path) -> str:
    return quote(Path(os.path.relpath(path.resolve(), out.resolve())).as_posix())


def _cell(
    cfg: ReportConfig, column: int, key: str, path: Path, img: np.ndarray, caption: str
) -> str:
    data = _png_bytes(img)
    if cfg.embed:
        src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    else:
        crop_path = cfg.out / "crops" / f"c{column}" / f"{key}.png"
        crop_path.parent.mkdir(parents=True, exist_ok=True)
        crop_path.write_bytes(data)
        src = _href(crop_path, cfg.out)
    tip = html.escape(str(path))
    return (
        f'<td><a href="{_href(path, cfg.out)}" title="{tip}"><img src="{src}" alt="{tip}"></a>'
        f'<div class="score">{html.escape(caption)}</div></td>'
    )


def crops_table(cfg: ReportConfig, scores: dict[str, dict[str, dict[str, str]]]) -> str:
    """The side-by-side crops, one row per image."""
    rows = match_rows(cfg.columns)[: cfg.max_images]
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in cfg.columns)
    lines = [f"<table><tr><th>image</th>{head}</tr>"]
    for key, paths in rows:
        images = {}
        for title, path in paths.items():
            try:
                images[title] = read_image(path)
            except ImageReadError as e:
                log.error("%s", e)
        box = _crop_box(images, cfg.crop_size) if images else None
        cells = []
        for column, (title, _) in enumerate(cfg.columns):
            if title not in images:
                cells.append("<td>–</td>")
                continue
            shown = to_display(crop_region(images[title], box), cfg.display_size)
            row_scores = scores.get(title, {}).get(key, {})
            caption = " · ".join(
                f"{m} {_as_float(v):.4g}" for m, v in row_scores.items() if _as_float(v) is not None
            )
            cells.append(_cell(cfg, column, key, paths[title], shown, caption))
        lines.append(f"<tr><th>{html.escape(key)}</th>{''.join(cells)}</tr>")
    return "\n".join([*lines, "</table>"])


def build_report(cfg: ReportConfig) -> Path:
    """Write `cfg.out`/index.html (and the crops); returns the page's path."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    summaries = {name: json.loads(path.read_text(encoding="utf-8")) for name, path in cfg.summaries}
    scores = {name: read_scores(path) for name, path in cfg.summaries}
    title = html.escape(cfg.title)
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>",
        f"<style>{_STYLE}</style></head><body><h1>{title}</h1>",
    ]
    if summaries:
        parts += ["<h2>Metrics</h2>", metrics_table(summaries)]
    crop = "whole images" if cfg.crop_size <= 0 else f"centre {cfg.crop_size}px crops"
    parts += [f"<h2>Images ({crop}; click for the full image)</h2>", crops_table(cfg, scores)]
    page = cfg.out / "index.html"
    page.write_text("\n".join([*parts, "</body></html>"]) + "\n", encoding="utf-8")
    return page
