"""Stage-2 weight files: our safetensors formats and loading a ControlLDM from paths.

Our LAControlNet file: safetensors in our key layout, metadata config `{target, params}` that
`model.train.instantiate.instantiate` rebuilds. Our SD file: safetensors with keys `unet.*`, `vae.*`,
`text_encoder.*` in our layouts and the original ControlLDM config in the metadata. Released
files (original layouts) are read through `model.io.checkpoint.load_weight_file`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from model.convert.cldm import cldm_from_original, original_params, split_sd_state
from model.convert.controlnet import controlnet_state_to_original
from model.convert.sd import SD_PREFIXES, SDSplit, build_sd_modules, sd_states_to_original
from model.io.checkpoint import (
    WeightFileError,
    load_weight_file,
    read_safetensors_config,
    save_safetensors,
)
from model.nets.cldm import ControlLDM
from model.nets.lacontrolnet import LAControlNet
from model.nets.unet import StateDict

logger = logging.getLogger(__name__)

CONTROLNET_TARGET = "model.nets.lacontrolnet.LAControlNet"
# What files written before the move to model/nets/ name (still read).
_CONTROLNET_TARGETS = (CONTROLNET_TARGET, "model.lacontrolnet.LAControlNet")
SD_FORMAT = "diffbir-sd"


def controlnet_config(controlnet: LAControlNet) -> dict[str, Any]:
    """`{target, params}` that `model.train.instantiate.instantiate` turns back into the module."""
    params = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in controlnet.config.items()
        if not k.startswith("_")
    }
    return {"target": CONTROLNET_TARGET, "params": params}


def save_controlnet(controlnet: LAControlNet, path: str | Path) -> None:
    """Write the LAControlNet in our format: safetensors, our keys, config in the metadata."""
    save_safetensors(controlnet.state_dict(), path, controlnet_config(controlnet))


def load_controlnet(path: str | Path) -> LAControlNet:
    """Read an LAControlNet written by `save_controlnet` (on the CPU)."""
    config = read_safetensors_config(path)
    if not config or config.get("target") not in _CONTROLNET_TARGETS:
        raise WeightFileError(
            f"{path}: not an LAControlNet safetensors file (no LAControlNet config)"
        )
    controlnet = LAControlNet(**config["params"])
    try:
        controlnet.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise WeightFileError(f"{path}: weights do not match the stored config ({exc})") from exc
    return controlnet


def sd_state_to_ours(
    cfg: Mapping[str, Any], sd_state: Mapping[str, torch.Tensor], allow_missing: bool = False
) -> SDSplit:
    """Convert an SD-layout state dict to our component layouts without building real weights.

    Raises KeyError naming missing keys unless `allow_missing`; unused keys are returned.
    """
    with torch.device("meta"):
        modules = build_sd_modules(cfg)
    split = split_sd_state(modules, sd_state)
    if split.missing and not allow_missing:
        raise KeyError(f"SD state: {len(split.missing)} missing keys: {split.missing}")
    return split


def save_sd(
    states: Mapping[str, Mapping[str, torch.Tensor]], cfg: Mapping[str, Any], path: str | Path
) -> None:
    """Write our SD file from our component states ({"unet", "vae", "text_encoder"})."""
    flat = {f"{name}.{k}": v for name, state in states.items() for k, v in state.items()}
    save_safetensors(flat, path, {"format": SD_FORMAT, "cldm": original_params(cfg)})


def load_sd(path: str | Path) -> tuple[dict[str, Any], StateDict]:
    """Read our SD file; returns (original config, SD-layout state dict)."""
    config = read_safetensors_config(path)
    if not config or config.get("format") != SD_FORMAT:
        raise WeightFileError(
            f"{path}: not one of our SD safetensors files (no '{SD_FORMAT}' config)"
        )
    flat = load_file(str(path))
    states: dict[str, StateDict] = {name: {} for name in SD_PREFIXES}
    for key, value in flat.items():
        name, _, rest = key.partition(".")
        if name not in states:
            raise WeightFileError(f"{path}: unexpected key {key!r}")
        states[name][rest] = value
    with torch.device("meta"):
        unet = build_sd_modules(config["cldm"])["unet"]
    return config["cldm"], sd_states_to_original(unet, states)


def read_controlnet_original(path: str | Path) -> StateDict:
    """An original-layout ControlNet state dict from a released file or our safetensors file."""
    if _stored_config(path).get("target") in _CONTROLNET_TARGETS:
        return controlnet_state_to_original(load_controlnet(path))
    return load_weight_file(path)


def read_sd_original(path: str | Path) -> StateDict:
    """An SD-layout state dict from a released checkpoint or our SD safetensors file."""
    if _stored_config(path).get("format") == SD_FORMAT:
        return load_sd(path)[1]
    return load_weight_file(path)


def _stored_config(path: str | Path) -> dict[str, Any]:
    # Safetensors files without our config (e.g. released SD .safetensors) are original layout.
    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return {}
    return read_safetensors_config(path) or {}


def load_cldm(
    cfg: Mapping[str, Any],
    sd_path: str | Path,
    controlnet_path: str | Path | None = None,
    allow_missing: bool = False,
) -> ControlLDM:
    """Build a ControlLDM from weight files (released original layouts or our safetensors).

    Without `controlnet_path` the LAControlNet is initialised from the UNet (for training).
    """
    sd_state = read_sd_original(sd_path)
    controlnet_state = (
        None if controlnet_path is None else read_controlnet_original(controlnet_path)
    )
    try:
        return cldm_from_original(cfg, sd_state, controlnet_state, allow_missing=allow_missing)
    except (KeyError, ValueError) as exc:
        sources = f"{sd_path}" + (f" / {controlnet_path}" if controlnet_path else "")
        raise WeightFileError(f"{sources}: {exc}") from exc
