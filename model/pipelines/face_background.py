"""Unaligned images with faces: the whole image with the general model, each face with the face
model, the restored faces pasted back (DiffBIR's unaligned face mode).

Order of operations, as XPixelGroup/DiffBIR `diffbir/inference/unaligned_bfr_loop.py`:

    lq ─ resize by the upscale factor ─ detect faces, align each to S×S ─> LQ faces
    LQ faces (S×S) ─ face pipeline, upscale 1 ─> restored faces
    lq ─ background pipeline (general model, the upscale) ─> restored background
    restored faces ─ paste into the restored background through soft masks ─> image

Faces are found on the upscaled LQ, which has the output size, so they go back where they were
found. Every face of an image is restored with that image's seed and caption. With no face
the result is the background restoration itself.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from model.ops.sizing import RESIZES
from model.pipelines.diffbir import DiffBIRPipeline
from model.pipelines.faces import AlignedFaces, FaceHelper
from model.pipelines.options import PipelineOptions
from model.pipelines.sampling import per_image_seeds

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FaceBackgroundResult:
    """Outputs of `FaceBackgroundPipeline.restore`; images in [0, 1] on the device.

    Args:
        images: (B, 3, H_out, W_out) restored images with the restored faces pasted in.
        stage1: (B, 3, H_out, W_out) stage-1 images of the background.
        backgrounds: (B, 3, H_out, W_out) restored images before the faces are pasted.
        faces: per image, its restored faces (N_i, 3, S, S); N_i may be 0.
        aligned: per image, the detected faces (`AlignedFaces`: LQ crops, affines, boxes).
        seeds: the seed of each image (its faces use the same seed).
    """

    images: Tensor
    stage1: Tensor
    backgrounds: Tensor
    faces: list[Tensor]
    aligned: list[AlignedFaces]
    seeds: list[int]


class FaceBackgroundPipeline:
    """Restore images with faces at any place, size and angle.

    Args:
        background: pipeline of the general model (a version's "sr" weights).
        face: pipeline of the face model (a version's "face" weights); it may share the
            ControlLDM with `background` (`model.pipelines.presets.load_pipelines` does).
        helper: detects, aligns and pastes faces (`model.pipelines.faces.load_face_helper`, or one with a
            stub detector); its `face_size` is the size of the face crops.
        face_batch_size: faces per call of the face pipeline.

    Both pipelines must both have a diffusion stage, or both be stage-1 only.
    """

    def __init__(
        self,
        background: DiffBIRPipeline,
        face: DiffBIRPipeline,
        helper: FaceHelper,
        face_batch_size: int = 1,
    ) -> None:
        if background.has_diffusion != face.has_diffusion:
            raise ValueError("the background and face pipelines must both have a diffusion stage")
        if face_batch_size < 1:
            raise ValueError(f"face_batch_size must be >= 1, got {face_batch_size}")
        self.background, self.face, self.helper = background, face, helper
        self.face_batch_size = face_batch_size

    @property
    def device(self) -> torch.device:
        """The device of the background pipeline (inputs and outputs live there)."""
        return self.background.device

    @property
    def precision(self) -> str:
        """The precision of the background pipeline."""
        return self.background.precision

    @property
    def has_diffusion(self) -> bool:
        """False for stage-1-only pipelines (faces and background restored by stage 1)."""
        return self.background.has_diffusion

    @torch.no_grad()
    def restore(
        self,
        lq: Tensor,
        options: PipelineOptions | None = None,
        seeds: Sequence[int] | None = None,
        captions: Sequence[str] | None = None,
    ) -> FaceBackgroundResult:
        """Restore a batch `lq` (B, 3, h, w) in [0, 1] of equal-sized images.

        Args:
            lq: low-quality images, any size.
            options: see `PipelineOptions`; faces use them with `upscale` 1.
            seeds: one seed per image (default `options.seed` for all).
            captions: optional per-image captions (see `DiffBIRPipeline.restore`).
        """
        options = options or PipelineOptions()
        lq = lq.to(self.device, torch.float32)
        batch = lq.shape[0]
        seeds = per_image_seeds(batch, options.seed, seeds)
        if captions is not None and len(captions) != batch:
            raise ValueError(f"need {batch} captions, got {len(captions)}")
        upscale = RESIZES[options.resize_backend]
        upscaled = upscale(lq, self.background.output_size(lq, options))
        aligned = [self.helper.detect_and_align(image) for image in upscaled]
        face_options = dataclasses.replace(options, upscale=1.0)
        faces = [
            self._restore_faces(
                found.faces, face_options, seed, None if captions is None else captions[i]
            )
            for i, (found, seed) in enumerate(zip(aligned, seeds, strict=True))
        ]
        if self.has_diffusion:
            result = self.background.restore(lq, options, seeds, captions)
            backgrounds, stage1 = result.images, result.stage1
        else:
            backgrounds = stage1 = self.background.restore_stage1(lq, options)
        images = torch.cat(
            [
                self.helper.paste_back(bg[None], found, restored).clamp(0, 1)
                for bg, found, restored in zip(backgrounds, aligned, faces, strict=True)
            ]
        )
        return FaceBackgroundResult(images, stage1, backgrounds, faces, aligned, seeds)

    __call__ = restore

    def _restore_faces(
        self, faces: Tensor, options: PipelineOptions, seed: int, caption: str | None
    ) -> Tensor:
        """Restore aligned faces (N, 3, S, S) in chunks of `face_batch_size`."""
        if faces.shape[0] == 0:
            return faces.to(self.device)
        restored = []
        for chunk in faces.split(self.face_batch_size):
            n = chunk.shape[0]
            if not self.face.has_diffusion:
                restored.append(self.face.restore_stage1(chunk, options))
                continue
            chunk_captions = None if caption is None else [caption] * n
            restored.append(self.face.restore(chunk, options, [seed] * n, chunk_captions).images)
        logger.info("restored %d face(s)", faces.shape[0])
        return torch.cat(restored)
