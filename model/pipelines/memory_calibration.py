"""Measure the activation memory of each stage (`model.pipelines.memory_plan.COSTS`).

Each stage runs alone on random inputs at a few sizes; its activations are the peak (CUDA
max allocated, or Linux's VmHWM reset before the call) minus what was resident before, and a
line through them gives (intercept, per_pixel), in elements (bytes / element size).
"""

from __future__ import annotations

import contextlib
import gc
import resource
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.io.file_pages import return_freed_blocks
from model.pipelines.diffbir import DiffBIRPipeline
from model.pipelines.memory_plan import resident_bytes
from model.pipelines.options import PipelineOptions

PROC = Path("/proc/self")


def reset_peak_memory(device: torch.device) -> None:
    """Open a new peak window: CUDA's peak statistics, or Linux's peak RSS (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif (PROC / "clear_refs").exists():
        with contextlib.suppress(OSError):
            (PROC / "clear_refs").write_text("5")  # VmHWM back to the current RSS


def peak_memory(device: torch.device) -> int:
    """Peak bytes since `reset_peak_memory`: allocated by torch on CUDA, process RSS on a CPU
    (the process's lifetime peak where VmHWM cannot be read)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    with contextlib.suppress(OSError):
        for line in (PROC / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB else


def activation_bytes(pipe: DiffBIRPipeline, run: Callable[[], Tensor]) -> int:
    """Peak bytes of `run()` above what was resident before it."""
    gc.collect()
    base = resident_bytes(pipe.device)
    reset_peak_memory(pipe.device)
    with torch.no_grad():
        run()
    return peak_memory(pipe.device) - base


def _stage_runs(pipe: DiffBIRPipeline, px: int) -> dict[str, Callable[[], Tensor]]:
    device, opts = pipe.device, PipelineOptions(upscale=1, min_short_side=px, progress=False)
    img = torch.rand(1, 3, px, px, device=device)
    z = torch.randn(1, 4, px // 8, px // 8, device=device)
    text = torch.zeros(1, 77, pipe.cldm.unet.config.cross_attention_dim, device=device)
    t = torch.full((1,), 500, device=device, dtype=torch.long)

    def diffusion() -> Tensor:
        with pipe._autocast():
            return pipe.cldm(z.to(pipe.dtype), t, {"c_txt": text, "c_img": z})

    return {
        "stage1": lambda: pipe.run_stage1(img, opts),
        "vae_encoder": lambda: pipe._vae_encode(img, opts),
        "vae_decoder": lambda: pipe._vae_decode(z, opts),
        "diffusion": diffusion,
    }


def calibrate(pipe: DiffBIRPipeline, sizes: Sequence[int] = (256, 512)) -> dict[str, Any]:
    """{stage: {"sizes", "activation_bytes", "intercept", "per_pixel"}} (elements)."""
    if pipe.device.type == "cpu":
        return_freed_blocks()
    element = torch.finfo(pipe.dtype).bits // 8
    measured: dict[str, list[int]] = {}
    paging, pipe.page_idle_weights = pipe.page_idle_weights, False  # weights stay resident
    try:
        for px in sizes:
            for stage, run in _stage_runs(pipe, px).items():
                run()  # warm-up: lazy allocations and kernels, the weights' pages read
                measured.setdefault(stage, []).append(activation_bytes(pipe, run))
    finally:
        pipe.page_idle_weights = paging
    pixels = [px * px for px in sizes]
    report = {}
    for stage, values in measured.items():
        slope = (values[-1] - values[0]) / (pixels[-1] - pixels[0])
        intercept = values[0] - slope * pixels[0]
        report[stage] = {"sizes": list(sizes), "activation_bytes": values,
                         "intercept": max(intercept, 0.0) / element, "per_pixel": slope / element}  # fmt: skip
    return report
