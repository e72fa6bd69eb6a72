"""Training schedules, q_sample and training targets against the official fixture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close_schedule, load_fixture

from model.diffusion.schedule import (
    DIFFUSION_PRESETS,
    Diffusion,
    diffusion_sd21,
    diffusion_sd21_zsnr,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
)

TENSORS, META = load_fixture("diffusion_schedules")
PRESETS = {"v2_eps": diffusion_sd21, "v21_v": diffusion_sd21_zsnr}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_training_schedule_matches_fixture(name: str) -> None:
    diffusion = PRESETS[name]()
    prefix = f"sched.{name}."
    assert diffusion.parameterization == META["schedules"][name]["parameterization"]
    assert diffusion.num_timesteps == META["schedules"][name]["num_timesteps"]
    assert_close_schedule(diffusion.betas, TENSORS[prefix + "betas"])
    assert_close_schedule(diffusion.alphas_cumprod, TENSORS[prefix + "alphas_cumprod"])
    for buffer in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
        assert_close_schedule(getattr(diffusion, buffer), TENSORS[prefix + buffer])
    assert diffusion.alphas_cumprod[-1] == META["schedules"][name]["alphas_cumprod_last"]


def test_zero_snr_endpoints() -> None:
    betas = rescale_zero_terminal_snr(scaled_linear_betas())
    alphas_cumprod = np.cumprod(1.0 - betas)
    assert betas[-1] == 1.0 and alphas_cumprod[-1] == 0.0
    # the first ᾱ is unchanged by the rescaling
    assert alphas_cumprod[0] == pytest.approx(1.0 - 0.00085, abs=1e-15)


def test_buffers_are_float32_and_not_saved() -> None:
    diffusion = diffusion_sd21()
    assert diffusion.sqrt_alphas_cumprod.dtype == torch.float32
    assert diffusion.betas.dtype == np.float64
    assert len(diffusion.state_dict()) == 0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_q_sample_matches_fixture(name: str) -> None:
    prefix = f"q_sample.{name}."
    t = TENSORS[prefix + "t"]
    assert t.tolist() == [0, 500, 999]
    x_t = PRESETS[name]().q_sample(TENSORS[prefix + "x0"], t, TENSORS[prefix + "noise"])
    assert_close_schedule(x_t, TENSORS[prefix + "x_t"])
    if name == "v21_v":  # zero terminal SNR: t = 999 is pure noise
        assert torch.equal(x_t[2], TENSORS[prefix + "noise"][2])


def test_presets_registry() -> None:
    assert DIFFUSION_PRESETS["v1"] is DIFFUSION_PRESETS["v2"] is diffusion_sd21
    assert DIFFUSION_PRESETS["v2.1"]().zero_snr
    with pytest.raises(ValueError, match="parameterization"):
        Diffusion(parameterization="x0")


@pytest.mark.parametrize("zero_snr,parameterization", [(False, "eps"), (False, "v"), (True, "v")])
def test_target_and_predict_x0_are_consistent(zero_snr: bool, parameterization: str) -> None:
    diffusion = Diffusion(zero_snr=zero_snr, parameterization=parameterization)
    x_0, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    if parameterization == "eps" and zero_snr:
        t = t[:-1]
    x_0, noise = x_0[: len(t)], noise[: len(t)]
    x_t = diffusion.q_sample(x_0, t, noise)
    target = diffusion.training_target(x_0, noise, t)
    torch.testing.assert_close(diffusion.predict_x0(x_t, t, target), x_0, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(diffusion.output_from_x0(x_t, t, x_0), target, atol=2e-4, rtol=1e-4)


def test_v_target_formula() -> None:
    diffusion = diffusion_sd21_zsnr()
    x_0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0, 500, 999])
    v = diffusion.training_target(x_0, noise, t)
    alpha = diffusion.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    sigma = diffusion.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v, alpha * noise - sigma * x_0)
    assert torch.equal(v[2], -x_0[2])  # zero SNR: v = −x_0 at the last step
    assert torch.equal(diffusion_sd21().training_target(x_0, noise, t), noise)


def test_loss_is_mse_to_target_and_zero_for_oracle() -> None:
    diffusion = diffusion_sd21_zsnr()
    x_0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = diffusion.sample_timesteps(2, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.shape == (2,)
    assert int(t.min()) >= 0 and int(t.max()) < 1000
    target = diffusion.training_target(x_0, noise, t)

    def oracle(x_t: torch.Tensor, t_: torch.Tensor, cond: dict) -> torch.Tensor:
        assert torch.equal(t_, t) and cond == {"c_txt": None}
        torch.testing.assert_close(x_t, diffusion.q_sample(x_0, t, noise))
        return target

    assert diffusion.loss(oracle, x_0, t, {"c_txt": None}, noise).item() == 0.0
    zero = diffusion.loss(lambda x, t_, c: torch.zeros_like(x), x_0, t, None, noise)
    torch.testing.assert_close(zero, target.pow(2).mean())
