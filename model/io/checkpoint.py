"""Reading and writing weight files.

Released DiffBIR files are `.pth`/`.ckpt`/`.pt` pickles, read with `weights_only=True`: a pickle
that would run code (build any object but tensors and plain containers) is refused unread.
Our own files are safetensors with their config stored as JSON in the metadata.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

StateDict = dict[str, torch.Tensor]


class WeightFileError(RuntimeError):
    """A weight file is missing, unreadable or has an unexpected layout."""


def unwrap_state_dict(obj: Mapping[str, Any]) -> StateDict:
    """Apply the official unwrapping rules to a loaded checkpoint object.

    Uses the `"state_dict"` entry when present (Lightning checkpoints), then strips a
    `"module."` prefix (DataParallel/DDP saves) from every key that has it.
    """
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    return {
        (k[len("module.") :] if k.startswith("module.") else k): v
        for k, v in obj.items()
        if isinstance(v, torch.Tensor)
    }


def _read_error(path: Path, exc: Exception) -> str:
    """One line for a file `torch.load` refused or could not read (never torch's advice to
    retry with `weights_only=False`)."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError):
        code = re.search(r"GLOBAL (\w+(?:\.\w+)+)\s", text)
        if code:
            return f"{path}: contains code ({code[1]}), refused: weight files may hold only tensors"
        return f"{path}: cannot read weights (corrupt, or not a PyTorch weight file)"
    reason = text.strip().split(". ")[0].splitlines()[0] if text.strip() else type(exc).__name__
    return f"{path}: cannot read weights ({reason})"


def load_weight_file(path: str | Path) -> StateDict:
    """Load a released or our own weight file onto the CPU as a flat state dict."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: weight file not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        obj = _torch_load(path)
    except Exception as exc:  # code in the pickle, corrupt file, wrong format, truncated download
        raise WeightFileError(_read_error(path, exc)) from None
    if not isinstance(obj, Mapping):
        raise WeightFileError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return unwrap_state_dict(obj)


def _torch_load(path: Path) -> Any:
    """torch.load of tensors only, memory-mapped (no copy of the file in memory) unless the
    file predates torch's zip format."""
    if zipfile.is_zipfile(path):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def _summary(keys: list[str], what: str) -> str:
    shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    return f"{len(keys)} {what} ({shown})"


def check_state_keys(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor] | list[str],
    source: str | Path,
    what: str,
) -> None:
    """Raise one `WeightFileError` line naming `source` if `state` does not fit `expected`.

    `expected` is a reference state dict (keys and shapes checked) or a list of key names.
    """
    shapes = expected if isinstance(expected, Mapping) else {}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in shapes.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        _summary(keys, kind)
        for keys, kind in ((missing, "missing keys"), (unexpected, "unexpected keys"),
                           (wrong, "shape mismatches"))
        if keys
    ]  # fmt: skip
    if problems:
        raise WeightFileError(f"{source}: not a {what} state dict: " + "; ".join(problems))


def load_state_strict(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str | Path, what: str
) -> None:
    """`module.load_state_dict(state, strict=True)` with a one-line error naming `source`.
    Tensors of the module's dtype are taken over, not copied (`assign`): weights read with mmap
    stay in the file's pages, which the pipeline hands back when the network is idle."""
    own = module.state_dict()
    check_state_keys(state, own, source, what)
    assign = all(state[key].dtype == value.dtype for key, value in own.items())
    module.load_state_dict(state, strict=True, assign=assign)


def save_safetensors(
    state: Mapping[str, torch.Tensor], path: str | Path, config: Mapping[str, Any] | None = None
) -> None:
    """Save tensors as safetensors, with `config` as JSON under the metadata key "config"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {"config": json.dumps(config)} if config is not None else None
    save_file(tensors, str(path), metadata=metadata)


def read_safetensors_config(path: str | Path) -> dict[str, Any] | None:
    """Return the config stored in a safetensors file's metadata, or None."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["config"]) if "config" in meta else None
