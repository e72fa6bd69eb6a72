"""Restoring many files: jobs claimed one by one, batched by size, failures reported and counted.

`FolderRunner` is what inference.py and scripts/reproduce.py run over `model.io.folder_jobs`
jobs, in one process or in each of several (torchrun): a process claims the next unclaimed job
(`model.io.claims`), so the processes share the work however long each image takes, and a job
finished by another process meanwhile is not redone. An unreadable image or a failed batch is
reported and the others go on; a full disk stops the run. `finish` adds up what every process
did into the one summary rank 0 prints.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from model.io.atomic import DiskFullError
from model.io.claims import Claim, Claims
from model.io.folder_jobs import Job, OutputSettings, load_image, plain, save_job
from model.io.images import DecodedImage, ImageReadError
from model.pipelines.distributed import Dist, all_gather
from model.pipelines.inputs import resize_alpha
from model.pipelines.options import PipelineOptions
from model.pipelines.restorer import Pipeline, batch_by_size, make_restorer

logger = logging.getLogger(__name__)

OOM_HINT = (
    "out of memory; use --tiled, or smaller --stage1-tile-size / --vae-encoder-tile-size / "
    "--vae-decoder-tile-size / --diffusion-tile-size, --batch-size 1, or --precision fp16"
)
Loaded = tuple[Job, DecodedImage, torch.Tensor]


@dataclasses.dataclass
class Counts:
    """What one process did with its jobs.

    Args:
        restored: jobs it finished.
        failed: one message per failed image or batch.
        finished_elsewhere: jobs another run finished while this one ran.
        busy: outputs a live process of another run was working on (left to it).
        stopped: why the process stopped early (a full disk), or None.
    """

    restored: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)
    finished_elsewhere: int = 0
    busy: list[str] = dataclasses.field(default_factory=list)
    stopped: str | None = None


@dataclasses.dataclass(frozen=True)
class Summary:
    """A run over `total` jobs, every process's counts added up (`finish`)."""

    total: int
    restored: int
    skipped: int
    skipped_other: int
    failed: list[str]
    busy: int
    stopped: list[str]

    def lines(self, output: Path) -> list[str]:
        """The summary as printed: one line of counts, then one per failure or stop."""
        counts = (f"done: {self.restored} restored, {self.skipped} skipped (already done), "
                  f"{len(self.failed)} failed -> {output}")  # fmt: skip
        lines = [counts]
        if self.skipped_other:
            lines.append(f"skipped {self.skipped_other} done with other options; use --overwrite")
        if self.busy:
            lines.append(f"left {self.busy} to another run working on them")
        lines += [f"  failed: {message}" for message in self.failed]
        undone = self.total - self.restored - self.skipped - self.skipped_other
        undone -= len(self.failed) + self.busy
        lines += [f"stopped: {reason}; {undone} not done" for reason in self.stopped]
        return lines

    @property
    def exit_code(self) -> int:
        """0 when every job is done, else 1."""
        return 1 if self.failed or self.stopped else 0


def finish(
    dist: Dist, claims: Claims, counts: Counts, jobs: list[Job], skipped: int, skipped_other: int
) -> Summary:
    """Every process's `counts` added up (on every process), once all are done; rank 0 removes
    the claims dead processes left on jobs they had finished, then every process releases its
    own. `skipped` and `skipped_other` are the run's (`model.io.folder_jobs.triage`)."""
    every = all_gather(dist, counts)
    if dist.is_main:
        for job in jobs:
            if job.claim.exists() and claims.claim(job.claim) in (Claim.TAKEN, Claim.TAKEN_OVER):
                claims.release(job.claim)
                job.remove_partials()
    claims.close()
    busy = {output for c in every for output in c.busy}
    return Summary(len(jobs), sum(c.restored for c in every),
                   skipped + sum(c.finished_elsewhere for c in every), skipped_other,
                   [m for c in every for m in c.failed], len(busy),
                   sorted({c.stopped for c in every if c.stopped}))  # fmt: skip


