"""`--max-memory GB`: tile sizes chosen so that the peak stays under a budget, for any input size.

Each stage's peak is modelled as what is resident while it runs plus its activations. What is
resident is measured live (process RSS on a CPU, torch's allocated bytes on CUDA), less the
weights that come and go, plus those the stage runs (`stage_residents`): memory-mapped weights
fault in on first use and are paged out when idle, offloaded networks move to the GPU only
while they run. The activations are linear in the
pixels of one tile: `intercept + per_pixel * pixels` (scaled by the batch, and doubled for the
batched CFG branches of the diffusion network). The coefficients were measured with full-size
random weights by `python -m scripts.benchmark --calibrate-memory` (results/bench/memory_*.json),
per pixel and per element of the run's precision: one table for fp32, one for bf16 and fp16
(under autocast the activations are not simply half as large).

For each stage the largest tile (a multiple of the stage's tile multiple, down to its minimum)
whose predicted peak fits is chosen; the whole image when it fits untiled. A budget below the
smallest tile of some stage is refused with the numbers.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from model.io.file_pages import pageable_bytes
from model.ops.sizing import short_side_size
from model.pipelines.options import TILE_MULTIPLES, PipelineOptions

logger = logging.getLogger(__name__)

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class StageCost:
    """Activation bytes of one stage call: (intercept + per_pixel * pixels) * element bytes,
    pixels in the stage's tile space (see `TILE_SPACE`)."""

    intercept: float
    per_pixel: float

    def bytes(self, pixels: int, element_bytes: int, batch: int = 1) -> float:
        return (self.intercept + self.per_pixel * pixels * batch) * element_bytes


# Measured on the CPU (2 cores, torch 2.14.1, full-size random weights; results/bench/memory_*.json
# hold the raw peaks), in elements per pixel of the stage input (stage1: processing size; VAE
# and diffusion: image pixels of a tile) and of the run's element size. GPU coefficients have
# not been measured: the same per-element figures are used there.
# fp32, fitted through 256 and 512 px:
COSTS: dict[str, StageCost] = {
    "stage1": StageCost(intercept=1.2e5, per_pixel=262.0),
    "vae_encoder": StageCost(intercept=1.4e5, per_pixel=643.0),
    "vae_decoder": StageCost(intercept=1.7e7, per_pixel=702.0),
    "diffusion": StageCost(intercept=2.9e7, per_pixel=62.0),
}
# bf16 (2-byte elements; fp16 too), fitted through 256 and 1024 px: the diffusion's activations
# grow faster than its pixels (256 -> 512 -> 1024 px: 56, 83, 331 MiB), so the wider line
# covers the tiles of large images, and under autocast its fp32 norms and casts take more
# bytes than in fp32.
HALF_COSTS: dict[str, StageCost] = {
    "stage1": StageCost(intercept=0.0, per_pixel=272.0),
    "vae_encoder": StageCost(intercept=8.0e5, per_pixel=646.0),
    "vae_decoder": StageCost(intercept=2.5e7, per_pixel=747.0),
    "diffusion": StageCost(intercept=2.0e7, per_pixel=147.0),
}
# Smallest tiles worth running (image pixels); diffusion tiles below 256 lose global coherence.
MIN_TILES = {"stage1": 128, "vae_encoder": 128, "vae_decoder": 128, "diffusion": 256}


# Predicted peaks are kept under this share of the budget. Against measured peaks (CPU, fp32,
# full-size weights from files) the model was 3% low at 512² and 13% low for the tiled
# diffusion at 2048² (README, "Performance and memory").
HEADROOM = 0.9


class MemoryBudgetError(ValueError):
    """A budget below the smallest tile of some stage."""


