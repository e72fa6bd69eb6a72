"""The v1 Lightning checkpoints (`general_full_v1.ckpt`, `face_full_v1.ckpt`): one state dict
holding SD, ControlNet and SwinIR, split into the three released layouts."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from model.diffusion.schedule import LDM_SCHEDULE_BUFFERS
from model.io.checkpoint import StateDict

logger = logging.getLogger(__name__)


# Diffusion schedule buffers saved by the v1 Lightning module; the schedule is rebuilt from
# its config, so they are not needed.
V1_SCHEDULE_BUFFERS = (*LDM_SCHEDULE_BUFFERS, "logvar")


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
