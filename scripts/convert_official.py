"""Convert released DiffBIR / Stable Diffusion weight files to our safetensors files and back.

The direction follows the input: a `.safetensors` file of ours is converted back to the
original layout, anything else (`.ckpt`, `.pth`, `.pt`) to ours.

    python -m scripts.convert_official controlnet weights/v2.pth weights/v2.safetensors
    python -m scripts.convert_official controlnet weights/v2.safetensors weights/v2_back.pth
    python -m scripts.convert_official sd weights/v2-1_512-ema-pruned.ckpt weights/sd21.safetensors
    python -m scripts.convert_official swinir weights/general_swinir_v1.ckpt weights/swinir.safetensors
    python -m scripts.convert_official v1-full weights/general_full_v1.ckpt weights/general_v1/
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from model.convert.cldm import check_controlnet_original, original_params
from model.convert.controlnet import controlnet_state_from_original
from model.convert.sd import sd21_cldm_cfg
from model.convert.v1_full import split_v1_full_state
from model.io.checkpoint import WeightFileError, load_weight_file, save_safetensors
from model.io.cldm_files import (
    controlnet_config,
    load_sd,
    read_controlnet_original,
    save_sd,
    sd_state_to_ours,
)
from model.io.logs import setup_logging
from model.nets.lacontrolnet import build_lacontrolnet
from model.nets.swinir import (
    SwinIR,
    load_swinir,
    load_swinir_state,
    save_swinir,
    swinir_diffbir_config,
)

KINDS = ("sd", "controlnet", "swinir", "v1-full")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=KINDS, help="which kind of weight file INPUT is")
    parser.add_argument(
        "input", type=Path, help="released file (.ckpt/.pth/.pt) or one of our .safetensors"
    )
    parser.add_argument(
        "output",
        type=Path,
        help="output file (.safetensors when converting to ours); a folder for v1-full",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="ControlLDM YAML in the original vocabulary (unet_cfg, controlnet_cfg, vae_cfg, "
        "clip_cfg, latent_scale_factor) for sd/controlnet/v1-full (default: DiffBIR on SD 2.1)",
    )
    parser.add_argument(
        "--swinir-config",
        type=Path,
        default=None,
        help="YAML of SwinIR constructor arguments for swinir/v1-full (default: DiffBIR's stage-1 SwinIR)",
    )
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="sd/v1-full: write the SD file even if the checkpoint lacks some keys (they are listed)",
    )
    return parser.parse_args(argv)


def _load_config(path: Path | None, default: Mapping[str, Any]) -> dict[str, Any]:
    if path is None:
        return dict(default)
    if not path.is_file():
        raise WeightFileError(f"{path}: config file not found")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def _report(what: str, keys: Sequence[str]) -> None:
    if keys:
        print(f"{len(keys)} {what}:")
        for key in keys:
            print(f"  {key}")


def controlnet_to_ours(
    state: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], output: Path
) -> None:
    """Check an original ControlNet state dict against the config and write ours."""
    with torch.device("meta"):
        controlnet = build_lacontrolnet(**original_params(cfg)["controlnet_cfg"])
    check_controlnet_original(controlnet, state)
    save_safetensors(
        controlnet_state_from_original(state, controlnet.layout),
        output,
        controlnet_config(controlnet),
    )
    print(f"wrote {output} ({len(state)} tensors)")


def sd_to_ours(
    state: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], output: Path, allow_missing: bool
) -> None:
    """Split an SD-layout state dict into our components and write our SD file."""
    split = sd_state_to_ours(cfg, state, allow_missing=True)
    _report("unused keys (ignored, as the original loader does)", split.unused)
    _report("missing keys", split.missing)
    if split.missing and not allow_missing:
        raise KeyError(f"{len(split.missing)} missing keys (use --allow-missing to write anyway)")
    save_sd(split.states, cfg, output)
    print(f"wrote {output} ({sum(len(s) for s in split.states.values())} tensors)")


def swinir_to_ours(
    state: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], source: Path, output: Path
) -> None:
    """Load a SwinIR state dict strictly into the configured model and write ours."""
    model = SwinIR(**cfg)
    load_swinir_state(model, state, source)
    save_swinir(model, output)
    print(f"wrote {output} ({len(state)} tensors)")


def v1_full_to_ours(args: argparse.Namespace, cldm_cfg: Mapping[str, Any]) -> None:
    """Write controlnet / swinir / sd safetensors files of a v1 Lightning checkpoint."""
    parts = split_v1_full_state(load_weight_file(args.input))
    _report(
        "cond_encoder tensors that differ from the VAE encoder (ignored)",
        parts.cond_encoder_mismatch,
    )
    args.output.mkdir(parents=True, exist_ok=True)
    controlnet_to_ours(parts.controlnet_state, cldm_cfg, args.output / "controlnet.safetensors")
    swinir_cfg = _load_config(args.swinir_config, swinir_diffbir_config())
    swinir_to_ours(parts.swinir_state, swinir_cfg, args.input, args.output / "swinir.safetensors")
    sd_to_ours(parts.sd_state, cldm_cfg, args.output / "sd.safetensors", args.allow_missing)


def to_original(args: argparse.Namespace) -> None:
    """Write one of our safetensors files back in the original layout (torch.save)."""
    if args.kind == "controlnet":
        state: Any = read_controlnet_original(args.input)
    elif args.kind == "sd":
        state = {"state_dict": load_sd(args.input)[1]}
    elif args.kind == "swinir":
        state = load_swinir(args.input).state_dict()
    else:
        raise ValueError(
            "v1-full files are only converted to ours (controlnet, swinir and sd files)"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.output)
    print(f"wrote {args.output}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        if args.input.suffix == ".safetensors":
            to_original(args)
        elif args.kind == "swinir":
            cfg = _load_config(args.swinir_config, swinir_diffbir_config())
            swinir_to_ours(load_weight_file(args.input), cfg, args.input, args.output)
        else:
            cldm_cfg = _load_config(args.config, sd21_cldm_cfg())
            if args.kind == "v1-full":
                v1_full_to_ours(args, cldm_cfg)
            elif args.kind == "controlnet":
                controlnet_to_ours(load_weight_file(args.input), cldm_cfg, args.output)
            else:
                sd_to_ours(load_weight_file(args.input), cldm_cfg, args.output, args.allow_missing)
    except WeightFileError as exc:  # its message already names the file
        print(f"error: {exc}")
        return 1
    except (KeyError, ValueError) as exc:
        # KeyError's str() adds quotes; print the message itself.
        print(f"error: {args.input}: {exc.args[0] if exc.args else exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
