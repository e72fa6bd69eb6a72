"""Loading never runs code: a weight file that would is refused, and configs build only
allow-listed classes and functions."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

import inference
from model.train.instantiate import TargetError, instantiate

ROOT = Path(__file__).resolve().parents[1]


class _WritesAFile:
    """Unpickling this calls `os.system`, which would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _malicious(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"weight": torch.zeros(1), "x": _WritesAFile(marker)}}, path)
    return path


@pytest.mark.parametrize("flag", ["--stage1-ckpt", "--controlnet-ckpt"])
def test_a_weight_file_with_code_is_refused_unread(
    flag: str, tiny_weights: Path, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "written_by_the_pickle"
    evil = _malicious(tmp_path / "evil.ckpt", marker)
    argv = [
        "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--offline",
        "--weights-dir", str(tiny_weights), "--model-config", str(tiny_weights / "tiny_config.yaml"),
        "--device", "cpu", "--precision", "fp32", "--no-progress", flag, str(evil),
    ]  # fmt: skip
    (tmp_path / "in").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "in" / "a.png")
    assert inference.main(argv) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(evil) in lines[0] and "contains code" in lines[0], err
    assert "refused" in lines[0] and "\x1b" not in err and "weights_only" not in err


def test_every_torch_load_in_the_library_is_weights_only() -> None:
    files = [*(ROOT / "model").rglob("*.py"), *(ROOT / "dataset").rglob("*.py"),
             *(ROOT / "scripts").glob("*.py"), ROOT / "inference.py", ROOT / "train.py"]  # fmt: skip
    unsafe = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if keywords.get("weights_only") != "True":
                    unsafe.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert unsafe == []


@pytest.mark.parametrize("target", ["os.system", "subprocess.check_call", "builtins.exec",
                                    "torch.save", "torch.hub.load", "model.io.weights.os"])  # fmt: skip
def test_a_config_target_outside_the_allow_list_is_refused(target: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    params = {"os.system": {"command": f"touch {marker}"},
              "subprocess.check_call": {"args": ["touch", str(marker)]},
              "torch.save": {"obj": 1, "f": str(marker)}}.get(target, {})  # fmt: skip
    with pytest.raises(TargetError, match="not allowed") as err:
        instantiate({"system": {"target": target, "params": params}})
    assert target in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_the_allow_list_keeps_what_the_configs_and_lightning_use() -> None:
    swinir = {"target": "model.nets.swinir.SwinIR", "params": {"embed_dim": 24, "depths": [2],
              "num_heads": [2], "window_size": 8, "sf": 1, "img_size": 16}}  # fmt: skip
    built = instantiate({"net": swinir, "opt": {"target": "torch.nn.Identity"}})
    assert type(built["net"]).__name__ == "SwinIR"
    assert isinstance(built["opt"], torch.nn.Identity)
    with pytest.raises(TargetError, match="not found"):
        instantiate({"target": "model.nets.swinir.NoSuchNet"})


def test_pickle_refusal_message_for_a_corrupt_file(tmp_path: Path) -> None:
    from model.io.checkpoint import WeightFileError, load_weight_file

    (tmp_path / "junk.pth").write_bytes(pickle.dumps([1, 2])[:3])
    with pytest.raises(WeightFileError) as err:
        load_weight_file(tmp_path / "junk.pth")
    assert "junk.pth: cannot read weights" in str(err.value) and "\n" not in str(err.value)
    assert "weights_only" not in str(err.value)
