"""Shared test helpers: fixture loading, deterministic seeding and the shared tiny models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"

# One intra-op thread: the tiny networks are dominated by per-op overhead, and on shared CPUs
# several threads per process spin-wait on each other (a tiny UNet call measured 0.05 s with one
# thread, 0.6-8 s with two under load). DIFFBIR_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("DIFFBIR_TEST_THREADS", "1")))


def load_fixture(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Return (tensors, json metadata) of a reference fixture under tests/fixtures/."""
    tensors = load_file(str(FIXTURES / f"{name}.safetensors"))
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    return tensors, meta


def load_manifest(name: str) -> dict[str, list[int]]:
    """Return a key → shape manifest of an official checkpoint layout."""
    return json.loads((FIXTURES / f"{name}.json").read_text())


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Select the weights stored under `prefix` in a fixture and drop the prefix."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def assert_close_schedule(actual, expected: torch.Tensor) -> None:
    """diffusion_schedules tolerances (float64 1e-12/1e-10, float32 1e-5); non-finite exactly."""
    actual = torch.as_tensor(actual)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite)
    assert torch.equal(actual[~finite], expected[~finite])
    f64 = expected.dtype == torch.float64
    tol = {"atol": 1e-12, "rtol": 1e-10} if f64 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(actual[finite], expected[finite], **tol)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A folder of tiny random weights under the released file names (make_tiny_weights)."""
    from scripts.make_tiny_weights import write_tiny_weights

    out = tmp_path_factory.mktemp("tiny_weights")
    write_tiny_weights(out, seed=0)
    return out


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory) -> Path:
    """train/ and val/ folders of small photo crops (make_demo_images)."""
    from scripts.make_demo_images import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["--out", str(out), "--count", "24", "--val-count", "4", "--size", "96"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_pipe(tiny_weights: Path):
    """The v2.1 "sr" DiffBIRPipeline on the tiny weights, CPU, fp32, shared by every test.

    Tests that change its state (options, precision, offload) wrap its modules in a new
    pipeline: `DiffBIRPipeline(tiny_pipe.stage1, tiny_pipe.cldm, tiny_pipe.diffusion, "cpu")`.
    """
    from model.io.weights import REGISTRY
    from model.pipelines.loading import load_pipeline
    from model.pipelines.presets import model_spec, read_model_config

    spec = model_spec("v2.1", "sr", read_model_config(tiny_weights / "tiny_config.yaml"))
    paths = {role: tiny_weights / REGISTRY[name].filename for role, name in spec.weights.items()}
    return load_pipeline(spec, paths, device="cpu", precision="fp32")
