"""Helpers of the folder-run tests: inputs, tiny stage-1-only runs in forked processes (fast:
nothing is imported again), killing them, and reading what they left."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

import inference
from model.io.claims import Claims

FORK = multiprocessing.get_context("fork")
Main = Callable[[list[str]], int]


def write_inputs(folder: Path, count: int, size: tuple[int, int] = (16, 24)) -> list[str]:
    """`count` random PNGs (half of them in sub/); their relative output names."""
    rng = np.random.default_rng(count)
    names = [f"{'sub/' if i % 2 else ''}{i:02d}.png" for i in range(count)]
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / name), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return names


def stage1_argv(weights: Path, src: Path, out: Path, *extra: str) -> list[str]:
    """A fast inference.py run: tiny stage 1 only, CPU, at the input size."""
    return [
        "--input", str(src), "--output", str(out), "--weights-dir", str(weights),
        "--model-config", str(weights / "tiny_config.yaml"), "--stage1-only", "--task",
        "denoise", "--device", "cpu", "--precision", "fp32", "--min-short-side", "16",
        "--offline", "--no-progress", *extra,
    ]  # fmt: skip


def reference_run(weights: Path, root: Path, count: int) -> tuple[Path, Path, list[str]]:
    """(inputs, one uninterrupted process's outputs, output names) of `count` images."""
    names = write_inputs(root / "in", count)
    assert inference.main(stage1_argv(weights, root / "in", root / "out")) == 0
    return root / "in", root / "out", names


def _main(main: Main, argv: list[str], log: Path, env: dict[str, str]) -> None:
    os.environ.update(env)
    with open(log, "w", encoding="utf-8") as f:
        sys.stdout = sys.stderr = f
        code = main(argv)
        f.flush()
    os._exit(code)  # no pytest teardown in the child


def start(
    argv: list[str], log: Path, main: Main = inference.main, **env: str
) -> multiprocessing.Process:
    """main(argv) in a forked process (its stdout and stderr to `log`, `env` set first)."""
    process = FORK.Process(target=_main, args=(main, argv, log, env))
    process.start()
    return process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(
    argv: list[str], logs: Path, world_size: int, main: Main = inference.main
) -> list[multiprocessing.Process]:
    """`world_size` forked processes with torchrun's environment (gloo on this machine)."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world_size)}  # fmt: skip
    return [
        start(argv, logs / f"rank{r}.log", main, RANK=str(r), LOCAL_RANK=str(r), **env)
        for r in range(world_size)
    ]


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    process = FORK.Process(target=int)
    process.start()
    process.join()
    return process.pid


def plant_leftovers(out: Path, name: str) -> None:
    """What a process killed while working on output `name` leaves: its claim, and partial
    files of the output and of the claim."""
    pid = dead_pid()
    claim = out / f"{name}.claim"
    killed = Claims("killed")  # its machine fields, with the dead process's pid
    killed.close()
    claim.parent.mkdir(parents=True, exist_ok=True)
    claim.write_text(json.dumps({**killed.holder, "pid": pid, "token": "dead"}))
    for path in (out / name, claim):
        path.with_name(f".{path.name}.{pid}.0123abcd.partial{path.suffix}").write_text("half")


def sidecars(out: Path) -> list[Path]:
    return sorted(out.rglob("*.png.json"))


def kill_when(processes: list[multiprocessing.Process], out: Path, done: int) -> None:
    """SIGKILL `processes` once `done` outputs are finished (or they have all ended)."""
    while len(sidecars(out)) < done and any(p.is_alive() for p in processes):
        time.sleep(0.002)
    for p in processes:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
    for p in processes:
        p.join()  # reaped: a claim of a zombie would still look alive


def finished(out: Path) -> dict[str, int]:
    """Finished outputs (relative name -> mtime in ns)."""
    return {
        str(s.relative_to(out))[: -len(".json")]: (s.with_suffix("")).stat().st_mtime_ns
        for s in sidecars(out)
    }


def restored_count(log: Path) -> int:
    """The "N restored" of a run's summary."""
    return int(re.search(r"done: (\d+) restored", log.read_text()).group(1))


def assert_complete(out: Path, reference: Path, names: list[str]) -> None:
    """Every output once, identical to the reference run's, and nothing else left behind."""
    expected = set(names) | {f"{name}.json" for name in names}
    present = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert present == expected, sorted(present ^ expected)
    for name in names:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
