"""Writing files that other processes may read or write at the same time.

Every file is written under a temporary name no other process uses
(`.<name>.<pid>.<random>.partial<suffix>` in the same folder: the suffix keeps the format), then
renamed over the final name, so a reader sees the old file or the new
one and never a mix; a writer killed midway leaves only its own temporary file, which
`remove_partials` deletes on the next attempt. A full disk (ENOSPC, EDQUOT) becomes a
`DiskFullError` after the temporary file is removed.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class DiskFullError(OSError):
    """No space left where an output was written; the message names the folder."""


def partial_name(path: Path) -> Path:
    """A temporary name next to `path` that no other process or attempt uses."""
    name = f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial{path.suffix}"
    return path.with_name(name)


def _partial_pattern(name_pattern: str) -> re.Pattern[str]:
    return re.compile(rf"\.{name_pattern}\.\d+\.[0-9a-f]{{8}}\.partial(\.[^.]*)?")


def is_partial(name: str) -> bool:
    """Whether a file name is a temporary name of `partial_name`."""
    return _partial_pattern(".+").fullmatch(name) is not None


def remove_partials(path: Path, name_pattern: str | None = None) -> int:
    """Delete the temporary files of earlier, interrupted writes of `path` (or of every name in
    its folder matching the regex `name_pattern`); returns how many were deleted."""
    pattern = _partial_pattern(name_pattern or re.escape(path.name))
    if not path.parent.is_dir():
        return 0
    removed = 0
    for entry in os.scandir(path.parent):
        if pattern.fullmatch(entry.name):
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary)`, then rename it to `path`; on any failure the temporary file is removed
    (a full disk raises `DiskFullError`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_name(path)
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise_if_full(exc, path.parent)
        raise


def raise_if_full(exc: OSError, folder: Path) -> None:
    """`DiskFullError` naming `folder` when `exc` says the disk or quota is full."""
    if exc.errno in _FULL:
        raise DiskFullError(f"no space left on {folder}") from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write(path, lambda partial: partial.write_text(text, encoding="utf-8"))
