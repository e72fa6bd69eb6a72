"""The EDM sampler family against the original's fixtures (stand-in network, recorded noise)."""

from __future__ import annotations

import pytest
import torch

from model.diffusion.cfg import classifier_free_guidance
from model.diffusion.edm import EDMSampler
from tests import sampling_reference as ref

EDM_CASES = ref.case_ids("edm")


def test_standin_reproduces_the_probe() -> None:
    assert ref.probe_check() < 1e-6


def _replay(case_id: str, **sampler_kwargs) -> tuple[torch.Tensor, dict, list]:
    c = ref.case(case_id)
    diffusion = ref.diffusion_for(c["schedule"])
    sampler = EDMSampler(c["sampler"].removeprefix("edm_"), diffusion, **sampler_kwargs)
    cond, uncond = ref.conditions(ref.case_tensor(c, "c_img"))
    model_fn = ref.standin(c["schedule"])
    if c["cfg_scale"] != 1:
        model_fn = classifier_free_guidance(model_fn, uncond, c["cfg_scale"], c["rescale_cfg"])
    queue = ref.noise_queue(c)
    served: list[tuple[float, float]] = []

    def noise(sigma: float, sigma_next: float) -> torch.Tensor:
        served.append((sigma, sigma_next))
        return queue[len(served) - 1] if len(served) <= len(queue) else torch.zeros(1)

    x_T = ref.case_tensor(c, "x_T")
    out = sampler.sample(model_fn, x_T, c["steps"], cond, progress=False, noise=noise)
    return out, c, served


@pytest.mark.parametrize("case_id", EDM_CASES)
def test_matches_the_original(case_id: str) -> None:
    out, c, served = _replay(case_id)
    ref.assert_matches(out, c)
    # the same draws in the same order, between the same sigmas where recorded
    assert len(served) == len(ref.noise_queue(c))
    for (sigma, sigma_next), call in zip(served, c["noise_calls"], strict=False):
        if "sigma" in call:
            assert sigma == pytest.approx(call["sigma"], rel=1e-5)
            assert sigma_next == pytest.approx(call["sigma_next"], rel=1e-5)


def test_schedule_and_network_timesteps_are_the_original() -> None:
    c = ref.case("edm/edm_dpm++_3m_sde/s10_cfg4")
    sampler = EDMSampler("dpm++_3m_sde", ref.diffusion_for(c["schedule"]))
    sigmas, _, timesteps = sampler.schedule(c["steps"])
    assert timesteps.tolist() == c["timesteps"]
    assert torch.allclose(torch.tensor(sigmas), torch.tensor(c["sigmas"], dtype=torch.float64),
                          rtol=1e-6)  # fmt: skip
    assert sampler.timesteps(c["steps"]) == c["eval_t"]


@pytest.mark.parametrize("kind", ["karras", "exponential"])
def test_other_sigma_schedules_span_the_same_range(kind: str) -> None:
    diffusion = ref.diffusion_for("v21_zsnr_v")
    original = EDMSampler("dpm++_2m", diffusion).schedule(10)[0]
    sigmas = EDMSampler("dpm++_2m", diffusion, sigma_schedule=kind).schedule(10)[0]
    assert sigmas[0] == pytest.approx(original[0]) and sigmas[-1] == 0
    assert (sigmas[:-1] > 0).all() and (sigmas[1:] < sigmas[:-1]).all()
    assert not torch.allclose(torch.tensor(sigmas), torch.tensor(original))


def test_brownian_noise_is_consistent_and_unit_normal() -> None:
    from model.diffusion.edm import BrownianNoise

    noise = BrownianNoise(torch.zeros(4000, 1, 1, 1), torch.Generator().manual_seed(0))
    whole = noise(10.0, 2.0)
    first, second = noise(10.0, 5.0), noise(5.0, 2.0)
    # W(2) - W(10) = (W(5) - W(10)) + (W(2) - W(5)), each normalised by its sqrt(length)
    assert torch.allclose(whole * 8**0.5, first * 5**0.5 + second * 3**0.5, atol=1e-5)
    assert abs(float(first.std()) - 1) < 0.05 and abs(float(torch.corrcoef(
        torch.stack([first.flatten(), second.flatten()]))[0, 1])) < 0.06  # fmt: skip


def test_eps_schedule_starts_at_its_own_sigma_max() -> None:
    # The original would clamp ᾱ[999] = 0.0047 to 1e-8 (σ = 1e4); ours keeps σ = 14.6.
    diffusion = ref.diffusion_for("sd21_eps")
    sigmas = EDMSampler("dpm++_2m", diffusion).schedule(10)[0]
    ab = diffusion.alphas_cumprod[-1]
    assert sigmas[0] == pytest.approx(((1 - ab) / ab) ** 0.5) and 14 < sigmas[0] < 15
