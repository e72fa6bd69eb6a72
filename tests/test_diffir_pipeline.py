"""DiffIRPipeline and `inference.py --method diffir`: any input size, per-image seeds, tiles,
folders with sidecars and resume, and the released files' registry entries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import inference
from model.diffir import DiffIRS2, save_diffir
from model.diffir.pipeline import DiffIRPipeline
from model.io.weights import MissingWeightsError, resolve_weights

TINY = {"n_encoder_res": 1, "dim": 8, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1,
        "heads": [1, 1, 2, 2], "ffn_expansion_factor": 2.0, "layer_norm": "BiasFree"}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("diffir") / "diffir_s2_last.safetensors"
    save_diffir(DiffIRS2(**TINY), path)
    return path


@torch.no_grad()
def test_pipeline_restores_any_size_with_per_image_seeds(tiny_file: Path) -> None:
    pipe = DiffIRPipeline.from_pretrained(tiny_file, device="cpu")
    lq = torch.rand(2, 3, 13, 21)
    out = pipe(lq, seed=5)
    assert out.shape == (2, 3, 52, 84) and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(pipe(lq[1:], seed=5), out[1:])  # a batch row = the image alone
    assert not torch.equal(pipe(lq, seed=6), out)  # x_T follows the seed
    assert pipe(lq, seed=5, upscale=2).shape == (2, 3, 26, 42)
    tiled = pipe(torch.rand(1, 3, 32, 48), tile_size=40, tile_stride=16)  # tiles of 32: two
    assert tiled.shape == (1, 3, 128, 192)


@pytest.fixture(scope="module")
def small_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lq")
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (20, 12)), ("sub/b.jpg", (16, 16))):
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / name)
    return folder


def restore_args(folder: Path, out: Path, weights: Path) -> list[str]:
    return ["--input", str(folder), "--output", str(out), "--method", "diffir",
            "--diffir-ckpt", str(weights), "--device", "cpu", "--no-progress"]  # fmt: skip


def test_inference_restores_a_folder_and_resumes(
    tiny_file: Path, small_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert inference.main(restore_args(small_images, out, tiny_file)) == 0
    outputs = sorted(out.rglob("*.png"))
    assert [p.relative_to(out).as_posix() for p in outputs] == ["a.png", "sub/b.png"]
    assert Image.open(outputs[0]).size == (48, 80)  # 12x20 (W x H), x4
    sidecar = json.loads(outputs[0].with_suffix(".png.json").read_text())
    assert sidecar["version"] == "diffir" and sidecar["weights"]["diffir"] == str(tiny_file)
    mtime = outputs[0].stat().st_mtime_ns
    assert inference.main(restore_args(small_images, out, tiny_file)) == 0  # done: skipped
    assert outputs[0].stat().st_mtime_ns == mtime


def test_missing_released_weights_point_to_the_drive_folder(
    tmp_path: Path, small_images: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(MissingWeightsError, match="drive.google.com.*by hand"):
        resolve_weights(["diffir_s2_gan"], [tmp_path])  # never fetched automatically
    (tmp_path / "DiffIRS2-GAN.pth").write_bytes(b"")
    assert resolve_weights(["diffir_s2_gan"], [tmp_path])["diffir_s2_gan"].parent == tmp_path
    empty = tmp_path / "empty"
    empty.mkdir()
    code = inference.main(["--input", str(small_images), "--output", str(tmp_path / "o"),
                           "--method", "diffir", "--weights-dir", str(empty)])  # fmt: skip
    assert code == 2 and "DiffIRS2-GAN.pth" in capsys.readouterr().err


def test_benchmark_times_diffir(tmp_path: Path) -> None:
    from scripts import benchmark

    out = tmp_path / "bench.json"
    argv = ["--method", "diffir", "--tiny", "--device", "cpu", "--sizes", "32x64", "--warmup",
            "0", "--repeat", "2", "--out", str(out)]  # fmt: skip
    assert benchmark.main(argv) == 0
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert result["lq_size"] == [8, 16] and result["output_size"] == [32, 64]
    assert result["whole_image"]["seconds"]["n"] == 2 and report["parameters"]["diffir"] > 0
