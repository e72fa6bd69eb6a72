"""Synthetic test sets (`dataset.testsets`) and their CLI: reproducible bytes, parameters inside
the protocol ranges, LQ sizes, reuse of a finished set."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from basicsr.utils.matlab_functions import imresize

from dataset import testsets
from dataset.testsets import DEFAULT_CROP, RealESRGANx4, existing_testset, make_testset
from model.io.images import read_image
from scripts.make_testset import build_parser, main


def _write(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


def _smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Textured 8-bit image: upsampled noise plus fine noise (something to blur and compress)."""
    coarse = cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h))
    return np.clip(coarse + rng.integers(-20, 21, coarse.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def gt_dir(tmp_path: Path) -> Path:
    """a.png 144x160, sub/b.png 136x136 (x4 protocols crop 128x128 from them)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "src"
    _write(root / "a.png", _smooth_image(rng, 144, 160))
    _write(root / "sub" / "b.png", _smooth_image(rng, 136, 136))
    return root


@pytest.fixture
def face_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    root = tmp_path / "faces"
    for name in ("f0", "f1", "f2"):
        _write(root / f"{name}.png", _smooth_image(rng, 64, 64))
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _run(tmp_path: Path, gt: Path, name: str, *args: str) -> tuple[Path, dict]:
    out = tmp_path / name
    assert main(["--gt", str(gt), "--out", str(out), *args]) == 0
    return out, json.loads((out / "meta.json").read_text())


def test_realesrgan_x4_reproducible_sizes_and_ranges(gt_dir: Path, tmp_path: Path) -> None:
    args = ["--protocol", "realesrgan_x4", "--crop-size", "128", "--seed", "3"]
    out1, meta = _run(tmp_path, gt_dir, "r1", *args)
    out2, _ = _run(tmp_path, gt_dir, "r2", *args)
    files = _files(out1)
    assert files == _files(out2)  # byte-identical, meta.json included
    assert sorted(files) == ["gt/a.png", "gt/sub/b.png", "lq/a.png", "lq/sub/b.png", "meta.json"]

    assert meta["protocol"] == "realesrgan_x4" and meta["seed"] == 3 and meta["scale"] == 4
    for entry in meta["images"]:
        assert read_image(out1 / "gt" / entry["name"]).shape == (128, 128, 3)
        assert read_image(out1 / "lq" / entry["name"]).shape == (32, 32, 3)
        assert entry["gt_size"] == [128, 128] and entry["lq_size"] == [32, 32]
        p = entry["params"]
        assert p["stage2_scale"] == 4.0
        for r, noise, poisson, resize in (
            (p["round1"], (1, 30), (0.05, 3), (0.15, 1.5)),
            (p["round2"], (1, 25), (0.05, 2.5), (0.3, 1.2)),
        ):
            low, high = noise if r["gaussian"] else poisson
            assert low <= r["strength"] <= high
            assert 30 <= r["jpeg_quality"] <= 95 and r["gray"] in (0.0, 1.0)
            assert resize[0] <= r["scale"] <= resize[1]
            assert r["resize_mode"] in ("area", "bilinear", "bicubic")
    # the centre crop of a.png (144x160) starts at (8, 16)
    assert meta["images"][0]["box"] == [8, 16, 128, 128]
    src = read_image(gt_dir / "a.png")[8:136, 16:144]
    assert np.array_equal(read_image(out1 / "gt" / "a.png"), src)
    assert meta["degradation"]["batch_transform"]["params"]["seed"] == 3

    out3, _ = _run(tmp_path, gt_dir, "r3", *args[:-1], "4")
    assert _files(out3)["gt/a.png"] == files["gt/a.png"]
    assert _files(out3)["lq/a.png"] != files["lq/a.png"]


def test_realesrgan_x4_matches_the_batch_transform(gt_dir: Path) -> None:
    """The test set draws what the deterministic transform draws, and stops before its resize
    back: upsampling our LQ gives the transform's LQ to within 8-bit rounding."""
    protocol = RealESRGANx4(seed=5)
    hq = torch.from_numpy(read_image(gt_dir / "a.png")[:128, :128].transpose(2, 0, 1).copy())[None]
    for key in (7, 123456):
        kernels, params = protocol.draw(key)
        batch = {"hq": hq, **kernels, "txt": [""], "index": torch.tensor([key])}
        full = protocol.transform(batch)["lq"]
        assert torch.equal(full, protocol.transform.degrade(hq, batch, params))
        small = protocol.transform.degrade(hq, kernels, params, resize_back=False)
        assert small.shape == (1, 3, 32, 32)
        up = F.interpolate(small, size=(128, 128), mode="bicubic")
        up = torch.clamp((up * 255).round(), 0, 255) / 255
        assert (up - full).abs().max() <= 2 / 255 + 1e-6
        assert (up - full).abs().mean() < 0.5 / 255


def test_codeformer_face_ranges_and_reproducible(face_dir: Path, tmp_path: Path) -> None:
    out1, meta = _run(tmp_path, face_dir, "f1", "--protocol", "codeformer_face", "--seed", "9")
    out2, _ = _run(tmp_path, face_dir, "f2", "--protocol", "codeformer_face", "--seed", "9")
    assert _files(out1) == _files(out2)
    assert len(meta["images"]) == 3 and meta["settings"]["crop"] == "none"
    scales = []
    for entry in meta["images"]:
        assert read_image(out1 / "lq" / entry["name"]).shape == (64, 64, 3)
        assert entry["box"] == [0, 0, 64, 64]
        p = entry["params"]
        assert p["kernel"]["kind"] in ("iso", "aniso")
        assert 0.1 <= p["kernel"]["sigma_x"] <= 12 and 0.1 <= p["kernel"]["sigma_y"] <= 12
        assert 1 <= p["scale"] <= 12 and 0 <= p["noise_sigma"] <= 15
        assert 30 <= p["jpeg_quality"] <= 100 and isinstance(p["jpeg_quality"], int)
        scales.append(p["scale"])
    assert len(set(scales)) == 3  # every image has its own draw
    settings = meta["degradation"]["degradation"]["params"]
    assert settings["blur_sigma"] == [0.1, 12] and settings["jpeg_range"] == [30, 100]


def test_bicubic_x4_is_matlab_imresize(gt_dir: Path, tmp_path: Path) -> None:
    out, meta = _run(tmp_path, gt_dir, "b", "--protocol", "bicubic_x4", "--crop", "none")
    assert [e["gt_size"] for e in meta["images"]] == [[144, 160], [136, 136]]
    assert [e["lq_size"] for e in meta["images"]] == [[36, 40], [34, 34]]
    gt = read_image(out / "gt" / "a.png")
    expected = np.round(np.clip(imresize(gt, 0.25), 0, 1) * 255)
    assert np.array_equal(read_image(out / "lq" / "a.png") * 255, expected.astype(np.float32))


def test_random_crops_and_skipped_images(gt_dir: Path, tmp_path: Path) -> None:
    (gt_dir / "broken.png").write_bytes(b"not an image")
    _write(gt_dir / "tiny.png", np.zeros((16, 16, 3), dtype=np.uint8))
    out = tmp_path / "rc"
    argv = ["--protocol", "bicubic_x4", "--gt", str(gt_dir), "--out", str(out)]
    argv += ["--crop", "random", "--crop-size", "64", "--crops-per-image", "2"]
    assert main(argv) == 1  # a source was skipped
    meta = json.loads((out / "meta.json").read_text())
    assert [e["name"] for e in meta["images"]] == [
        "a_00.png",
        "a_01.png",
        "sub/b_00.png",
        "sub/b_01.png",
    ]
    assert sorted(s["source"] for s in meta["skipped"]) == ["broken.png", "tiny.png"]
    for e in meta["images"]:
        top, left, h, w = e["box"]
        limit = (144, 160) if e["source"] == "a.png" else (136, 136)
        assert (h, w) == (64, 64) and top + h <= limit[0] and left + w <= limit[1]
        src = read_image(gt_dir / e["source"])[top : top + h, left : left + w]
        assert np.array_equal(read_image(out / "gt" / e["name"]), src)


def test_cli_rejects_bad_arguments(gt_dir: Path, tmp_path: Path) -> None:
    assert all(action.help for action in build_parser()._actions)
    out = tmp_path / "used"
    _write(out / "lq" / "x.png", np.zeros((4, 4, 3), dtype=np.uint8))
    bad = [
        ["--out", str(out)],  # not empty
        ["--out", str(tmp_path / "n1"), "--crop-size", "130"],  # not a multiple of 4
        ["--out", str(tmp_path / "n2"), "--crops-per-image", "2"],  # needs random crops
    ]
    for extra in bad:
        with pytest.raises(SystemExit) as exc:
            main(["--protocol", "bicubic_x4", "--gt", str(gt_dir), *extra])
        assert exc.value.code == 2


def test_config_checks_and_reuse_of_a_finished_set(gt_dir: Path, tmp_path: Path) -> None:
    config = testsets.TestsetConfig
    for protocol, crop in DEFAULT_CROP.items():
        assert config(protocol, gt_dir, tmp_path).crop == crop
    bad_settings = [
        {"protocol": "bogus"},
        {"crop": "corner"},
        {"crop_size": 130},  # not a multiple of 4
        {"crops_per_image": 2},  # needs random crops
        {"limit": 0},
    ]
    for bad in bad_settings:
        with pytest.raises(ValueError):
            config(**{"protocol": "bicubic_x4", "gt": gt_dir, "out": tmp_path, **bad})

    cfg = config("bicubic_x4", gt_dir, tmp_path / "set", crop_size=64, limit=1)
    assert existing_testset(cfg) is None
    meta = make_testset(cfg)
    assert [e["source"] for e in meta["images"]] == ["a.png"]  # limit: first source only
    expected = {"protocol": "bicubic_x4", "seed": 0, "crop": "center", "crop_size": 64}
    assert meta["settings"] == {**expected, "crops_per_image": 1, "limit": 1}
    assert existing_testset(cfg) == meta
    other_seed = config("bicubic_x4", gt_dir, cfg.out, seed=1, crop_size=64, limit=1)
    other_source = config("bicubic_x4", tmp_path, cfg.out, crop_size=64, limit=1)
    for other in (other_seed, other_source):
        with pytest.raises(ValueError, match="other settings or data"):
            existing_testset(other)
