"""Restoring many files: jobs batched by size, failures reported and counted, outputs saved.

`FolderRunner` is what inference.py and scripts/reproduce.py run over `model.io.folder_jobs`
jobs; an unreadable image or a failed batch is reported and the others go on.
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

from model.io.folder_jobs import Job, OutputSettings, load_image, save_job
from model.io.images import DecodedImage, ImageReadError
from model.pipelines.inputs import resize_alpha
from model.pipelines.options import PipelineOptions
from model.pipelines.restorer import Pipeline, batch_by_size, make_restorer

logger = logging.getLogger(__name__)

OOM_HINT = (
    "out of memory; use --tiled, or smaller --stage1-tile-size / --vae-encoder-tile-size / "
    "--vae-decoder-tile-size / --diffusion-tile-size, --batch-size 1, or --precision fp16"
)
Loaded = tuple[Job, DecodedImage, torch.Tensor]


class FolderRunner:
    """Restores jobs batch by batch, reports failures and keeps the counts.

    Args:
        pipeline: a DiffBIRPipeline (or FaceBackgroundPipeline), stage-1-only or full.
        options: the options of every image.
        record: the run-wide part of every sidecar (the seconds per image are added).
        settings: where and how outputs are written.
        batch_size: images per pipeline call (consecutive images of the same size).
        progress: show a progress bar (stderr).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        options: PipelineOptions,
        record: dict[str, Any],
        settings: OutputSettings,
        batch_size: int = 1,
        progress: bool = True,
    ) -> None:
        self.restorer = make_restorer(pipeline, options)
        self.record, self.settings = record, settings
        self.batch_size, self.progress = batch_size, progress
        self.failed: list[str] = []
        self.restored = 0

    def fail(self, message: str) -> None:
        self.failed.append(message)
        tqdm.write(f"error: {message}", file=sys.stderr)

    def run(self, jobs: list[Job]) -> None:
        """Restore `jobs` in order; counts end up in `restored` and `failed`."""
        bar = tqdm(total=len(jobs), unit="img", disable=not self.progress, file=sys.stderr)
        loaded = self._load(jobs, bar)
        for batch in batch_by_size(loaded, self.batch_size, lambda item: item[2].shape[-2:]):
            self._restore(batch, bar)
        bar.close()

    def _load(self, jobs: list[Job], bar: tqdm) -> Iterator[Loaded]:
        """The decodable jobs with their images; unreadable files are reported and counted."""
        for job in jobs:
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
                out = result.images[i]
                alpha = resize_alpha(image.alpha, tuple(out.shape[-2:]))
                save_job(job, image, out, result.stage1[i], alpha, record, self.settings, faces)
                self.restored += 1
        except torch.OutOfMemoryError:
            self.fail(f"{names}: {OOM_HINT}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
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
    model_config: str | None = None,
    stage1_only: bool = False,
) -> dict[str, Any]:
    """The run-wide part of every sidecar: what was run, with which weights and options."""
    return {
        "version": version, "task": task, "stage1_only": stage1_only, "seed": options.seed,
        "device": str(pipeline.device), "precision": pipeline.precision,
        "weights": {role: str(path) for role, path in pipeline.weight_paths.items()},
        "model_config": model_config, "options": dataclasses.asdict(options),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in arguments.items()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
