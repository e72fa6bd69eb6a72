"""Key check for the SD 2.1 text tower: the original (`cond_stage_model.model.*` without the
prefix) and our keys coincide; the conversion only checks that every key belongs to the layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from model.nets.text_encoder import StateDict

# The original (`cond_stage_model.model.*` without the prefix) and our keys coincide; the
# conversion only checks that every key belongs to the layout.
_TEXT_KEY = re.compile(
    r"^(token_embedding\.weight|positional_embedding|text_projection|logit_scale"
    r"|ln_final\.(weight|bias)"
    r"|transformer\.resblocks\.\d+\.(ln_1|ln_2|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)"
    r"|transformer\.resblocks\.\d+\.attn\.in_proj_(weight|bias))$"
)


def _checked_copy(sd: Mapping[str, torch.Tensor]) -> StateDict:
    unknown = [k for k in sd if not _TEXT_KEY.match(k)]
    if unknown:
        raise KeyError(
            f"text encoder state dict: {len(unknown)} keys not in the OpenCLIP text layout: {unknown[:10]}"
        )
    return dict(sd)


def text_state_from_original(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Original text tower state dict (keys without `cond_stage_model.model.`) to ours.

    Raises:
        KeyError: naming every key that is not part of the OpenCLIP text layout.
    """
    return _checked_copy(sd)


def text_state_to_original(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Our text tower state dict to the original keys (without `cond_stage_model.model.`)."""
    return _checked_copy(sd)
