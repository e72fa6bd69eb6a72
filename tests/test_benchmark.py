"""The benchmark CLI on tiny models (CPU): it times `DiffBIRPipeline` itself.

Checked: every JSON field; the measured parts fit inside the whole-image call; the options
reach the pipeline (network calls and batch per step with and without CFG, tile sizes of
every stage); `--weights-dir` loads through `from_pretrained`. Wall-clock values are never
compared with thresholds.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model.io.weights import REGISTRY
from model.nets.cldm import ControlLDM
from model.nets.swinir import SwinIR
from model.pipelines import random_weights
from model.pipelines.diffbir import DiffBIRPipeline
from model.pipelines.options import PipelineOptions
from model.pipelines.presets import VERSIONS, model_spec
from scripts import benchmark
from scripts.benchmark import PARTS, WHOLE, main

# 128x128 outputs from 64x64 LQs, processed at 128 (latent 16x16).
# One thread: the test machines are shared, and contended OpenMP threads make runs 10x slower.
FAST = ["--threads", "1", "--tiny", "--device", "cpu", "--sizes", "128", "--upscale", "2"]
FAST += ["--min-short-side", "128", "--steps", "2", "--warmup", "0", "--repeat", "1"]


@pytest.fixture(autouse=True)
def _keep_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    assert main([*FAST, *extra, "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[tuple[int, ...]]]:
    """Input shapes of every network call: ControlLDM, SwinIR, VAE encode / decode."""
    shapes: dict[str, list[tuple[int, ...]]] = defaultdict(list)

    def spy(cls: type, name: str, key: str) -> None:
        real = getattr(cls, name)

        def wrapper(self, x, *args, **kwargs):
            shapes[key].append(tuple(x.shape))
            return real(self, x, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    spy(ControlLDM, "forward", "cldm")
    spy(SwinIR, "forward", "swinir")
    spy(ControlLDM, "vae_encode", "vae_encode")
    spy(ControlLDM, "vae_decode", "vae_decode")
    return shapes


def _check_seconds(stats: dict, n: int) -> None:
    assert set(stats) == {"median", "min", "max", "n", "values"}
    assert stats["n"] == n == len(stats["values"])
    assert all(isinstance(v, float) and v > 0 for v in stats["values"])
    assert stats["min"] == min(stats["values"]) and stats["max"] == max(stats["values"])
    assert stats["min"] <= stats["median"] <= stats["max"]


def test_json_has_every_field_and_the_parts_fit_in_the_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    report = _run(tmp_path, "--warmup", "1", "--repeat", "2")
    assert set(report) == {
        "versions", "device", "settings", "parameters", "build_seconds", "build_peak_memory_bytes", "calib_mm_fp32_4096_seconds", "memory_kind", "results"
    }  # fmt: skip
    versions = report["versions"]
    assert versions["torch"] == torch.__version__ and versions["project"]
    assert {"python", "diffusers", "cuda"} <= set(versions)
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert report["device"]["cpu_count"] == os.cpu_count()
    settings = report["settings"]
    assert settings["weights"] == "random tiny" and settings["device"] == "cpu"
    # fp16 on a CPU runs fp32 (the pipeline's rule); the request is kept
    assert settings["precision"] == "fp32" and settings["requested"]["precision"] == "fp16"
    expected = PipelineOptions(upscale=2, min_short_side=128, steps=2)  # defaults otherwise
    assert settings["options"] == json.loads(json.dumps(dataclasses.asdict(expected)))
    assert settings["sizes"] == [[128, 128]] and settings["warmup"] == 1
    assert set(report["parameters"]) == {"stage1", "controlnet", "unet", "vae", "text_encoder"}
    assert all(n > 0 for n in report["parameters"].values())
    assert report["memory_kind"] == "process_peak_rss"

    (result,) = report["results"]
    assert result["size"] == result["output_size"] == result["processing_size"] == [128, 128]
    assert result["lq_size"] == [64, 64] and result["latent_size"] == [16, 16]
    assert result["steps_per_call"] == 2
    _check_seconds(result[WHOLE]["seconds"], 2)
    assert set(result["parts"]) == set(PARTS)
    for part in PARTS:
        _check_seconds(result["parts"][part]["seconds"], 4 if part == "step" else 2)
        peak = result["parts"][part]["peak_memory_bytes"]
        assert isinstance(peak, int) and peak > 0
        if part != "text_encode_cold":  # timed before the calls, text encoder still loaded
            assert peak <= result[WHOLE]["peak_memory_bytes"]
    # every part measured inside the whole-image call it belongs to
    assert len(result["runs"]) == 2
    for run in result["runs"]:
        inside = sum(run[p] for p in ("stage1", "text_encode_cached", "vae_encode", "vae_decode"))
        assert len(run["step"]) == 2
        assert run[WHOLE] >= inside + sum(run["step"])
    assert "| 128x128 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "calls_per_step", "batch"),
    [(["--cfg-scale", "1"], 1, 1), (["--cfg-scale", "3"], 1, 2),
     (["--cfg-scale", "3", "--cfg-separate"], 2, 1)],
)  # fmt: skip
def test_network_calls_per_step_follow_cfg(
    tmp_path: Path, seen: dict, flags: list[str], calls_per_step: int, batch: int
) -> None:
    report = _run(tmp_path, *flags)
    steps = report["results"][0]["steps_per_call"]
    assert steps == 2  # the benchmark makes no network calls of its own
    assert seen["cldm"] == [(batch, 4, 16, 16)] * (steps * calls_per_step)


def test_tile_flags_reach_every_stage(tmp_path: Path, seen: dict) -> None:
    # 64-pixel tiles (8 latents) with the default stride of half a tile; CFG batches 2 tiles,
    # as the tiny UNet cannot normalise one 8x8 latent at its 1x1 bottom level
    tiles = ["--steps", "1", "--cfg-scale", "3"]
    for stage in ("stage1", "vae-encoder", "vae-decoder", "diffusion"):
        tiles += [f"--{stage}-tile-size", "64"]
    report = _run(tmp_path, *tiles)
    assert report["settings"]["options"]["diffusion_tile_size"] == 64
    assert report["results"][0]["latent_size"] == [16, 16]
    assert len(seen["swinir"]) > 1 and {s[-2:] for s in seen["swinir"]} == {(64, 64)}
    assert len(seen["vae_encode"]) > 1 and {s[-2:] for s in seen["vae_encode"]} == {(64, 64)}
    assert len(seen["vae_decode"]) > 1 and {s[-2:] for s in seen["vae_decode"]} == {(8, 8)}
    assert len(seen["cldm"]) > 1 and set(seen["cldm"]) == {(2, 4, 8, 8)}


def test_tiled_uses_inference_sizes() -> None:
    args = benchmark.build_parser().parse_args(
        ["--tiled", "--diffusion-tile-size", "256", "--out", "x"]
    )
    options = benchmark.options_from_args(args)
    assert options.tiles("stage1") == (512, 256) and options.tiles("vae_decoder") == (256, 128)
    assert options.tiles("diffusion") == (256, 128)


def test_weights_dir_loads_through_from_pretrained(
    tmp_path: Path, tiny_weights: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    calls = []
    real = DiffBIRPipeline.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        calls.append((args, kwargs))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(DiffBIRPipeline, "from_pretrained", classmethod(from_pretrained))
    report = _run(tmp_path, "--weights-dir", str(tiny_weights), "--version", "v2.1")
    ((args, kwargs),) = calls
    assert args == ("v2.1", "sr") and kwargs["offline"] is True
    assert Path(kwargs["weights_dir"]) == tiny_weights
    names = VERSIONS["v2.1"].weights("sr")
    expected = {role: str(tiny_weights / REGISTRY[name].filename) for role, name in names.items()}
    assert report["settings"]["weights"] == expected
    assert report["results"][0]["parts"]["step"]["seconds"]["n"] == 2

    (tmp_path / "empty").mkdir()
    argv = [*FAST, "--weights-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "no.json")]
    assert main(argv) == 1
    assert REGISTRY[names["sd"]].filename in caplog.text
    assert not (tmp_path / "no.json").exists()


def test_random_weights_are_finite_and_scaled() -> None:
    config = random_weights.tiny_model_config()
    spec = model_spec("v2.1", "sr", config)
    pipe = random_weights.random_pipeline(spec, torch.device("cpu"), "fp32")
    for name, param in pipe.cldm.unet.named_parameters():  # meta-built, filled from the pool
        assert torch.isfinite(param).all(), name
        if param.ndim >= 2 and param.numel() > 1000:
            fan_in = param.numel() / param.shape[0]
            assert param.std().item() == pytest.approx(fan_in**-0.5, rel=0.2), name
    # SwinIR has buffers (attention masks, indices): built normally, so they are the real ones
    reference = SwinIR(**config["swinir"])
    for (name, buffer), (_, expected) in zip(
        pipe.stage1.network.named_buffers(), reference.named_buffers(), strict=True
    ):
        torch.testing.assert_close(buffer, expected, msg=name)


def test_out_of_memory_is_reported_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = benchmark.bench_size

    def bench_size(pipe, options, size, *args):
        if size == (256, 256):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(pipe, options, size, *args)

    monkeypatch.setattr(benchmark, "bench_size", bench_size)
    out = tmp_path / "oom.json"
    assert main([*FAST, "--sizes", "256,128", "--out", str(out)]) == 1
    first, second = json.loads(out.read_text())["results"]
    assert first == {"size": [256, 256], "error": "out of memory; try --tiled"}
    assert second["parts"]["stage1"]["seconds"]["n"] == 1


@pytest.mark.parametrize(
    "bad",
    [["--sizes", "0"], ["--sizes", "64x"], ["--sizes", "2x3x4"], ["--steps", "0"],
     ["--repeat", "0"], ["--threads", "0"], ["--sampler", "bogus"], ["--stage1-tile-size", "100"],
     ["--weights-dir", "/nonexistent/weights"]],
)  # fmt: skip
def test_cli_rejects_bad_arguments(tmp_path: Path, bad: list[str]) -> None:
    assert all(action.help for action in benchmark.build_parser()._actions)
    with pytest.raises(SystemExit) as exc:
        main([*bad, "--out", str(tmp_path / "x.json")])
    assert exc.value.code == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_records_cuda_memory(tmp_path: Path) -> None:
    report = _run(tmp_path, "--device", "cuda", "--precision", "fp16")
    assert report["memory_kind"] == "cuda_max_memory_allocated"
    assert report["settings"]["precision"] == "fp16" and report["device"]["type"] == "cuda"
    result = report["results"][0]
    assert all(result["parts"][p]["peak_memory_bytes"] > 0 for p in PARTS)


def test_whole_image_equals_inference_output(tmp_path: Path, tiny_weights: Path) -> None:
    """The benchmark times the path inference.py runs: same input and seed, same bytes."""
    import inference
    from model.io.images import decode_image

    shared = ["--upscale", "2", "--min-short-side", "128", "--steps", "2", "--precision", "fp32",
              "--device", "cpu"]  # fmt: skip
    weights = ["--weights-dir", str(tiny_weights)]
    # --seed of the benchmark draws the LQ; both sample with PipelineOptions' default seed
    bench = ["--threads", "1", "--tiny", "--sizes", "128", "--warmup", "0", "--repeat", "1",
             "--seed", "7"]  # fmt: skip
    images = tmp_path / "images"
    out = tmp_path / "bench.json"
    assert main([*bench, *shared, *weights, "--save-images", str(images), "--out", str(out)]) == 0
    restored = tmp_path / "restored"
    argv = ["--input", str(images / "lq_128x128.png"), "--output", str(restored), "--offline",
            "--model-config", str(tiny_weights / "tiny_config.yaml"), "--no-progress"]  # fmt: skip
    assert inference.main([*argv, *shared, *weights]) == 0
    ours = decode_image(restored / "lq_128x128.png").rgb
    assert ours.shape == (128, 128, 3)
    assert (ours == decode_image(images / "out_128x128.png").rgb).all()


def test_table_has_one_row_per_report_and_size(tmp_path: Path, capsys) -> None:
    _run(tmp_path, "--sizes", "128,64x128")
    capsys.readouterr()
    assert main(["--table", str(tmp_path / "bench.json")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "bench.json" in line]
    assert [row.split(" | ")[3:5] for row in rows] == [["random", "128x128"], ["random", "64x128"]]
