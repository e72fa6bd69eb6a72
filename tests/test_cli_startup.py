"""inference.py starts fast and fails fast: --help without torch, one-line errors for bad
flags, bad model configs and unreadable weights, and an offline run that stops in seconds."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
from PIL import Image

import inference
from model.io import weights

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "-c", code] if code else [sys.executable, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip


def test_help_is_quick_shows_the_defaults_and_imports_no_network_library() -> None:
    start = time.perf_counter()
    done = _python("", "inference.py", "--help")
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    entries = {}  # flag -> its help, one line
    for block in re.split(r"\n(?=  -)", done.stdout):
        entries[block.split()[0].rstrip(",")] = " ".join(block.split())
    expected = {"--steps": 10, "--cfg-scale": 6.0, "--sampler": "edm_dpm++_3m_sde",
                "--version": "v2.1", "--seed": 231, "--control-strength": 1.0,
                "--task": "sr", "--weights-dir": "weights", "--sd-ckpt": None, "--tiled": None}  # fmt: skip
    for flag, default in expected.items():
        shown = re.findall(r"\(default: ([^)]*)\)$", entries[flag])
        assert shown == ([] if default is None else [str(default)]), entries[flag]
    code = ("import sys, inference; inference.build_parser().format_help(); "
            "print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))")  # fmt: skip
    assert _python(code).stdout.strip() == "[]"
    assert seconds < 10  # ~1.5 s on a busy 2-core machine; importing torch alone takes longer


def test_the_parser_names_equal_the_registries() -> None:
    from model.diffusion.latent_guidance import LatentGuidance
    from model.diffusion.samplers import SAMPLERS
    from model.diffusion.schedule import DIFFUSION_PRESETS
    from model.nets.stage1 import STAGE1_MODELS
    from model.ops.color_fix import COLOR_FIX_MODES
    from model.ops.device import PRECISIONS
    from model.ops.sizing import RESIZES
    from model.ops.tiling import TILE_WEIGHTS
    from model.pipelines import cli_names as names
    from model.pipelines.captioner import CAPTIONERS
    from model.pipelines.faces import DETECTION_MODELS
    from model.pipelines.options import SIGMA_SCHEDULES, TILED_DEFAULTS, PipelineOptions

    assert tuple(SAMPLERS) == names.SAMPLERS
    assert tuple(DIFFUSION_PRESETS) == names.DIFFUSION_PRESETS
    assert tuple(STAGE1_MODELS) == names.STAGE1_MODELS
    assert tuple(DETECTION_MODELS) == names.DETECTION_MODELS
    assert tuple(CAPTIONERS) == names.CAPTIONERS
    assert tuple(COLOR_FIX_MODES) == names.COLOR_FIX_MODES
    assert tuple(RESIZES) == names.RESIZES
    assert tuple(TILE_WEIGHTS) == names.TILE_WEIGHTS
    assert tuple(PRECISIONS) == names.PRECISIONS
    assert names.SIGMA_SCHEDULES == SIGMA_SCHEDULES and names.TILED_DEFAULTS == TILED_DEFAULTS
    hints = {f.name: f.type for f in dataclasses.fields(LatentGuidance)}
    assert all(f"'{v}'" in hints["loss"] for v in names.GUIDANCE_LOSSES)
    assert all(f"'{v}'" in hints["space"] for v in names.GUIDANCE_SPACES)
    defaults = PipelineOptions()
    assert {k: getattr(defaults, k) for k in names.OPTION_DEFAULTS} == names.OPTION_DEFAULTS


@pytest.mark.parametrize(
    ("flag", "value", "reason"),
    [("--upscale", "0", "must be > 0"), ("--steps", "0", "must be >= 1"),
     ("--steps", "2.5", "expected an integer"), ("--quality", "101", "must be <= 100"),
     ("--batch-size", "0", "must be >= 1"), ("--control-end", "1.5", "must be <= 1"),
     ("--noise-aug", "1000", "must be <= 999"), ("--cfg-scale", "nan", "expected a finite number"),
     ("--seed", "-1", "must be >= 0"), ("--stage1-tile-size", "0", "must be >= 1")],
)  # fmt: skip
def test_a_bad_number_names_its_flag_and_value(flag: str, value: str, reason: str, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        inference.main(["--input", "x", "--output", "y", flag, value])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"argument {flag}: {reason}" in err and value in err


def _one_image(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16)).save(folder / "a.png")
    return folder


def test_without_network_the_main_command_fails_in_seconds_with_one_line(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # refused
    weights._reachable.cache_clear()
    fetched = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: fetched.append(a))
    argv = ["--task", "sr", "--upscale", "4", "--input", str(_one_image(tmp_path / "in")),
            "--output", str(tmp_path / "out"), "--weights-dir", str(tmp_path / "none")]  # fmt: skip
    start = time.perf_counter()
    assert inference.main(argv) == 2
    assert time.perf_counter() - start < 10
    weights._reachable.cache_clear()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fetched == [], err
    assert "3 weight file(s) missing" in err and "127.0.0.1:9 cannot be reached" in err
    assert "--offline" in err and "HF_HUB_OFFLINE=1" in err and "--weights-dir" in err


@pytest.mark.parametrize(
    ("section", "value", "expected"),
    [("swinir", "{bogus: 1}", "swinir: unknown SwinIR argument(s) 'bogus'"),
     ("swinir", "[1, 2]", "swinir: expected a mapping of SwinIR arguments"),
     ("diffusion", "{num_timestep: 10}", "diffusion: unknown Diffusion argument(s) 'num_timestep'"),
     ("diffusion", "v9", "unknown diffusion preset 'v9'")],
)  # fmt: skip
def test_a_bad_model_config_entry_is_one_line_and_exit_2(
    section: str, value: str, expected: str, tiny_weights: Path, tmp_path: Path, capsys
) -> None:
    config = tmp_path / "model.yaml"
    config.write_text(f"{section}: {value}\n")
    argv = ["--input", str(_one_image(tmp_path / "in")), "--output", str(tmp_path / "out"),
            "--weights-dir", str(tiny_weights), "--model-config", str(config), "--offline",
            "--version", "custom", "--stage1-ckpt", str(tiny_weights / "general_swinir_v1.ckpt"),
            "--stage1-only", "--device", "cpu"]  # fmt: skip
    assert inference.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(config) in err and expected in err, err


def test_an_unreadable_checkpoint_is_one_line_and_exit_2(
    tiny_weights: Path, tmp_path: Path, capsys
) -> None:
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes((tiny_weights / "general_swinir_v1.ckpt").read_bytes()[:1000])
    argv = ["--input", str(_one_image(tmp_path / "in")), "--output", str(tmp_path / "out"),
            "--weights-dir", str(tiny_weights), "--offline", "--stage1-ckpt", str(broken),
            "--model-config", str(tiny_weights / "tiny_config.yaml"), "--stage1-only",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    assert inference.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{broken}: cannot read weights" in err, err


def test_third_party_chatter_is_silenced_and_hub_warnings_print_once() -> None:
    code = (
        "import logging, huggingface_hub; from model.io.logs import setup_logging; "
        "setup_logging(logging.INFO); "
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('Failed to load CPU kernels'); "
        "logging.getLogger('httpx').info('HTTP Request: HEAD'); "
        "logging.getLogger('huggingface_hub.utils._http').warning('hub retry'); "
        "logging.getLogger('model.pipelines').warning('ours')"
    )
    err = _python(code).stderr
    assert "Failed to load" not in err and "HTTP Request" not in err
    assert err.count("hub retry") == 1 and err.count("ours") == 1, err
