"""bf16 against fp32 on the same weights (model.eval.precision_error, benchmark --precision-error)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.eval.precision_error import TIMESTEPS, precision_errors
from model.pipelines.diffbir import DiffBIRPipeline
from model.pipelines.presets import model_spec
from model.pipelines.random_weights import random_pipeline, tiny_model_config
from scripts.benchmark import main

CALLS = ["text_encoder", "vae_encode", *(f"network_t{t}" for t in TIMESTEPS), "vae_decode"]


def fresh_pipeline() -> DiffBIRPipeline:
    """Tiny random weights of its own: the comparison casts the modules in place."""
    spec = model_spec("v2.1", "sr", tiny_model_config())
    return random_pipeline(spec, torch.device("cpu"), "fp32", seed=0)


def test_fp32_against_itself_is_exact_and_bf16_is_close_but_not_equal() -> None:
    same = precision_errors(fresh_pipeline(), "fp32", size=128, steps=2)
    assert all(same[name]["relative_l2"] == 0 for name in [*CALLS, "whole_image"])
    assert same["whole_image"]["psnr_db"] == float("inf")
    low = precision_errors(fresh_pipeline(), "bf16", size=128, steps=2)
    for name in CALLS:  # cast (not 0) and on the same inputs (not ~1)
        assert 1e-4 < low[name]["relative_l2"] < 0.05, name
    assert 20 < low["whole_image"]["psnr_db"] < 80


def test_a_pipeline_not_in_fp32_is_refused() -> None:
    pipe = fresh_pipeline().to(dtype="bf16")
    with pytest.raises(ValueError, match="must be built in fp32"):
        precision_errors(pipe, "bf16", size=128)


def test_benchmark_flag_builds_in_fp32_and_writes_the_errors(tmp_path: Path, capsys) -> None:
    out = tmp_path / "errors.json"
    flags = ["--tiny", "--device", "cpu", "--threads", "1", "--sizes", "128", "--steps", "2"]
    assert main([*flags, "--precision", "bf16", "--precision-error", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    errors = report["precision_error"]
    assert report["precision"] == "bf16" and errors["precision"] == "bf16"
    assert errors["size"] == 128 and set(CALLS) < set(errors)
    assert 0 < errors["network_t500"]["relative_l2"] < 0.05
    with pytest.raises(SystemExit) as refused:  # not a timing report: no table row
        main(["--table", str(out)])
    assert refused.value.code == 2
    assert "errors.json: not a timing report" in capsys.readouterr().err
