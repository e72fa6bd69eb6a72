"""Tiny random weights in the released layouts: every file loads through the real loaders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from omegaconf import OmegaConf

from model.convert.cldm import cldm_from_original, original_params
from model.io.checkpoint import load_weight_file
from model.io.cldm_files import (
    load_cldm,
    read_controlnet_original,
    read_sd_original,
    sd_state_to_ours,
)
from model.io.weights import REGISTRY, resolve_weights
from model.nets.swinir import SwinIR, load_swinir
from scripts import convert_official, make_tiny_weights
from scripts.make_tiny_weights import (
    CONTROLNET_NAMES,
    SD_NAMES,
    SWINIR_NAMES,
    WRAPPED_SWINIR,
    write_tiny_weights,
)

WEIGHT_NAMES = SD_NAMES + CONTROLNET_NAMES + SWINIR_NAMES
# (SD file, ControlNet file) as the released versions pair them.
VERSIONS = [
    ("sd21_base", "v1_general"),
    ("sd21_base", "v1_face"),
    ("sd21_base", "v2"),
    ("sd21_zsnr", "v2.1"),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_weights")
    assert make_tiny_weights.main(["--out", str(out), "--seed", "0", "--diffusers"]) == 0
    return out


@pytest.fixture(scope="module")
def configs(tiny_dir: Path) -> tuple[dict, dict]:
    """(cldm config, SwinIR kwargs) as a loader reads them from the folder."""
    tree = OmegaConf.to_container(OmegaConf.load(tiny_dir / make_tiny_weights.CONFIG_FILE))
    return tree["cldm"], tree["swinir"]


def test_writes_every_file_under_its_released_name(tiny_dir: Path) -> None:
    written = {p.name for p in tiny_dir.iterdir() if p.is_file()}
    expected = {REGISTRY[name].filename for name in WEIGHT_NAMES}
    assert written == expected | {"tiny_config.yaml", "cldm.yaml", "swinir.yaml"}
    assert sum((tiny_dir / f).stat().st_size for f in expected) < 40e6
    found = resolve_weights(WEIGHT_NAMES, [tiny_dir], download=False)
    assert found == {name: tiny_dir / REGISTRY[name].filename for name in WEIGHT_NAMES}


def test_configs_are_the_tiny_ones_and_consistent(tiny_dir: Path, configs) -> None:
    cldm_cfg, swinir_cfg = configs
    assert cldm_cfg == make_tiny_weights.tiny_cldm_config()
    assert swinir_cfg == make_tiny_weights.tiny_swinir_config()
    width = cldm_cfg["clip_cfg"]["text_cfg"]["width"]
    assert cldm_cfg["unet_cfg"]["context_dim"] == cldm_cfg["controlnet_cfg"]["context_dim"] == width
    parts = [OmegaConf.load(tiny_dir / f) for f in ("cldm.yaml", "swinir.yaml")]
    assert original_params(parts[0]) == cldm_cfg and OmegaConf.to_container(parts[1]) == swinir_cfg


def test_file_layouts(tiny_dir: Path) -> None:
    sd = torch.load(tiny_dir / "v2-1_512-ema-pruned.ckpt", weights_only=True)
    assert list(sd) == ["state_dict"]
    prefixes = {k.split(".")[0] for k in sd["state_dict"]}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert any(k.startswith("cond_stage_model.model.transformer.") for k in sd["state_dict"])
    controlnet = torch.load(tiny_dir / "v2.pth", weights_only=True)
    assert controlnet["input_blocks.0.0.weight"].shape == (32, 8, 3, 3)
    # The layers the original zero-initialises are random here, hint channels included.
    for key in ("zero_convs.0.0.weight", "middle_block_out.0.weight"):
        assert controlnet[key].std() > 0.1
    assert controlnet["input_blocks.0.0.weight"][:, 4:].std() > 0.05
    for name in SWINIR_NAMES:
        raw = torch.load(tiny_dir / REGISTRY[name].filename, weights_only=True)
        if name in WRAPPED_SWINIR:
            assert list(raw) == ["state_dict"]
            assert all(k.startswith("module.") for k in raw["state_dict"])
        else:
            assert not any(k.startswith("module.") for k in raw)


@pytest.mark.parametrize(("sd_name", "controlnet_name"), VERSIONS)
def test_controlled_ldm_loads_strictly_and_runs(
    tiny_dir: Path, configs, sd_name: str, controlnet_name: str
) -> None:
    cldm_cfg, _ = configs
    sd_path = tiny_dir / REGISTRY[sd_name].filename
    controlnet_path = tiny_dir / REGISTRY[controlnet_name].filename
    split = sd_state_to_ours(cldm_cfg, read_sd_original(sd_path))
    assert split.missing == [] and split.unused == []
    cldm = load_cldm(cldm_cfg, sd_path, controlnet_path)
    assert len(cldm.control_scales) == 13
    hq = torch.rand(2, 3, 64, 64)
    c_img = cldm.vae_encode(hq * 2 - 1)
    c_txt = cldm.encode_text(["", "a photo of a cat"])
    assert c_img.shape == (2, 4, 8, 8) and c_txt.shape == (2, 77, 16)
    z_t, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        eps = cldm(z_t, t, {"c_txt": c_txt, "c_img": c_img})
        cldm.control_scales = [0.0] * 13
        eps_no_control = cldm(z_t, t, {"c_txt": c_txt, "c_img": c_img})
        decoded = cldm.vae_decode(c_img)
    assert eps.shape == z_t.shape and torch.isfinite(eps).all()
    assert 0.1 < eps.std() < 10
    assert (eps - eps_no_control).norm() > 0.2 * eps_no_control.norm()
    assert decoded.shape == hq.shape and torch.isfinite(decoded).all()


def test_files_hold_different_weights(tiny_dir: Path, configs) -> None:
    sd = [read_sd_original(tiny_dir / REGISTRY[n].filename) for n in SD_NAMES]
    key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(sd[0][key], sd[1][key])
    controlnets = [
        read_controlnet_original(tiny_dir / REGISTRY[n].filename) for n in CONTROLNET_NAMES
    ]
    firsts = [c["input_blocks.0.0.weight"] for c in controlnets]
    assert all(not torch.equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1 :])


@pytest.mark.parametrize("name", SWINIR_NAMES)
def test_swinir_loads_strictly_and_runs(tiny_dir: Path, configs, name: str) -> None:
    _, swinir_cfg = configs
    path = tiny_dir / REGISTRY[name].filename
    assert load_weight_file(path).keys() == SwinIR(**swinir_cfg).state_dict().keys()
    model = load_swinir(path, swinir_cfg)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 128))
    assert out.shape == (1, 3, 64, 128) and torch.isfinite(out).all()
    assert 0.01 < out.std() < 2


def test_same_seed_same_bytes_other_seed_other_weights(tiny_dir: Path, tmp_path: Path) -> None:
    again = write_tiny_weights(tmp_path / "again", seed=0)
    for name in WEIGHT_NAMES:
        assert again[name].read_bytes() == (tiny_dir / again[name].name).read_bytes(), name
    other = write_tiny_weights(tmp_path / "other", seed=1)
    a = load_weight_file(again["v2.1"])
    b = load_weight_file(other["v2.1"])
    assert a.keys() == b.keys() and not torch.equal(
        a["time_embed.0.weight"], b["time_embed.0.weight"]
    )


def test_diffusers_folders_hold_the_sd21_base_weights(tiny_dir: Path, configs) -> None:
    folder = tiny_dir / make_tiny_weights.DIFFUSERS_DIR
    cldm = cldm_from_original(configs[0], read_sd_original(tiny_dir / "v2-1_512-ema-pruned.ckpt"))
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
    for ours, theirs in ((cldm.unet, unet), (cldm.vae, vae)):
        expected = ours.state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in theirs.state_dict().items())
        assert theirs.state_dict().keys() == expected.keys()


def test_folder_configs_work_with_convert_official(tiny_dir: Path, tmp_path: Path) -> None:
    argv = ["controlnet", str(tiny_dir / "v2.pth"), str(tmp_path / "v2.safetensors")]
    assert convert_official.main([*argv, "--config", str(tiny_dir / "cldm.yaml")]) == 0
    argv = ["swinir", str(tiny_dir / "face_swinir_v1.ckpt"), str(tmp_path / "swinir.safetensors")]
    assert convert_official.main([*argv, "--swinir-config", str(tiny_dir / "swinir.yaml")]) == 0


def test_cli_reports_bad_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert make_tiny_weights.main(["--out", str(tmp_path), "--cldm-config", str(missing)]) == 1
    assert f"{missing}: config file not found" in capsys.readouterr().out
    broken = tmp_path / "broken.yaml"
    broken.write_text("unet_cfg: {}\ncontrolnet_cfg: {}\nclip_cfg: {}\n")
    assert make_tiny_weights.main(["--out", str(tmp_path), "--cldm-config", str(broken)]) == 1
    message = capsys.readouterr().out
    assert message.startswith(f"error: {broken}:") and "vae_cfg" in message


def test_only_writes_the_named_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert make_tiny_weights.main(["--out", str(tmp_path), "--only", "v2.1"]) == 0
    weights = {p.name for p in tmp_path.iterdir() if p.suffix not in (".yaml",)}
    assert weights == {REGISTRY["v2.1"].filename}
    with pytest.raises(SystemExit) as exit_info:
        make_tiny_weights.main(["--out", str(tmp_path), "--only", "v2.1,v3"])
    assert exit_info.value.code == 2 and "unknown weight names ['v3']" in capsys.readouterr().err
