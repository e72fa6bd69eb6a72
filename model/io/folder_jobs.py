"""Folders of images in, restored images out: what a batch restoration run reads and writes.

Inputs are a file, a folder (recursive), a glob or a file list (an optional caption after a tab
on each line). Outputs mirror the inputs' relative paths; the top-level folders `stage1/` and
`faces/` of the output folder hold the side outputs (--save-stage1, --save-faces), so an input
folder of that name (or of that name followed by underscores) gets one more "_". Two inputs
that would map to one output are refused. Every file is written atomically
(`model.io.atomic`) and the JSON sidecar (`<output>.json`, with the run's `parameters`) comes
last, so a rerun skips finished outputs, and says so when they were made with other parameters.
Pure I/O: decoding, naming and encoding; the restoration itself is elsewhere.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.io.atomic import (
    atomic_write,
    atomic_write_text,
    is_partial,
    partial_name,
    remove_partials,
)
from model.io.file_lists import list_image_files, read_file_list
from model.io.images import IMAGE_EXTENSIONS, DecodedImage, decode_image, write_image

LIST_SUFFIXES = (".txt", ".list")
SIDE_FOLDERS = ("stage1", "faces")
_ESCAPED = re.compile(r"(stage1|faces)_*")


class InputError(ValueError):
    """Inputs that cannot be turned into jobs (none found, an output over an input, two inputs
    with one output, an unwritable output folder)."""


@dataclasses.dataclass(frozen=True)
class OutputSettings:
    """Where and how outputs are written.

    Args:
        output: output folder; outputs keep the inputs' relative paths under it.
        output_format: "png", "jpg" or "webp".
        quality: JPEG/WebP quality (1-100).
        bit_depth: 8, or 16 (png only).
        quantize: "truncate" (the original's 8-bit conversion) or "round".
        save_stage1: also write the stage-1 image under `output/stage1/`.
        save_faces: also write each restored face under `output/faces/`.
    """

    output: Path
    output_format: str = "png"
    quality: int = 95
    bit_depth: int = 8
    quantize: str = "truncate"
    save_stage1: bool = False
    save_faces: bool = False


def read_record(path: Path) -> dict[str, Any] | None:
    """A JSON sidecar or claim as a dict; None when missing or unreadable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


@dataclasses.dataclass
class Job:
    """One input file, its caption and where its results go."""

    src: Path
    dst: Path
    stage1_dst: Path | None
    caption: str = ""
    faces_dst: Path | None = None

    @property
    def sidecar(self) -> Path:
        return self.dst.with_name(self.dst.name + ".json")

    @property
    def claim(self) -> Path:
        """The claim file of the process working on this job (`model.io.claims`)."""
        return self.dst.with_name(self.dst.name + ".claim")

    def face_path(self, index: int) -> Path:
        """Where the restored face `index` goes (with `save_faces`)."""
        name = f"{self.faces_dst.stem}_face{index}{self.faces_dst.suffix}"
        return self.faces_dst.with_name(name)

    def done(self) -> bool:
        return self.dst.is_file() and self.sidecar.is_file()

    def finished_record(self) -> dict[str, Any] | None:
        """The sidecar of a finished output, or None when the job is not finished."""
        return read_record(self.sidecar) if self.dst.is_file() else None

    def remove_partials(self) -> None:
        """Delete what an interrupted earlier attempt at this job left behind."""
        for path in (self.dst, self.sidecar, self.stage1_dst, self.claim):
            if path is not None:
                remove_partials(path)
        if self.faces_dst is not None:
            face = rf"{re.escape(self.faces_dst.stem)}_face\d+{re.escape(self.faces_dst.suffix)}"
            remove_partials(self.faces_dst, face)


def plain(value: Any) -> Any:
    """`value` as JSON reads it back (tuples as lists, paths as strings): how sidecars hold it."""
    return json.loads(json.dumps(value, default=str))


def triage(
    jobs: list[Job], parameters: dict[str, Any], overwrite: bool = False
) -> tuple[list[Job], int, int]:
    """(jobs to run, finished with these `parameters`, finished with others); finished jobs
    are run again only with `overwrite`."""
    if overwrite:
        return list(jobs), 0, 0
    parameters = plain(parameters)
    todo, same, other = [], 0, 0
    for job in jobs:
        record = job.finished_record()
        if record is None:
            todo.append(job)
        elif record.get("parameters") == parameters:
            same += 1
        else:
            other += 1
    return todo, same, other


def _earlier_output(file: Path) -> bool:
    """Whether `file` was written by a run into its own folder: its sidecar or claim names
    another input with `file` as the output."""
    for marker in (file.with_name(file.name + ".json"), file.with_name(file.name + ".claim")):
        record = read_record(marker) or {}
        output, source = record.get("output"), record.get("input")
        ours = isinstance(output, str) and isinstance(source, str)
        if ours and Path(output).name == file.name and Path(source).name != file.name:
            return True
    return False


def _own_outputs(files: list[Path], root: Path, output: Path) -> list[Path]:
    """`files` without what runs into `output` wrote: everything under it when it lies inside
    the input folder; earlier outputs and the side-output folders when it is the input folder."""
    out, top = output.resolve(), root.resolve()
    if out == top:
        side = [out / name for name in SIDE_FOLDERS]
        return [
            f
            for f in files
            if not any(f.resolve().is_relative_to(s) for s in side) and not _earlier_output(f)
        ]
    if out.is_relative_to(top):
        return [f for f in files if not f.resolve().is_relative_to(out)]
    return files


def collect_inputs(spec: str, exclude: Path) -> tuple[list[Path], Path, dict[Path, str]]:
    """(image files, the folder their relative paths are taken from, captions by file) for an
    input spec; only file lists have captions (after a tab), the other files get none. Outputs
    of runs into `exclude` (the output folder) are left out (`_own_outputs`)."""
    path = Path(spec)
    captions: dict[Path, str] = {}
    if path.is_dir():
        files, root = [Path(f) for f in list_image_files(path)], path
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        listed, texts = read_file_list(path)
        files, root = [Path(f) for f in listed], None
        captions = {f.resolve(): text for f, text in zip(files, texts, strict=True) if text}
    elif path.is_file():
        files, root = [path], path.parent
    elif glob.has_magic(spec):
        found = sorted(glob.glob(spec, recursive=True))
        files = [Path(f) for f in found if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        files = [f for f in files if not is_partial(f.name)]
        root = None
    else:
        raise InputError(f"{spec}: no such file, folder or file list")
    if not files:
        raise InputError(f"{spec}: no images found")
    if root is None:
        # file lists and globs: entries anywhere (../../x, /abs/y) keep their paths below the
        # deepest folder they share, so every output stays inside the output folder
        root = Path(os.path.commonpath([f.resolve().parent for f in files]))
        files = [f.resolve() for f in files]
    files = _own_outputs(files, root, exclude)
    if not files:
        raise InputError(f"{spec}: no images found besides the outputs in {exclude}")
    return files, root, captions


def _mirror(src: Path, root: Path) -> Path:
    """The output path of `src` relative to the output folder: its path below `root`, with a
    first folder that a side-output folder could be named escaped by one more "_"."""
    if not src.is_relative_to(root):
        raise InputError(f"{src}: outside the input folder {root}")
    first, *rest = src.relative_to(root).parts
    if rest and _ESCAPED.fullmatch(first):
        first += "_"
    return Path(first, *rest)


def make_jobs(
    files: list[Path],
    root: Path,
    settings: OutputSettings,
    captions: dict[Path, str] | None = None,
) -> list[Job]:
    """One job per file; outputs mirror the paths relative to `root` (`_mirror`); two files with
    one output, or an output over an input, are refused (InputError naming both)."""
    captions = captions or {}
    output, fmt = settings.output, settings.output_format
    jobs, sources, inputs = [], {}, {f.resolve() for f in files}
    for src in files:
        rel = _mirror(src, root)
        dst = output / rel.with_suffix(f".{fmt}")
        if dst in sources and sources[dst].suffix != src.suffix:  # a.png and a.jpg: keep both
            dst = dst.with_name(f"{rel.stem}_{src.suffix[1:]}.{fmt}")
        if dst in sources:
            raise InputError(f"{sources[dst]} and {src} map to one output {dst}; rename one")
        if dst.resolve() in inputs:
            raise InputError(
                f"{src}: its output would overwrite the input {dst}; choose another --output"
            )
        sources[dst] = src
        rel_dst = dst.relative_to(output)
        stage1_dst = output / "stage1" / rel_dst if settings.save_stage1 else None
        faces_dst = output / "faces" / rel_dst if settings.save_faces else None
        caption = captions.get(src.resolve(), "")
        jobs.append(Job(src, dst, stage1_dst, caption, faces_dst))
    return jobs


def check_writable(folder: Path, flag: str = "--output") -> None:
    """InputError (naming `flag`) unless `folder` is, or can be made, a writable folder."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{flag} {folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = partial_name(folder / "write-test")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"{flag} {folder}: not writable ({exc.strerror or exc})") from None


def load_image(job: Job) -> tuple[DecodedImage, torch.Tensor]:
    """The decoded file and its RGB as a (1, 3, H, W) float tensor."""
    image = decode_image(job.src)
    return image, torch.from_numpy(image.rgb).permute(2, 0, 1)[None]


def write_output(
    path: Path, rgb: np.ndarray, alpha: np.ndarray | None, settings: OutputSettings
) -> None:
    """Write atomically (`model.io.atomic.atomic_write`)."""
    if settings.output_format == "jpg":
        alpha = None
    args = (rgb, alpha, settings.bit_depth, settings.quality, settings.quantize)
    atomic_write(path, lambda partial: write_image(partial, *args))


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def save_job(
    job: Job,
    image: DecodedImage,
    out: torch.Tensor,
    stage1: torch.Tensor,
    alpha: np.ndarray | None,
    record: dict[str, Any],
    settings: OutputSettings,
    faces: torch.Tensor | None = None,
) -> None:
    """Write the optional faces and stage-1 image, the output (with `alpha`, the input's alpha
    at the output size) and, last, the sidecar (a rerun skips a job only when it exists)."""
    if job.faces_dst is not None and faces is not None:
        for i, face in enumerate(faces):
            write_output(job.face_path(i), _to_numpy(face), None, settings)
    write_output(job.dst, _to_numpy(out), alpha, settings)
    if job.stage1_dst is not None:
        write_output(job.stage1_dst, _to_numpy(stage1), alpha, settings)
    sidecar = {"input": str(job.src), "output": str(job.dst),
               "stage1_output": None if job.stage1_dst is None else str(job.stage1_dst),
               "input_size": list(image.rgb.shape[:2]), "output_size": list(out.shape[-2:]),
               "input_bit_depth": image.bit_depth, "alpha": image.alpha is not None,
               "caption": job.caption, **record}  # fmt: skip
    atomic_write_text(job.sidecar, json.dumps(sidecar, indent=2))
