"""Conversion between the released DiffBIR / Stable Diffusion checkpoints and our modules.

Released files use the original latent-diffusion layout: an SD checkpoint with
`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.model.*`; ControlNet files
as a flat original `ControlNet` state dict; v1 Lightning checkpoints holding the whole model.
Our own files are safetensors in our (diffusers) key layout with their config in the metadata.
Every conversion here is a key rename (plus the VAE's 1x1-conv <-> linear reshape), so
original -> ours -> original gives back the same tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from model.cldm import ControlLDM
from model.lacontrolnet import (
    LAControlNet,
    build_lacontrolnet,
    controlnet_state_from_original,
    diffbir_controlnet_cfg,
)
from model.lacontrolnet import controlnet_state_to_original as _controlnet_keys_to_original
from model.text_encoder import build_text_encoder, text_state_from_original, text_state_to_original
from model.unet import (
    StateDict,
    UNetLayout,
    build_unet,
    sd21_unet_cfg,
    unet_state_from_original,
    unet_state_to_original,
)
from model.vae import build_vae, vae_state_from_original, vae_state_to_original

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


def _build_loaded(build: Callable[[], nn.Module], state: Mapping[str, torch.Tensor]) -> nn.Module:
    """`build()` with `state` loaded, skipping the random init when `state` covers everything.

    Random init of the full SD 2.1 model takes tens of seconds on a CPU. A module built on the
    meta device can only be materialised empty if it has no non-persistent buffers (those keep
    their constructed values, e.g. the text encoder's causal mask).
    """
    with torch.device("meta"):
        module = build()
    expected = module.state_dict().keys()
    volatile = any(name not in expected for name, _ in module.named_buffers())
    if volatile or state.keys() != expected:
        module = build()
        module.load_state_dict(state, strict=False)
    else:
        module = module.to_empty(device="cpu")
        module.load_state_dict(state)
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


def _report_split(split: SDSplit, allow_missing: bool) -> None:
    if split.unused:
        # The original loader ignores them too (e.g. EMA copies, training buffers).
        logger.info("SD state: %d unused keys ignored: %s", len(split.unused), split.unused[:20])
        logger.debug("SD state: all unused keys: %s", split.unused)
    if split.missing:
        message = f"SD state: {len(split.missing)} missing keys: {split.missing}"
        if not allow_missing:
            raise KeyError(message)
        logger.warning("%s (kept at their initial values)", message)


def check_controlnet_original(controlnet: LAControlNet, state: Mapping[str, torch.Tensor]) -> None:
    """Raise KeyError / ValueError naming keys or shapes of `state` that do not fit `controlnet`."""
    expected = _controlnet_keys_to_original(controlnet.state_dict(), controlnet.layout)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise KeyError(f"ControlNet state: missing keys {missing}, unexpected keys {unexpected}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"ControlNet state: {key} has shape {list(tensor.shape)}, expected {list(expected[key].shape)}"
            )


def load_controlnet_original(controlnet: LAControlNet, state: Mapping[str, torch.Tensor]) -> None:
    """Load an original-layout ControlNet state dict strictly (see `check_controlnet_original`)."""
    check_controlnet_original(controlnet, state)
    controlnet.load_state_dict(controlnet_state_from_original(state, controlnet.layout))


def cldm_from_original(
    cfg: Mapping[str, Any],
    sd_state: Mapping[str, torch.Tensor],
    controlnet_state: Mapping[str, torch.Tensor] | None = None,
    *,
    allow_missing: bool = False,
) -> ControlLDM:
    """Build a ControlLDM from an original config and original-layout state dicts.

    Args:
        cfg: `{unet_cfg, controlnet_cfg, vae_cfg, clip_cfg, latent_scale_factor}` (original
            vocabulary), or the original YAML's `{target, params}` form.
        sd_state: SD-layout state dict; extra keys are ignored (logged), missing ones raise
            KeyError naming them unless `allow_missing` (then they keep their initial values).
        controlnet_state: original ControlNet state dict, loaded strictly; None initialises
            the LAControlNet from the UNet as for training (zero residuals).
    """
    cfg = original_params(cfg)
    builders = sd_builders(cfg)
    with torch.device("meta"):
        split = split_sd_state({name: build() for name, build in builders.items()}, sd_state)
    _report_split(split, allow_missing)
    modules = {name: _build_loaded(build, split.states[name]) for name, build in builders.items()}
    build_controlnet = partial(build_lacontrolnet, **cfg["controlnet_cfg"])
    if controlnet_state is None:
        with torch.device("meta"):
            controlnet = build_controlnet()
        # init_from_unet writes every tensor (copy, zero-extend or zero), so start empty.
        controlnet = controlnet.to_empty(device="cpu")
        report = controlnet.init_from_unet(modules["unet"])
        logger.info("LAControlNet initialised from the UNet:\n%s", report.format())
    else:
        with torch.device("meta"):
            check_controlnet_original(build_controlnet(), controlnet_state)
        layout = UNetLayout.from_original(cfg["controlnet_cfg"])
        controlnet = _build_loaded(
            build_controlnet, controlnet_state_from_original(controlnet_state, layout)
        )
    cldm = ControlLDM(
        controlnet=controlnet, latent_scale_factor=cfg["latent_scale_factor"], **modules
    )
    return cldm.eval()


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


def controlnet_state_to_original(controlnet: LAControlNet) -> StateDict:
    """The original-layout ControlNet state dict (as in the released .pth files)."""
    return _controlnet_keys_to_original(controlnet.state_dict(), controlnet.layout)


# Diffusion schedule buffers saved by the v1 Lightning module; the schedule is rebuilt from
# its config, so they are not needed.
V1_SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
)
# v1 prefix -> destination: the SD layout keeps its prefixes, the others are stripped.
_V1_PARTS = {
    "model.diffusion_model.": "sd",
    "first_stage_model.": "sd",
    "cond_stage_model.": "sd",
    "control_model.": "controlnet",
    "preprocess_model.": "swinir",
}
# The v1 condition encoder is a frozen copy of the VAE encoder and quant_conv.
_V1_COND_ENCODER = {
    "cond_encoder.encoder.": "first_stage_model.encoder.",
    "cond_encoder.quant_conv.": "first_stage_model.quant_conv.",
}


@dataclass
class V1FullState:
    """The parts of a v1 Lightning checkpoint (`general_full_v1.ckpt`, `face_full_v1.ckpt`).

    `sd_state` is in the SD layout (prefixes kept), `controlnet_state` in the original
    ControlNet layout and `swinir_state` in the SwinIR layout (prefixes stripped).
    `cond_encoder_mismatch` names `cond_encoder.*` tensors that differ from the VAE encoder.
    """

    sd_state: StateDict = field(default_factory=dict)
    controlnet_state: StateDict = field(default_factory=dict)
    swinir_state: StateDict = field(default_factory=dict)
    cond_encoder_mismatch: list[str] = field(default_factory=list)


def _same_tensor(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    if b is None or a.shape != b.shape:
        return False
    return a.is_meta or b.is_meta or torch.equal(a, b)


def split_v1_full_state(state: Mapping[str, torch.Tensor]) -> V1FullState:
    """Split an unwrapped v1 Lightning `state_dict` into SD, ControlNet and SwinIR states.

    `cond_encoder.*` is checked against the VAE encoder (differences are logged and listed),
    schedule buffers are dropped; any other key raises KeyError naming it.
    """
    out = V1FullState()
    unexpected = []
    for key, tensor in state.items():
        part = next((p for p in _V1_PARTS if key.startswith(p)), None)
        if part is not None:
            dest = _V1_PARTS[part]
            if dest == "sd":
                out.sd_state[key] = tensor
            else:
                getattr(out, f"{dest}_state")[key[len(part) :]] = tensor
            continue
        encoder = next((p for p in _V1_COND_ENCODER if key.startswith(p)), None)
        if encoder is not None:
            twin = _V1_COND_ENCODER[encoder] + key[len(encoder) :]
            if not _same_tensor(tensor, state.get(twin)):
                out.cond_encoder_mismatch.append(key)
        elif key not in V1_SCHEDULE_BUFFERS:
            unexpected.append(key)
    if unexpected:
        raise KeyError(f"v1 checkpoint: unexpected keys {unexpected}")
    if out.cond_encoder_mismatch:
        logger.warning(
            "v1 checkpoint: %d cond_encoder tensors differ from the VAE encoder (ignored): %s",
            len(out.cond_encoder_mismatch),
            out.cond_encoder_mismatch[:10],
        )
    return out
