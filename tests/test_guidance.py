"""Guidance wrappers: classifier-free guidance with samplers, latent image guidance."""

from __future__ import annotations

import pytest
import torch
from sampling_reference import (
    assert_matches,
    case,
    case_ids,
    case_tensor,
    conditions,
    diffusion_for,
    meta,
    noise_queue,
    standin,
)
from torch import nn

from model.diffusion.cfg import classifier_free_guidance, rescaled_cfg_scale
from model.diffusion.latent_guidance import (
    SCALE_FACTOR,
    LatentGuidance,
    edge_weights,
    latent_image_guidance,
    posterior_rescale,
)
from model.diffusion.samplers import make_sampler
from model.diffusion.schedule import diffusion_sd21, diffusion_sd21_zsnr
from model.diffusion.spaced_ddpm import SpacedSampler

PRESETS = {"eps": diffusion_sd21, "v_zsnr": diffusion_sd21_zsnr}
SHAPE = (2, 4, 8, 8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def stand_in(z_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """An analytic network of (z_t, t, c_img, c_txt)."""
    return 0.4 * z_t - 0.2 * cond["c_img"] + 1e-4 * t.view(-1, 1, 1, 1) + cond["c_txt"].mean()


def make_cond(seed: int) -> dict:
    g = gen(seed)
    return {"c_txt": torch.randn(2, 77, 8, generator=g), "c_img": torch.randn(SHAPE, generator=g)}


class TinyDecoder(nn.Module):
    """A differentiable latent → RGB [0, 1] map at 2× resolution, standing in for the VAE."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        up = nn.functional.interpolate(z, scale_factor=2, mode="nearest")
        return torch.sigmoid(self.conv(up))


@pytest.fixture(scope="module")
def decoder() -> TinyDecoder:
    torch.manual_seed(0)
    return TinyDecoder().requires_grad_(False)


@pytest.mark.parametrize("name", ["spaced", "edm_dpm++_3m_sde", "dpm++_3m_sde", "euler_a"])
def test_cfg_scale_one_equals_conditional_sampling(name: str) -> None:
    calls = []

    def net(z_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        calls.append(cond is uncond)
        return stand_in(z_t, t, cond)

    uncond = make_cond(2)
    sampler = make_sampler(name, diffusion_sd21_zsnr())
    x_T, cond = torch.randn(SHAPE, generator=gen(0)), make_cond(1)
    plain = sampler.sample(net, x_T, 6, cond, gen(1), progress=False)
    guided = classifier_free_guidance(net, uncond, 1.0)
    assert torch.equal(sampler.sample(guided, x_T, 6, cond, gen(1), progress=False), plain)
    assert not any(calls)
    strong = classifier_free_guidance(net, uncond, 4.0)
    assert not torch.equal(sampler.sample(strong, x_T, 6, cond, gen(1), progress=False), plain)
    assert any(calls)


def per_image(z_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """Like `stand_in`, with each image's own text term, so a stacked batch changes nothing."""
    return (
        0.4 * z_t
        - 0.2 * cond["c_img"]
        + 1e-4 * t.view(-1, 1, 1, 1)
        + cond["c_txt"].mean((1, 2)).view(-1, 1, 1, 1)
    )


@pytest.mark.parametrize("rescale", [False, True])
def test_batched_cfg_is_one_call_of_both_branches(rescale: bool) -> None:
    calls = []

    def net(z_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        calls.append((z_t.shape[0], cond["c_txt"].shape[0], t.tolist()))
        return per_image(z_t, t, cond)

    cond, uncond = make_cond(1), make_cond(2)
    z_t, t = torch.randn(SHAPE, generator=gen(0)), torch.tensor([500, 20])
    separate = classifier_free_guidance(net, uncond, 4.0, rescale)(z_t, t, cond)
    assert [c[0] for c in calls] == [2, 2]
    calls.clear()
    batched = classifier_free_guidance(net, uncond, 4.0, rescale, batched=True)(z_t, t, cond)
    assert calls == [(4, 4, [500, 20, 500, 20])]
    torch.testing.assert_close(batched, separate, atol=1e-6, rtol=0)
    # by hand: uncond + s·(cond − uncond), with the rescaled s per image
    s = torch.tensor([4.0, 4.0]) if not rescale else rescaled_cfg_scale(4.0, t).float()
    out_cond, out_uncond = per_image(z_t, t, cond), per_image(z_t, t, uncond)
    expected = out_uncond + s.view(-1, 1, 1, 1) * (out_cond - out_uncond)
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched, out_cond, atol=1e-3)
    # a scale of exactly 1 (the rescale at t = T, or scale 1) calls the network once with cond
    calls.clear()
    top = torch.tensor([1000, 1000])
    for scale, rescaled in ((4.0, True), (1.0, False)):
        wrapped = classifier_free_guidance(net, uncond, scale, rescaled, batched=True)
        assert torch.equal(wrapped(z_t, top, cond), per_image(z_t, top, cond))
    assert calls == [(2, 2, [1000, 1000])] * 2


def guidance_inputs(preset: str, t_value: int = 500):
    diffusion = PRESETS[preset]()
    z_t = torch.randn(SHAPE, generator=gen(0))
    t = torch.full((2,), t_value)
    # a smooth target (per-channel levels and a gentle ramp): edge weights stay near 1
    ramp = 0.01 * torch.arange(SHAPE[-1], dtype=torch.float32)
    target = (torch.randn(*SHAPE[:2], 1, 1, generator=gen(1)) + ramp).expand(SHAPE).contiguous()
    return diffusion, z_t, t, target


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("loss", ["mse", "weighted_mse"])
def test_scale_zero_and_inactive_timesteps_equal_no_guidance(preset: str, loss: str) -> None:
    diffusion, z_t, t, target = guidance_inputs(preset)
    cond = make_cond(1)
    plain = stand_in(z_t, t, cond)
    off = latent_image_guidance(stand_in, diffusion, target, LatentGuidance(scale=0.0, loss=loss))
    assert torch.equal(off(z_t, t, cond), plain)
    window = LatentGuidance(scale=0.01, t_start=400, t_stop=100, loss=loss)
    outside = latent_image_guidance(stand_in, diffusion, target, window)
    assert torch.equal(outside(z_t, t, cond), plain)
    t_inside = torch.full((2,), 300)
    assert not torch.equal(outside(z_t, t_inside, cond), stand_in(z_t, t_inside, cond))
    sampler = make_sampler("spaced", diffusion)
    x_T = torch.randn(SHAPE, generator=gen(5))
    assert torch.equal(
        sampler.sample(off, x_T, 5, cond, gen(2), progress=False),
        sampler.sample(stand_in, x_T, 5, cond, gen(2), progress=False),
    )


def x0_distance(diffusion, model_fn, z_t, t, cond, target, decode=None) -> float:
    x_0 = diffusion.predict_x0(z_t, t, model_fn(z_t, t, cond))
    pred = x_0 if decode is None else decode(x_0)
    return (pred - target).pow(2).mean().item()


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("loss", ["mse", "weighted_mse"])
@pytest.mark.parametrize("repeat", [1, 3])
def test_latent_guidance_moves_x0_toward_target(preset: str, loss: str, repeat: int) -> None:
    diffusion, z_t, t, target = guidance_inputs(preset)
    cond = make_cond(1)
    # per element the step is 2·3000·s·w/(C·H·W) of the gap: 0.35·w here, so no overshoot
    options = LatentGuidance(scale=0.015, loss=loss, repeat=repeat)
    guided = latent_image_guidance(stand_in, diffusion, target, options)
    before = x0_distance(diffusion, stand_in, z_t, t, cond, target)
    after = x0_distance(diffusion, guided, z_t, t, cond, target)
    assert after < 0.9 * before
    if loss == "mse":  # exact: x̂_0 − y shrinks by (1 − 0.35)^repeat
        factor = (1 - 2 * SCALE_FACTOR * 0.015 / 256) ** (2 * repeat)
        assert after == pytest.approx(before * factor, rel=1e-4)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("loss", ["mse", "weighted_mse"])
def test_rgb_guidance_moves_decoded_x0_toward_target(
    preset: str, loss: str, decoder: TinyDecoder
) -> None:
    diffusion, z_t, t, _ = guidance_inputs(preset)
    cond = make_cond(1)
    # a smooth image in [0, 1] (levels and a gentle ramp), so edge weights stay near 1
    levels = 0.3 + 0.4 * torch.rand(2, 3, 1, 1, generator=gen(3))
    image = (levels + 0.005 * torch.arange(16.0)).expand(2, 3, 16, 16).contiguous()
    options = LatentGuidance(scale=0.05, space="rgb", loss=loss, repeat=2)
    guided = latent_image_guidance(stand_in, diffusion, image, options, decode=decoder)
    with torch.no_grad():  # samplers run without autograd; guidance enables it itself
        before = x0_distance(diffusion, stand_in, z_t, t, cond, image, decoder)
        after = x0_distance(diffusion, guided, z_t, t, cond, image, decoder)
    assert after < 0.95 * before


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_guided_sampling_ends_closer_to_target(preset: str) -> None:
    diffusion = PRESETS[preset]()
    cond, target = make_cond(1), torch.randn(SHAPE, generator=gen(8))
    x_T = torch.randn(SHAPE, generator=gen(0))
    for name in ("spaced", "dpm++_2m"):
        sampler = make_sampler(name, diffusion)
        guided = latent_image_guidance(
            stand_in, diffusion, target, LatentGuidance(scale=0.01), sampler.timesteps(10)
        )
        with torch.inference_mode():
            plain = sampler.sample(stand_in, x_T, 10, cond, gen(1), progress=False)
            pulled = sampler.sample(guided, x_T, 10, cond, gen(1), progress=False)
        assert torch.isfinite(pulled).all()
        assert (pulled - target).pow(2).mean() < 0.5 * (plain - target).pow(2).mean()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_spaced_step_moves_posterior_mean_by_the_gradient_step(preset: str) -> None:
    """DiffBIR v2: x̂_0 += 3000·s·(−∇L)/coef1, so the posterior mean moves by 3000·s·(−∇L)."""
    diffusion, z_t, _, target = guidance_inputs(preset)
    cond, scale, steps = make_cond(1), 0.004, 10
    sampler = SpacedSampler.from_diffusion(diffusion)
    schedule = sampler.make_schedule(steps)
    timesteps = schedule.timesteps[::-1].tolist()
    guided = latent_image_guidance(
        stand_in, diffusion, target, LatentGuidance(scale=scale), timesteps
    )
    noise = torch.randn(SHAPE, generator=gen(4))
    for k in range(steps):  # includes t = 999 (α = 0 under zero SNR) and t = 0
        model_t = torch.full((2,), timesteps[k])
        index = torch.full((2,), steps - 1 - k)
        plain = sampler.p_sample(stand_in, schedule, z_t, model_t, index, cond, noise)
        pulled = sampler.p_sample(guided, schedule, z_t, model_t, index, cond, noise)
        x_0 = diffusion.predict_x0(z_t, model_t, stand_in(z_t, model_t, cond))
        expected = -SCALE_FACTOR * scale * 2 * (x_0 - target) / x_0[0].numel()
        # measured: at most 5.7e-7 (float32 round trip output → x̂_0 → output)
        torch.testing.assert_close(pulled - plain, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_posterior_rescale_matches_spaced_schedule(preset: str) -> None:
    diffusion = PRESETS[preset]()
    for steps in (10, 50):
        schedule = SpacedSampler.from_diffusion(diffusion).make_schedule(steps)
        rescale = posterior_rescale(diffusion.alphas_cumprod, schedule.timesteps[::-1].tolist())
        got = rescale(torch.from_numpy(schedule.timesteps.astype("int64")))
        torch.testing.assert_close(got, 1 / schedule.posterior_mean_coef1, rtol=1e-6, atol=0)
    assert rescale(torch.tensor([0])).item() == 1.0


def reference_edge_weights(image: torch.Tensor) -> torch.Tensor:
    """The original's weight map written out with explicit Sobel sums and 2×2 blocks."""
    grey = 0.2989 * image[:, 0] + 0.5870 * image[:, 1] + 0.1140 * image[:, 2]
    p = torch.nn.functional.pad(grey[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    h, w = grey.shape[-2:]

    def at(dy: int, dx: int) -> torch.Tensor:
        return p[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = at(-1, -1) + 2 * at(0, -1) + at(1, -1) - at(-1, 1) - 2 * at(0, 1) - at(1, 1)
    gy = at(-1, -1) + 2 * at(-1, 0) + at(-1, 1) - at(1, -1) - 2 * at(1, 0) - at(1, 1)
    magnitude = (gx**2 + gy**2).sqrt()
    blocks = magnitude.reshape(-1, h // 2, 2, w // 2, 2).sum((2, 4)).tanh()
    return 1 - blocks.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None]


def test_edge_weights() -> None:
    image = torch.rand(2, 3, 12, 16, generator=gen(0))
    torch.testing.assert_close(edge_weights(image), reference_edge_weights(image))
    flat = edge_weights(torch.full((1, 3, 4, 4), 0.5))
    torch.testing.assert_close(flat, torch.ones(1, 1, 4, 4), atol=1e-6, rtol=0)
    step = torch.zeros(1, 3, 8, 8)
    step[..., 4:] = 1.0
    weights = edge_weights(step)[0, 0]
    assert weights[:, 2:6].max() < 1e-3 and torch.all(weights[:, :2] == 1)
    assert edge_weights(torch.rand(1, 4, 8, 8, generator=gen(1))).shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="multiples of 2"):
        edge_weights(torch.rand(1, 3, 5, 8))


def test_bad_guidance_options() -> None:
    with pytest.raises(ValueError, match="decode"):
        latent_image_guidance(
            stand_in, diffusion_sd21(), torch.zeros(1, 3, 8, 8), LatentGuidance(space="rgb")
        )
    for bad in ({"scale": -1.0}, {"space": "pixel"}, {"loss": "l1"}, {"repeat": 0}):
        with pytest.raises(ValueError, match="guidance"):
            LatentGuidance(**bad)


# ---- the original's latent image guidance (tests/fixtures/sampling, guidance/*) --------------


def fixture_decode(z: torch.Tensor) -> torch.Tensor:
    """The fixtures' stand-in VAE decoder D(z) = U8(A·z + d), in [-1, 1]."""
    de = meta()["decoder_encoder"]
    a, d = torch.tensor(de["A"]).to(z), torch.tensor(de["d"]).to(z)
    y = torch.einsum("ok,bkhw->bohw", a, z) + d.view(1, -1, 1, 1)
    return y.repeat_interleave(8, -2).repeat_interleave(8, -1)


def fixture_guided_model(c: dict):
    """(cond, CFG stand-in wrapped with guidance as the pipeline wraps it, sampler, schedule)."""
    diffusion = diffusion_for(c["schedule"])
    cond, uncond = conditions(case_tensor(c, "c_img"))
    model_fn = classifier_free_guidance(standin(c["schedule"]), uncond, c["cfg_scale"])
    if c["space"] == "rgb":  # our RGB target and decoder are in [0, 1]
        target = (case_tensor(c, "target_rgb") + 1) / 2
        decode = lambda z: (fixture_decode(z) + 1) / 2  # noqa: E731
    else:
        target, decode = case_tensor(c, "target_latent"), None
    options = LatentGuidance(c["g_scale"], space=c["space"], loss=c["loss"], repeat=c["repeat"])
    sampler = SpacedSampler.from_diffusion(diffusion)
    schedule = sampler.make_schedule(c["steps"])
    timesteps = schedule.timesteps[::-1].tolist()
    guided = latent_image_guidance(model_fn, diffusion, target, options, timesteps, decode)
    return cond, guided, sampler, schedule


@pytest.mark.parametrize("case_id", [i for i in case_ids("guidance") if "/step/" in i])
def test_guided_step_matches_the_original(case_id: str) -> None:
    """One guided spaced step (CFG 4) at t = 666: x̂_0 after guidance and z_prev, in latent
    and RGB space, MSE and edge-weighted MSE, 1 or 2 gradient steps."""
    c = case(case_id)
    cond, guided, sampler, schedule = fixture_guided_model(c)
    z_t = case_tensor(c, "z_t")
    model_t = torch.full((z_t.shape[0],), c["model_t"])
    index = torch.full((z_t.shape[0],), c["index"])
    pred_x0 = sampler.predict_x0(schedule, z_t, index, guided(z_t, model_t, cond))
    assert_matches(pred_x0, c, "pred_x0_guided")
    noise = case_tensor(c, "noise")[0]
    assert_matches(
        sampler.p_sample(guided, schedule, z_t, model_t, index, cond, noise), c, "x_prev"
    )


@pytest.mark.parametrize("case_id", [i for i in case_ids("guidance") if "/full/" in i])
def test_guided_run_matches_the_original(case_id: str) -> None:
    c = case(case_id)
    cond, guided, sampler, _ = fixture_guided_model(c)
    noise = noise_queue(c)
    noise += [torch.zeros_like(noise[0])] * (c["steps"] - len(noise))  # the last step's draw
    final = sampler.sample(
        guided, case_tensor(c, "x_T"), c["steps"], cond, noise=noise, progress=False
    )
    assert_matches(final, c)
