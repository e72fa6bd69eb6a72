"""The Stable Diffusion checkpoint layout (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.model.*`) split into our UNet, VAE and text encoder and joined back; the
DiffBIR ControlLDM config in the original vocabulary."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from model.convert.text_encoder import text_state_from_original, text_state_to_original
from model.convert.unet import unet_state_from_original, unet_state_to_original
from model.convert.vae import vae_state_from_original, vae_state_to_original
from model.io.file_pages import release_file_pages
from model.nets.cldm import ControlLDM
from model.nets.lacontrolnet import diffbir_controlnet_cfg
from model.nets.text_encoder import build_text_encoder
from model.nets.unet import StateDict, UNetLayout, build_unet, sd21_unet_cfg
from model.nets.vae import build_vae

logger = logging.getLogger(__name__)


SD_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.model.",
}


_CFG_KEYS = ("unet_cfg", "controlnet_cfg", "vae_cfg", "clip_cfg")


def sd21_cldm_cfg() -> dict[str, Any]:
    """The DiffBIR ControlLDM config on SD 2.1-base, in the original vocabulary."""
    return {
        "latent_scale_factor": 0.18215,
        "unet_cfg": sd21_unet_cfg(),
        "controlnet_cfg": diffbir_controlnet_cfg(),
        "vae_cfg": {
            "embed_dim": 4,
            "ddconfig": {
                "double_z": True,
                "z_channels": 4,
                "resolution": 256,
                "in_channels": 3,
                "out_ch": 3,
                "ch": 128,
                "ch_mult": [1, 2, 4, 4],
                "num_res_blocks": 2,
                "attn_resolutions": [],
                "dropout": 0.0,
            },
        },
        "clip_cfg": {
            "embed_dim": 1024,
            "vision_cfg": {
                "image_size": 224,
                "layers": 32,
                "width": 1280,
                "head_width": 80,
                "patch_size": 14,
            },
            "text_cfg": {
                "context_length": 77,
                "vocab_size": 49408,
                "width": 1024,
                "heads": 16,
                "layers": 24,
            },
            "layer": "penultimate",
        },
    }


def original_params(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The plain `{unet_cfg, controlnet_cfg, vae_cfg, clip_cfg, latent_scale_factor}` mapping.

    Accepts a plain mapping or OmegaConf config, either the params themselves or the original
    YAML's `{target, params}` wrapper.
    """
    cfg = _plain(cfg)
    if "unet_cfg" not in cfg and "params" in cfg:
        cfg = cfg["params"]
    missing = [k for k in _CFG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"ControlLDM config: missing entries {missing}")
    out = {k: _plain(cfg[k]) for k in _CFG_KEYS}
    out["latent_scale_factor"] = float(cfg.get("latent_scale_factor", 0.18215))
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def sd_builders(cfg: Mapping[str, Any]) -> dict[str, Callable[[], nn.Module]]:
    """Zero-argument constructors of UNet, VAE and text encoder for an original config."""
    cfg = original_params(cfg)
    return {
        "unet": partial(build_unet, **cfg["unet_cfg"]),
        "vae": partial(build_vae, **cfg["vae_cfg"], scaling_factor=cfg["latent_scale_factor"]),
        "text_encoder": partial(build_text_encoder, **cfg["clip_cfg"]),
    }


def build_sd_modules(cfg: Mapping[str, Any]) -> dict[str, nn.Module]:
    """Build (randomly initialised) UNet, VAE and text encoder from an original config."""
    return {name: build() for name, build in sd_builders(cfg).items()}


