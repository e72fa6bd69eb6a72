"""The SD UNet on diffusers against the original ControlledUnetModel (fixture cldm_tiny) and layout."""

from __future__ import annotations

import pytest
import torch

from model.convert.unet import unet_state_from_original, unet_state_to_original
from model.nets.unet import UNetLayout, build_unet, sd21_unet_cfg
from tests.conftest import load_fixture, load_manifest, strip_prefix

TOL = {"atol": 1e-4, "rtol": 1e-4}
SD_PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def fixture() -> tuple[dict[str, torch.Tensor], dict]:
    return load_fixture("cldm_tiny")


@pytest.fixture(scope="module")
def tiny_unet(fixture):
    tensors, meta = fixture
    cfg = meta["config"]["unet_cfg"]
    unet = build_unet(**cfg).eval()
    state = unet_state_from_original(strip_prefix(tensors, "unet."), UNetLayout.from_original(cfg))
    unet.load_state_dict(state, strict=True)
    return unet


def test_uncontrolled_output_matches_fixture(fixture, tiny_unet) -> None:
    t = fixture[0]
    with torch.no_grad():
        eps = tiny_unet(t["in.x_noisy"], t["in.timesteps"], t["in.context"]).sample
    torch.testing.assert_close(eps, t["out.eps_no_control"], **TOL)


@pytest.mark.parametrize(
    ("name", "scales"),
    [
        ("out.eps", [1.0] * 10),
        ("out.eps_scale_0_5", [0.5] * 10),
        ("out.eps_scale_ramp", [0.1 * (i + 1) for i in range(10)]),
    ],
)
def test_fixture_control_tensors_as_residuals(fixture, tiny_unet, name, scales) -> None:
    # README reference point: the stored control tensors, scaled, fed as diffusers residuals.
    t = fixture[0]
    control = [t[f"out.control.{i}"] * s for i, s in enumerate(scales)]
    with torch.no_grad():
        eps = tiny_unet(
            t["in.x_noisy"],
            t["in.timesteps"],
            t["in.context"],
            down_block_additional_residuals=tuple(control[:-1]),
            mid_block_additional_residual=control[-1],
        ).sample
    torch.testing.assert_close(eps, t[name], **TOL)


def test_tiny_round_trip_is_lossless(fixture) -> None:
    tensors, meta = fixture
    original = strip_prefix(tensors, "unet.")
    layout = UNetLayout.from_original(meta["config"]["unet_cfg"])
    back = unet_state_to_original(unet_state_from_original(original, layout), layout)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_sd21_layout_matches_manifest() -> None:
    manifest = {
        k[len(SD_PREFIX) :]: v
        for k, v in load_manifest("sd21_ldm_keys").items()
        if k.startswith(SD_PREFIX)
    }
    cfg = sd21_unet_cfg()
    with torch.device("meta"):
        unet = build_unet(**cfg)
    layout = UNetLayout.from_original(cfg)
    ours = unet.state_dict()
    original = unet_state_to_original(ours, layout)
    assert len(manifest) == 686
    assert {k: list(v.shape) for k, v in original.items()} == manifest
    # And back: every diffusers key is reached from the manifest, with nothing left over.
    meta_state = {k: torch.empty(s, device="meta") for k, s in manifest.items()}
    assert unet_state_from_original(meta_state, layout).keys() == ours.keys()
    assert [len(b.attentions) for b in unet.down_blocks if hasattr(b, "attentions")] == [2, 2, 2]
    heads = [b.attentions[0].transformer_blocks[0].attn1.heads for b in unet.down_blocks[:3]]
    assert heads == [5, 10, 20]


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_res_blocks": 1, "channel_mult": [1, 2], "attention_resolutions": [2]},
        {"channel_mult": [1], "attention_resolutions": []},
        {
            "channel_mult": [1, 2, 2],
            "attention_resolutions": [1, 4],
            "num_head_channels": -1,
            "num_heads": 2,
        },
        {"num_res_blocks": 3, "transformer_depth": 2, "use_linear_in_transformer": False},
    ],
)
def test_other_layouts_convert_both_ways(overrides) -> None:
    cfg = {
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "attention_resolutions": [1, 2],
        "num_res_blocks": 2,
        "channel_mult": [1, 1, 2],
        "num_head_channels": 8,
        "context_dim": 16,
        "use_linear_in_transformer": True,
    } | overrides
    with torch.device("meta"):
        unet = build_unet(**cfg)
    layout = UNetLayout.from_original(cfg)
    ours = unet.state_dict()
    original = unet_state_to_original(ours, layout)
    levels = len(cfg["channel_mult"])
    inputs = {int(k.split(".")[1]) for k in original if k.startswith("input_blocks.")}
    outputs = {int(k.split(".")[1]) for k in original if k.startswith("output_blocks.")}
    assert inputs == set(range(1 + levels * cfg["num_res_blocks"] + levels - 1))
    assert outputs == set(range(levels * (cfg["num_res_blocks"] + 1)))
    assert layout.num_control_tensors == len(inputs) + 1
    assert unet_state_from_original(original, layout).keys() == ours.keys()


def test_unknown_keys_and_settings_raise() -> None:
    layout = UNetLayout(num_res_blocks=2, attention_levels=(True, False))
    with pytest.raises(KeyError, match="input_blocks.99.0.weight"):
        unet_state_from_original({"input_blocks.99.0.weight": torch.zeros(1)}, layout)
    with pytest.raises(KeyError, match="in_layers.7.weight"):
        unet_state_from_original({"input_blocks.1.0.in_layers.7.weight": torch.zeros(1)}, layout)
    with pytest.raises(ValueError, match="use_scale_shift_norm"):
        build_unet(**(sd21_unet_cfg() | {"use_scale_shift_norm": True}))
    with pytest.raises(ValueError, match="unknown keys"):
        build_unet(**(sd21_unet_cfg() | {"bogus": 1}))
