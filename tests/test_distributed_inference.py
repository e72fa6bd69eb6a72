"""inference.py as several processes (torchrun's environment, gloo on CPU): claims share the
jobs, the outputs equal one process's, rank 0 prints the merged summary, kills lose nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import inference
from model.io.claims import Claim, Claims
from scripts import evaluate, reproduce
from tests.folder_runs import (
    assert_complete,
    dead_pid,
    finished,
    kill_when,
    reference_run,
    stage1_argv,
    start_ranks,
)


@pytest.fixture(scope="module")
def reference(tiny_weights: Path, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(inputs, one process's outputs, output names) of 20 images."""
    return reference_run(tiny_weights, tmp_path_factory.mktemp("reference"), 20)


def test_claims_of_ranks_runs_and_dead_processes(tmp_path: Path) -> None:
    job = tmp_path / "sub" / "a.png.claim"
    rank0, rank1, other = Claims("run", 0, 2), Claims("run", 1, 2), Claims("other")
    assert rank0.claim(job, input="a.jpg") is Claim.TAKEN
    assert json.loads(job.read_text())["input"] == "a.jpg"
    assert rank1.claim(job) is Claim.OURS  # a rank of the same run has it
    assert other.claim(job) is Claim.BUSY  # a live process of another run has it
    rank0.close()
    assert not job.exists() and other.claim(job) is Claim.TAKEN
    other.close()
    # left by a process that died on this machine: taken over at once
    dead = {**rank1.holder, "run": "killed", "pid": dead_pid(), "token": "x"}
    job.write_text(json.dumps(dead))
    assert rank1.claim(job) is Claim.TAKEN_OVER and json.loads(job.read_text())["rank"] == 1
    # from another machine: respected while refreshed, taken over when stale
    job.write_text(json.dumps({**dead, "host": "elsewhere"}))
    assert other.claim(job) is Claim.BUSY
    os.utime(job, (time.time() - 301, time.time() - 301))
    assert Claims("third").claim(job) is Claim.TAKEN_OVER


def test_two_ranks_write_what_one_process_writes(reference, tiny_weights, tmp_path) -> None:
    src, ref, names = reference
    shutil.copytree(src, tmp_path / "in")
    (tmp_path / "in" / "bad.png").write_bytes(b"not a png")
    out, logs = tmp_path / "out", tmp_path / "logs"
    ranks = start_ranks(stage1_argv(tiny_weights, tmp_path / "in", out), logs, 2)
    for rank in ranks:
        rank.join()
    assert [rank.exitcode for rank in ranks] == [1, 1]  # each exit code says one image failed
    assert_complete(out, ref, names)
    records = [json.loads(s.read_text()) for s in out.rglob("*.json")]
    assert {r["world_size"] for r in records} == {2} and {r["rank"] for r in records} <= {0, 1}
    summary = (logs / "rank0.log").read_text()
    assert "done: 20 restored, 0 skipped (already done), 1 failed" in summary
    assert len(re.findall(r"failed: \S*bad\.png", summary)) == 1
    assert "done:" not in (logs / "rank1.log").read_text()


@pytest.mark.slow
def test_a_killed_rank_then_three_ranks_finish(reference, tiny_weights, tmp_path) -> None:
    src, ref, names = reference
    out, argv = tmp_path / "out", stage1_argv(tiny_weights, src, tmp_path / "out")
    ranks = start_ranks(argv, tmp_path / "killed", 2)
    kill_when(ranks[1:], out, 5)  # rank 1 killed; torchrun then stops the others
    kill_when(ranks[:1], out, 0)
    before = finished(out)
    assert 0 < len(before) < len(names)
    resumed = start_ranks(argv, tmp_path / "resumed", 3)
    for rank in resumed:
        rank.join()
    assert [rank.exitcode for rank in resumed] == [0, 0, 0]
    restored, skipped = len(names) - len(before), len(before)
    summary = (tmp_path / "resumed" / "rank0.log").read_text()
    assert f"done: {restored} restored, {skipped} skipped" in summary  # none twice, none redone
    assert_complete(out, ref, names)
    assert all(finished(out)[name] == mtime for name, mtime in before.items())


