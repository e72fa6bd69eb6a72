"""ControlLDM through the contract API `cldm_from_original`, against the tiny fixtures."""

from __future__ import annotations

import pytest
import torch

from model.convert.cldm import cldm_from_original
from model.nets.cldm import ControlLDM
from tests.conftest import load_fixture, strip_prefix

TOL = {"atol": 1e-4, "rtol": 1e-4}


def tiny_original() -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(cfg, SD-layout state, original ControlNet state) assembled from the tiny fixtures."""
    cldm_t, cldm_meta = load_fixture("cldm_tiny")
    vae_t, vae_meta = load_fixture("vae_tiny")
    clip_t, clip_meta = load_fixture("clip_tiny")
    cfg = dict(cldm_meta["config"], vae_cfg=vae_meta["config"], clip_cfg=clip_meta["config"])
    cfg["latent_scale_factor"] = vae_meta["latent_scale_factor"]
    sd_state = {"model.diffusion_model." + k: v for k, v in strip_prefix(cldm_t, "unet.").items()}
    sd_state |= {"first_stage_model." + k: v for k, v in strip_prefix(vae_t, "vae.").items()}
    # The fixture stores the token embedding in float16 (exactly representable); upcast it.
    sd_state |= {
        "cond_stage_model." + k: v.float() for k, v in strip_prefix(clip_t, "clip.").items()
    }
    return cfg, sd_state, strip_prefix(cldm_t, "controlnet.")


@pytest.fixture(scope="module")
def fixture() -> dict[str, torch.Tensor]:
    return load_fixture("cldm_tiny")[0]


@pytest.fixture(scope="module")
def cldm() -> ControlLDM:
    cfg, sd_state, controlnet_state = tiny_original()
    return cldm_from_original(cfg, sd_state, controlnet_state)


@pytest.fixture(scope="module")
def cldm_init() -> ControlLDM:
    cfg, sd_state, _ = tiny_original()
    return cldm_from_original(cfg, sd_state)


def _cond(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"c_txt": t["in.context"], "c_img": t["in.hint"]}


@pytest.mark.parametrize(
    ("name", "scales"),
    [
        ("out.eps", [1.0] * 10),
        ("out.eps_scale_0_5", [0.5] * 10),
        ("out.eps_scale_ramp", [0.1 * (i + 1) for i in range(10)]),
    ],
)
def test_forward_matches_fixture(fixture, cldm, name, scales) -> None:
    cldm.control_scales = scales
    with torch.no_grad():
        eps = cldm(fixture["in.x_noisy"], fixture["in.timesteps"], _cond(fixture))
    cldm.control_scales = [1.0] * 10
    torch.testing.assert_close(eps, fixture[name], **TOL)


def test_control_and_uncontrolled_match_fixture(fixture, cldm) -> None:
    x, t = fixture["in.x_noisy"], fixture["in.timesteps"]
    with torch.no_grad():
        control = cldm.control(x, t, _cond(fixture))
        eps = cldm.unet_forward(x, t, fixture["in.context"])
    assert len(control) == len(cldm.control_scales) == 10
    for i, c in enumerate(control):
        torch.testing.assert_close(c, fixture[f"out.control.{i}"], **TOL)
    torch.testing.assert_close(eps, fixture["out.eps_no_control"], **TOL)


def test_vae_and_text_match_fixtures(cldm) -> None:
    vae_t, _ = load_fixture("vae_tiny")
    clip_t, clip_meta = load_fixture("clip_tiny")
    z = cldm.vae_encode(vae_t["in.image"])
    torch.testing.assert_close(z, vae_t["out.cond_latent"], **TOL)
    with torch.no_grad():
        torch.testing.assert_close(cldm.vae_decode(z), vae_t["out.decoded_from_cond_latent"], **TOL)
    context = cldm.encode_text(clip_meta["prompts"])
    torch.testing.assert_close(context, clip_t["out.penultimate"], **TOL)
    sampled = cldm.vae_encode(
        vae_t["in.image"], sample=True, generator=torch.Generator().manual_seed(0)
    )
    assert sampled.shape == z.shape and not torch.equal(sampled, z)


def test_initialised_controlnet_leaves_unet_unchanged(fixture, cldm_init) -> None:
    x, t = fixture["in.x_noisy"], fixture["in.timesteps"]
    with torch.no_grad():
        controlled = cldm_init(x, t, _cond(fixture))
        plain = cldm_init.unet_forward(x, t, fixture["in.context"])
    assert torch.equal(controlled, plain)
    torch.testing.assert_close(plain, fixture["out.eps_no_control"], **TOL)


def test_control_scales_validation(fixture, cldm) -> None:
    assert cldm.control_scales == [1.0] * 10
    with pytest.raises(ValueError, match="10 values"):
        cldm.control_scales = [1.0] * 9
    cldm.control_scales[3] = 0.25  # in-place edits act on the live list
    assert cldm.control_scales[3] == 0.25
    # The original always sets 13 scales; entries beyond the layout's tensors are unused.
    cldm.control_scales = [0.1 * (i + 1) for i in range(13)]
    assert len(cldm.control_scales) == 13
    with torch.no_grad():
        eps = cldm(fixture["in.x_noisy"], fixture["in.timesteps"], _cond(fixture))
    torch.testing.assert_close(eps, fixture["out.eps_scale_ramp"], **TOL)
    cldm.control_scales = [1] * 10
    assert all(isinstance(s, float) for s in cldm.control_scales)


def test_frozen_modules_and_training_gradients(fixture, cldm_init) -> None:
    cldm_init.train()
    assert cldm_init.controlnet.training
    assert not any(m.training for m in (cldm_init.unet, cldm_init.vae, cldm_init.text_encoder))
    frozen = [cldm_init.unet, cldm_init.vae, cldm_init.text_encoder]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in cldm_init.controlnet.parameters())
    cldm_init.set_gradient_checkpointing(True)
    try:
        eps = cldm_init(fixture["in.x_noisy"], fixture["in.timesteps"], _cond(fixture))
        eps.square().mean().backward()
    finally:
        cldm_init.set_gradient_checkpointing(False)
        cldm_init.eval()
    # Zero convs start at zero, so only they receive gradients at the first step; the UNet
    # must pass the gradient through to them.
    grad = cldm_init.controlnet.controlnet_mid_block.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for m in frozen for p in m.parameters())
    cldm_init.controlnet.zero_grad(set_to_none=True)


def test_vae_decode_is_differentiable_for_guidance(cldm) -> None:
    z = torch.randn(1, 4, 8, 8, requires_grad=True)
    cldm.vae_decode(z).mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
