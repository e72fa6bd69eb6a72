"""Scoring (`model.eval.scoring`) and its CLI on tiny generated folders; no network, no real
metric weights."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from basicsr.metrics import calculate_niqe, calculate_psnr, calculate_ssim

from model.eval import iqa
from model.eval.scoring import EvalConfig, evaluate_folder, metric_device, pair_images
from scripts.evaluate import build_parser, main

NIQE_PARAMS = Path(calculate_niqe.__code__.co_filename).with_name("niqe_pris_params.npz")


def _write(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """results/ and gt/: a.png, sub/b.png match; c.png differs in size; d.png has no GT;
    e.png matches gt/other/e.png by stem."""
    rng = np.random.default_rng(0)
    res, gt = tmp_path / "results", tmp_path / "gt"
    for name in ("a", "sub/b", "c", "other/e"):
        g = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
        _write(gt / f"{name}.png", g)
        r = np.clip(g.astype(int) + rng.integers(-15, 16, g.shape), 0, 255).astype(np.uint8)
        out_name = "e" if name == "other/e" else name
        _write(res / f"{out_name}.png", r[:24] if name == "c" else r)
    _write(res / "d.png", rng.integers(0, 256, (32, 40, 3), dtype=np.uint8))
    return res, gt


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "metrics.csv", newline="") as f:
        return {row["image"]: row for row in csv.DictReader(f)}


def test_cli_writes_csv_json_markdown(folders: tuple[Path, Path], tmp_path: Path) -> None:
    res, gt = folders
    out = tmp_path / "eval"
    argv = ["--results", str(res), "--gt", str(gt), "--metrics", "psnr,ssim", "--y-channel"]
    argv += ["--crop-border", "2", "--batch-size", "2", "--seed", "1", "--device", "cpu"]
    assert main([*argv, "--out", str(out)]) == 0

    rows = _rows(out)
    assert sorted(rows) == ["a.png", "c.png", "d.png", "e.png", "sub/b.png"]
    for name, gt_name in (("a.png", "a.png"), ("sub/b.png", "sub/b.png"), ("e.png", "other/e.png")):
        r, g = cv2.imread(str(res / name)), cv2.imread(str(gt / gt_name))
        assert rows[name]["gt"] == str(gt / gt_name)
        ref_psnr = calculate_psnr(r, g, crop_border=2, test_y_channel=True)
        ref_ssim = calculate_ssim(r, g, crop_border=2, test_y_channel=True)
        assert float(rows[name]["psnr"]) == pytest.approx(ref_psnr, abs=1e-6)
        assert float(rows[name]["ssim"]) == pytest.approx(ref_ssim, abs=1e-6)
    for skipped in ("c.png", "d.png"):
        assert rows[skipped]["psnr"] == rows[skipped]["ssim"] == ""

    summary = json.loads((out / "summary.json").read_text())
    psnrs = [float(rows[n]["psnr"]) for n in ("a.png", "sub/b.png", "e.png")]
    assert summary["means"]["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-12)
    assert summary["counts"] == {"psnr": 3, "ssim": 3}
    assert summary["missing_gt"] == ["d.png"]
    assert summary["size_mismatch"] == [{"name": "c.png", "result": [24, 40], "gt": [32, 40]}]
    assert summary["errors"] == {}
    assert summary["settings"]["crop_border"] == 2 and summary["settings"]["y_channel"] is True
    assert summary["versions"]["torch"] == torch.__version__.split("+")[0]

    table = (out / "summary.md").read_text()
    assert f"{summary['means']['psnr']:.4f}" in table and "PSNR↑" in table
    assert "d.png" in table and "c.png [24, 40] vs GT [32, 40]" in table


def test_rgb_flag_matches_basicsr_rgb(folders: tuple[Path, Path], tmp_path: Path) -> None:
    res, gt = folders
    out = tmp_path / "eval"
    argv = ["--results", str(res), "--gt", str(gt), "--metrics", "psnr", "--rgb", "--out", str(out)]
    assert main(argv) == 0
    r, g = cv2.imread(str(res / "a.png")), cv2.imread(str(gt / "a.png"))
    ref = calculate_psnr(r, g, crop_border=4, test_y_channel=False)
    assert float(_rows(out)["a.png"]["psnr"]) == pytest.approx(ref, abs=1e-6)


def test_without_gt_skips_full_reference(folders: tuple[Path, Path], tmp_path: Path) -> None:
    res, _ = folders
    out = tmp_path / "eval"
    assert main(["--results", str(res), "--metrics", "psnr,ssim", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_metrics"] == ["psnr", "ssim"]
    assert summary["means"] == {} and summary["images"] == 5


def test_unreadable_image_is_reported(folders: tuple[Path, Path], tmp_path: Path) -> None:
    res, gt = folders
    (res / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "eval"
    assert (
        main(["--results", str(res), "--gt", str(gt), "--metrics", "psnr", "--out", str(out)]) == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unreadable"] == ["broken.png"] and summary["counts"]["psnr"] == 3


def test_identical_images_give_inf_psnr_as_a_json_string(tmp_path: Path) -> None:
    img = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    _write(tmp_path / "res" / "x.png", img)
    _write(tmp_path / "gt" / "x.png", img)
    out = tmp_path / "eval"
    argv = ["--results", str(tmp_path / "res"), "--gt", str(tmp_path / "gt"), "--out", str(out)]
    assert main([*argv, "--metrics", "psnr,ssim", "--crop-border", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["means"]["psnr"] == "inf"
    assert summary["means"]["ssim"] == pytest.approx(1.0, abs=1e-12)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every download pyiqa could start fail at once; returns the URLs attempted."""
    pytest.importorskip("pyiqa")
    from pyiqa.utils import download_util

    attempted: list[str] = []

    def refuse(url: str, *args, **kwargs) -> None:
        attempted.append(url)
        raise ConnectionError(f"network disabled in tests: {url}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(download_util, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return attempted


def test_missing_weights_is_one_clear_error_and_psnr_still_written(
    folders: tuple[Path, Path], tmp_path: Path, no_network: list[str]
) -> None:
    res, gt = folders
    weights, out = tmp_path / "weights", tmp_path / "eval"
    weights.mkdir()
    argv = ["--results", str(res), "--gt", str(gt), "--metrics", "psnr,ssim,lpips,musiq"]
    assert main([*argv, "--metric-weights-dir", str(weights), "--out", str(out)]) == 1

    summary = json.loads((out / "summary.json").read_text())
    lpips_error = summary["errors"]["lpips"]
    assert "LPIPS_v0.1_alex-df73285e.pth" in lpips_error and str(weights / "pyiqa") in lpips_error
    assert "musiq_koniq_ckpt" in summary["errors"]["musiq"]
    assert "\n" not in lpips_error
    assert summary["counts"]["psnr"] == 3 and summary["counts"]["lpips"] == 0
    assert float(_rows(out)["a.png"]["psnr"]) > 0
    assert "lpips: weight file" in (out / "summary.md").read_text()
    assert no_network == []  # the local check fails before pyiqa tries to download


def test_lpips_vgg_is_full_reference_and_asks_for_its_vgg_files(
    folders: tuple[Path, Path], tmp_path: Path, no_network: list[str]
) -> None:
    """lpips_vgg (DiffIR's LPIPS) is pyiqa's lpips-vgg: its own two weight files, lower better,
    skipped without GT. (Its weights cannot be faked cheaply: VGG16 is 528 MB.)"""
    res, gt = folders
    weights, out = tmp_path / "weights", tmp_path / "eval"
    with pytest.raises(iqa.MetricUnavailable, match="LPIPS_v0.1_vgg-a78928a0.pth"):
        iqa.check_weights("lpips_vgg", weights)
    (weights / "pyiqa").mkdir(parents=True)
    (weights / "pyiqa" / "LPIPS_v0.1_vgg-a78928a0.pth").touch()  # the VGG16 trunk still missing
    argv = ["--results", str(res), "--metrics", "psnr,lpips_vgg", "--out", str(out)]
    assert main([*argv, "--gt", str(gt), "--metric-weights-dir", str(weights)]) == 1
    summary = json.loads((out / "summary.json").read_text())
    error = summary["errors"]["lpips_vgg"]
    assert "vgg16-397923af.pth" in error and str(weights / "checkpoints") in error
    assert summary["settings"]["pyiqa_models"] == {"lpips_vgg": "lpips-vgg"}
    assert "LPIPS_VGG↓" in (out / "summary.md").read_text()
    assert main(argv) == 0  # no GT folder
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_metrics"] == ["psnr", "lpips_vgg"]
    assert no_network == []


def test_failed_download_is_reported(
    folders: tuple[Path, Path],
    tmp_path: Path,
    no_network: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pyiqa.utils import download_util

    monkeypatch.setattr(download_util, "DEFAULT_CACHE_DIR", str(tmp_path / "cache"))
    res, gt = folders
    out = tmp_path / "eval"
    argv = ["--results", str(res), "--gt", str(gt), "--metrics", "psnr,niqe", "--out", str(out)]
    assert main(argv) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"]["niqe"].startswith("niqe: could not be created (network disabled")
    assert len(no_network) == 1 and no_network[0].endswith("niqe_modelparameters.mat")
    assert summary["counts"]["psnr"] == 3


def test_niqe_reads_the_weights_dir(tmp_path: Path, no_network: list[str]) -> None:
    """NIQE with MATLAB's pristine-image model (shipped by BasicSR) put into the weights dir,
    checked against BasicSR's independent NIQE on the MATLAB gray conversion."""
    import scipy.io

    params = np.load(NIQE_PARAMS)
    weights = tmp_path / "weights"
    (weights / "pyiqa").mkdir(parents=True)
    scipy.io.savemat(
        weights / "pyiqa" / "niqe_modelparameters.mat",
        {"mu_prisparam": params["mu_pris_param"], "cov_prisparam": params["cov_pris_param"]},
    )
    rng = np.random.default_rng(1)
    res, out = tmp_path / "results", tmp_path / "eval"
    for i in range(2):
        smooth = cv2.resize(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), (192, 192))
        _write(
            res / f"{i}.png",
            np.clip(smooth + rng.integers(-8, 9, smooth.shape), 0, 255).astype(np.uint8),
        )
    argv = ["--results", str(res), "--metrics", "niqe", "--metric-weights-dir", str(weights)]
    assert main([*argv, "--out", str(out)]) == 0
    rows = _rows(out)
    for name in ("0.png", "1.png"):
        ref = calculate_niqe(cv2.imread(str(res / name)), 0, convert_to="gray")
        # pyiqa and BasicSR round the gray image differently: ~0.01 apart on NIQE ~12.
        assert float(rows[name]["niqe"]) == pytest.approx(ref, abs=0.02)
    assert no_network == []


def test_weights_location_is_restored(tmp_path: Path) -> None:
    pytest.importorskip("pyiqa")
    from pyiqa.archs import maniqa_arch
    from pyiqa.utils import download_util

    before = (torch.hub.get_dir(), download_util.DEFAULT_CACHE_DIR, maniqa_arch.timm)
    with iqa.weights_location(tmp_path):
        assert torch.hub.get_dir() == str(tmp_path)
        assert str(tmp_path / "pyiqa") == download_util.DEFAULT_CACHE_DIR
        assert maniqa_arch.timm is not before[2]
    assert (torch.hub.get_dir(), download_util.DEFAULT_CACHE_DIR, maniqa_arch.timm) == before


def test_every_flag_has_help_and_bad_metric_is_rejected(tmp_path: Path) -> None:
    parser = build_parser()
    assert all(action.help for action in parser._actions)
    for bad in (["--metrics", "psnr,bogus"], ["--batch-size", "0"], ["--crop-border", "-1"]):
        with pytest.raises(SystemExit) as exc:
            main(["--results", str(tmp_path), *bad])
        assert exc.value.code == 2


def test_library_pairs_scores_and_checks_settings(folders: tuple[Path, Path]) -> None:
    """The library without the CLI: pairing, one call that scores and summarizes, checks."""
    res, gt = folders
    items, missing = pair_images(res, gt)
    pairs = {it.name: it.gt_path for it in items}
    assert pairs["e.png"] == gt / "other" / "e.png" and pairs["sub/b.png"] == gt / "sub" / "b.png"
    assert missing == ["d.png"] and pairs["d.png"] is None

    cfg = EvalConfig(results=res, gt=gt, metrics=("psnr",), crop_border=0)
    report, summary, table = evaluate_folder(cfg)
    a = next(it for it in report.items if it.name == "a.png")
    r, g = cv2.imread(str(res / "a.png")), cv2.imread(str(gt / "a.png"))
    assert a.scores["psnr"] == pytest.approx(calculate_psnr(r, g, 0, test_y_channel=True), abs=1e-6)
    assert summary["counts"] == {"psnr": 3} and f"{summary['means']['psnr']:.4f}" in table

    bad_settings = [{"metrics": ()}, {"metrics": ("psnr", "bogus")}, {"batch_size": 0}]
    for bad in [*bad_settings, {"crop_border": -1}]:
        with pytest.raises(ValueError):
            EvalConfig(**{"results": res, "gt": gt, "metrics": ("psnr",), **bad})
    assert metric_device("cuda:1") == "cuda:1"
    assert metric_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