def build_loaded(build: Callable[[], nn.Module], state: Mapping[str, torch.Tensor]) -> nn.Module:
    """`build()` with `state` loaded, skipping the random init when `state` covers everything.

    Random init of the full SD 2.1 model takes tens of seconds on a CPU. A module built on the
    meta device takes the tensors of `state` as its parameters (no copy; memory-mapped when the
    file was), which needs every buffer to be in `state` (non-persistent ones keep their
    constructed values, e.g. the text encoder's causal mask: such modules are built normally).
    Parameters are fp32 (as the module builds them) whatever the file stores. Where the
    weights are copied, the file's pages they were read from leave the process (a text encoder
    freed after its prompts are encoded then gives its memory back).
    """
    with torch.device("meta"):
        module = build()
    expected = module.state_dict().keys()
    volatile = any(name not in expected for name, _ in module.named_buffers())
    if volatile or state.keys() != expected:
        module = build()
        module.load_state_dict(state, strict=False)
        release_file_pages(state.values())  # copied: the file's pages are not needed
    else:
        # the loaded tensors become the parameters: no second copy of the weights
        module.load_state_dict(state, assign=True)
        if any(p.dtype != torch.float32 for p in module.parameters()):
            module.float()
            release_file_pages(state.values())
    return module


Converter = Callable[[Mapping[str, torch.Tensor]], StateDict]


def _sd_converters(unet: nn.Module) -> dict[str, tuple[Converter, Converter]]:
    """(to_original, from_original) per SD component, keys without the SD prefixes."""
    layout = UNetLayout.from_diffusers(unet.config)
    return {
        "unet": (
            partial(unet_state_to_original, layout=layout),
            partial(unet_state_from_original, layout=layout),
        ),
        "vae": (vae_state_to_original, vae_state_from_original),
        "text_encoder": (text_state_to_original, text_state_from_original),
    }


@dataclass
class SDSplit:
    """An SD-layout state dict split into our components (keys in our layout)."""

    states: dict[str, StateDict]
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)


def split_sd_state(
    modules: Mapping[str, nn.Module], sd_state: Mapping[str, torch.Tensor]
) -> SDSplit:
    """Pick each module's tensors out of an SD-layout state dict and convert their keys.

    `modules` holds "unet" and any of "vae", "text_encoder"; the expected keys come from the
    modules themselves (which may live on the meta device).
    Missing and unused keys are returned by their SD-layout names; shapes must match.
    """
    split = SDSplit(states={})
    used: set[str] = set()
    converters = _sd_converters(modules["unet"])
    for name, module in modules.items():
        to_original, from_original = converters[name]
        prefix = SD_PREFIXES[name]
        found: StateDict = {}
        for key, ours in to_original(module.state_dict()).items():
            tensor = sd_state.get(prefix + key)
            if tensor is None:
                split.missing.append(prefix + key)
                continue
            if tensor.shape != ours.shape:
                raise ValueError(
                    f"{prefix + key}: shape {list(tensor.shape)} does not match the config ({list(ours.shape)})"
                )
            found[key] = tensor
            used.add(prefix + key)
        split.states[name] = from_original(found)
    split.unused = [k for k in sd_state if k not in used]
    return split


def report_split(split: SDSplit, allow_missing: bool) -> None:
    if split.unused:
        # The original loader ignores them too (e.g. EMA copies, training buffers).
        logger.info("SD state: %d unused keys ignored: %s", len(split.unused), split.unused[:20])
        logger.debug("SD state: all unused keys: %s", split.unused)
    if split.missing:
        message = f"SD state: {len(split.missing)} missing keys: {split.missing}"
        if not allow_missing:
            raise KeyError(message)
        logger.warning("%s (kept at their initial values)", message)


def sd_states_to_original(
    unet: nn.Module, states: Mapping[str, Mapping[str, torch.Tensor]]
) -> StateDict:
    """Our component state dicts ({"unet", "vae", "text_encoder"}) -> one SD-layout dict."""
    out: StateDict = {}
    for name, (to_original, _) in _sd_converters(unet).items():
        out.update({SD_PREFIXES[name] + k: v for k, v in to_original(states[name]).items()})
    return out


def sd_state_to_original(cldm: ControlLDM) -> StateDict:
    """The SD-layout state dict (UNet, VAE, text encoder) of a ControlLDM."""
    states = {name: getattr(cldm, name).state_dict() for name in SD_PREFIXES}
    return sd_states_to_original(cldm.unet, states)
