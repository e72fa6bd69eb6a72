"""Build the initial LAControlNet for stage-2 training from a Stable Diffusion UNet.

Encoder weights are copied from the UNet, the input-conv weights of the extra condition-latent
channels start at zero, and the 1x1 output convs start at zero, so the controlled UNet starts
out computing exactly the frozen UNet. Prints which tensors were copied, zero-extended and
newly initialised.

    python -m scripts.make_stage2_init --sd weights/v2-1_512-ema-pruned.ckpt --output weights/init.safetensors
    python -m scripts.make_stage2_init --sd path/to/diffusers-sd21/ --output weights/init.pth
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from omegaconf import OmegaConf

from model.convert.cldm import original_params, split_sd_state
from model.convert.controlnet import controlnet_state_to_original
from model.convert.sd import sd21_cldm_cfg
from model.io.checkpoint import WeightFileError
from model.io.cldm_files import read_sd_original, save_controlnet
from model.io.logs import setup_logging
from model.nets.lacontrolnet import lacontrolnet_from_unet
from model.nets.unet import build_unet


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sd",
        type=Path,
        required=True,
        help="SD checkpoint in the original layout (.ckpt/.safetensors, ours too) or a diffusers "
        "model folder (with unet/ or itself a UNet folder)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        required=True,
        help="where to write the LAControlNet: .safetensors (ours) or .pth/.pt (original layout)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="ControlLDM YAML in the original vocabulary; its unet_cfg describes an original-layout "
        "checkpoint (default: SD 2.1-base)",
    )
    parser.add_argument(
        "--hint-channels",
        type=int,
        default=None,
        help="channels of the condition latent (default: controlnet_cfg.hint_channels, 4)",
    )
    return parser.parse_args(argv)


def load_unet(path: Path, cfg: dict) -> UNet2DConditionModel:
    """The frozen UNet from a diffusers folder or an SD-layout checkpoint (strict)."""
    if path.is_dir():
        subfolder = "unet" if (path / "unet").is_dir() else None
        return UNet2DConditionModel.from_pretrained(
            path, subfolder=subfolder, local_files_only=True
        )
    unet = build_unet(**cfg["unet_cfg"])
    split = split_sd_state({"unet": unet}, read_sd_original(path))
    if split.missing:
        raise WeightFileError(f"{path}: {len(split.missing)} UNet keys missing: {split.missing}")
    unet.load_state_dict(split.states["unet"])
    return unet


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(logging.WARNING)
    try:
        if args.config is not None and not args.config.is_file():
            raise WeightFileError(f"{args.config}: config file not found")
        raw = (
            sd21_cldm_cfg()
            if args.config is None
            else OmegaConf.to_container(OmegaConf.load(args.config))
        )
        cfg = original_params(raw)
        if not args.sd.exists():
            raise WeightFileError(f"{args.sd}: not found")
        unet = load_unet(args.sd, cfg)
    except (WeightFileError, ValueError, OSError) as exc:
        print(f"error: {exc}")
        return 1
    hint_channels = args.hint_channels or int(cfg["controlnet_cfg"].get("hint_channels", 4))
    controlnet, report = lacontrolnet_from_unet(unet, hint_channels)
    print(report.format())
    if args.output.suffix == ".safetensors":
        save_controlnet(controlnet, args.output)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        torch.save(controlnet_state_to_original(controlnet), args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
