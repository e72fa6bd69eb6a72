"""The SD VAE on diffusers against the original AutoencoderKL (fixture vae_tiny) and layout."""

from __future__ import annotations

import pytest
import torch

from model.convert.sd import sd21_cldm_cfg
from model.convert.vae import vae_state_from_original, vae_state_to_original
from model.nets.vae import LATENT_SCALE_FACTOR, build_vae
from tests.conftest import load_fixture, load_manifest, strip_prefix

TOL = {"atol": 1e-4, "rtol": 1e-4}

SD21_DDCONFIG = sd21_cldm_cfg()["vae_cfg"]["ddconfig"]


@pytest.fixture(scope="module")
def fixture() -> tuple[dict[str, torch.Tensor], dict]:
    return load_fixture("vae_tiny")


@pytest.fixture(scope="module")
def tiny_vae(fixture):
    tensors, meta = fixture
    vae = build_vae(**meta["config"]).eval()
    vae.load_state_dict(vae_state_from_original(strip_prefix(tensors, "vae.")), strict=True)
    return vae


def test_encode_decode_match_fixture(fixture, tiny_vae) -> None:
    tensors, _ = fixture
    with torch.no_grad():
        posterior = tiny_vae.encode(tensors["in.image"]).latent_dist
        decoded = tiny_vae.decode(posterior.mode()).sample
    torch.testing.assert_close(posterior.parameters, tensors["out.moments"], **TOL)
    torch.testing.assert_close(posterior.mean, tensors["out.mean"], **TOL)
    torch.testing.assert_close(posterior.logvar, tensors["out.logvar"], **TOL)
    torch.testing.assert_close(decoded, tensors["out.decoded"], **TOL)


def test_latent_scaling_matches_fixture(fixture, tiny_vae) -> None:
    tensors, meta = fixture
    assert tiny_vae.config.scaling_factor == LATENT_SCALE_FACTOR == meta["latent_scale_factor"]
    with torch.no_grad():
        cond_latent = tiny_vae.encode(tensors["in.image01"] * 2 - 1).latent_dist.mode()
        cond_latent = cond_latent * tiny_vae.config.scaling_factor
        decoded = tiny_vae.decode(tensors["out.cond_latent"] / tiny_vae.config.scaling_factor)
    torch.testing.assert_close(cond_latent, tensors["out.cond_latent"], **TOL)
    torch.testing.assert_close(decoded.sample, tensors["out.decoded_from_cond_latent"], **TOL)


def test_round_trip_is_exact(fixture) -> None:
    original = strip_prefix(fixture[0], "vae.")
    ours = vae_state_from_original(original)
    assert ours["encoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)
    back = vae_state_to_original(ours)
    assert list(back) == list(original)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and back[key].shape == tensor.shape
        assert torch.equal(back[key], tensor), key


def test_sd21_layout_matches_manifest() -> None:
    prefix = "first_stage_model."
    expected = {
        k[len(prefix) :]: v
        for k, v in load_manifest("sd21_ldm_keys").items()
        if k.startswith(prefix)
    }
    with torch.device("meta"):
        vae = build_vae(4, SD21_DDCONFIG)
    ours = {k: list(v.shape) for k, v in vae_state_to_original(vae.state_dict()).items()}
    assert ours == expected
    assert len(ours) == 248
    # And back: the manifest layout converts onto exactly our parameters.
    shapes = {k: torch.empty(v, device="meta") for k, v in expected.items()}
    converted = vae_state_from_original(shapes)
    assert {k: v.shape for k, v in converted.items()} == {
        k: v.shape for k, v in vae.state_dict().items()
    }


def test_encoder_only_state_converts(fixture) -> None:
    # v1 checkpoints hold a second copy of encoder + quant_conv (`cond_encoder.*`).
    original = strip_prefix(fixture[0], "vae.")
    part = {k: v for k, v in original.items() if k.startswith(("encoder.", "quant_conv."))}
    ours = vae_state_from_original(part)
    assert all(k.startswith(("encoder.", "quant_conv.")) for k in ours)
    assert vae_state_to_original(ours).keys() == part.keys()


@pytest.mark.parametrize(
    "key",
    ["encoder.mid.attn_1.foo.weight", "loss.logvar", "first_stage_model.encoder.conv_in.weight"],
)
def test_unknown_original_key_is_named(fixture, key: str) -> None:
    original = dict(strip_prefix(fixture[0], "vae."))
    original[key] = torch.zeros(1)
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        vae_state_from_original(original)


def test_unknown_diffusers_key_is_named(tiny_vae) -> None:
    state = dict(tiny_vae.state_dict())
    state["decoder.up_blocks.0.attentions.0.to_q.weight"] = torch.zeros(1, 1)
    with pytest.raises(KeyError, match="up_blocks.0.attentions"):
        vae_state_to_original(state)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attn_resolutions": [16]}, "attn_resolutions"),
        ({"z_channels": 8}, "z_channels"),
        ({"double_z": False}, "double_z"),
        ({"dropout": 0.1}, "dropout"),
        ({"use_linear_attn": True}, "unknown"),
    ],
)
def test_unsupported_config_is_rejected(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message), torch.device("meta"):
        build_vae(4, {**SD21_DDCONFIG, **change})
