"""DDIM and the respaced DDPM against the original's fixtures (stand-in network, recorded
noise), on both schedules, with and without CFG and its rescale."""

from __future__ import annotations

import pytest
import torch

from model.diffusion.cfg import classifier_free_guidance
from model.diffusion.ddim import DDIMSampler
from model.diffusion.spaced_ddpm import SpacedSampler
from tests import sampling_reference as ref

CASES = ref.case_ids("ddpm_ddim")


def _model_fn(c: dict):
    cond, uncond = ref.conditions(ref.case_tensor(c, "c_img"))
    model_fn = ref.standin(c["schedule"])
    if c["cfg_scale"] != 1:
        model_fn = classifier_free_guidance(model_fn, uncond, c["cfg_scale"], c["rescale_cfg"])
    return model_fn, cond


@pytest.mark.parametrize("case_id", CASES)
def test_matches_the_original(case_id: str) -> None:
    c = ref.case(case_id)
    diffusion = ref.diffusion_for(c["schedule"])
    model_fn, cond = _model_fn(c)
    x_T = ref.case_tensor(c, "x_T")
    if c["sampler"] == "ddim":
        sampler = DDIMSampler(diffusion, eta=c["eta"])
        assert sampler.timesteps(c["steps"]) == c["eval_t"]
        out = sampler.sample(model_fn, x_T, c["steps"], cond, progress=False,
                             noise=ref.noise_queue(c))  # fmt: skip
    else:
        sampler = SpacedSampler.from_diffusion(diffusion)
        noise = list(ref.case_tensor(c, "noise"))  # the last draw is masked by the sampler
        out = sampler.sample(model_fn, x_T, c["steps"], cond, noise=noise, progress=False)
    ref.assert_matches(out, c)


def test_original_ddim_takes_the_original_timesteps() -> None:
    sampler = DDIMSampler(ref.diffusion_for("v21_zsnr_v"), eta=1.0)
    assert sampler.timesteps(7) == list(range(995, 0, -142))  # 8 steps, as the original
    assert len(DDIMSampler(sampler.diffusion, spacing="trailing").timesteps(7)) == 7


@pytest.mark.parametrize("spacing", ["original", "trailing"])
@pytest.mark.parametrize("steps", [7, 10, 25])
def test_eta_one_on_the_zero_snr_schedule_is_finite(spacing: str, steps: int) -> None:
    c = ref.case("ddpm_ddim/v21_zsnr_v/ddim_eta1/s10_cfg4")
    model_fn, cond = _model_fn(c)
    sampler = DDIMSampler(ref.diffusion_for("v21_zsnr_v"), eta=1.0, spacing=spacing)
    out = sampler.sample(model_fn, ref.case_tensor(c, "x_T"), steps, cond, torch.Generator(),
                         progress=False)  # fmt: skip
    assert torch.isfinite(out).all()
