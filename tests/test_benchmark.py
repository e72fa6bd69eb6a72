"""The benchmark CLI on tiny random models (CPU): JSON fields, types and the tiling wrappers.

Wall-clock values are never asserted, only that they are positive and consistent.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from model.nets.cldm import ControlLDM
from scripts import benchmark
from scripts.benchmark import (
    PARTS,
    BenchConfig,
    build_models,
    build_parser,
    guided_model_fn,
    main,
)
from scripts.make_tiny_weights import write_tiny_weights


def _check_timing(stats: dict, runs: int) -> None:
    assert set(stats) == {"mean", "std", "min", "max", "n", "values"}
    assert stats["n"] == runs == len(stats["values"])
    assert all(isinstance(v, float) and v > 0 for v in stats["values"])
    assert stats["min"] == min(stats["values"]) and stats["max"] == max(stats["values"])
    assert stats["min"] <= stats["mean"] <= stats["max"] and stats["std"] >= 0


def test_tiny_cpu_run_writes_every_field(tmp_path: Path) -> None:
    out = tmp_path / "bench" / "tiny.json"
    argv = ["--tiny", "--sizes", "128,192x128", "--steps", "2", "--warmup", "1", "--repeat", "2"]
    assert main([*argv, "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"config", "environment", "models", "memory_kind", "results"}

    config = report["config"]
    assert set(config) == {f.name for f in dataclasses.fields(BenchConfig)}
    assert config["sizes"] == [[128, 128], [192, 128]] and config["tiny"] is True
    assert config["steps"] == 2 and config["precision"] == "fp32" and config["device"] == "cpu"

    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert {"python", "platform", "cuda", "cudnn", "diffusers", "device_name"} <= set(env)
    assert isinstance(env["cpu_threads"], int)

    models = report["models"]
    assert models["weights"] == "random tiny" and models["build_seconds"] > 0
    assert set(models["parameters"]) == {"swinir", "controlnet", "unet", "vae", "text_encoder"}
    assert all(isinstance(n, int) and n > 0 for n in models["parameters"].values())

    assert report["memory_kind"] == "process_peak_rss"
    assert [r["size"] for r in report["results"]] == [[128, 128], [192, 128]]
    for result, latent in zip(report["results"], ([16, 16], [24, 16]), strict=True):
        assert result["latent_size"] == latent  # the tiny VAE downsamples by 8, as SD's
        assert result["network_calls_per_step"] == 1
        assert set(result["timings"]) == set(PARTS) == set(result["peak_memory_bytes"])
        for part in PARTS:
            _check_timing(result["timings"][part], runs=2)
            peak = result["peak_memory_bytes"][part]
            assert isinstance(peak, int) and peak > 0
        # the process peak only grows along the run
        peaks = [result["peak_memory_bytes"][p] for p in PARTS]
        assert peaks == sorted(peaks)


def test_tiling_guidance_and_sampler_flags(tmp_path: Path) -> None:
    out = tmp_path / "tiled.json"
    argv = ["--tiny", "--sizes", "256", "--steps", "1", "--warmup", "0", "--repeat", "1"]
    argv += ["--device", "cpu", "--cfg-scale", "3", "--sampler", "ddim", "--stage1-tile", "128"]
    argv += [
        "--vae-tiling",
        "--vae-tile-size",
        "128",
        "--latent-tile",
        "16",
        "--latent-stride",
        "16",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["latent_tile"] == 16 and report["config"]["vae_tiling"] is True
    (result,) = report["results"]
    assert result["network_calls_per_step"] == 2 and result["latent_size"] == [32, 32]
    for part in PARTS:
        _check_timing(result["timings"][part], runs=1)


def test_guided_model_fn_tiles_and_doubles_the_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = BenchConfig(tiny=True, latent_tile=16, latent_stride=8, cfg_scale=3.0)
    cfg = dataclasses.replace(cfg, vae_tiling=True, vae_tile_size=128)
    models = build_models(cfg)
    assert models.cldm.vae.use_tiling and models.cldm.vae.tile_latent_min_size == 16
    seen: list[tuple[int, ...]] = []
    forward = ControlLDM.forward

    def counting(self, x_noisy, t, cond):
        seen.append(tuple(x_noisy.shape[-2:]))
        return forward(self, x_noisy, t, cond)

    monkeypatch.setattr(ControlLDM, "forward", counting)
    c_txt = models.cldm.encode_text([""])
    cond = {"c_txt": c_txt, "c_img": torch.randn(1, 4, 32, 32)}
    with torch.inference_mode():
        out = guided_model_fn(models.cldm, cfg, cond)(
            torch.randn(1, 4, 32, 32), torch.tensor([999]), cond
        )
    assert out.shape == (1, 4, 32, 32) and out.dtype == torch.float32
    # 3 x 3 tiles of 16 (stride 8 over 32), conditional and unconditional
    assert seen == [(16, 16)] * 18


def test_weights_dir_with_tiny_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = write_tiny_weights(tmp_path / "weights")
    out = tmp_path / "files.json"
    argv = ["--tiny", "--weights-dir", str(tmp_path / "weights"), "--version", "v2.1"]
    argv += ["--sizes", "128", "--steps", "1", "--warmup", "0", "--repeat", "1", "--device", "cpu"]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    weights = report["models"]["weights"]
    assert weights.startswith("tiny files: ")
    for name in ("sd21_zsnr", "v2.1", "swinir_realesrgan"):
        assert str(paths[name]) in weights
    for part in PARTS:
        _check_timing(report["results"][0]["timings"][part], runs=1)

    (tmp_path / "empty").mkdir()
    argv = ["--tiny", "--weights-dir", str(tmp_path / "empty"), "--sizes", "128"]
    assert main([*argv, "--out", str(tmp_path / "none.json")]) == 1
    assert "v2-1_512-ema-pruned.ckpt" in caplog.text and "v2.pth" in caplog.text
    assert not (tmp_path / "none.json").exists()


def test_out_of_memory_is_reported_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = benchmark.bench_size

    def bench_size(models, cfg, size):
        if size == (256, 256):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(models, cfg, size)

    monkeypatch.setattr(benchmark, "bench_size", bench_size)
    out = tmp_path / "oom.json"
    argv = ["--tiny", "--sizes", "256,128", "--steps", "1", "--warmup", "0", "--repeat", "1"]
    assert main([*argv, "--device", "cpu", "--out", str(out)]) == 1
    first, second = json.loads(out.read_text())["results"]
    assert first["size"] == [256, 256] and "--vae-tiling" in first["error"]
    assert "timings" not in first and second["timings"]["total"]["n"] == 1


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    assert all(action.help for action in build_parser()._actions)
    out = str(tmp_path / "x.json")
    for bad in (
        ["--sizes", "500"],  # not a multiple of 64
        ["--sizes", "64x"],
        ["--steps", "0"],
        ["--vae-tile-size", "64"],  # without --vae-tiling
        ["--sampler", "bogus"],
        ["--stage1-tile", "100"],
        ["--latent-tile", "0"],
    ):
        with pytest.raises(SystemExit) as exc:
            main([*bad, "--out", out])
        assert exc.value.code == 2
