"""Claims on the jobs of a shared output folder: which process restores which image.

Processes of one run (torchrun ranks, on one machine or several with shared storage) and
independent runs over one folder take the next job by creating its claim file
(`<output>.claim`) atomically: a fully written temporary file is hard-linked to the claim name,
which fails when the claim exists, so exactly one process gets each job. A claim records who
holds it (run id, rank, world size, machine, pid and process start time) and what it is for.
It stays valid while its holder lives: a claim of this run is always respected; on the same
machine (host name, boot id and pid namespace) the holder's process is looked up in /proc; a
claim from another machine is valid while its holder refreshes it (every `heartbeat` seconds)
and stale after `stale_after` seconds without. A stale claim, left by a killed or lost process,
is taken over by the next process that wants the job.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

from model.io.atomic import partial_name, raise_if_full

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
_OPEN: set[str] = set()  # tokens of this process's open Claims


class Claim(enum.Enum):
    """The outcome of `Claims.claim`."""

    TAKEN = "taken"  # this process holds it now
    TAKEN_OVER = "taken over"  # ... from a dead process (which may have left partial files)
    OURS = "ours"  # another process of this run holds it
    BUSY = "busy"  # a live process of another run holds it


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None


def _process_state(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) from /proc, None when not there."""
    stat = _read_text(Path(f"/proc/{pid}/stat"))
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (command)"
    return fields[0], int(fields[19])


def _machine() -> dict[str, Any]:
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = 0
    boot = _read_text(Path("/proc/sys/kernel/random/boot_id")) or ""
    return {"host": socket.gethostname(), "boot": boot, "pidns": pidns}


def _alive_here(pid: int, start: int | None) -> bool:
    """Whether process `pid`, started at `start`, runs on this machine (zombies do not)."""
    if Path("/proc/self/stat").exists():
        state = _process_state(pid)
        return state is not None and state[0] != "Z" and state[1] == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Claims:
    """The claims one process holds, and how it takes new ones.

    Args:
        run: the run id, shared by every process of the run.
        rank: this process's rank in the run.
        world_size: the number of processes of the run.
        heartbeat: seconds between refreshes of the held claims.
        stale_after: seconds after which a claim from another machine that nobody refreshed
            is taken over.
    """

    def __init__(
        self,
        run: str,
        rank: int = 0,
        world_size: int = 1,
        heartbeat: float = HEARTBEAT_S,
        stale_after: float = STALE_AFTER_S,
    ) -> None:
        state = _process_state(os.getpid())
        self.holder = {"run": run, "rank": rank, "world_size": world_size, **_machine(),
                       "pid": os.getpid(), "start": None if state is None else state[1],
                       "token": secrets.token_hex(8)}  # fmt: skip
        _OPEN.add(self.holder["token"])
        self.heartbeat, self.stale_after = heartbeat, stale_after
        self.held: set[Path] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def claim(self, path: Path, **info: Any) -> Claim:
        """Take the claim `path` (its folder is created), recording `info` in it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        broken = False
        for _ in range(3):  # a stale claim is broken, then taken on the next round
            if self._create(path, {**self.holder, **info, "time": time.time()}):
                with self._lock:
                    self.held.add(path)
                self._start_heartbeat()
                return Claim.TAKEN_OVER if broken else Claim.TAKEN
            record, mtime = self._read(path)
            if record is None:
                continue  # released meanwhile
            if record.get("run") == self.holder["run"]:
                return Claim.OURS
            if self._alive(record, mtime):
                return Claim.BUSY
            broken = self._break(path, record) or broken
        return Claim.BUSY

    def release(self, path: Path) -> None:
        """Give up the claim `path` (its job is finished, or left for a rerun)."""
        with self._lock:
            self.held.discard(path)
        path.unlink(missing_ok=True)

    def close(self) -> None:
        """Release every held claim and stop refreshing."""
        self._stop.set()
        _OPEN.discard(self.holder["token"])
        for path in list(self.held):
            self.release(path)

    def _create(self, path: Path, record: dict[str, Any]) -> bool:
        partial = partial_name(path)
        try:
            partial.write_text(json.dumps(record), encoding="utf-8")
            os.link(partial, path)
        except (FileExistsError, FileNotFoundError):  # taken, or its partial tidied away
            return False
        except OSError as exc:
            raise_if_full(exc, path.parent)
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            return self._create_exclusive(path, record)  # a file system without hard links
        finally:
            partial.unlink(missing_ok=True)
        return True

    @staticmethod
    def _create_exclusive(path: Path, record: dict[str, Any]) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(record))
        return True

    @staticmethod
    def _read(path: Path) -> tuple[dict[str, Any] | None, float]:
        try:
            mtime, text = path.stat().st_mtime, path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, 0.0
        try:
            record = json.loads(text)
        except ValueError:  # being written by exclusive creation, or damaged: judged by age
            record = {}
        return record if isinstance(record, dict) else {}, mtime

    def _alive(self, record: dict[str, Any], mtime: float) -> bool:
        here = all(record.get(key) == self.holder[key] for key in ("host", "boot", "pidns"))
        pid = record.get("pid")
        if here and isinstance(pid, int):
            if pid == os.getpid():  # an unknown token: an earlier process with this pid
                return record.get("token") in _OPEN
            return _alive_here(pid, record.get("start"))
        return time.time() - mtime < self.stale_after

    @staticmethod
    def _break(path: Path, stale: dict[str, Any]) -> bool:
        """Remove the claim `path` if it still is `stale` (whether it did): moved aside first,
        so that a claim another process took meanwhile is put back instead of lost."""
        aside = partial_name(path)
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        record, _ = Claims._read(aside)
        replaced = record is not None and record.get("token") != stale.get("token")
        if replaced:
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
        aside.unlink(missing_ok=True)
        return not replaced

    def _start_heartbeat(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._refresh, daemon=True)
            self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with self._lock:
                held = list(self.held)
            for path in held:
                with contextlib.suppress(OSError):
                    os.utime(path)
