"""Key table between the original LAControlNet (released DiffBIR files) and ours: the UNet
encoder rows plus the zero convs."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from model.convert.unet import SAME_NAMES, Row, convert_state, encoder_rows
from model.nets.lacontrolnet import LAControlNet
from model.nets.unet import StateDict, UNetLayout


def controlnet_rows(layout: UNetLayout) -> list[Row]:
    """Key table between the original ControlNet and the LAControlNet."""
    rows = encoder_rows(layout)
    rows += [
        (f"zero_convs.{i}.0.", f"controlnet_down_blocks.{i}.", SAME_NAMES)
        for i in range(layout.num_control_tensors - 1)
    ]
    rows.append(("middle_block_out.0.", "controlnet_mid_block.", SAME_NAMES))
    return rows


def controlnet_state_from_original(sd: Mapping[str, torch.Tensor], layout: UNetLayout) -> StateDict:
    """Original ControlNet keys (released DiffBIR files) -> LAControlNet keys."""
    return convert_state(sd, controlnet_rows(layout))


def controlnet_keys_to_original(sd: Mapping[str, torch.Tensor], layout: UNetLayout) -> StateDict:
    """LAControlNet keys -> original ControlNet keys."""
    return convert_state(sd, controlnet_rows(layout), reverse=True)


def check_controlnet_original(controlnet: LAControlNet, state: Mapping[str, torch.Tensor]) -> None:
    """Raise KeyError / ValueError naming keys or shapes of `state` that do not fit `controlnet`."""
    expected = controlnet_keys_to_original(controlnet.state_dict(), controlnet.layout)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise KeyError(f"ControlNet state: missing keys {missing}, unexpected keys {unexpected}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"ControlNet state: {key} has shape {list(tensor.shape)}, expected {list(expected[key].shape)}"
            )


def load_controlnet_original(
    controlnet: LAControlNet, state: Mapping[str, torch.Tensor], assign: bool = False
) -> None:
    """Load an original-layout ControlNet state dict strictly (see `check_controlnet_original`);
    `assign` makes the (fp32) tensors of `state` the parameters instead of copying them."""
    check_controlnet_original(controlnet, state)
    controlnet.load_state_dict(
        controlnet_state_from_original(state, controlnet.layout), assign=assign
    )
    if assign:
        controlnet.float()


def controlnet_state_to_original(controlnet: LAControlNet) -> StateDict:
    """The original-layout ControlNet state dict (as in the released .pth files)."""
    return controlnet_keys_to_original(controlnet.state_dict(), controlnet.layout)
