"""Markdown tables of scripts/benchmark.py's JSON reports (the README's performance tables).

python -m scripts.benchmark --table results/bench/*.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PARTS = ("stage1", "text_encode_cold", "text_encode_cached", "vae_encode", "step", "vae_decode")
WHOLE = "whole_image"


def format_table(report: dict[str, Any]) -> str:
    """Median seconds per part and size, and the peak memory, as a markdown table."""
    head = ["size", *PARTS, WHOLE, "peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in report["results"]:
        size = "x".join(map(str, r["size"]))
        if "error" in r:
            lines.append(f"| {size} | {r['error']} |")
            continue
        parts = r.get("parts", {})  # --method diffir: the whole image only
        cells = [f"{parts[p]['seconds']['median']:.3f}" if p in parts else "-" for p in PARTS]
        whole = r[WHOLE]
        cells += [f"{whole['seconds']['median']:.3f}", f"{whole['peak_memory_bytes'] / 2**30:.2f}"]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(reports: list[dict[str, Any]], paths: list[Path]) -> str:
    """One row per benchmark JSON and size: settings, median seconds, peak memory."""
    head = ["file", "device", "precision", "weights", "size", "steps", "CFG", "whole s",
            "step s", "VAE dec s", "peak GiB", "4096² matmul s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for report, path in zip(reports, paths, strict=True):
        if "results" not in report:
            raise ValueError(
                f"{path}: not a timing report (--calibrate-memory / --precision-error)"
            )
        settings = report["settings"]
        for r in report["results"]:
            if "error" in r:
                continue
            parts = r.get("parts", {})
            med = {p: f"{v['seconds']['median']:.2f}" for p, v in parts.items()}
            diffir = settings.get("method") == "diffir"  # 4 IPR steps, no CFG
            steps = "4 (IPR)" if diffir else str(settings["options"]["steps"])
            cfg = "-" if diffir else f"{settings['options']['cfg_scale']:g}"
            cells = [path.name, report["device"]["name"], settings["precision"],
                     _weights(settings), "x".join(map(str, r["size"])), steps, cfg,
                     f"{r[WHOLE]['seconds']['median']:.1f}", med.get("step", "-"),
                     med.get("vae_decode", "-"), f"{r[WHOLE]['peak_memory_bytes'] / 2**30:.2f}",
                     f"{report.get('calib_mm_fp32_4096_seconds', float('nan')):.2f}"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _weights(settings: dict[str, Any]) -> str:
    """ "random" (built in memory) or "files" (loaded from --weights-dir, memory-mapped)."""
    return "random" if isinstance(settings.get("weights"), str) else "files"
