"""Folders of images in, restored images out: what a batch restoration run reads and writes.

Inputs are a file, a folder (recursive), a glob or a file list (an optional caption after a tab
on each line). Outputs mirror the inputs' relative paths; each output is written atomically and
followed, last, by a JSON sidecar (`<output>.json`), so a rerun can skip finished outputs.
Pure I/O: decoding, naming and encoding; the restoration itself is elsewhere.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.io.file_lists import list_image_files, read_file_list
from model.io.images import IMAGE_EXTENSIONS, DecodedImage, decode_image, write_image

LIST_SUFFIXES = (".txt", ".list")


class InputError(ValueError):
    """Inputs that cannot be turned into jobs (none found, or an output would overwrite one)."""


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

    def face_path(self, index: int) -> Path:
        """Where the restored face `index` goes (with `save_faces`)."""
        name = f"{self.faces_dst.stem}_face{index}{self.faces_dst.suffix}"
        return self.faces_dst.with_name(name)

    def done(self) -> bool:
        return self.dst.is_file() and self.sidecar.is_file()


def collect_inputs(spec: str, exclude: Path) -> tuple[list[Path], Path, dict[Path, str]]:
    """(image files, the folder their relative paths are taken from, captions by file) for an
    input spec; only file lists have captions (after a tab), the other files get none. Files
    under `exclude` (the output folder) are left out when it lies inside the input folder."""
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
        root = None
    else:
        raise InputError(f"{spec}: no such file, folder or file list")
    if not files:
        raise InputError(f"{spec}: no images found")
    if root is None:
        root = Path(os.path.commonpath([f.resolve().parent for f in files]))
        files = [f.resolve() for f in files]
    out = exclude.resolve()
    if out != root.resolve() and out.is_relative_to(root.resolve()):
        # an output folder inside the input folder: never take earlier outputs as inputs
        files = [f for f in files if not f.resolve().is_relative_to(out)]
        if not files:
            raise InputError(f"{spec}: no images found outside the output folder")
    return files, root, captions


def make_jobs(
    files: list[Path],
    root: Path,
    settings: OutputSettings,
    captions: dict[Path, str] | None = None,
) -> list[Job]:
    """One job per file; outputs mirror the paths relative to `root`."""
    captions = captions or {}
    output, fmt = settings.output, settings.output_format
    jobs, taken = [], set()
    for src in files:
        rel = src.relative_to(root) if src.is_relative_to(root) else Path(src.name)
        dst = output / rel.with_suffix(f".{fmt}")
        if dst in taken:  # e.g. a.png and a.jpg: keep both
            dst = dst.with_name(f"{rel.stem}_{src.suffix[1:]}.{fmt}")
        if dst.resolve() == src.resolve():
            raise InputError(
                f"{src}: the output would overwrite the input; choose another --output"
            )
        taken.add(dst)
        rel_dst = dst.relative_to(output)
        stage1_dst = output / "stage1" / rel_dst if settings.save_stage1 else None
        faces_dst = output / "faces" / rel_dst if settings.save_faces else None
        caption = captions.get(src.resolve(), "")
        jobs.append(Job(src, dst, stage1_dst, caption, faces_dst))
    return jobs


def load_image(job: Job) -> tuple[DecodedImage, torch.Tensor]:
    """The decoded file and its RGB as a (1, 3, H, W) float tensor."""
    image = decode_image(job.src)
    return image, torch.from_numpy(image.rgb).permute(2, 0, 1)[None]


def write_output(
    path: Path, rgb: np.ndarray, alpha: np.ndarray | None, settings: OutputSettings
) -> None:
    """Write atomically (a temporary name, then a rename)."""
    if settings.output_format == "jpg":
        alpha = None
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    write_image(partial, rgb, alpha, settings.bit_depth, settings.quality, settings.quantize)
    os.replace(partial, path)


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
    partial = job.sidecar.with_name(f".{job.sidecar.name}.partial")
    partial.write_text(json.dumps(sidecar, indent=2))
    os.replace(partial, job.sidecar)
