"""Finding image files: folders (by extension) and file lists (path, optional tab + caption)."""

from __future__ import annotations

import os
from pathlib import Path

from model.io.atomic import is_partial
from model.io.images import IMAGE_EXTENSIONS


def resolve_path(path: str, root: Path) -> str:
    """`path` (with ~ expanded) relative to `root` unless absolute."""
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else root / p)


def list_image_files(folder: str | os.PathLike, recursive: bool = True) -> list[str]:
    """Image files (by extension, case-insensitive) under `folder`, sorted; the temporary files
    of unfinished writes (`model.io.atomic`) are left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    pattern = "**/*" if recursive else "*"
    files = (p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(str(p) for p in files if p.is_file() and not is_partial(p.name))


def read_file_list(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Parse a file list; returns (paths, captions), captions "" where a line has none."""
    path = Path(path)
    paths, captions = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            file, _, caption = line.partition("\t")
            paths.append(resolve_path(file.strip(), path.parent))
            captions.append(caption.strip())
    return paths, captions