class FolderRunner:
    """Restores jobs batch by batch, reports failures and keeps the counts.

    Args:
        pipeline: a DiffBIRPipeline (or FaceBackgroundPipeline), stage-1-only or full.
        options: the options of every image.
        record: the run-wide part of every sidecar (the seconds per image are added).
        settings: where and how outputs are written.
        claims: this process's claims (their run id, rank and world size go into the sidecars).
        batch_size: images per pipeline call (consecutive images of the same size).
        overwrite: redo jobs finished by earlier runs.
        progress: show a progress bar (stderr).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        options: PipelineOptions,
        record: dict[str, Any],
        settings: OutputSettings,
        claims: Claims,
        batch_size: int = 1,
        overwrite: bool = False,
        progress: bool = True,
    ) -> None:
        self.restorer = make_restorer(pipeline, options)
        holder = claims.holder
        self.record = {**record, "run": holder["run"], "rank": holder["rank"],
                       "world_size": holder["world_size"]}  # fmt: skip
        self.settings, self.claims = settings, claims
        self.batch_size, self.overwrite, self.progress = batch_size, overwrite, progress
        self.counts = Counts()

    def fail(self, message: str) -> None:
        self.counts.failed.append(message)
        tqdm.write(f"error: {message}", file=sys.stderr)

    def run(self, jobs: list[Job]) -> Counts:
        """Restore the `jobs` this process can claim, in order, until done or the disk is
        full; failed jobs stay claimed until `self.claims` is closed (after every process of
        the run is done), so that no other process of the run tries them again."""
        bar = tqdm(total=len(jobs), unit="img", disable=not self.progress, file=sys.stderr)
        loaded = self._load(jobs, bar)
        try:
            for batch in batch_by_size(loaded, self.batch_size, lambda item: item[2].shape[-2:]):
                self._restore(batch, bar)
        except DiskFullError as exc:
            self.counts.stopped = str(exc)
            tqdm.write(f"error: {exc}; stopping", file=sys.stderr)
        bar.close()
        return self.counts

    def _take(self, job: Job) -> bool:
        """Claim `job` if it still needs doing."""
        state = self.claims.claim(job.claim, input=str(job.src), output=str(job.dst))
        if state is Claim.BUSY:
            self.counts.busy.append(str(job.dst))
        if state not in (Claim.TAKEN, Claim.TAKEN_OVER):
            return False
        record = job.finished_record()
        if record is not None and (not self.overwrite or record.get("run") == self.record["run"]):
            self.claims.release(job.claim)  # finished since the run started
            if record.get("run") != self.record["run"]:
                self.counts.finished_elsewhere += 1
            return False
        if state is Claim.TAKEN_OVER:
            job.remove_partials()  # what the dead holder was writing
        return True

    def _load(self, jobs: list[Job], bar: tqdm) -> Iterator[Loaded]:
        """The jobs this process takes, decoded; unreadable files are reported and counted."""
        for job in jobs:
            if not self._take(job):
                bar.update(1)
                continue
            try:
                yield (job, *load_image(job))
            except ImageReadError as exc:
                self.fail(str(exc))
                bar.update(1)

    def _restore(self, batch: list[Loaded], bar: tqdm) -> None:
        start = time.perf_counter()
        lq = torch.cat([x for _, _, x in batch])
        names = ", ".join(str(job.src) for job, _, _ in batch)
        captions = [job.caption for job, _, _ in batch]
        try:
            result = self.restorer(lq, captions if any(captions) else None)
            seconds = (time.perf_counter() - start) / len(batch)
            for i, (job, image, _) in enumerate(batch):
                record = {**self.record, "seconds": round(seconds, 3)}
                faces = None if result.faces is None else result.faces[i]
                if result.boxes is not None:
                    record["faces"] = np.round(result.boxes[i], 2).tolist()
                if result.tiles is not None:
                    record["tiles"] = result.tiles
                out = result.images[i]
                alpha = resize_alpha(image.alpha, tuple(out.shape[-2:]))
                save_job(job, image, out, result.stage1[i], alpha, record, self.settings, faces)
                self.claims.release(job.claim)
                self.counts.restored += 1
        except torch.OutOfMemoryError:
            self.fail(f"{names}: {OOM_HINT}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except DiskFullError:
            raise
        except (RuntimeError, ValueError, OSError) as exc:
            logger.debug("failure details", exc_info=True)
            self.fail(f"{names}: {type(exc).__name__}: {exc}")
        bar.update(len(batch))
        bar.set_postfix_str(f"{(time.perf_counter() - start) / len(batch):.2f} s/img")


def run_record(
    pipeline: Pipeline,
    options: PipelineOptions,
    version: str,
    task: str,
    arguments: dict[str, Any],
    parameters: dict[str, Any],
    model_config: str | None = None,
    stage1_only: bool = False,
) -> dict[str, Any]:
    """The run-wide part of every sidecar: what was run, with which weights and options, and
    the `parameters` a rerun compares (`model.io.folder_jobs.triage`)."""
    return {
        "version": version, "task": task, "stage1_only": stage1_only, "seed": options.seed,
        "device": str(pipeline.device), "precision": pipeline.precision,
        "weights": {role: str(path) for role, path in pipeline.weight_paths.items()},
        "model_config": model_config, "options": dataclasses.asdict(options),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in arguments.items()},
        "parameters": plain(parameters),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
