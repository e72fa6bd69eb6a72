"""Where training images come from: file lists, folders and CSV/TSV/parquet tables.

A file list has one image path per line; an optional caption may follow after a tab. Blank lines
and lines starting with `#` are ignored. Relative paths (in lists and tables) are resolved
against the folder of the list or table, so a data folder can be moved with its lists.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model.io.file_lists import list_image_files, read_file_list, resolve_path

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")


class PackedStrings:
    """An immutable list of strings stored in two numpy arrays.

    A Python list of millions of str objects is copied page by page into every DataLoader worker
    as reference counts change; two flat arrays are shared copy-on-write for free.
    """

    def __init__(self, strings: Sequence[str]) -> None:
        encoded = [s.encode("utf-8") for s in strings]
        self._data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._data[self._offsets[i] : self._offsets[i + 1]].tobytes().decode("utf-8")


class ImageList:
    """Image paths with zero or more caption columns.

    Args:
        paths: image file paths.
        captions: one sequence of strings per caption column, each as long as `paths`.
    """

    def __init__(self, paths: Sequence[str], captions: Sequence[Sequence[str]] = ()) -> None:
        for column in captions:
            if len(column) != len(paths):
                raise ValueError(f"{len(column)} captions for {len(paths)} images")
        self._paths = PackedStrings(paths)
        self._captions = [PackedStrings(c) for c in captions]

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def num_caption_columns(self) -> int:
        return len(self._captions)

    def path(self, i: int) -> str:
        return self._paths[i]

    def captions(self, i: int) -> tuple[str, ...]:
        return tuple(column[i] for column in self._captions)


def read_table(
    path: str | os.PathLike,
    path_column: str = "image_path",
    caption_columns: Sequence[str] = (),
) -> tuple[list[str], list[list[str]]]:
    """Read image paths and caption columns from a CSV, TSV or parquet table."""
    import pandas as pd

    path = Path(path)
    columns = [path_column, *caption_columns]
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(
            path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False
        )
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; the table has {list(df.columns)}")
    paths = [resolve_path(str(p), path.parent) for p in df[path_column]]
    captions = [[str(v) for v in df[c].fillna("")] for c in caption_columns]
    return paths, captions


def _load_one(
    src: Path, path_column: str, caption_columns: Sequence[str]
) -> tuple[list[str], list[list[str]]]:
    if src.is_dir():
        return list_image_files(src), []
    if src.suffix.lower() in TABLE_SUFFIXES:
        return read_table(src, path_column, caption_columns)
    if src.is_file():
        paths, captions = read_file_list(src)
        return paths, [captions] if any(captions) else []
    raise FileNotFoundError(f"{src}: no such file list, table or folder")


def load_image_list(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    path_column: str = "image_path",
    caption_columns: Sequence[str] = (),
) -> ImageList:
    """Collect images from one or more sources: folders, tables (by suffix) or file lists.

    Args:
        source: a folder (searched recursively), a `.csv`/`.tsv`/`.parquet` table, a file list,
            or a list of these. Sources with fewer caption columns get empty captions.
        path_column: table column with the image paths.
        caption_columns: table columns with captions (a file list has at most one caption
            column, from its optional tab-separated field).
    """
    sources = [source] if isinstance(source, str | os.PathLike) else list(source)
    parts = [_load_one(Path(src), path_column, caption_columns) for src in sources]
    paths = [p for found, _ in parts for p in found]
    if not paths:
        raise ValueError(f"{source}: no images found")
    num_columns = max(len(cols) for _, cols in parts)
    captions = [
        [c for found, cols in parts for c in (cols[k] if k < len(cols) else [""] * len(found))]
        for k in range(num_columns)
    ]
    return ImageList(paths, captions)
