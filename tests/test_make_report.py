"""The HTML report (`model.eval.report`) and its CLI: every image linked, crops written or
embedded, metric values shown."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from urllib.parse import unquote

import cv2
import numpy as np
import pytest

from model.eval.report import crop_region, match_rows
from model.eval.scoring import EvalConfig, evaluate_folder
from scripts.make_report import build_parser, main


def _write(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """gt/ (64x64), lq/ (16x16), stage1/ and two methods; names a, sub/b; m2 lacks sub/b."""
    rng = np.random.default_rng(0)
    roots = {k: tmp_path / k for k in ("gt", "lq", "stage1", "m1", "m2")}
    for name in ("a", "sub/b"):
        gt = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        _write(roots["gt"] / f"{name}.png", gt)
        _write(roots["lq"] / f"{name}.png", cv2.resize(gt, (16, 16), interpolation=cv2.INTER_AREA))
        for i, key in enumerate(("stage1", "m1", "m2")):
            if key == "m2" and name == "sub/b":
                continue
            noise = rng.integers(-10 * (i + 1), 10 * (i + 1) + 1, gt.shape)
            _write(roots[key] / f"{name}.png", np.clip(gt + noise, 0, 255).astype(np.uint8))
    return roots


def _evaluate(results: Path, gt: Path, out: Path) -> Path:
    cfg = EvalConfig(results=results, gt=gt, metrics=("psnr", "ssim"), crop_border=0)
    report, _, _ = evaluate_folder(cfg, out)
    assert not report.errors
    return out / "summary.json"


def evaluate_rows(summary: Path) -> dict[str, dict[str, str]]:
    with open(summary.with_name("metrics.csv"), newline="") as f:
        return {row["image"]: row for row in csv.DictReader(f)}


def test_report_links_every_image_and_shows_the_metrics(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    s1 = _evaluate(folders["m1"], folders["gt"], tmp_path / "eval_m1")
    s2 = _evaluate(folders["m2"], folders["gt"], tmp_path / "eval_m2")
    out = tmp_path / "report"
    argv = ["--out", str(out), "--lq", str(folders["lq"]), "--stage1", str(folders["stage1"])]
    argv += ["--method", f"m1={folders['m1']}", "--method", f"m2={folders['m2']}"]
    argv += ["--gt", str(folders["gt"]), "--summary", f"m1={s1}", "--summary", f"m2={s2}"]
    assert main([*argv, "--crop-size", "32", "--display-size", "64"]) == 0
    page = (out / "index.html").read_text()

    links = {(out / unquote(h)).resolve() for h in re.findall(r'<a href="([^"]+)"', page)}
    expected = {p.resolve() for root in folders.values() for p in root.rglob("*.png")}
    assert links == expected  # every image of every column, nothing else
    crops = [out / unquote(s) for s in re.findall(r'<img src="([^"]+)"', page)]
    assert len(crops) == len(expected) == 9
    for crop in crops:  # 32x32 of 64x64 images, 8x8 of the 16x16 LQ, all shown at 64x64
        assert cv2.imread(str(crop)).shape == (64, 64, 3)
    assert "<th>m2</th>" in page and page.count("<td>–</td>") == 1  # m2 has no sub/b

    m1, m2 = json.loads(s1.read_text()), json.loads(s2.read_text())
    for metric in ("psnr", "ssim"):
        v1, v2 = m1["means"][metric], m2["means"][metric]
        assert f"{v1:.4f}" in page and f"{v2:.4f}" in page
        assert f"<b>{max(v1, v2):.4f}</b>" in page  # higher is better for both
    assert "PSNR↑" in page and "SSIM↑" in page
    first_psnr = float(next(iter(evaluate_rows(s1).values()))["psnr"])
    assert f"psnr {first_psnr:.4g}" in page  # per-image score under the crop


def test_embedded_report_is_one_file(folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "embedded"
    argv = ["--out", str(out), "--gt", str(folders["gt"]), "--method", f"m1={folders['m1']}"]
    assert main([*argv, "--embed", "--crop-size", "0", "--max-images", "1"]) == 0
    page = (out / "index.html").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["index.html"]
    assert page.count("data:image/png;base64,") == 2  # one row, two columns
    assert "<h2>Metrics</h2>" not in page and "whole images" in page


def test_cli_rejects_bad_arguments(folders: dict[str, Path], tmp_path: Path) -> None:
    assert all(action.help for action in build_parser()._actions)
    out = str(tmp_path / "r")
    for bad in (
        [],  # no column
        ["--gt", str(tmp_path / "missing")],
        ["--method", "noequals"],
        ["--gt", str(folders["gt"]), "--summary", f"x={tmp_path / 'none.json'}"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(["--out", out, *bad])
        assert exc.value.code == 2


def test_rows_match_by_path_then_stem_and_crops_scale(tmp_path: Path) -> None:
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    for path in ("a/x.png", "a/sub/y.png", "b/x.jpg", "b/other/y.png", "c/y.png", "c/z/y.png"):
        _write(tmp_path / path, img)
    columns = (("A", tmp_path / "a"), ("B", tmp_path / "b"), ("C", tmp_path / "c"))
    rows = dict(match_rows(columns))
    assert sorted(rows) == ["sub/y", "x"]
    assert rows["x"] == {"A": tmp_path / "a/x.png", "B": tmp_path / "b/x.jpg"}
    # sub/y: B by its unique stem; C has two y.png, so neither is taken
    assert rows["sub/y"] == {"A": tmp_path / "a/sub/y.png", "B": tmp_path / "b/other/y.png"}
    big = np.arange(64 * 48).reshape(64, 48, 1).repeat(3, axis=2).astype(np.float32)
    box = (0.25, 0.5, 0.5, 0.25)
    assert np.array_equal(crop_region(big, box), big[16:48, 24:36])
    assert np.array_equal(crop_region(big[::4, ::4], box), big[::4, ::4][4:12, 6:9])
