"""Hand the pages of memory-mapped weights back to the OS once their values were copied.

`torch.load(..., mmap=True)` maps a whole checkpoint; every tensor read through that mapping
stays resident in the process (and counts in its RSS) while any tensor of the file lives. A
module that copies its weights out of the file (its own buffers, a cast) leaves the source pages
resident for nothing: `release_file_pages` drops them with `madvise(MADV_DONTNEED)`. Only whole
pages inside private file mappings are dropped, so the tensors stay valid: reading them again
faults the pages back in from the file. Linux only; elsewhere (and for anonymous memory) it is a
no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

MADV_DONTNEED = 4
_MAPS = Path("/proc/self/maps")


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of the process's private file-backed mappings."""
    spans = []
    for line in _MAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1].endswith("p") and fields[4] != "0":
            start, end = (int(v, 16) for v in fields[0].split("-"))
            spans.append((start, end))
    return spans


def release_file_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Drop the resident pages of the file-mapped `tensors`; returns the bytes released.

    Call it only for tensors that were read, never written: a private mapping's written pages
    would be lost (they read back as the file's bytes).
    """
    if not sys.platform.startswith("linux") or not _MAPS.exists():
        return 0
    spans = _file_mappings()
    page = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    released = 0
    seen: set[int] = set()
    for tensor in tensors:
        storage = tensor.untyped_storage()
        start = storage.data_ptr()
        if tensor.device.type != "cpu" or start in seen:
            continue
        seen.add(start)
        end = start + storage.nbytes()
        if not any(lo <= start and end <= hi for lo, hi in spans):
            continue
        first, last = -(-start // page) * page, end // page * page  # whole pages inside
        size = last - first
        if (
            size > 0
            and libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(size), MADV_DONTNEED) == 0
        ):
            released += size
    return released


@contextlib.contextmanager
def releasing_replaced(module: nn.Module) -> Iterator[None]:
    """Release the file pages of the weights of `module` that the block replaces by copies
    (a cast, a memory-format change); weights the block keeps stay resident."""
    before = list(module.state_dict().values())
    yield
    kept = {t.untyped_storage().data_ptr() for t in module.state_dict().values()}
    release_file_pages(t for t in before if t.untyped_storage().data_ptr() not in kept)
