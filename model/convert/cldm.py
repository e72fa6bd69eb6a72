"""`cldm_from_original`: a ControlLDM from an original config and original-layout state dicts.

Released files use the original latent-diffusion layout: an SD checkpoint with
`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.model.*`; ControlNet files
as a flat original `ControlNet` state dict; v1 Lightning checkpoints holding the whole model.
Our own files are safetensors in our (diffusers) key layout with their config in the metadata.
Every conversion here is a key rename (plus the VAE's 1x1-conv <-> linear reshape), so
original -> ours -> original gives back the same tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch

from model.convert.controlnet import check_controlnet_original, controlnet_state_from_original
from model.convert.sd import (
    build_loaded,
    original_params,
    report_split,
    sd_builders,
    split_sd_state,
)
from model.nets.cldm import ControlLDM
from model.nets.lacontrolnet import build_lacontrolnet
from model.nets.unet import UNetLayout

logger = logging.getLogger(__name__)


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
    report_split(split, allow_missing)
    modules = {name: build_loaded(build, split.states[name]) for name, build in builders.items()}
    build_controlnet = partial(build_lacontrolnet, **cfg["controlnet_cfg"])
    if controlnet_state is None:
        with torch.device("meta"):
            controlnet = build_controlnet()
        # init_from_unet writes every tensor (copy, zero-extend or zero), so start empty.
        controlnet = controlnet.to_empty(device="cpu")
        report = controlnet.init_from_unet(modules["unet"])
        logger.info(
            "LAControlNet initialised from the UNet: %d tensors copied, %d zero-extended, "
            "%d zero-initialised",
            len(report.copied),
            len(report.zero_extended),
            len(report.zero_initialised),
        )
        logger.debug("LAControlNet initialisation:\n%s", report.format())
    else:
        with torch.device("meta"):
            check_controlnet_original(build_controlnet(), controlnet_state)
        layout = UNetLayout.from_original(cfg["controlnet_cfg"])
        controlnet = build_loaded(
            build_controlnet, controlnet_state_from_original(controlnet_state, layout)
        )
    cldm = ControlLDM(
        controlnet=controlnet, latent_scale_factor=cfg["latent_scale_factor"], **modules
    )
    return cldm.eval()
