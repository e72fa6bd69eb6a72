"""Build objects from YAML: `{target: "package.module.Name", params: {...}}`, recursively.

A config may name only classes and functions of an allow-list: this project's packages
(`model`, `dataset`) and the network / training parts of torch, Lightning, diffusers and
basicsr. So a config from elsewhere cannot run `os.system`, `subprocess.check_call`,
`torch.load` or `torch.hub.load`: a target outside the list is refused before it is imported.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

# Packages a target's dotted path may start with (nothing else is even imported) ...
ALLOWED_PACKAGES = ("model", "dataset", "torch", "torchvision", "pytorch_lightning", "lightning",
                    "lightning_fabric", "diffusers", "basicsr")  # fmt: skip
# ... and the modules the object must be defined in (so no re-exported `os.system`, no
# `torch.load`, `torch.save` or `torch.hub`).
ALLOWED_MODULES = ("model.", "dataset.", "torch.nn.", "torch.optim.", "torch.utils.data.",
                   "torchvision.transforms.", "torchvision.models.", "pytorch_lightning.",
                   "lightning.", "lightning_fabric.", "diffusers.models.", "diffusers.schedulers.",
                   "basicsr.archs.")  # fmt: skip


class TargetError(ValueError):
    """A config `target` that is malformed, missing or not allowed."""


def get_obj_from_str(path: str) -> Any:
    """Import `package.module.Name` and return `Name`, if the allow-list permits it.

    Raises:
        TargetError: a path outside `ALLOWED_PACKAGES`, an object defined outside
            `ALLOWED_MODULES`, a private name, or a name that does not exist.
    """
    module, _, name = path.rpartition(".")
    if not module:
        raise TargetError(
            f"target {path!r} must be a dotted path such as 'model.nets.swinir.SwinIR'"
        )
    allowed = ", ".join(ALLOWED_PACKAGES)
    if module.split(".")[0] not in ALLOWED_PACKAGES or name.startswith("_"):
        raise TargetError(f"target {path!r} is not allowed: configs may build from {allowed}")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise TargetError(f"target {path!r} not found ({exc})") from None
    defined = getattr(obj, "__module__", None) or ""
    if inspect.ismodule(obj) or not callable(obj) or not defined.startswith(ALLOWED_MODULES):
        raise TargetError(
            f"target {path!r} is not allowed ({f'{defined}.{name}' if defined else 'a module'}): configs "
            f"may build classes and functions of {', '.join(m.rstrip('.') for m in ALLOWED_MODULES)}"
        )
    return obj


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
