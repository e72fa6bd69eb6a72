"""One call for every task: a pipeline and its options as (lq batch, captions) -> `Restored`.

Batch tools (inference.py) restore many images through `make_restorer` without knowing which
flow a task runs; `batch_by_size` groups consecutive images that can share a pipeline call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch

from model.diffir.pipeline import DiffIRPipeline
from model.pipelines.diffbir import DiffBIRPipeline
from model.pipelines.face_background import FaceBackgroundPipeline
from model.pipelines.options import PipelineOptions

Pipeline = DiffBIRPipeline | FaceBackgroundPipeline | DiffIRPipeline
T = TypeVar("T")


@dataclasses.dataclass
class Restored:
    """A restorer's results for a batch, images at the output size in [0, 1].

    Args:
        images: (B, 3, H, W) restored images.
        stage1: (B, 3, H, W) stage-1 images.
        faces: face_background only: per image its restored faces (N_i, 3, 512, 512).
        boxes: face_background only: per image its face boxes (N_i, 5) in output pixels
            (x1, y1, x2, y2, score).
        tiles: the tile sizes `--max-memory` chose for this batch, else None.
    """

    images: torch.Tensor
    stage1: torch.Tensor
    faces: list[torch.Tensor] | None = None
    boxes: list[np.ndarray] | None = None
    tiles: dict[str, int | None] | None = None


Restorer = Callable[[torch.Tensor, Sequence[str] | None], Restored]


def make_restorer(pipeline: Pipeline, options: PipelineOptions) -> Restorer:
    """(lq batch, per-image captions or None) -> `Restored`.

    The task dispatch point: a task with its own flow returns its own function here
    (face_background: faces detected, restored and pasted back into the restored background).
    """
    if isinstance(pipeline, FaceBackgroundPipeline):

        def with_faces(lq: torch.Tensor, captions: Sequence[str] | None) -> Restored:
            result = pipeline.restore(lq, options, captions=captions)
            boxes = [found.boxes for found in result.aligned]
            return Restored(result.images, result.stage1, result.faces, boxes)

        return with_faces
    if isinstance(pipeline, DiffIRPipeline):  # one network: its output is also "stage 1"

        def diffir(lq: torch.Tensor, captions: Sequence[str] | None) -> Restored:
            out = pipeline(lq, options.seed, options.upscale, options.stage1_tile_size,
                           options.stage1_tile_stride)  # fmt: skip
            return Restored(out, out)

        return diffir
    if not pipeline.has_diffusion:

        def stage1_only(lq: torch.Tensor, captions: Sequence[str] | None) -> Restored:
            out = pipeline.restore_stage1(lq, options)
            return Restored(out, out)

        return stage1_only

    def restore(lq: torch.Tensor, captions: Sequence[str] | None) -> Restored:
        result = pipeline.restore(lq, options, captions=captions)
        return Restored(result.images, result.stage1, tiles=result.tiles)

    return restore


def batch_by_size(
    items: Iterable[T], batch_size: int, size: Callable[[T], Hashable]
) -> Iterator[list[T]]:
    """Consecutive items of the same `size`, at most `batch_size` at a time, in order.

    Lazy: a batch is handed out as soon as it is complete (full, or the next item differs in
    size), before the item after it is drawn from `items`.
    """
    pending: list[T] = []
    for item in items:
        pending.append(item)
        if len(pending) > 1 and size(pending[0]) != size(item):
            yield pending[:-1]
            pending = pending[-1:]
        if len(pending) == batch_size:
            yield pending
            pending = []
    if pending:
        yield pending
