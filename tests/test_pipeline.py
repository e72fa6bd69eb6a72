"""The restoration pipeline on tiny random weights (scripts/make_tiny_weights.py), CPU, fp32.

Images are kept at most 64 pixels after the upscale (min_short_side 32), so one call is one
stage-1 window, an 8×8 latent and two sampling steps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import load_fixture
from torch import nn

from model.diffusion.latent_guidance import LatentGuidance
from model.diffusion.samplers import SAMPLERS
from model.io.weights import REGISTRY
from model.nets.stage1 import Stage1Model
from model.ops.color_fix import color_fix
from model.ops.sizing import short_side_size
from model.pipelines import options as pipeline_options
from model.pipelines.diffbir import DiffBIRPipeline
from model.pipelines.loading import load_pipeline
from model.pipelines.options import DEFAULT_NEG_PROMPT, DEFAULT_POS_PROMPT, PipelineOptions
from model.pipelines.presets import TASKS, VERSIONS, build_diffusion, model_spec, read_model_config

FAST = PipelineOptions(upscale=2, min_short_side=32, steps=2)


@pytest.fixture(scope="module")
def pipe(tiny_pipe: DiffBIRPipeline) -> DiffBIRPipeline:
    return tiny_pipe  # conftest: session-scoped, on the session's tiny weights


def _lq(seed: int = 0, h: int = 16, w: int = 24, batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _restore(pipe: DiffBIRPipeline, lq: torch.Tensor, **changes) -> torch.Tensor:
    return pipe.restore(lq, dataclasses.replace(FAST, **changes)).images


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_and_is_deterministic(pipe: DiffBIRPipeline, sampler: str) -> None:
    lq = _lq()
    options = dataclasses.replace(FAST, sampler=sampler, seed=7)
    latents = []
    first = pipe.restore(lq, options, callback=lambda step, t, z: latents.append(z)).images
    assert first.shape == (1, 3, 32, 48)
    # one report per step; diffusers' Heun reports each of its 2·steps − 1 scheduler timesteps
    assert len(latents) == (3 if sampler == "heun" else 2)
    # The output is the sampler's final latent, decoded, colour-fixed against the stage-1 image
    # and only then clamped: rebuild the unclamped image from the last step's latent. (The
    # clamp alone would hide a wrong value range or a latent that is not the sampler's result.)
    decoded = (pipe.cldm.vae_decode(latents[-1])[..., :32, :48] + 1) / 2
    unclamped = color_fix(decoded, pipe.run_stage1(lq, options), "wavelet")
    torch.testing.assert_close(first, unclamped.clamp(0, 1), atol=1e-5, rtol=0)
    # a restored image, not a saturated or flat one (random weights: ~10% of pixels clipped)
    assert ((unclamped < 0) | (unclamped > 1)).float().mean() < 0.3 and unclamped.std() > 0.05
    torch.testing.assert_close(_restore(pipe, lq, sampler=sampler, seed=7), first, atol=0, rtol=0)
    assert not torch.equal(_restore(pipe, lq, sampler=sampler, seed=8), first)


@pytest.mark.parametrize(
    ("h", "w", "upscale", "expected"),
    [(37, 53, 2.0, (74, 106)), (19, 27, 1.5, (28, 40)), (40, 13, 1.0, (40, 13))],
)
def test_output_sizes(pipe: DiffBIRPipeline, h: int, w: int, upscale: float, expected) -> None:
    # 37×53 ×2 is processed at 74×106 (padded 128×128); 13 px wide is raised to 32 and back.
    options = dataclasses.replace(FAST, upscale=upscale, steps=1)
    result = pipe.restore(_lq(1, h, w), options)
    assert result.images.shape[-2:] == expected and result.stage1.shape[-2:] == expected
    assert pipe.run_stage1(_lq(1, h, w), options).shape[-2:] == (
        expected if min(expected) >= 32 else short_side_size(*expected, 32)
    )


def test_seed_per_image_is_independent_of_the_batch(pipe: DiffBIRPipeline) -> None:
    lq = _lq(2, batch=2)
    for sampler in ("edm_dpm++_3m_sde", "spaced"):
        options = dataclasses.replace(FAST, sampler=sampler)
        both = pipe.restore(lq, options, seeds=[3, 4])
        assert both.seeds == [3, 4]
        alone = pipe.restore(lq[1:], options, seeds=[4]).images
        # Batched matmuls round differently (~1e-4 after the random tiny network); a shared
        # random stream would change the image by ~0.1.
        torch.testing.assert_close(both.images[1:], alone, atol=1e-3, rtol=0)
        assert not torch.allclose(both.images[0], both.images[1], atol=1e-3)


TILES_ONE = dict(stage1_tile_size=64, vae_encoder_tile_size=64, vae_decoder_tile_size=64,
                 diffusion_tile_size=64)  # fmt: skip
TILES_MANY = dict(stage1_tile_size=64, stage1_tile_stride=32, vae_encoder_tile_size=64,
                  vae_encoder_tile_stride=32, vae_decoder_tile_size=64, vae_decoder_tile_stride=32,
                  diffusion_tile_size=64, diffusion_tile_stride=32, diffusion_tile_batch_size=2)  # fmt: skip


def test_tiles_covering_the_image_equal_untiled(pipe: DiffBIRPipeline) -> None:
    # Tolerance: exact up to float noise (1e-6) — one tile is the untiled computation. The
    # processing size (64×64) is a multiple of 64, so the ×8 padding of tiled runs and the ×64
    # padding of untiled ones agree.
    lq = _lq(3, 32, 32)
    torch.testing.assert_close(
        _restore(pipe, lq, **TILES_ONE), _restore(pipe, lq), atol=1e-6, rtol=0
    )


def test_tiles_smaller_than_the_image(
    pipe: DiffBIRPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 48×60 ×2 -> 96×120, padded to ×8 as the original does when tiling (a 12×15 latent): 2×3
    # diffusion tiles of 64 px. (With batched CFG every call has a batch of at least 2: the
    # tiny UNet's 1×1 bottom level cannot normalise a single 8×8 tile.)
    calls = []
    forward = pipe.cldm.forward
    monkeypatch.setattr(
        pipe.cldm, "forward", lambda x, t, c: calls.append(x.shape) or forward(x, t, c)
    )
    lq = _lq(4, 48, 60)
    tiled = _restore(pipe, lq, **TILES_MANY)
    assert tiled.shape == (1, 3, 96, 120) and torch.isfinite(tiled).all()
    # 2 steps × 6 tiles, 2 tiles per call -> 3 calls per step on 8×8 latent tiles, CFG doubled
    assert [shape[0] for shape in calls] == [4, 4, 4] * 2
    assert all(shape[-2:] == (8, 8) for shape in calls)
    untiled = _restore(pipe, lq)
    # the untiled run pads to 128×128 (other border content): close, not equal
    assert (tiled - untiled).abs().mean() < 0.3


def test_stage1_tiles(pipe: DiffBIRPipeline) -> None:
    lq = _lq(5, 70, 100)  # padded to 128×128: 3×3 tiles of 64
    options = dataclasses.replace(FAST, upscale=1)
    whole = pipe.run_stage1(lq, options)
    one = pipe.run_stage1(lq, dataclasses.replace(options, stage1_tile_size=128))
    torch.testing.assert_close(one, whole, atol=1e-6, rtol=0)
    many = pipe.run_stage1(
        lq, dataclasses.replace(options, stage1_tile_size=64, stage1_tile_stride=32)
    )
    assert many.shape == whole.shape and torch.isfinite(many).all()


def test_guidance_scale_zero_equals_no_guidance(pipe: DiffBIRPipeline) -> None:
    lq = _lq(6)
    plain = _restore(pipe, lq)
    off = LatentGuidance(scale=0.0, loss="weighted_mse")
    torch.testing.assert_close(_restore(pipe, lq, guidance=off), plain, atol=0, rtol=0)
    for space in ("latent", "rgb"):
        on = LatentGuidance(scale=0.05, space=space, loss="mse", repeat=2)
        guided = _restore(pipe, lq, guidance=on)
        assert torch.isfinite(guided).all() and not torch.allclose(guided, plain, atol=1e-4)


def test_classifier_free_guidance_variants(pipe: DiffBIRPipeline) -> None:
    # a batch of 2: the tiny UNet cannot normalise a single 8×8 latent at its 1×1 bottom level
    lq = _lq(7, batch=2)
    batched = _restore(pipe, lq, cfg_scale=4.0)
    # batch 2B vs B calls: matmul rounding only (~1e-4 after scaling the branch difference by 4)
    torch.testing.assert_close(
        _restore(pipe, lq, cfg_scale=4.0, cfg_batched=False), batched, atol=1e-3, rtol=0
    )
    # scale 1: the negative prompt is never used
    single = _restore(pipe, lq, cfg_scale=1.0)
    torch.testing.assert_close(
        _restore(pipe, lq, cfg_scale=1.0, neg_prompt="other"), single, atol=0, rtol=0
    )
    assert not torch.allclose(single, batched, atol=1e-4)
    rescaled = _restore(pipe, lq, cfg_scale=4.0, rescale_cfg=True)
    torch.testing.assert_close(
        _restore(pipe, lq, cfg_scale=4.0, rescale_cfg=True, cfg_batched=False),
        rescaled,
        atol=1e-3,
        rtol=0,
    )


def test_prompts_strength_start_noise_aug_and_colour_fix_matter(pipe: DiffBIRPipeline) -> None:
    lq = _lq(8)
    plain = _restore(pipe, lq)
    assert pipe.cldm.control_scales == [1.0] * len(pipe.cldm.control_scales)
    variants = dict(pos_prompt="a cat", control_strength=0.3, noise_aug=300,
                    color_fix="adain", sampler="ddim")  # fmt: skip
    for key, value in variants.items():
        changed = _restore(pipe, lq, **{key: value})
        assert not torch.allclose(changed, plain, atol=1e-4), key
    assert pipe.cldm.control_scales == [1.0] * len(pipe.cldm.control_scales)  # restored
    # an empty caption leaves the prompt unchanged; a caption is prepended
    captioned = pipe.restore(lq, FAST, captions=[""]).images
    torch.testing.assert_close(captioned, plain, atol=0, rtol=0)
    assert not torch.allclose(pipe.restore(lq, FAST, captions=["a dog"]).images, plain, atol=1e-4)


def test_start_from_the_condition_latent(pipe: DiffBIRPipeline) -> None:
    lq = _lq(12)
    # v2.1 has zero terminal SNR: q_sample(c_img, 999) is pure noise, so "cond" = "noise" for
    # the spaced sampler, which starts at t = 999
    spaced = dataclasses.replace(FAST, sampler="spaced")
    cond = pipe.restore(lq, dataclasses.replace(spaced, start="cond")).images
    torch.testing.assert_close(cond, pipe.restore(lq, spaced).images, atol=0, rtol=0)
    eps_pipe = DiffBIRPipeline(pipe.stage1, pipe.cldm, build_diffusion("v2"), device="cpu")
    noise = eps_pipe.restore(lq, spaced).images
    cond = eps_pipe.restore(lq, dataclasses.replace(spaced, start="cond")).images
    assert not torch.allclose(noise, cond, atol=1e-4)


def test_colour_fix_none_keeps_the_decoded_sample(pipe: DiffBIRPipeline) -> None:
    lq = _lq(9)
    none = _restore(pipe, lq, color_fix="none", upscale=1, min_short_side=16)
    wavelet = _restore(pipe, lq, upscale=1, min_short_side=16)
    assert none.shape == wavelet.shape == lq.shape
    assert not torch.allclose(none, wavelet, atol=1e-4)


def test_bf16_autocast_runs_on_cpu(tiny_weights: Path) -> None:
    spec = model_spec("v2.1", "sr", read_model_config(tiny_weights / "tiny_config.yaml"))
    paths = {role: tiny_weights / REGISTRY[name].filename for role, name in spec.weights.items()}
    pipe = load_pipeline(spec, paths, device="cpu", precision="bf16")
    out = pipe.restore(_lq(10), FAST).images
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert load_pipeline(spec, {"stage1": paths["stage1"]}, "cpu", "fp16").precision == "fp32"


class _Nearest(nn.Module):
    """A ×4 nearest-neighbour "cleaner" standing in for BSRNet (any size, no padding)."""

    size_multiple = 1
    output_scale = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(4, -2).repeat_interleave(4, -1)


def test_stage1_placement_before_and_after_the_upscale(pipe: DiffBIRPipeline) -> None:
    bsrnet_like = Stage1Model("bsrnet", _Nearest(), 4, 1, "constant", runs_before_upscale=True)
    stage1_only = DiffBIRPipeline(bsrnet_like, device="cpu")
    lq = _lq(11, 10, 15)
    # requested 20×30 is under 64: the ×4 output (40×60) is raised to short side 64
    options = PipelineOptions(upscale=2, min_short_side=64)
    assert stage1_only.run_stage1(lq, options).shape[-2:] == (64, 96)
    assert stage1_only.restore_stage1(lq, options).shape[-2:] == (20, 30)
    # requested 30×45 >= 16: the ×4 output is resized to the requested size
    options = PipelineOptions(upscale=3, min_short_side=16)
    torch.testing.assert_close(
        stage1_only.run_stage1(lq, options),
        torch.nn.functional.interpolate(
            _Nearest()(lq), size=(30, 45), mode="bicubic", antialias=True
        ),
    )
    with pytest.raises(RuntimeError, match="no diffusion stage"):
        stage1_only.restore(lq, options)
    # SwinIR runs on the resized input: stage 1 alone equals run_stage1 resized back
    assert pipe.restore_stage1(lq, FAST).shape[-2:] == (20, 30)


class _Recorder(nn.Module):
    """A ×1 identity "cleaner" that records the input sizes it sees."""

    size_multiple = 1
    output_scale = 1

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape[-2:]))
        return x


@pytest.mark.parametrize(("after_raise", "seen"), [(True, (64, 96)), (False, (20, 30))])
def test_stage1_before_or_after_the_raise(after_raise: bool, seen: tuple[int, int]) -> None:
    net = _Recorder()
    model = Stage1Model("any", net, 1, 1, "constant", False, runs_after_raise=after_raise)
    options = PipelineOptions(upscale=2, min_short_side=64)
    out = DiffBIRPipeline(model, device="cpu").run_stage1(_lq(13, 10, 15), options)
    # the requested 20×30 is under the minimum 64: raised to 64×96 before or after stage 1
    assert net.seen == [seen] and out.shape[-2:] == (64, 96)


def test_versions_name_the_released_weights() -> None:
    assert VERSIONS["v2.1"].weights("sr") == {
        "stage1": "swinir_realesrgan",
        "sd": "sd21_zsnr",
        "controlnet": "v2.1",
    }
    assert VERSIONS["v1"].weights("face") == {
        "stage1": "swinir_face",
        "sd": "sd21_base",
        "controlnet": "v1_face",
    }
    assert model_spec("v2", "sr").stage1_model == "bsrnet"
    assert model_spec("v2", "denoise").weights["stage1"] == "scunet_psnr"
    for version in VERSIONS:
        for task in TASKS:
            spec = model_spec(version, task)
            assert set(spec.weights.values()) <= set(REGISTRY)
            assert build_diffusion(spec.diffusion).parameterization == (
                "v" if version == "v2.1" else "eps"
            )
    with pytest.raises(ValueError, match="needs its schedule"):
        model_spec("custom", "sr", {})
    assert model_spec("custom", "sr", {"diffusion": "v2"}).weights == {}
    with pytest.raises(ValueError, match="for custom models"):
        model_spec("v2.1", "sr", {"diffusion": "v2"})
    with pytest.raises(ValueError, match="unknown task"):
        model_spec("v2.1", "unaligned_face")


def test_model_configs(tmp_path: Path) -> None:
    example = read_model_config(Path(__file__).parents[1] / "configs" / "inference" / "custom.yaml")
    spec = model_spec("custom", "sr", example)
    assert spec.stage1_model == "swinir" and spec.cldm["unet_cfg"]["model_channels"] == 320
    assert build_diffusion(spec.diffusion).parameterization == "eps"
    bad = tmp_path / "bad.yaml"
    bad.write_text("cldm: {}\nextra: 1\n")
    with pytest.raises(ValueError, match="unknown model config keys"):
        read_model_config(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_model_config(tmp_path / "missing.yaml")


def test_options_validation_and_defaults() -> None:
    assert (
        PipelineOptions is pipeline_options.PipelineOptions
    )  # re-exported by model.pipelines.diffbir
    defaults = PipelineOptions()
    assert (defaults.sampler, defaults.steps, defaults.cfg_scale, defaults.control_strength) == (
        "edm_dpm++_3m_sde",
        10,
        6.0,
        1.0,
    )
    assert defaults.sampler_options() == {"sigma_schedule": "original"}
    assert PipelineOptions(sampler="euler", sigma_schedule="karras").sampler_options() == {
        "use_karras_sigmas": True
    }
    assert (defaults.pos_prompt, defaults.neg_prompt) == (DEFAULT_POS_PROMPT, DEFAULT_NEG_PROMPT)
    # the reference fixture tokenised the official CLI's default positive prompt
    assert DEFAULT_POS_PROMPT in load_fixture("clip_tiny")[1]["prompts"]
    assert PipelineOptions(diffusion_tile_size=512).tiles("diffusion") == (512, 256)
    for bad in (dict(sampler="lms"), dict(sigma_schedule="linear"), dict(stage1_tile_size=100), dict(vae_decoder_tile_size=64, vae_decoder_tile_stride=12),
                dict(color_fix="hist"), dict(start="x"), dict(steps=0), dict(noise_aug=1000)):  # fmt: skip
        with pytest.raises(ValueError):
            PipelineOptions(**bad)
