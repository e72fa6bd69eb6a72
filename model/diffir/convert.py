"""Original DiffIR checkpoints <-> our modules, and our safetensors files.

The original layout (DiffIR-RealSR, basicsr checkpoints) differs from ours by prefixes only,
plus two quirks of DiffIRS2: CPEN_S2 and the denoiser are registered twice (the second time
inside its DDPM, as `diffusion.condition.*` / `diffusion.model.*`, the same tensors), and the
12 schedule buffers live under `diffusion.`. Conversions are pure dict -> dict functions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from model.diffir.models import DiffIRS1, DiffIRS2
from model.io.checkpoint import (
    StateDict,
    WeightFileError,
    check_state_keys,
    load_weight_file,
    read_safetensors_config,
    save_safetensors,
    unwrap_state_dict,
)

MODELS = {"DiffIRS1": DiffIRS1, "DiffIRS2": DiffIRS2}

# (original prefix, our prefix), per network type
_PREFIXES = {
    "DiffIRS1": (("G.", "restorer."), ("E.", "cpen.")),
    "DiffIRS2": (
        ("G.", "restorer."),
        ("condition.", "cpen."),
        ("denoise.", "denoiser."),
        ("diffusion.", "schedule."),  # after the aliases below were removed
    ),
}
# DiffIRS2 keys saved twice: alias prefix -> the prefix of the tensor it repeats
_ALIASES = {"diffusion.condition.": "condition.", "diffusion.model.": "denoise."}
# the denoiser's layers: original `resmlp.<i>.resmlp.0.` (i >= 2) and `resmlp.0.`
_DENOISER = ((r"^denoiser\.resmlp\.(\d+)\.resmlp\.0\.", r"denoiser.layers.\1.0."),
             (r"^denoiser\.resmlp\.0\.", "denoiser.layers.0."))  # fmt: skip
_DENOISER_BACK = ((r"^denoiser\.layers\.(\d+)\.0\.", r"denoiser.resmlp.\1.resmlp.0."),
                  (r"^denoiser\.layers\.0\.", "denoiser.resmlp.0."))  # fmt: skip
# original option vocabulary -> our constructor arguments (inp_channels is unused there too)
_RENAMED = {"LayerNorm_type": "layer_norm"}
_IGNORED = ("type", "inp_channels")


def _swap_prefix(key: str, table: tuple[tuple[str, str], ...]) -> str:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old) :]
    raise KeyError(key)


def _regex(key: str, table: tuple[tuple[str, str], ...]) -> str:
    for pattern, repl in table:
        key, n = re.subn(pattern, repl, key)
        if n:
            return key
    return key


def _network_type(cfg: Mapping[str, Any]) -> str:
    kind = cfg.get("type")
    if kind not in MODELS:
        raise ValueError(f"network type must be one of {sorted(MODELS)}, got {kind!r}")
    return kind


def model_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of `MODELS[cfg['type']]` from an original `network_g` mapping."""
    return {_RENAMED.get(k, k): v for k, v in cfg.items() if k not in _IGNORED}


def from_original_state(
    state: Mapping[str, torch.Tensor], kind: str, source: str = ""
) -> StateDict:
    """Original DiffIRS1 / DiffIRS2 state dict -> ours (aliases checked equal and dropped)."""
    state = dict(state)
    for alias, target in _ALIASES.items() if kind == "DiffIRS2" else ():
        for key in [k for k in state if k.startswith(alias)]:
            twin = target + key[len(alias) :]
            if twin not in state:
                raise WeightFileError(f"{source}: {key} has no twin {twin}")
            if state[key] is not state[twin] and not torch.equal(state[key], state[twin]):
                raise WeightFileError(f"{source}: {key} differs from its twin {twin}")
            del state[key]
    out = {}
    for key, value in state.items():
        try:
            new = _swap_prefix(key, _PREFIXES[kind])
        except KeyError:
            new = key  # left for the strict key check to report
        out[_regex(new, _DENOISER)] = value
    return out


def to_original_state(state: Mapping[str, torch.Tensor], kind: str) -> StateDict:
    """Our state dict -> the original layout, aliases included (the same tensors)."""
    back = tuple((new, old) for old, new in _PREFIXES[kind])
    out = {_swap_prefix(_regex(k, _DENOISER_BACK), back): v for k, v in state.items()}
    for alias, target in _ALIASES.items() if kind == "DiffIRS2" else ():
        out.update(
            {alias + k[len(target) :]: v for k, v in list(out.items()) if k.startswith(target)}
        )
    return out


def original_state_from_checkpoint(obj: Mapping[str, Any]) -> StateDict:
    """basicsr checkpoint {'params_ema', 'params'} (or a bare state dict), `module.` stripped."""
    for key in ("params_ema", "params"):
        if isinstance(obj.get(key), Mapping):
            return unwrap_state_dict(obj[key])
    return unwrap_state_dict(obj)


def diffir_from_original(
    cfg: Mapping[str, Any], state_dict: Mapping[str, Any], source: str = "state dict"
) -> DiffIRS1 | DiffIRS2:
    """Build DiffIRS1 / DiffIRS2 from an original `network_g` config and load `state_dict` strictly.

    Args:
        cfg: the option YAML's `network_g` / `network_S1` mapping, with `type`; missing keys
            take the original class defaults.
        state_dict: the original layout, or a basicsr checkpoint dict (`params_ema` preferred,
            then `params`); a leading `module.` is stripped.
        source: name used in error messages (e.g. the file path).
    """
    kind = _network_type(cfg)
    model = MODELS[kind](**model_kwargs(cfg))
    state = from_original_state(original_state_from_checkpoint(state_dict), kind, source)
    check_state_keys(state, model.state_dict(), source, kind)
    model.load_state_dict(state, strict=True, assign=_on_meta(model))
    return model.eval()


def _on_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def save_diffir(model: DiffIRS1 | DiffIRS2, path: str | Path) -> None:
    """Our safetensors file: the state dict with `model.config` in the metadata."""
    save_safetensors(model.state_dict(), path, model.config)


def load_diffir(path: str | Path, cfg: Mapping[str, Any] | None = None) -> DiffIRS1 | DiffIRS2:
    """Load our safetensors (its config from the metadata) or an original `.pth` file.

    `cfg`: the original `network_g` mapping (with `type`) of an original checkpoint; our files
    ignore it.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_weight_file(path)  # names a missing or unreadable file
        config = read_safetensors_config(path)
        if not config:
            raise WeightFileError(f"{path}: no DiffIR config in the file's metadata")
        kind = _network_type(config)
        model = MODELS[kind](**{k: v for k, v in config.items() if k != "type"})
        check_state_keys(state, model.state_dict(), path, kind)
        model.load_state_dict(state, strict=True)
        return model.eval()
    if cfg is None:
        raise WeightFileError(f"{path}: an original DiffIR checkpoint needs its network config")
    if not path.is_file():
        raise WeightFileError(f"{path}: weight file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated
        raise WeightFileError(f"{path}: cannot read weights ({exc})") from exc
    return diffir_from_original(cfg, obj, str(path))
