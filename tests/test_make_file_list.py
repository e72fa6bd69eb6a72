"""scripts/make_file_list.py: reproducible train/val split of image folders."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dataset.file_sources import load_image_list
from scripts.make_file_list import main


@pytest.fixture
def folders(tmp_path):
    for name, n in (("a", 6), ("b/sub", 4)):
        folder = tmp_path / name
        folder.mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(folder / f"{i}.png"), np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "a" / "readme.txt").write_text("not an image")
    return tmp_path


def _lines(path) -> list[str]:
    return path.read_text().splitlines()


def test_split_by_count_is_seeded(folders, tmp_path):
    args = ["--folders", str(folders / "a"), str(folders / "b"), "--val-size", "3"]
    assert main([*args, "--out-dir", str(tmp_path / "x"), "--seed", "1"]) == 0
    assert main([*args, "--out-dir", str(tmp_path / "y"), "--seed", "1"]) == 0
    assert main([*args, "--out-dir", str(tmp_path / "z"), "--seed", "2"]) == 0
    train, val = _lines(tmp_path / "x" / "train.list"), _lines(tmp_path / "x" / "val.list")
    assert len(train) == 7 and len(val) == 3 and not set(train) & set(val)
    assert all(p.endswith(".png") for p in train + val)
    assert train == _lines(tmp_path / "y" / "train.list")
    assert train != _lines(tmp_path / "z" / "train.list")


def test_split_by_fraction_relative_paths_load_back(folders, tmp_path):
    out = tmp_path / "lists"
    args = ["--folders", str(folders / "a"), "--val-fraction", "0.5", "--out-dir", str(out)]
    assert main([*args, "--relative"]) == 0
    train = _lines(out / "train.list")
    assert len(train) == 3 and not train[0].startswith("/")
    images = load_image_list(out / "train.list")
    assert (folders / "a").samefile(images.path(0).rsplit("/", 1)[0])


def test_non_recursive_and_errors(folders, tmp_path):
    out = str(tmp_path / "o")
    assert main(["--folders", str(folders / "b"), "--no-recursive", "--out-dir", out]) == 1
    assert main(["--folders", str(tmp_path / "missing"), "--out-dir", out]) == 1
    assert main(["--folders", str(folders / "a"), "--val-size", "6", "--out-dir", out]) == 1
    assert main(["--folders", str(folders / "a"), "--out-dir", out]) == 0
    assert len(_lines(tmp_path / "o" / "train.list")) == 6
    assert _lines(tmp_path / "o" / "val.list") == []


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--folders", "--out-dir", "--val-size", "--val-fraction", "--seed", "--relative"):
        assert flag in text
