"""The respaced DDPM sampler and classifier-free guidance against the official fixture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close_schedule, load_fixture

from model.diffusion.cfg import classifier_free_guidance, rescaled_cfg_scale
from model.diffusion.schedule import diffusion_sd21, diffusion_sd21_zsnr
from model.diffusion.spaced_ddpm import (
    BUFFER_NAMES,
    SpacedSampler,
    make_spaced_schedule,
    space_timesteps,
)

TENSORS, META = load_fixture("diffusion_schedules")
PRESETS = {"v2_eps": diffusion_sd21, "v21_v": diffusion_sd21_zsnr}
SCHEDULES = {name: META["schedules"][name] for name in PRESETS}
# (schedule name, step count) for every respaced schedule stored in the fixture
SPACED = [(name, int(steps)) for name, s in SCHEDULES.items() for steps in s["spaced"]]
# (schedule name, step count, loop position key) for every stored single step
ONE_STEP = [
    (name, steps, key)
    for name, steps in SPACED
    for key in SCHEDULES[name]["spaced"][str(steps)]["one_step"]
]


def sampler_for(name: str) -> SpacedSampler:
    return SpacedSampler.from_diffusion(PRESETS[name]())


def constant(output: torch.Tensor):
    """A stand-in network that returns a stored output and checks the timestep it gets."""

    def model_fn(x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        model_fn.seen_t.append(t.tolist())
        return output

    model_fn.seen_t = []
    return model_fn


@pytest.mark.parametrize("steps", sorted(int(n) for n in META["schedules"]["space_timesteps"]))
def test_space_timesteps_matches_fixture(steps: int) -> None:
    expected = META["schedules"]["space_timesteps"][str(steps)]
    assert space_timesteps(1000, steps) == expected
    assert len(expected) == steps


def test_space_timesteps_rejects_bad_counts() -> None:
    for steps in (0, 1001):
        with pytest.raises(ValueError, match="steps"):
            space_timesteps(1000, steps)


@pytest.mark.parametrize("name,steps", SPACED)
def test_spaced_schedule_matches_fixture(name: str, steps: int) -> None:
    schedule = sampler_for(name).make_schedule(steps)
    prefix = f"spaced.{name}.s{steps}."
    meta = SCHEDULES[name]["spaced"][str(steps)]
    assert schedule.timesteps.tolist() == meta["timesteps"]
    assert_close_schedule(torch.from_numpy(schedule.timesteps), TENSORS[prefix + "timesteps"])
    assert_close_schedule(schedule.betas, TENSORS[prefix + "betas"])
    assert_close_schedule(schedule.alphas_cumprod, TENSORS[prefix + "alphas_cumprod"])
    assert list(BUFFER_NAMES) == meta["buffers"]
    for buffer in BUFFER_NAMES:
        values = getattr(schedule, buffer)
        assert_close_schedule(values, TENSORS[prefix + buffer])
        nonfinite = torch.nonzero(~torch.isfinite(values)).flatten().tolist()
        assert nonfinite == meta["nonfinite_entries"].get(buffer, [])


def test_schedule_is_independent_of_the_diffusion_object() -> None:
    alphas_cumprod = PRESETS["v2_eps"]().alphas_cumprod
    a = make_spaced_schedule(alphas_cumprod, 10)
    b = SpacedSampler(alphas_cumprod, "eps").make_schedule(10)
    for buffer in BUFFER_NAMES:
        assert torch.equal(getattr(a, buffer), getattr(b, buffer))
    assert np.array_equal(a.betas, b.betas)


@pytest.mark.parametrize("name,steps,key", ONE_STEP)
def test_p_sample_matches_fixture(name: str, steps: int, key: str) -> None:
    info = SCHEDULES[name]["spaced"][str(steps)]["one_step"][key]
    p = f"step.{name}.s{steps}.{key}."
    sampler = sampler_for(name)
    schedule = sampler.make_schedule(steps)
    assert schedule.timesteps[info["t_index"]] == info["model_t"]
    assert info["t_index"] == steps - 1 - info["loop_index"]
    x_t, output, noise = TENSORS[p + "x_t"], TENSORS[p + "model_output"], TENSORS[p + "noise"]
    t = torch.tensor([info["t_index"]])
    model_t = torch.tensor([info["model_t"]])

    pred_x0 = sampler.predict_x0(schedule, x_t, t, output)
    mean, variance = sampler.q_posterior(schedule, pred_x0, x_t, t)
    assert_close_schedule(pred_x0, TENSORS[p + "pred_x0"])
    assert_close_schedule(mean, TENSORS[p + "mean"])
    assert_close_schedule(variance, TENSORS[p + "variance"])

    model_fn = constant(output)
    x_prev = sampler.p_sample(model_fn, schedule, x_t, model_t, t, None, noise)
    assert model_fn.seen_t == [[info["model_t"]]]
    assert_close_schedule(x_prev, TENSORS[p + "x_prev"])
    assert torch.equal(x_prev, mean) != info["noise_added"]


def test_zero_snr_first_step_predicts_minus_v() -> None:
    sampler = sampler_for("v21_v")
    schedule = sampler.make_schedule(10)
    v = torch.randn(1, 4, 8, 8)
    pred_x0 = sampler.predict_x0(schedule, torch.randn(1, 4, 8, 8), torch.tensor([9]), v)
    assert torch.equal(pred_x0, -v)


@pytest.mark.parametrize("name,steps", SPACED)
def test_cfg_step_matches_fixture(name: str, steps: int) -> None:
    info = SCHEDULES[name]["spaced"][str(steps)]["cfg"]
    p = f"cfg.{name}.s{steps}."
    sampler = sampler_for(name)
    schedule = sampler.make_schedule(steps)
    outputs = {
        "cond": TENSORS[p + "model_output_cond"],
        "uncond": TENSORS[p + "model_output_uncond"],
    }

    def model_fn(x: torch.Tensor, t: torch.Tensor, cond: str) -> torch.Tensor:
        assert t.tolist() == [info["model_t"]]
        return outputs[cond]

    x_t, noise = TENSORS[p + "x_t"], TENSORS[p + "noise"]
    t, model_t = torch.tensor([info["t_index"]]), torch.tensor([info["model_t"]])
    for rescale, key in ((False, "x_prev_plain"), (True, "x_prev_rescaled")):
        guided = classifier_free_guidance(model_fn, "uncond", info["cfg_scale_arg"], rescale)
        x_prev = sampler.p_sample(guided, schedule, x_t, model_t, t, "cond", noise)
        assert_close_schedule(x_prev, TENSORS[p + key])


@pytest.mark.parametrize("name,steps", SPACED)
def test_rescaled_cfg_scale_matches_fixture(name: str, steps: int) -> None:
    info = SCHEDULES[name]["spaced"][str(steps)]["cfg"]
    model_t = torch.tensor(space_timesteps(1000, steps)[::-1])
    scales = rescaled_cfg_scale(info["cfg_scale_arg"], model_t)
    expected = torch.tensor(info["rescaled_scale_per_step"], dtype=torch.float64)
    torch.testing.assert_close(scales, expected, atol=1e-12, rtol=1e-10)
    assert scales[info["loop_index"]].item() == pytest.approx(info["effective_scale_rescaled"])


def test_cfg_wrapper_calls() -> None:
    calls = []

    def model_fn(x: torch.Tensor, t: torch.Tensor, cond: float) -> torch.Tensor:
        calls.append(cond)
        return torch.full_like(x, cond)

    x = torch.zeros(2, 1, 2, 2)
    plain = classifier_free_guidance(model_fn, 1.0, 3.0)
    assert torch.equal(plain(x, torch.tensor([5, 5]), 2.0), torch.full_like(x, 4.0))
    assert calls == [2.0, 1.0]
    # rescale gives scale 1 at t = 999: a single conditional call
    calls.clear()
    rescaled = classifier_free_guidance(model_fn, 1.0, 3.0, rescale=True)
    assert torch.equal(rescaled(x, torch.tensor([999, 999]), 2.0), torch.full_like(x, 2.0))
    assert calls == [2.0]
    # per-sample scales at t = 0 (1 + s = 4) and t = 999 (1)
    out = rescaled(x, torch.tensor([0, 999]), 2.0)
    assert out[:, 0, 0, 0].tolist() == [5.0, 2.0]
    assert torch.equal(
        classifier_free_guidance(model_fn, 1.0, 1)(x, torch.tensor([0, 0]), 2.0), x + 2
    )


def stand_in(x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
    """The fixture's stand-in network: 0.5·x + 0.001·model_t."""
    return 0.5 * x + 0.001 * t.view(-1, *[1] * (x.ndim - 1))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_sampling_loop_matches_fixture(name: str) -> None:
    p = f"loop.{name}.s10."
    seen = []

    def model_fn(x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        seen.append(int(t))
        return stand_in(x, t, cond)

    x_0 = sampler_for(name).sample(
        model_fn, TENSORS[p + "x_T"], 10, noise=TENSORS[p + "noise"], progress=False
    )
    assert seen == SCHEDULES[name]["loop_s10"]["model_t_sequence"]
    assert_close_schedule(x_0, TENSORS[p + "x_0"])


def test_generator_makes_sampling_reproducible() -> None:
    sampler = sampler_for("v2_eps")
    x_T = torch.randn(2, 4, 8, 8)

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return sampler.sample(stand_in, x_T, 5, generator=gen, progress=False)

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.isfinite(a).all()


def test_single_step_returns_mean_without_noise() -> None:
    sampler = sampler_for("v21_v")
    x_T = torch.randn(1, 4, 8, 8)
    seen = []

    def model_fn(x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        seen.append(int(t))
        return torch.zeros_like(x)

    out1 = sampler.sample(
        model_fn, x_T, 1, generator=torch.Generator().manual_seed(0), progress=False
    )
    out2 = sampler.sample(
        model_fn, x_T, 1, generator=torch.Generator().manual_seed(1), progress=False
    )
    assert seen == [0, 0]
    assert torch.equal(out1, out2)


@pytest.mark.parametrize("name,steps", [("v2_eps", 10), ("v2_eps", 50), ("v21_v", 10)])
def test_diffusers_linspace_ddpm_agrees(name: str, steps: int) -> None:
    """diffusers' DDPM with linspace spacing keeps the same timesteps and (float32) steps."""
    from diffusers import DDPMScheduler

    zero_snr = name == "v21_v"
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        prediction_type="v_prediction" if zero_snr else "epsilon",
        rescale_betas_zero_snr=zero_snr,
        timestep_spacing="linspace",
    )
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.flip(0).tolist() == space_timesteps(1000, steps)
    x_T = torch.randn(1, 4, 8, 8)
    ours = sampler_for(name).sample(
        stand_in, x_T, steps, generator=torch.Generator().manual_seed(1), progress=False
    )
    x, generator = x_T, torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        x = scheduler.step(stand_in(x, t.view(1), None), t, x, generator=generator).prev_sample
    # diffusers keeps its schedule in float32, hence the looser tolerance
    torch.testing.assert_close(ours, x, atol=5e-5, rtol=1e-5)
