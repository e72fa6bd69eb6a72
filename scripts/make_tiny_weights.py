"""Write tiny random-weight files in the released layouts, so every CLI runs on a CPU in seconds.

The files carry the released names (`model.io.weights.REGISTRY`), so `--weights-dir OUT` finds
them like the real weights folder. Their architecture is the tiny one of `configs/tiny/cldm.yaml`
and `configs/tiny/swinir.yaml`, recorded in OUT as well:

    OUT/tiny_config.yaml   {cldm: <ControlLDM config, original vocabulary>, swinir: <SwinIR kwargs>}
    OUT/cldm.yaml          the cldm part alone (for `--config` of convert_official, make_stage2_init)
    OUT/swinir.yaml        the swinir part alone (for `--swinir-config`)

    python -m scripts.make_tiny_weights --out weights/tiny
    python -m scripts.make_tiny_weights --full-size --only sd21_zsnr,v2.1,swinir_realesrgan \
        --out /tmp/full_weights   # v2.1's files at the released sizes (6.8 GB): benchmarks
    python -m scripts.convert_official controlnet weights/tiny/v2.pth v2.safetensors \\
        --config weights/tiny/cldm.yaml

Weights follow the reference fixtures' rule: N(0,1)/sqrt(fan_in) for tensors with 2 or more
dims, 1+0.1·N(0,1) for norm scales, 0.1·N(0,1) for other vectors. Nothing is zero, not even the
layers the original initialises to zero, so the control path changes the output. Each file has
its own generator, seeded from `--seed` and the file's registry name: same seed, same bytes.
"""

from __future__ import annotations

import argparse
import logging
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

from model.convert.cldm import original_params
from model.convert.controlnet import controlnet_state_to_original
from model.convert.sd import build_sd_modules, sd21_cldm_cfg, sd_states_to_original
from model.io.logs import setup_logging
from model.io.weights import REGISTRY
from model.nets.lacontrolnet import build_lacontrolnet
from model.nets.swinir import SwinIR, swinir_diffbir_config
from model.nets.unet import StateDict

logger = logging.getLogger(__name__)

TINY_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
CONFIG_FILE = "tiny_config.yaml"
CLDM_CONFIG_FILE = "cldm.yaml"
SWINIR_CONFIG_FILE = "swinir.yaml"
DIFFUSERS_DIR = "sd21_base_diffusers"

SD_NAMES = ("sd21_base", "sd21_zsnr")
CONTROLNET_NAMES = ("v1_general", "v1_face", "v2", "v2.1")
SWINIR_NAMES = ("swinir_general", "swinir_face", "swinir_realesrgan")
ALL_NAMES = ",".join((*SD_NAMES, *CONTROLNET_NAMES, *SWINIR_NAMES))
# Saved as {"state_dict": {"module." + key: ...}} (a DataParallel Lightning save), the others
# as a plain state dict; `model.io.checkpoint.load_weight_file` unwraps both.
WRAPPED_SWINIR = ("swinir_general", "swinir_face")


def file_seed(seed: int, name: str) -> int:
    """The generator seed of one file: independent of which other files are written."""
    # The CPU generator keeps only 32 bits of its seed, so hash seed and name together.
    return zlib.crc32(f"{seed}:{name}".encode())


def randomize_(module: nn.Module, generator: torch.Generator) -> None:
    """Overwrite every parameter in place (buffers keep their constructed values).

    Tensors with >= 2 dims get N(0,1)/sqrt(fan_in), fan_in = numel/shape[0]; 1-D `*weight`
    tensors (norm scales) 1+0.1·N(0,1); other 1-D and 0-D tensors 0.1·N(0,1).
    """
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.ndim >= 2:
                value = noise / (param.numel() / param.shape[0]) ** 0.5
            elif param.ndim == 1 and name.endswith("weight"):
                value = 1 + 0.1 * noise
            else:
                value = 0.1 * noise
            param.copy_(value)


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(file_seed(seed, name))


def tiny_sd_modules(cldm_cfg: Mapping[str, Any], seed: int, name: str) -> dict[str, nn.Module]:
    """Randomised UNet, VAE and text encoder ({"unet", "vae", "text_encoder"}) of one SD file."""
    modules = build_sd_modules(cldm_cfg)
    generator = _generator(seed, name)
    for key in ("unet", "vae", "text_encoder"):
        randomize_(modules[key], generator)
    return modules


