"""Build objects from YAML: `{target: "package.module.Name", params: {...}}`, recursively."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def get_obj_from_str(path: str) -> Any:
    """Import `package.module.Name` and return `Name`."""
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(
            f"target {path!r} must be a dotted path such as 'model.nets.swinir.SwinIR'"
        )
    return getattr(importlib.import_module(module), name)


def instantiate(config: Any) -> Any:
    """Recursively build every mapping that has a `target` key; other values pass through.

    A mapping with `target` becomes `target(**params)` with its params built first, so
    constructors receive built objects, never config dicts.
    """
    if isinstance(config, DictConfig | ListConfig):
        config = OmegaConf.to_container(config, resolve=True, throw_on_missing=True)
    if isinstance(config, Mapping):
        if "target" in config:
            params = {k: instantiate(v) for k, v in (config.get("params") or {}).items()}
            return get_obj_from_str(config["target"])(**params)
        return {k: instantiate(v) for k, v in config.items()}
    if isinstance(config, list):
        return [instantiate(v) for v in config]
    return config


def load_yaml(path: str) -> dict[str, Any]:
    """A YAML file as a plain dict, e.g. an architecture config referenced from a train config."""
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
