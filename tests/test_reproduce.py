"""scripts/reproduce.py: the command sequence, and a whole run on tiny weights (CPU, seconds).

The end-to-end run uses the real DIV2K config with small overrides: 128x128 crops of two
generated images (Real-ESRGAN x4 -> 32x32 LQ), version v2.1 (its stage-1 file is among the tiny
weights; v2's BSRNet is not), 2 sampling steps, and PSNR/SSIM only (no metric downloads).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from model.io.images import read_image
from scripts.reproduce import load_config, main

CONFIGS = sorted(Path("configs/reproduce").glob("*.yaml"))
DIV2K = Path("configs/reproduce/bsr_synthetic_div2k.yaml")


def _gt_folder(root: Path) -> Path:
    """Two textured 8-bit images of 136x144 and 128x160 (centre crops of 128x128)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for name, (h, w) in (("a.png", (136, 144)), ("b.png", (128, 160))):
        coarse = cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h))
        img = np.clip(coarse + rng.integers(-20, 21, coarse.shape), 0, 255).astype(np.uint8)
        assert cv2.imwrite(str(root / name), img)
    return root


def _tiny_args(weights: Path) -> list[str]:
    return [
        "--weights-dir", str(weights), "--model-config", str(weights / "tiny_config.yaml"),
        "--device", "cpu", "--precision", "fp32", "--offline", "--metrics", "psnr,ssim",
        "--set", "version=v2.1", "--set", "data.crop_size=128",
        "--set", "inference.steps=2", "--set", "inference.min-short-side=32",
    ]  # fmt: skip


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_plans(path: Path, tmp_path: Path, capsys) -> None:
    cfg = load_config(path)
    assert cfg["name"] == path.stem and cfg["version"] == "v2"
    assert cfg["inference"]["sampler"] == "spaced" and cfg["inference"]["steps"] == 50
    # numbers in the paper column only together with their source
    assert not cfg["paper"]["values"] or cfg["paper"]["source"]
    argv = ["--config", str(path), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")]
    assert main([*argv, "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    programs = [" ".join(shlex.split(ln)[:3]) for ln in lines]
    expected = ["python inference.py --input", "python -m scripts.evaluate"]
    if cfg["data"]["kind"] == "synthetic":
        expected.insert(0, "python -m scripts.make_testset")
    assert programs == expected
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_dry_run_prints_the_sequence(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["--config", str(DIV2K), "--data", "div2k", "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    testset, restore, score = (shlex.split(ln) for ln in lines[:3])
    assert testset[:3] == ["python", "-m", "scripts.make_testset"]
    assert testset[testset.index("--protocol") + 1] == "realesrgan_x4"
    assert testset[testset.index("--crop-size") + 1] == "512"
    assert restore[restore.index("--input") + 1] == str(out / "testset" / "lq")
    for flag, value in (("--task", "sr"), ("--version", "v2"), ("--sampler", "spaced"),
                        ("--steps", "50"), ("--cfg-scale", "4.0"), ("--pos-prompt", ""),
                        ("--upscale", "4"), ("--seed", "231")):  # fmt: skip
        assert restore[restore.index(flag) + 1] == value, flag
    assert score[score.index("--gt") + 1] == str(out / "testset" / "gt")
    assert score[score.index("--metrics") + 1] == "psnr,ssim,lpips,musiq,maniqa,clipiqa"
    assert lines[3].startswith("#") and "table.md" in lines[3]


def test_end_to_end_on_tiny_weights(tiny_weights: Path, tmp_path: Path, capsys) -> None:
    data = _gt_folder(tmp_path / "gt_source")
    out = tmp_path / "run"
    argv = [
        "--config",
        str(DIV2K),
        "--data",
        str(data),
        "--out",
        str(out),
        *_tiny_args(tiny_weights),
    ]
    assert main(argv) == 0
    for name in ("a.png", "b.png"):
        assert read_image(out / "testset" / "lq" / name).shape == (32, 32, 3)
        assert read_image(out / "restored" / name).shape == (128, 128, 3)
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["counts"] == {"psnr": 2, "ssim": 2}
    table = (out / "table.md").read_text()
    assert table in capsys.readouterr().out  # printed as well
    rows = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert rows[0] == "| | PSNR↑ | SSIM↑ |"
    assert rows[1] == "| DiffBIR, paper | – | – |"
    ours = rows[2].split(" | ")
    assert ours[0].startswith("| this run (v2.1; upscale 4, sampler spaced, steps 2")
    assert ours[1] == f"{summary['means']['psnr']:.2f}"
    assert ours[2].rstrip(" |") == f"{summary['means']['ssim']:.4f}"
    assert "paper numbers: none in the config" in table and "note: Not found:" in table
    assert "python inference.py" in table

    # a rerun reuses the test set and the restored images: same numbers
    stamp = (out / "restored" / "a.png").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "restored" / "a.png").stat().st_mtime_ns == stamp
    assert (out / "table.md").read_text() == table
    # another seed of the same test set folder is refused instead of mixed in
    assert main([*argv, "--set", "data.seed=1"]) == 2


def test_paired_data_with_paper_numbers(tiny_weights: Path, tmp_path: Path) -> None:
    """A paired config scores against the given GT; paper values appear with their source."""
    data = tmp_path / "pairs"
    rng = np.random.default_rng(1)
    for name in ("x.png", "y.png"):
        gt = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        for sub, img in (
            ("gt", gt),
            ("lq", cv2.resize(gt, (16, 16), interpolation=cv2.INTER_AREA)),
        ):
            (data / sub).mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(data / sub / name), img)
    cfg = yaml.safe_load(Path("configs/reproduce/bsr_real_realsr.yaml").read_text())
    cfg["paper"].update(source="Table 9 of a test", values={"psnr": 12.34})
    config = tmp_path / "realsr.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    argv = ["--config", str(config), "--data", str(data), "--out", str(out), "--limit", "1"]
    assert main(argv + _tiny_args(tiny_weights)) == 0
    assert [p.name for p in (out / "restored").glob("*.png")] == ["x.png"]
    table = (out / "table.md").read_text()
    assert "| DiffBIR, paper | 12.34 | – |" in table
    assert "paper numbers: Table 9 of a test" in table


def test_bad_input_is_one_clear_error(tmp_path: Path, capsys) -> None:
    base = ["--data", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main(["--config", str(tmp_path / "none.yaml"), *base]) == 2
    assert "none.yaml: config not found" in capsys.readouterr().err
    assert main(["--config", str(DIV2K), *base, "--set", "inference.stepz=3"]) == 2
    assert "`stepz` is not a flag" in capsys.readouterr().err
    assert main(["--config", str(DIV2K), *base, "--set", "inference.task=face"]) == 2
    assert "`task` is set by reproduce.py" in capsys.readouterr().err
    assert main(["--config", str(DIV2K), *base, "--metrics", "psnr,bogus"]) == 2
    assert "unknown metrics ['bogus']" in capsys.readouterr().err
    assert main(["--config", str(DIV2K), "--data", str(tmp_path / "missing"), "--out", "o"]) == 2
    assert "missing: not a folder" in capsys.readouterr().err