def test_a_setup_error_is_printed_once_and_ends_every_rank(reference, tmp_path) -> None:
    argv = stage1_argv(tmp_path / "no_weights", reference[0], tmp_path / "out")
    ranks = start_ranks(argv, tmp_path / "logs", 2)
    for rank in ranks:
        rank.join()
    assert [rank.exitcode for rank in ranks] == [2, 2]
    assert (tmp_path / "logs" / "rank0.log").read_text().count("error:") == 1
    assert "error:" not in (tmp_path / "logs" / "rank1.log").read_text()


def test_two_ranks_score_what_one_process_scores(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(24, 24)] * 3 + [(24, 32)] * 4):
        gt = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        noisy = np.clip(gt + rng.normal(0, 3 + i, gt.shape), 0, 255).astype(np.uint8)
        (tmp_path / "gt").mkdir(exist_ok=True), (tmp_path / "res").mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / "res" / f"{i}.png"), noisy)
        cv2.imwrite(str(tmp_path / "gt" / f"{i}.png"), gt if i != 5 else gt[:8])
    (tmp_path / "res" / "7.png").write_bytes(b"unreadable")
    argv = ["--results", str(tmp_path / "res"), "--gt", str(tmp_path / "gt"), "--metrics",
            "psnr,ssim", "--batch-size", "2", "--device", "cpu"]  # fmt: skip
    assert evaluate.main([*argv, "--out", str(tmp_path / "one")]) == 0
    ranks = start_ranks([*argv, "--out", str(tmp_path / "two")], tmp_path / "logs", 2,
                        evaluate.main)  # fmt: skip
    for rank in ranks:
        rank.join()
    assert [rank.exitcode for rank in ranks] == [0, 0]
    for name in ("metrics.csv", "summary.json", "summary.md"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["counts"] == {"psnr": 6, "ssim": 6} and summary["unreadable"] == ["7.png"]


@pytest.mark.slow
def test_reproduce_on_two_ranks_equals_one_process(tiny_weights: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for i in range(5):
        gt = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        for sub, img in (("gt", gt), ("lq", cv2.resize(gt, (16, 16)))):
            (tmp_path / "data" / sub).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(tmp_path / "data" / sub / f"{i}.png"), img)
    argv = [
        "--config", "configs/reproduce/bsr_real_realsr.yaml", "--data", str(tmp_path / "data"),
        "--weights-dir", str(tiny_weights), "--model-config", str(tiny_weights / "tiny_config.yaml"),
        "--device", "cpu", "--precision", "fp32", "--offline", "--metrics", "psnr,ssim",
        "--set", "version=v2.1", "--set", "inference.steps=1", "--set", "inference.min_short_side=32",
    ]  # fmt: skip
    assert reproduce.main([*argv, "--out", str(tmp_path / "one")]) == 0
    ranks = start_ranks([*argv, "--out", str(tmp_path / "two")], tmp_path / "logs", 2,
                        reproduce.main)  # fmt: skip
    for rank in ranks:
        rank.join()
    assert [rank.exitcode for rank in ranks] == [0, 0]
    one, two = tmp_path / "one", tmp_path / "two"
    table = (one / "table.md").read_text().replace(str(one), str(two))
    assert (two / "table.md").read_text() == table
    assert (two / "eval" / "metrics.csv").read_text() == (one / "eval" / "metrics.csv").read_text()
    ranks_used = {json.loads(p.read_text())["rank"] for p in (two / "restored").glob("*.json")}
    assert ranks_used <= {0, 1}


def _torchrun(nproc: int, argv: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "inference.py", *argv]  # fmt: skip
    root = Path(inference.__file__).parent
    return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_torchrun_two_processes(reference, tiny_weights, tmp_path) -> None:
    src, ref, names = reference
    run = _torchrun(2, stage1_argv(tiny_weights, src, tmp_path / "out"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr.count("done: 20 restored, 0 skipped") == 1
    assert_complete(tmp_path / "out", ref, names)
