"""Checkpoint conversion: SD / ControlNet / v1 layouts, our safetensors files and the CLIs."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml

from model.convert.cldm import cldm_from_original, split_sd_state
from model.convert.controlnet import controlnet_state_to_original
from model.convert.sd import (
    build_sd_modules,
    sd21_cldm_cfg,
    sd_state_to_original,
    sd_states_to_original,
)
from model.convert.v1_full import split_v1_full_state
from model.io.cldm_files import (
    load_cldm,
    load_controlnet,
    load_sd,
    save_controlnet,
    save_sd,
    sd_state_to_ours,
)
from model.train.instantiate import instantiate
from scripts import convert_official, make_stage2_init
from tests.conftest import load_fixture, load_manifest, strip_prefix
from tests.test_cldm import tiny_original


def _meta_state(manifest: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in manifest.items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny() -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return tiny_original()


@pytest.fixture(scope="module")
def tiny_cldm(tiny):
    return cldm_from_original(*tiny)


def test_sd21_layout_matches_manifest() -> None:
    manifest = load_manifest("sd21_ldm_keys")
    with torch.device("meta"):
        modules = build_sd_modules(sd21_cldm_cfg())
    original = sd_states_to_original(
        modules["unet"], {k: m.state_dict() for k, m in modules.items()}
    )
    assert len(manifest) == 1228
    assert {k: list(v.shape) for k, v in original.items()} == manifest
    split = split_sd_state(modules, _meta_state(manifest))
    assert split.missing == [] and split.unused == []
    assert {k: len(v) for k, v in split.states.items()} == {
        "unet": 686,
        "vae": 248,
        "text_encoder": 294,
    }


def test_v1_full_layout_splits() -> None:
    parts = split_v1_full_state(_meta_state(load_manifest("diffbir_v1_full_keys")))
    assert parts.sd_state.keys() == load_manifest("sd21_ldm_keys").keys()
    assert parts.controlnet_state.keys() == load_manifest("diffbir_controlnet_keys").keys()
    assert parts.swinir_state.keys() == load_manifest("diffbir_swinir_keys").keys()
    assert parts.cond_encoder_mismatch == []


def test_v1_full_checks_cond_encoder_and_rejects_unknown_keys(tiny) -> None:
    _, sd_state, controlnet_state = tiny
    v1 = dict(sd_state) | {"control_model." + k: v for k, v in controlnet_state.items()}
    v1["cond_encoder.encoder.conv_in.weight"] = sd_state[
        "first_stage_model.encoder.conv_in.weight"
    ].clone()
    v1["cond_encoder.quant_conv.bias"] = torch.zeros_like(
        sd_state["first_stage_model.quant_conv.bias"]
    )
    v1["betas"] = torch.zeros(1000)
    parts = split_v1_full_state(v1)
    assert parts.cond_encoder_mismatch == ["cond_encoder.quant_conv.bias"]
    assert _equal(parts.controlnet_state, controlnet_state) and _equal(parts.sd_state, sd_state)
    with pytest.raises(KeyError, match="model_ema.decay"):
        split_v1_full_state(v1 | {"model_ema.decay": torch.zeros(())})


def test_sd_and_controlnet_round_trip_through_our_files(tiny, tiny_cldm, tmp_path) -> None:
    cfg, sd_state, controlnet_state = tiny
    assert _equal(sd_state_to_original(tiny_cldm), sd_state)
    assert _equal(controlnet_state_to_original(tiny_cldm.controlnet), controlnet_state)
    save_controlnet(tiny_cldm.controlnet, tmp_path / "cn.safetensors")
    reloaded = load_controlnet(tmp_path / "cn.safetensors")
    assert _equal(controlnet_state_to_original(reloaded), controlnet_state)
    save_sd(sd_state_to_ours(cfg, sd_state).states, cfg, tmp_path / "sd.safetensors")
    stored_cfg, back = load_sd(tmp_path / "sd.safetensors")
    assert _equal(back, sd_state)
    assert stored_cfg["unet_cfg"] == cfg["unet_cfg"]


def test_controlnet_file_config_instantiates(tiny_cldm, tmp_path) -> None:
    from model.io.cldm_files import read_safetensors_config

    save_controlnet(tiny_cldm.controlnet, tmp_path / "cn.safetensors")
    built = instantiate(read_safetensors_config(tmp_path / "cn.safetensors"))
    assert built.state_dict().keys() == tiny_cldm.controlnet.state_dict().keys()


def test_load_cldm_from_original_and_our_files(tiny, tiny_cldm, tmp_path) -> None:
    cfg, sd_state, controlnet_state = tiny
    torch.save({"state_dict": sd_state}, tmp_path / "sd.ckpt")
    torch.save(controlnet_state, tmp_path / "cn.pth")
    save_controlnet(tiny_cldm.controlnet, tmp_path / "cn.safetensors")
    save_sd(sd_state_to_ours(cfg, sd_state).states, cfg, tmp_path / "sd.safetensors")
    t = load_fixture("cldm_tiny")[0]
    cond = {"c_txt": t["in.context"], "c_img": t["in.hint"]}
    for sd_name, cn_name in (("sd.ckpt", "cn.pth"), ("sd.safetensors", "cn.safetensors")):
        model = load_cldm(cfg, tmp_path / sd_name, tmp_path / cn_name)
        with torch.no_grad():
            eps = model(t["in.x_noisy"], t["in.timesteps"], cond)
        torch.testing.assert_close(eps, t["out.eps"], atol=1e-4, rtol=1e-4)


def test_missing_extra_and_misshaped_keys(tiny, caplog) -> None:
    cfg, sd_state, controlnet_state = tiny
    key = "model.diffusion_model.out.2.bias"
    partial = {k: v for k, v in sd_state.items() if k != key}
    with pytest.raises(KeyError, match=key):
        cldm_from_original(cfg, partial, controlnet_state)
    with caplog.at_level(logging.INFO, logger="model.convert.sd"):
        cldm_from_original(
            cfg, partial | {"model_ema.extra": torch.zeros(1)}, controlnet_state, allow_missing=True
        )
    assert key in caplog.text and "model_ema.extra" in caplog.text
    bad = dict(sd_state) | {key: torch.zeros(3)}
    with pytest.raises(ValueError, match="out.2.bias"):
        cldm_from_original(cfg, bad, controlnet_state)
    cn_bad = {k: v for k, v in controlnet_state.items() if k != "middle_block_out.0.bias"}
    with pytest.raises(KeyError, match="middle_block_out.0.bias"):
        cldm_from_original(cfg, sd_state, cn_bad | {"zero_convs.42.0.weight": torch.zeros(1)})


def test_config_forms_are_accepted(tiny) -> None:
    cfg, sd_state, controlnet_state = tiny
    from omegaconf import OmegaConf

    wrapped = OmegaConf.create({"target": "diffbir.model.nets.cldm.ControlLDM", "params": cfg})
    model = cldm_from_original(wrapped, sd_state, controlnet_state)
    assert model.latent_scale_factor == pytest.approx(0.18215)
    with pytest.raises(ValueError, match="vae_cfg"):
        cldm_from_original({k: v for k, v in cfg.items() if k != "vae_cfg"}, sd_state)


def test_convert_official_cli_round_trips(tiny, tmp_path, capsys) -> None:
    cfg, sd_state, controlnet_state = tiny
    (tmp_path / "cldm.yaml").write_text(yaml.safe_dump(cfg))
    swinir_t, swinir_meta = load_fixture("swinir_tiny")
    swinir_state = strip_prefix(swinir_t, "swinir.")
    (tmp_path / "swinir.yaml").write_text(yaml.safe_dump(swinir_meta["config"]))
    torch.save(
        {"state_dict": sd_state | {"model_ema.decay": torch.zeros(())}}, tmp_path / "sd.ckpt"
    )
    torch.save(controlnet_state, tmp_path / "cn.pth")
    torch.save(swinir_state, tmp_path / "swinir.pth")
    flags = [
        "--config",
        str(tmp_path / "cldm.yaml"),
        "--swinir-config",
        str(tmp_path / "swinir.yaml"),
    ]
    for kind, name, original in (("sd", "sd", sd_state), ("controlnet", "cn", controlnet_state)):
        assert convert_official.main([kind, str(tmp_path / f"{name}.{'ckpt' if kind == 'sd' else 'pth'}"),
                                      str(tmp_path / f"{name}.safetensors"), *flags]) == 0  # fmt: skip
        assert (
            convert_official.main(
                [kind, str(tmp_path / f"{name}.safetensors"), str(tmp_path / f"{name}_back.pt")]
            )
            == 0
        )
        back = torch.load(tmp_path / f"{name}_back.pt", weights_only=True)
        assert _equal(back["state_dict"] if kind == "sd" else back, original)
    assert "model_ema.decay" in capsys.readouterr().out
    assert (
        convert_official.main(
            ["swinir", str(tmp_path / "swinir.pth"), str(tmp_path / "sw.safetensors"), *flags]
        )
        == 0
    )
    assert (
        convert_official.main(
            ["swinir", str(tmp_path / "sw.safetensors"), str(tmp_path / "sw_back.pth")]
        )
        == 0
    )
    assert _equal(torch.load(tmp_path / "sw_back.pth", weights_only=True), swinir_state)


def test_convert_official_cli_v1_full_and_errors(tiny, tmp_path, capsys) -> None:
    cfg, sd_state, controlnet_state = tiny
    swinir_t, swinir_meta = load_fixture("swinir_tiny")
    (tmp_path / "cldm.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "swinir.yaml").write_text(yaml.safe_dump(swinir_meta["config"]))
    v1 = sd_state | {"control_model." + k: v for k, v in controlnet_state.items()}
    v1 |= {"preprocess_model." + k: v for k, v in strip_prefix(swinir_t, "swinir.").items()}
    v1 |= {"cond_encoder." + k[len("first_stage_model.") :]: v for k, v in sd_state.items()
           if k.startswith(("first_stage_model.encoder.", "first_stage_model.quant_conv."))}  # fmt: skip
    torch.save({"state_dict": v1, "epoch": 3}, tmp_path / "full.ckpt")
    flags = [
        "--config",
        str(tmp_path / "cldm.yaml"),
        "--swinir-config",
        str(tmp_path / "swinir.yaml"),
    ]
    assert (
        convert_official.main(
            ["v1-full", str(tmp_path / "full.ckpt"), str(tmp_path / "v1"), *flags]
        )
        == 0
    )
    assert _equal(
        controlnet_state_to_original(load_controlnet(tmp_path / "v1/controlnet.safetensors")),
        controlnet_state,
    )
    assert _equal(load_sd(tmp_path / "v1/sd.safetensors")[1], sd_state)
    assert (tmp_path / "v1/swinir.safetensors").is_file()
    torch.save({"zero_convs.0.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    assert (
        convert_official.main(
            ["controlnet", str(tmp_path / "bad.pth"), str(tmp_path / "x.safetensors"), *flags]
        )
        == 1
    )
    assert "missing keys" in capsys.readouterr().out
    assert (
        convert_official.main(["sd", str(tmp_path / "nope.ckpt"), str(tmp_path / "x.safetensors")])
        == 1
    )
    assert "not found" in capsys.readouterr().out


def test_make_stage2_init_from_ckpt_and_diffusers_dir(tiny, tiny_cldm, tmp_path, capsys) -> None:
    cfg, sd_state, _ = tiny
    (tmp_path / "cldm.yaml").write_text(yaml.safe_dump(cfg))
    torch.save({"state_dict": sd_state}, tmp_path / "sd.ckpt")
    flags = ["--config", str(tmp_path / "cldm.yaml")]
    assert (
        make_stage2_init.main(
            [
                "--sd",
                str(tmp_path / "sd.ckpt"),
                "--output",
                str(tmp_path / "init.safetensors"),
                *flags,
            ]
        )
        == 0
    )
    assert "zero-extended" in capsys.readouterr().out
    init = load_controlnet(tmp_path / "init.safetensors")
    unet_state = tiny_cldm.unet.state_dict()
    assert torch.equal(init.state_dict()["conv_in.weight"][:, :4], unet_state["conv_in.weight"])
    assert not init.controlnet_mid_block.weight.any()
    tiny_cldm.unet.save_pretrained(tmp_path / "diffusers" / "unet")
    assert (
        make_stage2_init.main(
            ["--sd", str(tmp_path / "diffusers"), "--output", str(tmp_path / "init.pth")]
        )
        == 0
    )
    from_dir = torch.load(tmp_path / "init.pth", weights_only=True)
    assert _equal(from_dir, controlnet_state_to_original(init))
    assert (
        make_stage2_init.main(
            ["--sd", str(tmp_path / "missing.ckpt"), "--output", str(tmp_path / "o.pth")]
        )
        == 1
    )
