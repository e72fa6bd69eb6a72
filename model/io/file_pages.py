"""Hand the pages of memory-mapped weights (and freed heap memory) back to the OS.

`torch.load(..., mmap=True)` maps a whole checkpoint; every tensor read through that mapping
stays resident in the process (and counts in its RSS) while any tensor of the file lives. A
module that copies its weights out of the file (its own buffers, a cast) leaves the source pages
resident for nothing: `release_file_pages` drops them with `madvise(MADV_DONTNEED)`. The
pipeline does the same for the weights a network keeps once it has run (`page_idle_weights`):
reading them again faults the pages back in from the file (from the page cache, about 0.1 s for
the 4.6 GiB of the UNet and LAControlNet).

Only pages that still hold the file's bytes are dropped: whole pages inside private file
mappings that `/proc/self/pagemap` shows as file pages (or not faulted in). A page written in
place (the private copy a write makes) stays, so no value is ever lost. Linux only; elsewhere
(and for anonymous memory) it is a no-op.

Freed tensors are not always handed back either: glibc serves allocations below its (growing)
mmap threshold from the heap and keeps them there when freed. `trim_heap` returns those pages
(`malloc_trim`), e.g. the 0.6 GiB of a freed bf16 text encoder.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

MADV_DONTNEED = 4
_MAPS = Path("/proc/self/maps")
_PAGEMAP = Path("/proc/self/pagemap")
_PRESENT, _SWAPPED, _FILE = (np.uint64(1 << bit) for bit in (63, 62, 61))


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of the process's private file-backed mappings."""
    spans = []
    for line in _MAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1].endswith("p") and fields[4] != "0":
            start, end = (int(v, 16) for v in fields[0].split("-"))
            spans.append((start, end))
    return spans


def _file_pages(tensors: Iterable[torch.Tensor]) -> Iterator[tuple[int, np.ndarray]]:
    """(address of the first page, pagemap entries) of the whole pages that each distinct CPU
    storage among `tensors` has inside a private file mapping."""
    if not sys.platform.startswith("linux") or not _MAPS.exists():
        return
    spans, page, seen = _file_mappings(), mmap.PAGESIZE, set()
    try:
        pagemap = _PAGEMAP.open("rb")
    except OSError:
        return
    with pagemap:
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
            if last <= first:
                continue
            pagemap.seek(first // page * 8)
            yield first, np.frombuffer(pagemap.read((last - first) // page * 8), np.uint64)


def _clean(flags: np.ndarray) -> np.ndarray:
    """Pages that hold the file's bytes: mapped from the file, or never faulted in."""
    return ((flags & _FILE) != 0) | ((flags & (_PRESENT | _SWAPPED)) == 0)


def release_file_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Drop the resident file pages of the memory-mapped `tensors`; returns the bytes released.
    Pages written in place are kept (see the module docstring)."""
    page = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    released = 0
    for first, flags in _file_pages(tensors):
        clean = _clean(flags)
        edges = np.flatnonzero(np.diff(clean.astype(np.int8), prepend=0, append=0))
        for lo, hi in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
            address, size = first + lo * page, (hi - lo) * page
            if libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(size), MADV_DONTNEED) == 0:
                released += int(((flags[lo:hi] & _PRESENT) != 0).sum()) * page
    return released


def pageable_bytes(tensors: Iterable[torch.Tensor]) -> tuple[int, int]:
    """(resident now, all): bytes of the file pages under `tensors` that `release_file_pages`
    can drop, resident now and in all (what a run of the network faults in)."""
    page, resident, total = mmap.PAGESIZE, 0, 0
    for _, flags in _file_pages(tensors):
        clean = _clean(flags)
        total += int(clean.sum()) * page
        resident += int((clean & ((flags & _PRESENT) != 0)).sum()) * page
    return resident, total


@contextlib.contextmanager
def releasing_replaced(module: nn.Module, recurse: bool = True) -> Iterator[None]:
    """Release the file pages of the weights of `module` (its own only, without `recurse`)
    that the block replaces by copies (a cast, a memory-format change); weights the block
    keeps stay resident."""

    def tensors() -> list[torch.Tensor]:  # detached: a cast swaps a parameter's .data
        own = [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]
        return [t.detach() for t in own]

    before = tensors()
    yield
    kept = {t.untyped_storage().data_ptr() for t in tensors()}
    release_file_pages(t for t in before if t.untyped_storage().data_ptr() not in kept)


def trim_heap() -> None:
    """Return the free pages of the C heap to the OS (glibc's `malloc_trim`; elsewhere a
    no-op). Takes milliseconds."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
