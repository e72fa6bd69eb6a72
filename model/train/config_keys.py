"""Check a training config's keys before building anything: a typo names the closest valid key.

Valid keys: the top-level sections, `pl.Trainer`'s arguments under `trainer`, the logger and
checkpoint options, and under `params` of a `target` the parameters of that callable. A key
that the YAML already has is always valid (e.g. an entry of a plain mapping).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import pytorch_lightning as pl

from model.train.instantiate import TargetError, get_obj_from_str

TOP_LEVEL = ("system", "data", "trainer", "logger", "checkpoint", "export_prefix", "seed",
             "output_dir")  # fmt: skip
SECTIONS = {
    "trainer": tuple(inspect.signature(pl.Trainer.__init__).parameters)[1:],
    "logger": ("type", "name", "project"),
    "checkpoint": ("every_n_train_steps",),
}
_VAR_KEYWORD = inspect.Parameter.VAR_KEYWORD


class ConfigKeyError(ValueError):
    """A config key that nothing reads."""


def _parameters(target: Any) -> tuple[str, ...] | None:
    """Keyword parameters of a config target; None when unknown or open (**kwargs).

    A class whose `__init__` passes **kwargs on to its base class gets the base's parameters.
    """
    try:
        obj = get_obj_from_str(str(target))
    except TargetError:  # instantiate reports it
        return None
    if inspect.isclass(obj):
        inits = [c.__dict__["__init__"] for c in obj.__mro__ if "__init__" in c.__dict__]
    else:
        inits = [obj]
    names: list[str] = []
    for init in inits:
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            return None
        names += [p.name for p in params if p.kind is not _VAR_KEYWORD and p.name != "self"]
        if all(p.kind is not _VAR_KEYWORD for p in params):
            return tuple(names)
    return None


def _unknown(path: str, key: str, valid: Iterable[str]) -> ConfigKeyError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean {path}{close[0]}?" if close else ""
    return ConfigKeyError(f"{path}{key}: unknown config key{hint}")


def check_key(cfg: Mapping, dotted: str) -> None:
    """Raise `ConfigKeyError` unless `dotted` (e.g. `trainer.max_steps`) is a valid key."""
    node: Any = cfg
    parent: Any = None
    path = ""
    for depth, key in enumerate(dotted.split(".")):
        if not isinstance(node, Mapping):
            return  # below a scalar or a list: OmegaConf itself decides
        if key in node:
            parent, node, path = node, node[key], f"{path}{key}."
            continue
        if depth == 0:
            valid: Iterable[str] | None = (*TOP_LEVEL, *node)
        elif depth == 1 and path[:-1] in SECTIONS:
            valid = SECTIONS[path[:-1]]
        elif path.endswith("params.") and isinstance(parent, Mapping) and "target" in parent:
            valid = _parameters(parent["target"])
        elif "target" in node:
            valid = ("target", "params")
        else:
            valid = None
        if valid is not None and key not in valid:
            raise _unknown(path, key, (*valid, *node))
        return


def check_config(cfg: Mapping, overrides: Iterable[str]) -> None:
    """Check every override key against `cfg` (the YAML before the overrides), and every
    `trainer` key of the YAML itself."""
    for override in overrides:
        check_key(cfg, override.split("=", 1)[0].lstrip("+~"))
    for key in cfg.get("trainer") or {}:
        if key not in SECTIONS["trainer"]:
            raise _unknown("trainer.", key, SECTIONS["trainer"])
