"""Every YAML under configs/ parses, names importable targets whose parameters bind to the
target's signature (so a misspelt keyword fails here, not after an hour of training), and the
tiny ones build."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from model.train.instantiate import get_obj_from_str, instantiate

CONFIGS = sorted(Path("configs").rglob("*.yaml"))


def target_nodes(node, where: str = "") -> list[tuple[str, dict]]:
    """(dotted location, mapping) of every mapping with a `target`, depth first."""
    if isinstance(node, dict):
        found = [(where or "<root>", node)] if isinstance(node.get("target"), str) else []
        return found + [
            t for k, v in node.items() for t in target_nodes(v, f"{where}.{k}".lstrip("."))
        ]
    if isinstance(node, list):
        return [t for i, v in enumerate(node) for t in target_nodes(v, f"{where}[{i}]")]
    return []


def _keywords(signature: inspect.Signature) -> tuple[set[str], bool]:
    """(named keyword parameters, whether it takes **kwargs)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {p.name for p in signature.parameters.values() if p.kind in kinds}
    return names, any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
    )


def forwarded_unknown(target, params: dict) -> set[str]:
    """Keywords that a class taking **kwargs forwards to its bases' __init__ but none accepts."""
    extra = set(params) - _keywords(inspect.signature(target))[0]
    if not extra or not inspect.isclass(target):
        return set()
    for base in target.__mro__[1:]:
        if "__init__" not in vars(base):
            continue
        if base is object:
            return extra
        names, open_ended = _keywords(inspect.signature(base.__init__))
        extra -= names
        if not extra or not open_ended:
            return extra
    return extra


def bind_errors(tree) -> list[str]:
    """One message per target whose `params` do not bind to its signature (following **kwargs
    that a class passes on to its base class)."""
    errors = []
    for where, node in target_nodes(tree):
        target = get_obj_from_str(node["target"])
        if not callable(target):
            errors.append(f"{where}: {node['target']} is not callable")
            continue
        unknown = set(node) - {"target", "params"}
        if unknown:
            errors.append(f"{where}: keys {sorted(unknown)} next to target (only params)")
        params = node.get("params") or {}
        try:
            inspect.signature(target).bind(**params)
        except TypeError as exc:
            errors.append(f"{where}: {node['target']}: {exc}")
            continue
        forwarded = forwarded_unknown(target, params)
        if forwarded:
            errors.append(f"{where}: {node['target']}: unexpected keyword(s) {sorted(forwarded)}")
    return errors


def test_configs_exist() -> None:
    assert len(CONFIGS) >= 5
    assert sum(bool(target_nodes(OmegaConf.to_container(OmegaConf.load(p)))) for p in CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_config_targets_import_and_bind_their_params(path: Path) -> None:
    tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    assert not bind_errors(tree), f"{path}: " + "; ".join(bind_errors(tree))


def test_binding_catches_a_misspelt_or_missing_keyword() -> None:
    tree = OmegaConf.to_container(OmegaConf.load("configs/train/stage1.yaml"), resolve=False)
    assert not bind_errors(tree)
    tree["system"]["params"]["learning_rat"] = tree["system"]["params"].pop("learning_rate", 1e-4)
    tree["data"]["params"]["train_dataset"]["params"]["out_sise"] = 512
    errors = bind_errors(tree)
    assert len(errors) == 2
    assert "learning_rat" in errors[0] and "data.params.train_dataset: " in errors[1]
    swinir = {"target": "model.nets.swinir.SwinIR", "params": {"embed_dim": 24}, "param": {}}
    assert "next to target" in bind_errors(swinir)[0]


def test_tiny_architecture_configs_bind() -> None:
    from model.nets.swinir import SwinIR

    inspect.signature(SwinIR).bind(
        **OmegaConf.to_container(OmegaConf.load("configs/tiny/swinir.yaml"))
    )


def test_tiny_stage1_config_builds(tmp_path: Path) -> None:
    cfg = OmegaConf.load("configs/tiny/stage1.yaml")
    (tmp_path / "a.png").write_bytes(b"")
    cfg.data.params.train_dataset.params.source = str(tmp_path)
    cfg.data.params.val_dataset.params.source = str(tmp_path)
    system = instantiate(cfg.system)
    datamodule = instantiate(cfg.data)
    assert sum(p.numel() for p in system.parameters()) < 300_000
    assert len(datamodule.train_dataset) == 1
