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

import bisect
import contextlib
import ctypes
import mmap
import re
import sys
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import torch
from torch import nn

MADV_DONTNEED = 4
_MAPS = Path("/proc/self/maps")
_PAGEMAP = Path("/proc/self/pagemap")
_PRESENT, _SWAPPED, _FILE = (np.uint64(1 << bit) for bit in (63, 62, 61))


# start-end perms offset dev inode: private (p) mappings with an inode (of a file)
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S{3}p \S+ \S+ ([1-9]\d*)", re.MULTILINE)


_snapshot: ContextVar[tuple[list[int], list[int]] | None] = ContextVar("maps", default=None)


def _file_mappings() -> tuple[list[int], list[int]]:
    """Starts and ends of the process's private file-backed mappings, by address."""
    if (snapshot := _snapshot.get()) is not None:
        return snapshot
    spans = [(int(m[1], 16), int(m[2], 16)) for m in _MAPPING.finditer(_MAPS.read_text())]
    spans.sort()
    return [lo for lo, _ in spans], [hi for _, hi in spans]


def _file_pages(tensors: Iterable[torch.Tensor]) -> Iterator[tuple[int, np.ndarray]]:
    """(address of the first page, pagemap entries) of the whole pages under the CPU storages
    of `tensors` that lie inside private file mappings. Storages of one mapping less than a
    page apart are taken together (a file's tensors follow each other; the bytes between them
    are the file's too), so a network's weights take a few reads."""
    page, spans = mmap.PAGESIZE, {}
    for tensor in tensors:
        if tensor.device.type == "cpu":
            storage = tensor.untyped_storage()
            spans[storage.data_ptr()] = storage.data_ptr() + storage.nbytes()
    if not spans or not sys.platform.startswith("linux") or not _MAPS.exists():
        return
    starts, ends = _file_mappings()
    runs: list[list[int]] = []  # [mapping, start, end], merged
    for start, end in sorted(spans.items()):
        i = bisect.bisect_right(starts, start) - 1
        if i < 0 or end > ends[i]:
            continue
        if runs and runs[-1][0] == i and start - runs[-1][2] < page:
            runs[-1][2] = max(runs[-1][2], end)
        else:
            runs.append([i, start, end])
    try:
        pagemap = _PAGEMAP.open("rb")
    except OSError:
        return
    with pagemap:
        for _, start, end in runs:
            first, last = -(-start // page) * page, end // page * page  # whole pages inside
            if last > first:
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
def one_maps_read() -> Iterator[None]:
    """The releases inside the block look the mappings up once (reading /proc/self/maps takes
    milliseconds; a cast releases after each of its thousands of submodules). Safe while the
    tensors released stay alive: their mappings cannot go, and a mapping made later is only
    missed (its pages stay)."""
    token = _snapshot.set(_file_mappings())
    try:
        yield
    finally:
        _snapshot.reset(token)


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


def hand_back(modules: Iterable[nn.Module], weight_pages: bool = True) -> None:
    """After `modules` ran: their memory-mapped weight pages (with `weight_pages`) and the
    heap's free pages (their freed activations) back to the OS."""
    if weight_pages:
        release_file_pages(t for m in modules for t in (*m.parameters(), *m.buffers()))
    trim_heap()


def trim_heap() -> None:
    """Return the free pages of the C heap to the OS (glibc's `malloc_trim`; elsewhere a
    no-op). Takes milliseconds."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def return_freed_blocks() -> None:
    """From now on, glibc hands every freed block over 64 KiB straight back to the OS (a fixed
    mmap threshold; the default one grows to 32 MiB and keeps freed activations in the heap,
    so later peaks do not show in the RSS): the memory calibration measures under it. Fresh
    blocks then cost page faults (a bf16 network call and VAE decode ran 1.2-1.3x slower), so
    runs keep glibc's default. A no-op off glibc."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
