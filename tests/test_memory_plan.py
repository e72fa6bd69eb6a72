"""`--max-memory`: tiles chosen from the cost model (model/pipelines/memory_plan.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from model.io.file_pages import release_file_pages
from model.pipelines.diffbir import DiffBIRPipeline
from model.pipelines.memory_plan import (
    COSTS,
    GIB,
    HALF_COSTS,
    HEADROOM,
    MemoryBudgetError,
    StageCost,
    chosen_tiles,
    plan_for_budget,
    plan_tiles,
    resident_bytes,
    stage_residents,
)
from model.pipelines.options import TILE_MULTIPLES, PipelineOptions

# 1 KiB per pixel per element byte for every stage, nothing fixed: easy to reason about
FLAT = {stage: StageCost(0.0, 1024.0) for stage in COSTS}
MIB = 2**20


def _everywhere(gb: float) -> dict[str, int]:
    return {stage: int(gb * GIB) for stage in COSTS}


def _plan(budget_gb: float, side: int = 2048, resident: float = 1.0, **options) -> dict:
    options.setdefault("cfg_scale", 1.0)  # no batched CFG branch unless asked
    planned = plan_tiles(PipelineOptions(**options), (side, side), budget_gb,
                         _everywhere(resident), 4, costs=FLAT)  # fmt: skip
    return chosen_tiles(planned)


def test_bf16_plans_with_its_own_measured_costs() -> None:
    """Under autocast the diffusion's bf16 activations take more bytes than half of fp32's: a
    bf16 2048² image at 6 GB (4 GiB resident) ran over with the fp32 table at 2 bytes, which
    left the diffusion untiled."""
    options, size, residents = PipelineOptions(max_memory_gb=6), (2048, 2048), _everywhere(4)
    naive = chosen_tiles(plan_tiles(options, size, 6, residents, 2, costs=COSTS))
    half = chosen_tiles(plan_for_budget(options, size, 1, residents, torch.bfloat16))
    assert naive["diffusion"] is None and half["diffusion"] is not None
    cost = HALF_COSTS["diffusion"]  # the tile fits the bf16 line with both CFG branches
    assert 4 * GIB + cost.bytes(half["diffusion"] ** 2, 2, batch=2) <= 6 * GIB * HEADROOM
    fp32 = chosen_tiles(plan_for_budget(options, size, 1, _everywhere(2), torch.float32))
    assert fp32 == chosen_tiles(plan_tiles(options, size, 6, _everywhere(2), 4, costs=COSTS))


def test_tiles_shrink_with_the_budget_and_vanish_when_the_image_fits() -> None:
    # 2048² px x 4 KiB = 16 GiB of activations, 1 GiB resident: fits in 90% of 19 GB
    assert set(_plan(19).values()) == {None} and set(_plan(18).values()) != {None}
    roomy, tight = _plan(10), _plan(2)
    for stage in COSTS:
        assert roomy[stage] is not None and tight[stage] is not None
        assert tight[stage] < roomy[stage] < 2048
        assert roomy[stage] % TILE_MULTIPLES[stage] == 0
        # the chosen tile fits, one multiple more would not
        used = 1 + 4 * 1024 * roomy[stage] ** 2 / GIB
        grown = 1 + 4 * 1024 * (roomy[stage] + TILE_MULTIPLES[stage]) ** 2 / GIB
        assert used <= 10 * HEADROOM < grown
    for budget in (1.9, 2.0, 2.3, 3.1, 4.7, 6.0):  # strides: half a tile, on the stage grid
        planned = plan_tiles(PipelineOptions(), (2048, 2048), budget, _everywhere(1), 4, costs=FLAT)
        for stage, multiple in TILE_MULTIPLES.items():
            tile, stride = (getattr(planned, f"{stage}_tile_{k}") for k in ("size", "stride"))
            assert stride % multiple == 0 and tile // 2 - multiple < stride <= tile // 2


def test_batched_cfg_doubles_the_diffusion_cost() -> None:
    single, batched = _plan(4, cfg_scale=1.0), _plan(4, cfg_scale=4.0)
    assert batched["diffusion"] < single["diffusion"]
    assert batched["stage1"] == single["stage1"]


def test_a_budget_below_the_smallest_tile_is_refused_with_the_numbers() -> None:
    with pytest.raises(MemoryBudgetError, match=r"--max-memory 1\.0 GB .* smallest .* resident"):
        _plan(1.0, resident=1.0)


def test_pipeline_records_the_tiles_it_chose(tiny_pipe: DiffBIRPipeline) -> None:
    lq = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    call = dict(upscale=2, min_short_side=64, steps=1)
    roomy = resident_bytes(tiny_pipe.device) / GIB + 50
    result = tiny_pipe(lq, max_memory_gb=roomy, **call)
    assert result.tiles == {stage: None for stage in COSTS}
    torch.testing.assert_close(result.images, tiny_pipe(lq, **call).images, atol=0, rtol=0)
    assert tiny_pipe(lq, **call).tiles is None
    with pytest.raises(MemoryBudgetError):
        tiny_pipe(lq, max_memory_gb=0.01, **call)


def _mapped_linear(tmp_path: Path, name: str, mib: int) -> nn.Linear:
    layer = nn.Linear(1024, mib * 256, bias=False, device="meta")
    torch.save({"weight": torch.randn(mib * 256, 1024)}, tmp_path / name)
    state = torch.load(tmp_path / name, mmap=True, weights_only=True)
    layer.load_state_dict(state, assign=True)
    return layer


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux page maps")
def test_paged_weights_count_in_the_stages_that_run_them(tmp_path: Path) -> None:
    big, small = _mapped_linear(tmp_path, "big.pt", 32), _mapped_linear(tmp_path, "small.pt", 8)
    networks = {"stage1": [big], "vae_encoder": [small], "vae_decoder": [small], "diffusion": []}
    cpu = torch.device("cpu")
    release_file_pages([big.weight, small.weight])
    paged = stage_residents(networks, cpu, idle_out=True)
    big.weight.sum(), small.weight.sum()  # every page resident now: the prediction holds
    again = stage_residents(networks, cpu, idle_out=True)
    kept = stage_residents(networks, cpu, idle_out=False)
    for stage in COSTS:
        assert abs(again[stage] - paged[stage]) < 4 * MIB
    assert abs(paged["stage1"] - paged["diffusion"] - 32 * MIB) < 2 * MIB
    assert abs(paged["vae_decoder"] - paged["diffusion"] - 8 * MIB) < 2 * MIB
    assert abs(kept["diffusion"] - paged["diffusion"] - 40 * MIB) < 2 * MIB