def resident_bytes(device: torch.device) -> int:
    """What is resident now: process RSS on a CPU, torch's allocated bytes on CUDA."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def network_bytes(module: nn.Module, device: torch.device) -> tuple[int, int]:
    """(resident now, resident while it runs) of the weights of `module` that come and go: its
    file pages on a CPU, its bytes on an accelerator (where it may be offloaded)."""
    tensors = list(itertools.chain(module.parameters(), module.buffers()))
    if device.type == "cpu":
        return pageable_bytes(tensors)
    sizes = [(t.numel() * t.element_size(), t.device.type == device.type) for t in tensors]
    return sum(size for size, there in sizes if there), sum(size for size, _ in sizes)


def stage_networks(
    stage1: nn.Module, cldm: nn.Module | None, rgb_guidance: bool = False
) -> dict[str, list[nn.Module]]:
    """{stage: the networks it runs} of a pipeline (the VAE in the diffusion too with RGB
    guidance); a stage-1-only pipeline runs nothing in the other stages."""
    networks: dict[str, list[nn.Module]] = {stage: [] for stage in COSTS}
    networks["stage1"] = [stage1]
    if cldm is not None:
        networks.update(vae_encoder=[cldm.vae], vae_decoder=[cldm.vae],
                        diffusion=[cldm.unet, cldm.controlnet] + [cldm.vae] * rgb_guidance)  # fmt: skip
    return networks


def stage_residents(
    networks: Mapping[str, Sequence[nn.Module]], device: torch.device, idle_out: bool
) -> dict[str, int]:
    """{stage: bytes resident while it runs}: what is resident now, less the weights of
    `networks` ({stage: the networks it runs}) that come and go, plus those of the stage's own
    networks (of all of them unless idle networks are out: `idle_out`)."""
    every = {id(m): m for modules in networks.values() for m in modules}
    sizes = {key: network_bytes(module, device) for key, module in every.items()}
    base = resident_bytes(device) - sum(now for now, _ in sizes.values())
    return {
        stage: base + sum(sizes[id(m)][1] for m in (modules if idle_out else every.values()))
        for stage, modules in networks.items()
    }


def check_budget(budget_gb: float, residents: Mapping[str, int]) -> None:
    """Refuse a budget that the weights alone exceed (before any image is run)."""
    resident = max(residents.values())
    if budget_gb <= 0 or resident >= budget_gb * GIB * HEADROOM:
        raise MemoryBudgetError(
            f"--max-memory {budget_gb:g} GB is below what is resident while the networks run "
            f"({resident / GIB:.1f} GB) and a {1 - HEADROOM:.0%} margin; raise it or use a "
            "lower --precision"
        )


def _largest_tile(
    stage: str, side: int, budget: float, resident: float, element_bytes: int, batch: int,
    costs: Mapping[str, StageCost],
) -> int | None:  # fmt: skip
    """The largest tile side of `stage` that fits (None: the whole `side`x`side` fits)."""
    cost, multiple = costs[stage], TILE_MULTIPLES[stage]

    def fits(tile: int) -> bool:
        return resident + cost.bytes(tile * tile, element_bytes, batch) <= budget

    if fits(side):
        return None
    smallest = max(MIN_TILES[stage], multiple)
    tile = (side // multiple) * multiple
    while tile >= smallest:
        if fits(tile):
            return tile
        tile -= multiple
    need = resident + cost.bytes(smallest * smallest, element_bytes, batch)
    raise MemoryBudgetError(
        f"--max-memory {budget / HEADROOM / GIB:.1f} GB (less a {1 - HEADROOM:.0%} margin) "
        f"is below what the smallest {stage} tile "
        f"({smallest} px) needs: {need / GIB:.1f} GB ({resident / GIB:.1f} GB resident weights)"
    )


def plan_tiles(
    options: PipelineOptions,
    processing_hw: tuple[int, int],
    budget_gb: float,
    residents: Mapping[str, float],
    element_bytes: int,
    batch: int = 1,
    costs: Mapping[str, StageCost] = COSTS,
) -> PipelineOptions:
    """`options` with tile sizes (stride: half a tile) such that each stage's predicted peak
    stays under `budget_gb`, for an input processed at `processing_hw` (`residents`: the bytes
    resident while each stage runs)."""
    budget = budget_gb * GIB * HEADROOM
    side = max(processing_hw)
    cfg = 2 if options.cfg_scale != 1 and options.cfg_batched else 1
    batches = {"stage1": batch, "vae_encoder": batch, "vae_decoder": batch,
               "diffusion": batch * cfg * options.diffusion_tile_batch_size}  # fmt: skip
    chosen = {
        stage: _largest_tile(
            stage, side, budget, residents[stage], element_bytes, batches[stage], costs
        )
        for stage in COSTS
    }
    fields = {}
    for stage, tile in chosen.items():
        fields[f"{stage}_tile_size"] = tile
        multiple = TILE_MULTIPLES[stage]  # half a tile, on the stage's grid
        fields[f"{stage}_tile_stride"] = (
            None if tile is None else max(multiple, tile // 2 // multiple * multiple)
        )
    logger.info(
        "--max-memory %.1f GB at %dx%d: tiles %s (resident GB %s)", budget_gb, *processing_hw,
        chosen, {s: round(r / GIB, 1) for s, r in residents.items()},
    )  # fmt: skip
    return dataclasses.replace(options, **fields)


def plan_for_budget(
    options: PipelineOptions,
    out_size: tuple[int, int],
    batch: int,
    residents: Mapping[str, int],
    dtype: torch.dtype,
) -> PipelineOptions:
    """`plan_tiles` for one pipeline call at output size `out_size` (processing size: short
    side at least `options.min_short_side`)."""
    h, w = out_size
    side = options.min_short_side
    processing = (h, w) if min(h, w) >= side else short_side_size(h, w, side)
    element = torch.finfo(dtype).bits // 8
    costs = COSTS if element == 4 else HALF_COSTS
    return plan_tiles(options, processing, options.max_memory_gb, residents, element, batch, costs)


def chosen_tiles(options: PipelineOptions) -> dict[str, int | None]:
    """{stage: tile side or None (whole)} of `options`, as recorded in sidecars."""
    return {stage: getattr(options, f"{stage}_tile_size") for stage in COSTS}
