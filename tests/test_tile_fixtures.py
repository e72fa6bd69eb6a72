"""Tiled diffusion against the original's tile fixtures: Gaussian weights, windows, one tiled
evaluation and a whole tiled run; and the original's ×8 padding when tiling is on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.diffusion.cfg import classifier_free_guidance
from model.diffusion.spaced_ddpm import SpacedSampler
from model.diffusion.tiled import tiled_model_fn
from model.ops.tiling import gaussian_weights, tile_starts
from model.pipelines.diffbir import DiffBIRPipeline
from model.pipelines.options import PipelineOptions
from tests import sampling_reference as ref


def _normalised(w: torch.Tensor) -> torch.Tensor:
    return w.double() / w.double().max()


@pytest.mark.parametrize("case_id", ref.case_ids("tiles")[:3])
def test_original_weights_match_and_symmetric_ones_are_centred(case_id: str) -> None:
    c = ref.case(case_id)
    h, w = c["tile_height"], c["tile_width"]
    want = _normalised(ref.case_tensor(c, "weights"))
    original = _normalised(gaussian_weights(h, w, centre="original"))
    torch.testing.assert_close(original, want, rtol=1e-6, atol=1e-7)
    symmetric = _normalised(gaussian_weights(h, w))
    # same x profile; y mirrored about the centre (the original's is half a pixel off)
    torch.testing.assert_close(
        symmetric[h // 2], want[h // 2] / want[h // 2].max(), rtol=1e-6, atol=0
    )
    assert torch.allclose(symmetric, symmetric.flip(0)) and not torch.allclose(want, want.flip(0))


def test_sliding_windows_are_the_originals() -> None:
    c = ref.case("tiles/sliding_windows/25x33_tile16_stride8")
    windows = ref.case_tensor(c, "windows").tolist()
    ours = [[y, y + 16, x, x + 16] for y in tile_starts(25, 16, 8) for x in tile_starts(33, 16, 8)]
    assert sorted(ours) == sorted(windows)


def test_one_tiled_evaluation_matches_the_original() -> None:
    c = ref.case("tiles/eval/25x33_tile16_stride8")
    cond, _ = ref.conditions(ref.case_tensor(c, "c_img"))
    model_fn = tiled_model_fn(ref.standin(c["schedule"]), 16, c["tile_stride"], weights="original")
    x = ref.case_tensor(c, "x")
    t = torch.full((x.shape[0],), c["t"], dtype=torch.long)
    ref.assert_matches(model_fn(x, t, cond), c, "out")
    batched = tiled_model_fn(ref.standin(c["schedule"]), 16, 8, 5, weights="original")
    ref.assert_matches(batched(x, t, cond), c, "out")
    # the symmetric weights give a slightly different blend, both far from the untiled output
    symmetric = tiled_model_fn(ref.standin(c["schedule"]), 16, c["tile_stride"])(x, t, cond)
    gap = (symmetric - ref.case_tensor(c, "out")).abs().max()
    assert 0 < gap < (ref.case_tensor(c, "untiled_out") - ref.case_tensor(c, "out")).abs().max()


def test_a_tiled_spaced_run_matches_the_original() -> None:
    c = ref.case("tiles/spaced/25x33_tile16_stride8/s10_cfg4")
    cond, uncond = ref.conditions(ref.case_tensor(c, "c_img"))
    diffusion = ref.diffusion_for(c["schedule"])
    tiled = tiled_model_fn(ref.standin(c["schedule"]), 16, c["tile_stride"], weights="original")
    model_fn = classifier_free_guidance(tiled, uncond, c["cfg_scale"], c.get("rescale_cfg", False))
    sampler = SpacedSampler.from_diffusion(diffusion)
    noise = list(ref.case_tensor(c, "noise"))
    out = sampler.sample(model_fn, ref.case_tensor(c, "x_T"), c["steps"], cond, noise=noise,
                         progress=False)  # fmt: skip
    ref.assert_matches(out, c)


def test_tiling_pads_the_condition_to_8_not_64(tiny_weights: Path) -> None:
    assert PipelineOptions().pad_multiple() == 64
    assert PipelineOptions(diffusion_tile_size=64).pad_multiple() == 8
    assert PipelineOptions(vae_encoder_tile_size=64).pad_multiple() == 8
    pipe = DiffBIRPipeline.from_pretrained(
        "v2.1", "sr", weights_dir=tiny_weights, offline=True, device="cpu",
        model_config=tiny_weights / "tiny_config.yaml",
    )  # fmt: skip
    shapes = []
    for tiles in ({}, {"diffusion_tile_size": 128}):
        pipe(torch.rand(1, 3, 34, 36), upscale=4, min_short_side=64, steps=1, cfg_scale=1,
             callback=lambda k, t, z: shapes.append(tuple(z.shape[-2:])), **tiles)  # fmt: skip
    # I_reg is 136x144: x64 padding gives a 24x24 latent, x8 padding a 17x18 one
    assert shapes == [(24, 24), (17, 18)]