def tiny_sd_state(modules: Mapping[str, nn.Module]) -> StateDict:
    """The SD-layout state dict (`model.diffusion_model.*`, `first_stage_model.*`, ...)."""
    states = {key: module.state_dict() for key, module in modules.items()}
    return sd_states_to_original(modules["unet"], states)


def tiny_controlnet_state(cldm_cfg: Mapping[str, Any], seed: int, name: str) -> StateDict:
    """A randomised LAControlNet in the original ControlNet layout (flat state dict)."""
    controlnet = build_lacontrolnet(**original_params(cldm_cfg)["controlnet_cfg"])
    randomize_(controlnet, _generator(seed, name))
    return controlnet_state_to_original(controlnet)


def tiny_swinir_state(swinir_cfg: Mapping[str, Any], seed: int, name: str) -> StateDict:
    """A randomised SwinIR state dict, buffers (masks, position indices) included."""
    model = SwinIR(**swinir_cfg)
    randomize_(model, _generator(seed, name))
    return model.state_dict()


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file as plain containers; one-line errors naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping, found {type(cfg).__name__}")
    return cfg


def tiny_cldm_config() -> dict[str, Any]:
    """The tiny ControlLDM config of configs/tiny/cldm.yaml (original vocabulary)."""
    return original_params(read_yaml(TINY_CONFIGS / CLDM_CONFIG_FILE))


def tiny_swinir_config() -> dict[str, Any]:
    """The tiny SwinIR constructor arguments of configs/tiny/swinir.yaml."""
    return read_yaml(TINY_CONFIGS / SWINIR_CONFIG_FILE)


def _save(obj: Any, path: Path, what: str) -> None:
    torch.save(obj, path)
    logger.info("wrote %s (%s, %.2f MB)", path, what, path.stat().st_size / 1e6)


def _write_yaml(data: Mapping[str, Any], path: Path, header: str) -> None:
    text = yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=None)
    path.write_text(f"# {header}\n{text}")
    logger.info("wrote %s", path)


def write_configs(
    out: Path, cldm_cfg: Mapping[str, Any], swinir_cfg: Mapping[str, Any]
) -> dict[str, Path]:
    """Write tiny_config.yaml ({cldm, swinir}) and its two parts; returns their paths."""
    paths = {
        "tiny_config": out / CONFIG_FILE,
        "cldm_config": out / CLDM_CONFIG_FILE,
        "swinir_config": out / SWINIR_CONFIG_FILE,
    }
    note = "Architecture of the tiny weights in this folder (scripts/make_tiny_weights.py)."
    _write_yaml({"cldm": cldm_cfg, "swinir": swinir_cfg}, paths["tiny_config"], note)
    _write_yaml(cldm_cfg, paths["cldm_config"], note + " ControlLDM, original vocabulary.")
    _write_yaml(swinir_cfg, paths["swinir_config"], note + " SwinIR constructor arguments.")
    return paths


