"""LAControlNet against the original ControlNet (fixture cldm_tiny), its layout and its init."""

from __future__ import annotations

import pytest
import torch

from model.convert.controlnet import controlnet_keys_to_original, controlnet_state_from_original
from model.convert.unet import unet_state_from_original
from model.nets.lacontrolnet import (
    LAControlNet,
    build_lacontrolnet,
    diffbir_controlnet_cfg,
    lacontrolnet_from_unet,
)
from model.nets.unet import UNetLayout, build_unet
from tests.conftest import load_fixture, load_manifest, strip_prefix

TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(scope="module")
def fixture() -> tuple[dict[str, torch.Tensor], dict]:
    return load_fixture("cldm_tiny")


@pytest.fixture(scope="module")
def tiny_controlnet(fixture) -> LAControlNet:
    tensors, meta = fixture
    controlnet = build_lacontrolnet(**meta["config"]["controlnet_cfg"]).eval()
    state = controlnet_state_from_original(strip_prefix(tensors, "controlnet."), controlnet.layout)
    controlnet.load_state_dict(state, strict=True)
    return controlnet


@pytest.fixture(scope="module")
def tiny_unet(fixture):
    tensors, meta = fixture
    cfg = meta["config"]["unet_cfg"]
    unet = build_unet(**cfg).eval()
    unet.load_state_dict(
        unet_state_from_original(strip_prefix(tensors, "unet."), UNetLayout.from_original(cfg))
    )
    return unet


def test_control_tensors_match_fixture(fixture, tiny_controlnet) -> None:
    t = fixture[0]
    with torch.no_grad():
        control = tiny_controlnet(t["in.x_noisy"], t["in.timesteps"], t["in.context"], t["in.hint"])
    assert (
        len(control)
        == fixture[1]["num_control_tensors"]
        == tiny_controlnet.layout.num_control_tensors
    )
    for i, c in enumerate(control):
        torch.testing.assert_close(c, t[f"out.control.{i}"], **TOL)


def test_original_round_trip_is_lossless(fixture, tiny_controlnet) -> None:
    original = strip_prefix(fixture[0], "controlnet.")
    assert len(original) == len(tiny_controlnet.state_dict())
    back = controlnet_keys_to_original(tiny_controlnet.state_dict(), tiny_controlnet.layout)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_from_unet_report_and_zero_residuals(fixture, tiny_unet) -> None:
    t = fixture[0]
    controlnet, report = lacontrolnet_from_unet(tiny_unet, hint_channels=4)
    state = controlnet.state_dict()
    n_convs = controlnet.layout.num_control_tensors
    assert report.zero_extended == ["conv_in.weight"]
    assert len(report.zero_initialised) == 2 * n_convs
    assert all(k.startswith("controlnet_") and not state[k].any() for k in report.zero_initialised)
    assert len(report.copied) + 1 + 2 * n_convs == len(state)
    unet_state = tiny_unet.state_dict()
    assert all(torch.equal(state[k], unet_state[k]) for k in report.copied)
    assert torch.equal(state["conv_in.weight"][:, :4], unet_state["conv_in.weight"])
    assert not state["conv_in.weight"][:, 4:].any()
    assert "zero-extended" in report.format()
    with torch.no_grad():
        control = controlnet(t["in.x_noisy"], t["in.timesteps"], t["in.context"], t["in.hint"])
    assert all(not c.any() for c in control)
    assert LAControlNet.from_unet(tiny_unet).state_dict().keys() == state.keys()


def test_full_size_layout_and_control_shapes() -> None:
    manifest = load_manifest("diffbir_controlnet_keys")
    with torch.device("meta"):
        controlnet = build_lacontrolnet(**diffbir_controlnet_cfg())
        z = torch.empty(1, 4, 64, 64)
        control = controlnet(z, torch.tensor([999]), torch.empty(1, 77, 1024), z)
    original = controlnet_keys_to_original(controlnet.state_dict(), controlnet.layout)
    assert len(manifest) == 324
    assert {k: list(v.shape) for k, v in original.items()} == manifest
    meta_state = {k: torch.empty(s, device="meta") for k, s in manifest.items()}
    assert (
        controlnet_state_from_original(meta_state, controlnet.layout).keys()
        == controlnet.state_dict().keys()
    )
    expected = load_manifest("manifest_info")["notes"][
        "full_size_control_tensor_shapes_for_1x4x64x64_latent"
    ]
    assert len(expected) == 13
    assert [list(c.shape) for c in control] == expected


def test_from_unet_matches_released_layout_at_full_size() -> None:
    # make_stage2_init's path: a ControlNet derived from the SD 2.1 UNet has the released keys.
    from model.nets.unet import sd21_unet_cfg

    with torch.device("meta"):
        controlnet, report = lacontrolnet_from_unet(build_unet(**sd21_unet_cfg()))
    original = controlnet_keys_to_original(controlnet.state_dict(), controlnet.layout)
    assert {k: list(v.shape) for k, v in original.items()} == load_manifest(
        "diffbir_controlnet_keys"
    )
    # 298 keys are shared with the UNet, one of them (the input conv) zero-extended.
    assert len(report.copied) == 297 and report.zero_extended == ["conv_in.weight"]
    assert len(report.zero_initialised) == 26


def test_gradient_checkpointing_gives_same_gradients(fixture, tiny_controlnet) -> None:
    t = fixture[0]
    grads = []
    for enabled in (False, True):
        tiny_controlnet.zero_grad()
        if enabled:
            tiny_controlnet.enable_gradient_checkpointing()
        control = tiny_controlnet(t["in.x_noisy"], t["in.timesteps"], t["in.context"], t["in.hint"])
        sum(c.square().mean() for c in control).backward()
        grads.append(tiny_controlnet.conv_in.weight.grad.clone())
    tiny_controlnet.disable_gradient_checkpointing()
    tiny_controlnet.zero_grad()
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_bad_inputs_raise(tiny_controlnet) -> None:
    bad = {"zero_convs.99.0.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match="zero_convs.99.0.weight"):
        controlnet_state_from_original(bad, tiny_controlnet.layout)
    with pytest.raises(ValueError, match="out_channels"):
        build_lacontrolnet(**(diffbir_controlnet_cfg() | {"out_channels": 4}))
