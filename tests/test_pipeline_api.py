"""The diffusers-style API of DiffBIRPipeline on the tiny weights (CPU, fp32), and the wiring of
tiled diffusion and latent guidance through a whole pipeline call.

16×24 inputs with upscale 2 and min_short_side 32: one 8×8 latent per image. Every test can fail
on a plausible wiring bug; tolerances are stated where results are not bit-identical.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from model.diffusion.callbacks import SamplingStopped
from model.diffusion.latent_guidance import LatentGuidance
from model.diffusion.samplers import make_sampler
from model.pipelines.diffbir import DiffBIRPipeline
from model.pipelines.options import PipelineOptions

FAST = PipelineOptions(upscale=2, min_short_side=32, steps=2)
LATENT = (1, 4, 8, 8)  # 16×24 ×2 = 32×48, padded to 64×64


def _lq(seed: int = 0, h: int = 16, w: int = 24, batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _fresh(pipe: DiffBIRPipeline) -> DiffBIRPipeline:
    """A pipeline over the shared modules, with its own options, precision and prompt cache."""
    return DiffBIRPipeline(pipe.stage1, pipe.cldm, pipe.diffusion, device="cpu")


def _count_network_calls(pipe: DiffBIRPipeline, monkeypatch: pytest.MonkeyPatch) -> list:
    """Record ("control" or "unet", t) of every UNet call, with or without LAControlNet."""
    calls: list[tuple[str, int]] = []
    unet_forward = pipe.cldm.unet_forward

    def counted(x, t, c_txt, control=None):
        calls.append(("unet" if control is None else "control", int(t[0])))
        return unet_forward(x, t, c_txt, control)

    monkeypatch.setattr(pipe.cldm, "unet_forward", counted)
    return calls


# ---- step callback ----------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["spaced", "ddim", "edm_dpm++_3m_sde"])
def test_callback_stops_the_run_after_k_steps(
    tiny_pipe: DiffBIRPipeline, monkeypatch: pytest.MonkeyPatch, sampler: str
) -> None:
    options = dataclasses.replace(FAST, sampler=sampler, steps=4)
    timesteps = make_sampler(sampler, tiny_pipe.diffusion, **options.sampler_options()).timesteps(4)
    calls = _count_network_calls(tiny_pipe, monkeypatch)
    seen: list[tuple[int, int, tuple]] = []

    def stop_after_two(step: int, t: int, latents: torch.Tensor) -> bool:
        seen.append((step, t, tuple(latents.shape)))
        return step == 1

    with pytest.raises(SamplingStopped) as info:
        tiny_pipe(_lq(), options, callback=stop_after_two)
    assert info.value.steps_done == 2
    assert seen == [(0, timesteps[0], LATENT), (1, timesteps[1], LATENT)]
    # batched CFG: one network call per step, at the step's timestep
    assert calls == [("control", timesteps[0]), ("control", timesteps[1])]
    # a callback that never stops sees every step, and the run completes
    seen.clear()
    calls.clear()
    tiny_pipe(_lq(), options, callback=lambda step, t, z: seen.append(step) and None)
    assert seen == [0, 1, 2, 3] and len(calls) == 4


# ---- randomness: generator, latents -------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["spaced", "edm_dpm++_3m_sde"])
def test_generator_and_latents_reproduce_a_run(tiny_pipe: DiffBIRPipeline, sampler: str) -> None:
    options = dataclasses.replace(FAST, sampler=sampler)
    lq = _lq(1)

    def run(**kwargs) -> torch.Tensor:
        return tiny_pipe(lq, options, **kwargs).images

    first = run(generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        run(generator=torch.Generator().manual_seed(3)), first, atol=0, rtol=0
    )
    assert (run(generator=torch.Generator().manual_seed(4)) - first).abs().mean() > 1e-3
    # a generator seeded like `seeds` draws what the seed draws
    torch.testing.assert_close(run(seeds=[3]), first, atol=0, rtol=0)
    # x_T given: the run whose generator drew it (the generator continues with the noise)
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(LATENT, generator=generator)
    torch.testing.assert_close(run(latents=latents, generator=generator), first, atol=0, rtol=0)
    assert (run(latents=-latents, generator=generator) - first).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="latents must be"):
        run(latents=torch.zeros(1, 4, 8, 6))


def test_one_generator_per_image(tiny_pipe: DiffBIRPipeline) -> None:
    lq = _lq(2, batch=2)
    both = tiny_pipe(lq, FAST, generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    assert both.seeds == [None, None]
    alone = tiny_pipe(lq[1:], FAST, generator=torch.Generator().manual_seed(6)).images
    # image 1 alone with its generator = image 1 in the batch, up to batched-matmul rounding
    # (~1e-4); swapping the generators between the images changes them by ~0.1
    torch.testing.assert_close(both.images[1:], alone, atol=1e-3, rtol=0)
    assert (both.images[0] - both.images[1]).abs().mean() > 1e-2
    with pytest.raises(ValueError, match="generators"):
        tiny_pipe(lq, FAST, generator=[torch.Generator()])


# ---- image types in and out ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def uint8_image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference(tiny_pipe: DiffBIRPipeline, uint8_image: np.ndarray) -> torch.Tensor:
    """The restoration of `uint8_image` given as a (1, 3, H, W) float tensor."""
    batch = torch.from_numpy(uint8_image).permute(2, 0, 1)[None].float() / 255
    return tiny_pipe(batch, FAST).images


def test_image_types_give_the_same_restoration(
    tiny_pipe: DiffBIRPipeline, uint8_image: np.ndarray, reference: torch.Tensor
) -> None:
    tensor = torch.from_numpy(uint8_image).permute(2, 0, 1).float() / 255
    inputs = {"numpy uint8": uint8_image, "PIL": Image.fromarray(uint8_image), "(3, H, W)": tensor,
              "list": [uint8_image], "numpy float": uint8_image.astype(np.float32) / 255}  # fmt: skip
    for name, image in inputs.items():
        out = tiny_pipe(image, FAST).images
        torch.testing.assert_close(out, reference, atol=1e-6, rtol=0, msg=name)
    # output types: uint8 HWC arrays and PIL images of the same pixels
    expected = np.round(reference[0].permute(1, 2, 0).numpy() * 255)
    arrays = tiny_pipe(uint8_image, FAST, output_type="np").images
    assert len(arrays) == 1 and arrays[0].dtype == np.uint8 and arrays[0].shape == (32, 48, 3)
    assert np.abs(arrays[0].astype(float) - expected).max() <= 1
    pils = tiny_pipe(uint8_image, FAST, output_type="pil").images
    assert pils[0].mode == "RGB" and pils[0].size == (48, 32)
    np.testing.assert_array_equal(np.asarray(pils[0]), arrays[0])
    result = tiny_pipe(uint8_image, FAST, output_type="pt")
    assert isinstance(result.images, torch.Tensor) and result.stage1.shape == (1, 3, 32, 48)
    with pytest.raises(ValueError, match="output_type"):
        tiny_pipe(uint8_image, FAST, output_type="jpg")


def test_alpha_is_taken_off_and_put_back(
    tiny_pipe: DiffBIRPipeline, uint8_image: np.ndarray, reference: torch.Tensor
) -> None:
    alpha = np.full((16, 24, 1), 200, dtype=np.uint8)
    alpha[:, :12] = 40  # two halves, resized ×2 with the image
    rgba = np.concatenate([uint8_image, alpha], -1)
    result = tiny_pipe(rgba, FAST, output_type="np")
    out = result.images[0]
    assert out.shape == (32, 48, 4)
    # the colour channels are the RGB image's restoration; the alpha channel is the input's
    rgb = tiny_pipe(uint8_image, FAST, output_type="np").images[0]
    np.testing.assert_array_equal(out[..., :3], rgb)
    alpha_out = out[..., 3].astype(int)  # ±1: 8-bit rounding of the resized alpha
    assert np.abs(alpha_out[:, :20] - 40).max() <= 1 and np.abs(alpha_out[:, 28:] - 200).max() <= 1
    assert result.stage1[0].shape == (32, 48, 4)
    pil = tiny_pipe(Image.fromarray(rgba, "RGBA"), FAST, output_type="pil").images[0]
    assert pil.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(pil), out)
    # tensors have no alpha: 4-channel tensors are refused, "pt" output is RGB
    assert tiny_pipe(rgba, FAST).images.shape == (1, 3, 32, 48)
    with pytest.raises(ValueError, match="tensors"):
        tiny_pipe(torch.rand(4, 16, 24), FAST)


def test_batched_tensor_equals_single_images(tiny_pipe: DiffBIRPipeline) -> None:
    batch = _lq(3, batch=2)
    both = tiny_pipe(batch, FAST, seeds=[1, 2]).images
    listed = tiny_pipe([batch[0], batch[1]], FAST, seeds=[1, 2]).images
    torch.testing.assert_close(listed, both, atol=0, rtol=0)
    one = tiny_pipe(batch[1], FAST, seeds=[2]).images
    torch.testing.assert_close(one, both[1:], atol=1e-3, rtol=0)  # batched-matmul rounding
    with pytest.raises(ValueError, match="one size"):
        tiny_pipe([batch[0], batch[1, :, :8]], FAST)


# ---- control scales, strength and window -------------------------------------------------------


def test_control_strength_scales_and_window(
    tiny_pipe: DiffBIRPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    lq = _lq(4)
    options = dataclasses.replace(FAST, steps=4, sampler="ddim")
    timesteps = make_sampler("ddim", tiny_pipe.diffusion).timesteps(4)
    calls = _count_network_calls(tiny_pipe, monkeypatch)

    def run(**changes) -> torch.Tensor:
        calls.clear()
        return tiny_pipe(lq, dataclasses.replace(options, **changes)).images

    full = run()
    assert calls == [("control", t) for t in timesteps]
    # strength 0 = every scale 0 = the frozen UNet alone (residuals of exactly zero)
    off = run(control_strength=0.0)
    torch.testing.assert_close(run(control_scales=(0.0,) * 13), off, atol=0, rtol=0)
    frozen = run(control_start=0.8)  # steps k with 0.8 <= k/4 < 1: none
    assert calls == [("unet", t) for t in timesteps]
    torch.testing.assert_close(frozen, off, atol=1e-5, rtol=0)
    assert (full - off).abs().mean() > 1e-2  # the control path matters
    # strength multiplies the scales: 0.5 × ones = ones(0.5) × 1, and 0.5 lies between 0 and 1
    half = run(control_strength=0.5)
    torch.testing.assert_close(run(control_scales=(0.5,) * 13), half, atol=0, rtol=0)
    torch.testing.assert_close(
        run(control_scales=(0.25,) * 13, control_strength=2.0), half, atol=1e-6, rtol=0
    )
    assert 0 < (half - full).abs().mean() < (off - full).abs().mean()
    # one residual alone does something; the scales are restored after the call
    first_only = run(control_scales=(1.0,) + (0.0,) * 12)
    assert (first_only - off).abs().mean() > 1e-4 and (first_only - full).abs().mean() > 1e-4
    assert tiny_pipe.cldm.control_scales == [1.0] * 13
    # window [0.25, 0.75): the middle two steps are controlled
    late = run(control_start=0.25, control_end=0.75)
    assert calls == [("unet", timesteps[0]), ("control", timesteps[1]),
                     ("control", timesteps[2]), ("unet", timesteps[3])]  # fmt: skip
    assert 0 < (late - full).abs().mean() < (off - full).abs().mean()
    with pytest.raises(ValueError, match="13 values"):
        run(control_scales=(1.0,) * 12)


# ---- prompts ------------------------------------------------------------------------------------


def test_prompt_embeddings_are_cached_and_can_be_given(
    tiny_pipe: DiffBIRPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = _fresh(tiny_pipe)
    encoded: list[str] = []
    encode_text = pipe.cldm.encode_text
    monkeypatch.setattr(
        pipe.cldm, "encode_text", lambda prompts: encoded.extend(prompts) or encode_text(prompts)
    )
    lq = _lq(5, batch=2)
    first = pipe(lq, FAST, pos_prompt="sharp", neg_prompt="blurry").images
    assert sorted(encoded) == ["blurry", "sharp"]  # once each, for a batch of two
    again = pipe(lq, FAST, pos_prompt="sharp", neg_prompt="blurry").images
    assert sorted(encoded) == ["blurry", "sharp"]  # both cached
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    pipe(lq, FAST, pos_prompt="a cat", neg_prompt="blurry", cfg_scale=1.0)
    assert encoded[2:] == ["a cat"]  # scale 1: the negative prompt is never encoded
    # given embeddings replace the encoding (and equal it)
    pipe.clear_prompt_cache()
    encoded.clear()
    sharp, blurry = encode_text(["sharp"]), encode_text(["blurry"])
    given = pipe(lq, FAST, prompt_embeds=sharp, negative_prompt_embeds=blurry).images
    assert encoded == []
    torch.testing.assert_close(given, first, atol=1e-6, rtol=0)
    other = pipe(lq, FAST, prompt_embeds=blurry, negative_prompt_embeds=blurry).images
    assert encoded == [] and (other - first).abs().mean() > 1e-4
    with pytest.raises(ValueError, match="prompt embeddings"):
        pipe(lq, FAST, prompt_embeds=torch.cat([sharp] * 3))


# ---- pipeline state: VAE tiling, sampler, precision, offload -------------------------------------


def test_vae_tiling_switch(tiny_pipe: DiffBIRPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = _fresh(tiny_pipe)
    assert pipe.options.tiles("vae_encoder") == (None, None)
    pipe.enable_vae_tiling(32, 16)
    assert pipe.options.tiles("vae_encoder") == pipe.options.tiles("vae_decoder") == (32, 16)
    shapes = {"encode": [], "decode": []}
    encode, decode = pipe.cldm.vae_encode, pipe.cldm.vae_decode
    monkeypatch.setattr(pipe.cldm, "vae_encode", lambda x: shapes["encode"].append(x.shape[-2:]) or encode(x))  # fmt: skip
    monkeypatch.setattr(pipe.cldm, "vae_decode", lambda z: shapes["decode"].append(z.shape[-2:]) or decode(z))  # fmt: skip
    lq = _lq(6, 32, 32)  # 64×64 at the processing size: the ×8 and ×64 paddings agree
    overrides = dict(upscale=2, min_short_side=32, steps=1)  # keep the pipeline's tile options
    tiled = pipe(lq, **overrides).images
    # 64×64 padded image: 3×3 tiles of 32 pixels (encoder) / 4 latents (decoder)
    assert shapes["encode"] == [(32, 32)] * 9 and shapes["decode"] == [(4, 4)] * 9
    pipe.disable_vae_tiling()
    assert pipe.options.tiles("vae_decoder") == (None, None)
    shapes["encode"].clear()
    shapes["decode"].clear()
    whole = pipe(lq, **overrides).images
    assert shapes["encode"] == [(64, 64)] and shapes["decode"] == [(8, 8)]
    assert tiled.shape == whole.shape and 0 < (tiled - whole).abs().mean() < 0.2


def test_set_sampler_precision_and_offload(tiny_pipe: DiffBIRPipeline) -> None:
    lq = _lq(7)
    base = tiny_pipe(lq, FAST, sampler="ddim", ddim_eta=0.5).images
    pipe = _fresh(tiny_pipe)
    pipe.set_sampler("ddim", ddim_eta=0.5)
    assert (pipe.options.sampler, pipe.options.ddim_eta) == ("ddim", 0.5)
    overrides = dict(upscale=2, min_short_side=32, steps=2)
    torch.testing.assert_close(pipe(lq, **overrides).images, base, atol=0, rtol=0)
    # fp16 falls back to fp32 on the CPU
    assert pipe.to(dtype="fp16").precision == "fp32"
    torch.testing.assert_close(pipe(lq, **overrides).images, base, atol=0, rtol=0)
    pipe.enable_model_cpu_offload("cpu")
    assert pipe.offload and pipe.device == torch.device("cpu")
    torch.testing.assert_close(pipe(lq, **overrides).images, base, atol=0, rtol=0)
    pipe.disable_model_cpu_offload()
    assert not pipe.offload


def _weight_dtypes(module: torch.nn.Module) -> set[tuple[str, torch.dtype]]:
    return {(type(m).__name__ if isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm)
             else "other", p.dtype) for m in module.modules() for p in m.parameters(recurse=False)}  # fmt: skip


def test_bf16_casts_the_weights_and_keeps_norms_in_fp32(tiny_pipe: DiffBIRPipeline) -> None:
    lq, overrides = _lq(7), dict(upscale=2, min_short_side=32, steps=2, sampler="ddim")
    base = tiny_pipe(lq, **overrides).images
    low = copy.deepcopy(tiny_pipe)  # casting is lossy: never on the shared modules
    assert low.to(dtype=torch.bfloat16) is low and low.dtype == torch.bfloat16
    for module in (low.cldm.unet, low.cldm.controlnet, low.cldm.vae, low.cldm.text_encoder):
        dtypes = _weight_dtypes(module)
        assert ("other", torch.bfloat16) in dtypes and ("other", torch.float32) not in dtypes
        assert ("GroupNorm", torch.bfloat16) not in dtypes and (
            "LayerNorm",
            torch.bfloat16,
        ) not in dtypes
    bf16 = low(lq, **overrides).images
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert 0 < (bf16 - base).abs().mean() < 0.1
    # vae_precision="fp32": the VAE and text encoder stay fp32
    kept = DiffBIRPipeline(low.stage1, low.cldm, low.diffusion, "cpu", "bf16", vae_precision="fp32")
    assert {p.dtype for p in kept.cldm.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in kept.cldm.text_encoder.parameters()} == {torch.float32}
    assert {p.dtype for p in kept.cldm.unet.conv_in.parameters()} == {torch.bfloat16}


# ---- tiled diffusion and latent guidance through the pipeline ------------------------------------


def test_tiled_diffusion_crops_the_condition_with_each_tile(
    tiny_pipe: DiffBIRPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A per-pixel stand-in network (output at a pixel depends on z_t and c_img there only):
    tiled diffusion must then equal the untiled run up to float rounding, however the tiles
    overlap. c_img varies across the image, so a c_img crop that does not match the z_t tile
    changes the result by ~0.1."""

    def per_pixel(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        text = cond["c_txt"].mean((1, 2)).view(-1, 1, 1, 1)
        return torch.tanh(0.6 * x - 5.0 * cond["c_img"]) + 0.05 * text + 1e-4 * t.view(-1, 1, 1, 1)

    monkeypatch.setattr(tiny_pipe.cldm, "forward", per_pixel)
    lq = _lq(8, 64, 64)  # ×2 = 128×128 (no padding, tiled or not): 16×16 latent, 3×3 tiles of 8
    options = dataclasses.replace(FAST, sampler="spaced", color_fix="none")
    latents: dict[str, torch.Tensor] = {}

    def run(name: str, **tiles) -> torch.Tensor:
        keep = lambda step, t, z: latents.__setitem__(name, z)  # noqa: E731
        return tiny_pipe(lq, dataclasses.replace(options, **tiles), callback=keep).images

    whole = run("whole")
    tiled = run("tiled", diffusion_tile_size=64, diffusion_tile_stride=32)
    batched = run("batched", diffusion_tile_size=64, diffusion_tile_stride=32,
                  diffusion_tile_batch_size=4)  # fmt: skip
    # measured: max |difference| of the latents ~1e-7 (weighted mean of equal values)
    torch.testing.assert_close(latents["tiled"], latents["whole"], atol=1e-5, rtol=0)
    torch.testing.assert_close(latents["batched"], latents["whole"], atol=1e-5, rtol=0)
    torch.testing.assert_close(tiled, whole, atol=1e-4, rtol=0)
    torch.testing.assert_close(batched, whole, atol=1e-4, rtol=0)
    # the condition matters: a latent tile against another place's c_img differs
    assert latents["whole"][..., :8, :8].std() > 0.05


def test_latent_guidance_pulls_the_sample_toward_the_stage1_latent(
    tiny_pipe: DiffBIRPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Direction and size: guidance toward c_img (the stage-1 image's latent) brings the final
    latent from MSE ~1.6 to ~1e-4 of it; c_img itself is small (mean square ~0.01), so a
    sample pulled toward anything else (zeros, the LQ, noise) fails the second check."""
    c_imgs: list[torch.Tensor] = []
    encode = tiny_pipe.cldm.vae_encode
    monkeypatch.setattr(
        tiny_pipe.cldm, "vae_encode", lambda x: c_imgs.append(encode(x)) or c_imgs[-1]
    )
    options = dataclasses.replace(FAST, sampler="spaced", steps=4, color_fix="none")
    lq = _lq(9)
    finals: list[torch.Tensor] = []

    def final_latent(**changes) -> torch.Tensor:
        keep = lambda step, t, z: finals.append(z)  # noqa: E731
        tiny_pipe(lq, dataclasses.replace(options, **changes), callback=keep)
        return finals[-1]

    plain = final_latent()
    c_img = c_imgs[-1]
    guided = final_latent(guidance=LatentGuidance(scale=0.03, repeat=2))
    torch.testing.assert_close(c_imgs[-1], c_img, atol=0, rtol=0)
    plain_mse, guided_mse = (plain - c_img).pow(2).mean(), (guided - c_img).pow(2).mean()
    assert guided_mse < 0.01 * plain_mse
    assert guided_mse < 0.05 * c_img.pow(2).mean()
    # a weaker pull moves less: the effect grows with the scale
    weak = final_latent(guidance=LatentGuidance(scale=0.01))
    assert guided_mse < (weak - c_img).pow(2).mean() < plain_mse