def write_tiny_weights(
    out: str | Path,
    seed: int = 0,
    cldm_cfg: Mapping[str, Any] | None = None,
    swinir_cfg: Mapping[str, Any] | None = None,
    diffusers: bool = False,
    only: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write every tiny weight file (or those named in `only`) and the configs into `out`.

    Args:
        out: folder to write (created; existing files of the same names are replaced).
        seed: base seed; every file draws from its own generator (see `file_seed`).
        cldm_cfg: ControlLDM config in the original vocabulary (default configs/tiny/cldm.yaml).
        swinir_cfg: SwinIR constructor arguments (default configs/tiny/swinir.yaml).
        diffusers: also write the `sd21_base` UNet and VAE as diffusers folders
            (`sd21_base_diffusers/unet`, `.../vae`; no text encoder).
        only: registry names of the files to write (default: all of them).

    Returns:
        Paths by registry name (e.g. "v2.1"), plus "tiny_config", "cldm_config",
        "swinir_config" and, with `diffusers`, "diffusers" (the folder).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cldm_cfg = original_params(cldm_cfg if cldm_cfg is not None else tiny_cldm_config())
    swinir_cfg = dict(swinir_cfg if swinir_cfg is not None else tiny_swinir_config())
    paths = write_configs(out, cldm_cfg, swinir_cfg)
    unknown = sorted(set(only or ()) - set(ALL_NAMES.split(",")))
    if unknown:
        raise ValueError(f"unknown weight names {unknown}; known: {ALL_NAMES}")

    def wanted(names: Sequence[str]) -> list[str]:
        return [name for name in names if only is None or name in only]

    for name in wanted(SD_NAMES):
        paths[name] = out / REGISTRY[name].filename
        modules = tiny_sd_modules(cldm_cfg, seed, name)
        _save({"state_dict": tiny_sd_state(modules)}, paths[name], "SD, latent-diffusion layout")
        if diffusers and name == "sd21_base":
            paths["diffusers"] = out / DIFFUSERS_DIR
            for part in ("unet", "vae"):
                modules[part].save_pretrained(paths["diffusers"] / part)
                logger.info("wrote %s (diffusers %s)", paths["diffusers"] / part, part)
    for name in wanted(CONTROLNET_NAMES):
        paths[name] = out / REGISTRY[name].filename
        state = tiny_controlnet_state(cldm_cfg, seed, name)
        _save(state, paths[name], "LAControlNet, original ControlNet layout")
    for name in wanted(SWINIR_NAMES):
        paths[name] = out / REGISTRY[name].filename
        state = tiny_swinir_state(swinir_cfg, seed, name)
        if name in WRAPPED_SWINIR:
            state = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
        _save(state, paths[name], "SwinIR, " + _swinir_layout(name))
    return paths


def _swinir_layout(name: str) -> str:
    return "{'state_dict': {'module.*'}}" if name in WRAPPED_SWINIR else "plain state dict"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="folder to write the weight files and configs to"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="base seed; the same seed gives the same files"
    )
    parser.add_argument(
        "--cldm-config",
        type=Path,
        default=None,
        help="ControlLDM YAML in the original vocabulary (unet_cfg, controlnet_cfg, vae_cfg, "
        f"clip_cfg, latent_scale_factor); default {TINY_CONFIGS / CLDM_CONFIG_FILE}",
    )
    parser.add_argument(
        "--swinir-config",
        type=Path,
        default=None,
        help=f"YAML of SwinIR constructor arguments; default {TINY_CONFIGS / SWINIR_CONFIG_FILE}",
    )
    parser.add_argument(
        "--full-size",
        action="store_true",
        help="the released architectures (SD 2.1 ControlLDM, DiffBIR's SwinIR) instead of the "
        "tiny ones: GB-sized files, for benchmarks (use --only)",
    )
    parser.add_argument(
        "--only",
        type=lambda text: [name for name in text.split(",") if name],
        default=None,
        help=f"comma-separated registry names of the files to write (default all: {ALL_NAMES})",
    )
    parser.add_argument(
        "--diffusers",
        action="store_true",
        help=f"also write the SD UNet and VAE as diffusers folders under OUT/{DIFFUSERS_DIR}/ "
        "(save_pretrained; no text encoder)",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only or ()) - set(ALL_NAMES.split(",")))
    if unknown:
        parser.error(f"--only: unknown weight names {unknown}; known: {ALL_NAMES}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        cldm_cfg = None if args.cldm_config is None else read_yaml(args.cldm_config)
        swinir_cfg = None if args.swinir_config is None else read_yaml(args.swinir_config)
        if args.full_size:
            cldm_cfg, swinir_cfg = sd21_cldm_cfg(), swinir_diffbir_config()
        paths = write_tiny_weights(
            args.out, args.seed, cldm_cfg, swinir_cfg, args.diffusers, args.only
        )
    except OSError as exc:  # its message names the file
        print(f"error: {exc}")
        return 1
    except (KeyError, TypeError, ValueError) as exc:  # a config the modules cannot be built from
        sources = [str(p) for p in (args.cldm_config, args.swinir_config) if p is not None]
        print(f"error: {', '.join(sources) or TINY_CONFIGS}: {exc}")
        return 1
    print(f"wrote {len(paths)} files to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
