"""Folder runs that meet other processes, kills, full disks and awkward folders: nothing lost,
nothing redone, nothing written twice or outside --output (tiny stage 1, CPU, forked runs)."""

from __future__ import annotations

import errno
import json
import random
from pathlib import Path

import numpy as np
import pytest

import inference
from model.io import folder_jobs
from model.io.folder_jobs import InputError, OutputSettings, collect_inputs, make_jobs
from tests.folder_runs import (
    FORK,
    assert_complete,
    finished,
    kill_when,
    plant_leftovers,
    reference_run,
    restored_count,
    stage1_argv,
    start,
    write_inputs,
)


@pytest.fixture(scope="module")
def reference(tiny_weights: Path, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(inputs, an uninterrupted run's outputs, output names) of 12 images."""
    return reference_run(tiny_weights, tmp_path_factory.mktemp("reference"), 12)


def _write_many(path: Path, count: int) -> None:
    rgb = np.random.default_rng(0).random((8, 8, 3), dtype=np.float32)
    for _ in range(count):
        folder_jobs.write_output(path, rgb, None, OutputSettings(path.parent))


def test_two_processes_writing_one_output_never_collide(tmp_path: Path) -> None:
    # one fixed temporary name failed 875 of 3000 such writes (FileNotFoundError)
    target = tmp_path / "x.png"
    writers = [FORK.Process(target=_write_many, args=(target, 150)) for _ in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert [w.exitcode for w in writers] == [0, 0]
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_two_runs_over_one_folder_share_the_work(reference, tiny_weights, tmp_path) -> None:
    src, ref, names = reference
    argv = stage1_argv(tiny_weights, src, tmp_path / "out")
    runs = [start(argv, tmp_path / f"run{i}.log") for i in range(2)]
    for run in runs:
        run.join()
    assert [run.exitcode for run in runs] == [0, 0]
    # each image restored by one of them: none twice
    assert sum(restored_count(tmp_path / f"run{i}.log") for i in range(2)) == len(names)
    assert_complete(tmp_path / "out", ref, names)


def _kill_and_finish(reference, weights: Path, out: Path, kills: int, seed: int) -> None:
    src, ref, names = reference
    argv = stage1_argv(weights, src, out)
    rng = random.Random(seed)
    for k in range(kills):
        kill_when([start(argv, out.parent / f"killed{k}.log")], out, rng.randint(k + 1, 8))
    before = finished(out)
    assert 0 < len(before) < len(names)
    # killed after a sidecar, before the release; and while writing an unfinished output
    plant_leftovers(out, next(iter(before)))
    plant_leftovers(out, next(name for name in names if name not in before))
    resumed = start(argv, out.parent / "resumed.log")
    resumed.join()
    assert resumed.exitcode == 0
    assert restored_count(out.parent / "resumed.log") == len(names) - len(before)
    assert_complete(out, ref, names)
    assert all(finished(out)[name] == mtime for name, mtime in before.items())  # not redone


def test_sigkill_then_resume_loses_and_redoes_nothing(reference, tiny_weights, tmp_path) -> None:
    _kill_and_finish(reference, tiny_weights, tmp_path / "out", kills=1, seed=0)


@pytest.mark.slow
def test_two_sigkills_at_random_moments_then_resume(reference, tiny_weights, tmp_path) -> None:
    for seed in range(3):
        _kill_and_finish(reference, tiny_weights, tmp_path / f"out{seed}", kills=2, seed=seed)


def test_side_outputs_are_out_of_reach_of_inputs(tmp_path: Path) -> None:
    src = tmp_path / "in"
    for name in ("a.png", "stage1/a.png", "stage1_/a.png", "faces/b.png", "stage1.png"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).touch()
    files, root, _ = collect_inputs(str(src), tmp_path / "out")
    jobs = make_jobs(files, root, OutputSettings(tmp_path / "out", save_stage1=True))
    paths = [j.dst for j in jobs] + [j.stage1_dst for j in jobs]
    assert len(set(paths)) == len(paths)
    rel = sorted(str(j.dst.relative_to(tmp_path / "out")) for j in jobs)
    assert rel == ["a.png", "faces_/b.png", "stage1.png", "stage1_/a.png", "stage1__/a.png"]


def test_two_inputs_with_one_output_are_refused(tmp_path: Path) -> None:
    names = ("a.jpg", "a.png", "a_png.png")  # a.jpg -> a.png, so a.png -> a_png.png
    with pytest.raises(InputError, match=r"a\.png and \S*a_png\.png map to one output"):
        make_jobs([tmp_path / n for n in names], tmp_path, OutputSettings(tmp_path / "out"))
    jobs = make_jobs([tmp_path / n for n in names[:2]], tmp_path, OutputSettings(tmp_path / "o"))
    assert sorted(j.dst.name for j in jobs) == ["a.png", "a_png.png"]
    with pytest.raises(InputError, match=r"a\.jpg: its output would overwrite the input \S*a\.png"):
        make_jobs([tmp_path / n for n in names[:2]], tmp_path, OutputSettings(tmp_path))


def test_file_list_entries_outside_its_folder_stay_inside_output(tmp_path: Path) -> None:
    (tmp_path / "x.png").touch()
    (tmp_path / "lists" / "deep").mkdir(parents=True)
    (tmp_path / "lists" / "deep" / "y.png").touch()
    listing = tmp_path / "lists" / "deep" / "files.txt"
    listing.write_text(f"../../x.png\n{tmp_path / 'lists' / 'deep' / 'y.png'}\ny.png\n")
    files, root, _ = collect_inputs(str(listing), tmp_path / "out")
    with pytest.raises(InputError, match="map to one output"):  # y.png listed twice
        make_jobs(files, root, OutputSettings(tmp_path / "out"))
    jobs = make_jobs(files[:2], root, OutputSettings(tmp_path / "out"))
    out = (tmp_path / "out").resolve()
    assert all(j.dst.resolve().is_relative_to(out) for j in jobs)
    assert sorted(str(j.dst.relative_to(tmp_path / "out")) for j in jobs) == [
        "lists/deep/y.png",
        "x.png",
    ]


def test_output_in_the_input_folder_takes_no_outputs_as_inputs(
    tiny_weights, tmp_path, capsys
) -> None:
    src = tmp_path / "photos"
    write_inputs(src, 3)
    for path in src.rglob("*.png"):  # jpg inputs, png outputs beside them
        path.rename(path.with_suffix(".jpg"))
    argv = stage1_argv(tiny_weights, src, src, "--save-stage1")
    assert inference.main(argv) == 0
    capsys.readouterr()
    assert inference.main(argv) == 0  # the outputs and stage-1 images are not inputs
    assert "0 restored, 3 skipped" in capsys.readouterr().err
    assert len(list(src.rglob("*.png.json"))) == 3 and not list(src.glob("stage1/stage1"))


def test_unwritable_output_fails_before_models_load(
    tiny_weights, tmp_path, capsys, monkeypatch
) -> None:
    write_inputs(tmp_path / "in", 1)
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(inference, "build", lambda args: pytest.fail("models loaded"))
    for out, reason in ((tmp_path / "file", "not a folder"), (tmp_path / "file" / "o", "writable")):
        assert inference.main(stage1_argv(tiny_weights, tmp_path / "in", out)) == 2
        err = capsys.readouterr().err
        assert f"error: --output {out}:" in err and reason in err and len(err.splitlines()) == 1


def test_full_disk_stops_the_run_and_leaves_no_partial_file(
    tiny_weights, tmp_path, capsys, monkeypatch
) -> None:
    names = write_inputs(tmp_path / "in", 4)
    write = folder_jobs.write_image
    calls = []

    def fill_up(path, *args) -> None:
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, *args)

    monkeypatch.setattr(folder_jobs, "write_image", fill_up)
    out = tmp_path / "out"
    assert inference.main(stage1_argv(tiny_weights, tmp_path / "in", out)) == 1
    err = capsys.readouterr().err
    assert f"no space left on {out}" in err and "stopped" in err and "3 not done" in err
    assert len(calls) == 2  # nothing computed after the disk was full
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        names[0],
        f"{names[0]}.json",
    ]


def test_a_rerun_with_other_options_says_so(tiny_weights, tmp_path, capsys) -> None:
    write_inputs(tmp_path / "in", 2)
    argv = stage1_argv(tiny_weights, tmp_path / "in", tmp_path / "out")
    assert inference.main(argv) == 0
    first = json.loads((tmp_path / "out" / "00.png.json").read_text())
    assert first["parameters"]["arguments"]["quantize"] == "truncate"
    capsys.readouterr()
    assert inference.main(argv + ["--quantize", "round"]) == 0
    err = capsys.readouterr().err
    assert "0 restored, 0 skipped" in err
    assert "skipped 2 done with other options; use --overwrite" in err
    assert inference.main(argv + ["--device", "cpu", "--batch-size", "2"]) == 0
    assert "0 restored, 2 skipped" in capsys.readouterr().err  # how a run executes: the same
