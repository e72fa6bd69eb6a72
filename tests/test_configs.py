"""Every YAML under configs/ parses and names importable targets; the tiny ones build."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from model.train.instantiate import get_obj_from_str, instantiate

CONFIGS = sorted(Path("configs").rglob("*.yaml"))


def targets(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["target"]] if isinstance(node.get("target"), str) else []
        return found + [t for v in node.values() for t in targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in targets(v)]
    return []


def test_configs_exist() -> None:
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_config_targets_import(path: Path) -> None:
    tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    for target in targets(tree):
        assert callable(get_obj_from_str(target)), f"{path}: {target} is not callable"


def test_tiny_stage1_config_builds(tmp_path: Path) -> None:
    cfg = OmegaConf.load("configs/tiny/stage1.yaml")
    (tmp_path / "a.png").write_bytes(b"")
    cfg.data.params.train_dataset.params.source = str(tmp_path)
    cfg.data.params.val_dataset.params.source = str(tmp_path)
    system = instantiate(cfg.system)
    datamodule = instantiate(cfg.data)
    assert sum(p.numel() for p in system.parameters()) < 300_000
    assert len(datamodule.train_dataset) == 1
