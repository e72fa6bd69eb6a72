"""Key table between the original latent-diffusion VAE (`first_stage_model.*` without the
prefix) and diffusers' `AutoencoderKL`: renames declared as templates, plus the one shape
change (mid-block attention q/k/v/proj_out: 1x1 Conv2d in the original, Linear in diffusers).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from model.nets.vae import StateDict

# Key renames declared as (original, diffusers) templates around a final `weight`/`bias`.
# Placeholders: {i}, {j} indices copied as they are; {u} a decoder level index, reversed between
# the layouts (original `up.0` is the full-resolution level, diffusers `up_blocks.0` the
# lowest-resolution one); {e} encoder|decoder; {r} a ResNet layer name kept as it is.
_VAE_RENAMES: tuple[tuple[str, str], ...] = (
    ("{e}.conv_in", "{e}.conv_in"),
    ("{e}.conv_out", "{e}.conv_out"),
    ("{e}.norm_out", "{e}.conv_norm_out"),
    ("encoder.down.{i}.block.{j}.{r}", "encoder.down_blocks.{i}.resnets.{j}.{r}"),
    (
        "encoder.down.{i}.block.{j}.nin_shortcut",
        "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut",
    ),
    ("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv"),
    ("decoder.up.{u}.block.{j}.{r}", "decoder.up_blocks.{u}.resnets.{j}.{r}"),
    ("decoder.up.{u}.block.{j}.nin_shortcut", "decoder.up_blocks.{u}.resnets.{j}.conv_shortcut"),
    ("decoder.up.{u}.upsample.conv", "decoder.up_blocks.{u}.upsamplers.0.conv"),
    ("{e}.mid.block_1.{r}", "{e}.mid_block.resnets.0.{r}"),
    ("{e}.mid.block_2.{r}", "{e}.mid_block.resnets.1.{r}"),
    ("{e}.mid.attn_1.norm", "{e}.mid_block.attentions.0.group_norm"),
    ("{e}.mid.attn_1.q", "{e}.mid_block.attentions.0.to_q"),
    ("{e}.mid.attn_1.k", "{e}.mid_block.attentions.0.to_k"),
    ("{e}.mid.attn_1.v", "{e}.mid_block.attentions.0.to_v"),
    ("{e}.mid.attn_1.proj_out", "{e}.mid_block.attentions.0.to_out.0"),
    ("quant_conv", "quant_conv"),
    ("post_quant_conv", "post_quant_conv"),
)


# Original layers stored as 1x1 Conv2d whose diffusers counterpart is a Linear.
_CONV1X1_AS_LINEAR = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


_PLACEHOLDERS = {
    "i": r"\d+",
    "j": r"\d+",
    "u": r"\d+",
    "e": "encoder|decoder",
    "r": "norm1|conv1|norm2|conv2",
}


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name, alternatives in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{alternatives})")
    return re.compile(f"^{pattern}\\.(?P<leaf>weight|bias)$")


def _compile(pairs: Iterable[tuple[str, str]]) -> list[tuple[re.Pattern[str], str]]:
    return [(_template_regex(src), dst) for src, dst in pairs]


_FROM_ORIGINAL = _compile(_VAE_RENAMES)


_TO_ORIGINAL = _compile((dst, src) for src, dst in _VAE_RENAMES)


def _num_levels(keys: Iterable[str], level_prefix: str) -> int:
    """Number of decoder levels, read from the `decoder.up[_blocks].N.` indices present."""
    pattern = re.compile(rf"^decoder\.{re.escape(level_prefix)}\.(\d+)\.")
    indices = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def _rename_all(
    sd: Mapping[str, torch.Tensor],
    rules: list[tuple[re.Pattern[str], str]],
    levels: int,
    layout: str,
) -> dict[str, str]:
    """Map every key of `sd` through the first matching rule; raise naming unknown keys."""
    renamed: dict[str, str] = {}
    unknown = []
    for key in sd:
        for regex, template in rules:
            match = regex.match(key)
            if match is None:
                continue
            fields = match.groupdict()
            if fields.get("u") is not None:
                fields["u"] = str(levels - 1 - int(fields["u"]))
            renamed[key] = template.format(**fields) + "." + fields["leaf"]
            break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(
            f"VAE state dict: {len(unknown)} keys not in the {layout} layout: {unknown[:10]}"
        )
    return renamed


def vae_state_from_original(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Convert an original VAE state dict (keys without `first_stage_model.`) to diffusers keys.

    The 1x1 Conv2d attention weights [C, C, 1, 1] become Linear weights [C, C].

    Raises:
        KeyError: naming every key that is not part of the original VAE layout.
    """
    names = _rename_all(sd, _FROM_ORIGINAL, _num_levels(sd, "up"), "original")
    out: StateDict = {}
    for key, tensor in sd.items():
        if _CONV1X1_AS_LINEAR.match(key):
            if tensor.ndim != 4 or tensor.shape[2:] != (1, 1):
                raise ValueError(
                    f"VAE state dict: {key} has shape {list(tensor.shape)}, expected [C, C, 1, 1]"
                )
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        out[names[key]] = tensor
    return out


def vae_state_to_original(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Convert a diffusers `AutoencoderKL` state dict to the original keys (no prefix).

    The inverse of `vae_state_from_original`; Linear attention weights get back their 1x1 dims.

    Raises:
        KeyError: naming every key that is not part of the diffusers VAE layout.
    """
    names = _rename_all(sd, _TO_ORIGINAL, _num_levels(sd, "up_blocks"), "diffusers")
    out: StateDict = {}
    for key, tensor in sd.items():
        name = names[key]
        if _CONV1X1_AS_LINEAR.match(name):
            if tensor.ndim != 2:
                raise ValueError(
                    f"VAE state dict: {key} has shape {list(tensor.shape)}, expected [C, C]"
                )
            tensor = tensor[:, :, None, None]
        out[name] = tensor
    return out
