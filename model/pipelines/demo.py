"""The web demo's restoration (scripts/app.py): one uploaded file per request, pipelines cached.

`Restorer` builds a pipeline per (version, task) on first use and keeps the most recent ones
(least recently used first out), so that switching task or version does not reload the weights
every time; tasks that use the same weight files share one pipeline. Besides the DiffBIR
versions it offers DiffIR (`DIFFIR`: one fast x4 network, task sr only, whose tiles are the
"stage 1" tiles). `RunRequest` holds one field per UI control and maps them to
`PipelineOptions`. No Gradio here: the UI lives in scripts/app.py.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from model.diffir.pipeline import DiffIRPipeline
from model.diffusion.latent_guidance import LatentGuidance
from model.io.images import decode_image, write_image
from model.io.weights import DEFAULT_WEIGHTS_DIR
from model.ops.sizing import resize
from model.pipelines.diffbir import DiffBIRPipeline
from model.pipelines.inputs import resize_alpha, to_uint8
from model.pipelines.options import DEFAULT_NEG_PROMPT, DEFAULT_POS_PROMPT, PipelineOptions
from model.pipelines.presets import (
    CUSTOM,
    DEFAULT_UPSCALE,
    ROLES,
    VERSIONS,
    model_spec,
    read_model_config,
)
from model.pipelines.restorer import make_restorer

logger = logging.getLogger(__name__)

TILE_STAGES = ("stage 1", "VAE", "diffusion")
# The version name of DiffIR among the DiffBIR versions.
DIFFIR = "diffir"
# PNGs written by this process beyond this many are deleted, oldest first.
KEEP_OUTPUTS = 32


@dataclasses.dataclass(frozen=True)
class AppConfig:
    """Where the weights are and how pipelines are built.

    Args:
        weights_dir: folder with the released weight files (downloads go here unless offline).
        model_config: YAML with cldm / swinir / stage1 / diffusion entries (tiny or custom).
        checkpoints: explicit weight files by role ("stage1", "sd", "controlnet"); they
            override every version's, and all three make the "custom" version available.
        diffir_ckpt: DiffIR weights (our export or an original .pth); None: DiffIRS2-GAN.pth
            in `weights_dir`.
        device: "auto" (cuda > mps > cpu) or a torch device name.
        precision: "fp32", "fp16" or "bf16" (fp16 on a CPU runs fp32; DiffIR always fp32).
        offline: never download; a missing file is reported with where to get it.
        max_pipelines: pipelines kept in memory at once.
    """

    weights_dir: Path = DEFAULT_WEIGHTS_DIR
    model_config: Path | None = None
    checkpoints: Mapping[str, Path] = dataclasses.field(default_factory=dict)
    diffir_ckpt: Path | None = None
    device: str = "auto"
    precision: str = "fp16"
    offline: bool = False
    max_pipelines: int = 2


@dataclasses.dataclass(frozen=True)
class RunRequest:
    """The settings of one restoration, one field per control of the UI (same names).

    Args:
        task, version: see `model.pipelines.presets`; version `DIFFIR` runs DiffIR (task sr;
            of the controls below it reads upscale, the seed and the stage-1 tiles).
        tile_stages: subset of TILE_STAGES to run tiled, with the sizes and strides below
            (image pixels).
        random_seed: draw a fresh seed instead of `seed`.
        Others: as in `PipelineOptions` and `LatentGuidance`.
    """

    task: str = "sr"
    version: str = "v2.1"
    upscale: float = DEFAULT_UPSCALE["sr"]
    sampler: str = PipelineOptions.sampler
    steps: int = 10
    cfg_scale: float = 6.0
    pos_prompt: str = DEFAULT_POS_PROMPT
    neg_prompt: str = DEFAULT_NEG_PROMPT
    control_strength: float = 1.0
    seed: int | None = 231
    random_seed: bool = False
    color_fix: str = "wavelet"
    min_short_side: int = 512
    guidance_scale: float = 0.0
    guidance_space: str = "latent"
    guidance_loss: str = "weighted_mse"
    guidance_start: int = 1001
    guidance_stop: int = -1
    tile_stages: tuple[str, ...] = ()
    stage1_tile_size: int = 512
    stage1_tile_stride: int = 256
    vae_tile_size: int = 256
    vae_tile_stride: int = 128
    diffusion_tile_size: int = 512
    diffusion_tile_stride: int = 256

    def options(self, seed: int) -> PipelineOptions:
        """PipelineOptions for these settings with `seed` (raises ValueError on bad values)."""
        unknown = set(self.tile_stages) - set(TILE_STAGES)
        if unknown:
            raise ValueError(f"unknown tile stages {sorted(unknown)}; choose from {TILE_STAGES}")
        tiles: dict[str, int | None] = {}
        for stage, key, size, stride in (
            ("stage 1", "stage1", self.stage1_tile_size, self.stage1_tile_stride),
            ("VAE", "vae_encoder", self.vae_tile_size, self.vae_tile_stride),
            ("VAE", "vae_decoder", self.vae_tile_size, self.vae_tile_stride),
            ("diffusion", "diffusion", self.diffusion_tile_size, self.diffusion_tile_stride),
        ):
            on = stage in self.tile_stages
            tiles[f"{key}_tile_size"] = int(size) if on else None
            tiles[f"{key}_tile_stride"] = int(stride) if on else None
        guidance = None
        if self.guidance_scale > 0:
            guidance = LatentGuidance(
                self.guidance_scale, int(self.guidance_start), int(self.guidance_stop),
                self.guidance_space, self.guidance_loss,  # type: ignore[arg-type]
            )  # fmt: skip
        return PipelineOptions(
            upscale=float(self.upscale), min_short_side=int(self.min_short_side),
            sampler=self.sampler, steps=int(self.steps), cfg_scale=float(self.cfg_scale),
            pos_prompt=self.pos_prompt, neg_prompt=self.neg_prompt, control_strength=float(self.control_strength),
            guidance=guidance, color_fix=self.color_fix, seed=seed, progress=True, **tiles,
        )  # fmt: skip


@dataclasses.dataclass
class RunResult:
    """What one restoration shows: uint8 (H, W, 3) images at the output size, and the PNG.

    Args:
        before: the input, bicubic-resized to the output size.
        stage1: the stage-1 image (DiffIR: the result itself).
        after: the restored image.
        png: the full-resolution PNG (alpha re-attached when the input had one).
        seed: the seed used.
        summary: one line for the UI.
    """

    before: np.ndarray
    stage1: np.ndarray
    after: np.ndarray
    png: Path
    seed: int
    summary: str


Pipeline = DiffBIRPipeline | DiffIRPipeline


class Restorer:
    """Builds pipelines on demand, keeps the most recent ones, and restores uploaded files.

    Args:
        config: see `AppConfig`.
        output_dir: where PNGs are written (default: a new folder in the system temp dir,
            which Gradio serves).
    """

    def __init__(self, config: AppConfig, output_dir: Path | None = None) -> None:
        self.config = config
        # Read now so that a bad model config stops the app at start, not at the first run.
        self.model_config = read_model_config(config.model_config) if config.model_config else {}
        unknown = set(config.checkpoints) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown checkpoint roles {sorted(unknown)}; use {ROLES}")
        self.output_dir = output_dir or Path(tempfile.mkdtemp(prefix="diffbir_app_"))
        self._pipelines: OrderedDict[tuple, Pipeline] = OrderedDict()
        self._lock = threading.Lock()
        self._cancel = threading.Event()

    @property
    def versions(self) -> list[str]:
        """Selectable versions: the releases, "custom" when all three files are given, and
        DiffIR."""
        custom = set(ROLES) <= set(self.config.checkpoints)
        return [*VERSIONS, *([CUSTOM] if custom else []), DIFFIR]

    def pipeline(self, version: str, task: str) -> Pipeline:
        """The pipeline of (version, task), built on first use; tasks whose model spec is
        the same (v2.1 sr and denoise) share one."""
        if version not in self.versions:
            raise ValueError(f"unknown version {version!r}; choose one of {self.versions}")
        if version == DIFFIR and task != "sr":
            raise ValueError(f"DiffIR restores task sr only, not {task}; pick sr or DiffBIR")
        if version == DIFFIR:
            key: tuple = (DIFFIR,)
        else:
            spec = model_spec(version, task, self.model_config)
            key = (version, spec.stage1_model, tuple(sorted(spec.weights.items())))
        with self._lock:
            if key in self._pipelines:
                self._pipelines.move_to_end(key)
                return self._pipelines[key]
            while len(self._pipelines) >= max(self.config.max_pipelines, 1):
                self._pipelines.popitem(last=False)  # free memory before loading the next
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            logger.info("loading %s / %s", version, task)
            self._pipelines[key] = self._load(version, task)
            return self._pipelines[key]

    def _load(self, version: str, task: str) -> Pipeline:
        c = self.config
        if version == DIFFIR:
            weights = c.diffir_ckpt or c.weights_dir
            return DiffIRPipeline.from_pretrained(weights, device=c.device, offline=c.offline)
        return DiffBIRPipeline.from_pretrained(
            version, task, weights_dir=c.weights_dir, device=c.device, dtype=c.precision,
            checkpoints=c.checkpoints, model_config=self.model_config, offline=c.offline,
        )  # fmt: skip

    def cancel(self) -> None:
        """Ask the running restoration to stop after its current sampler step."""
        self._cancel.set()

    def restore(
        self,
        image_path: str | Path,
        request: RunRequest,
        on_step: Callable[[int, int], None] | None = None,
    ) -> RunResult:
        """Restore one image file with `request`; writes the PNG into `output_dir`.

        `on_step(done, total)` reports sampler progress (DiffBIR). A `cancel()` during the run
        raises `SamplingStopped`.
        """
        # an emptied seed box counts as "random seed"
        fresh = request.random_seed or request.seed is None
        seed = random.randrange(2**31) if fresh else int(request.seed)
        options = request.options(seed)
        image = decode_image(image_path)
        lq = torch.from_numpy(image.rgb).permute(2, 0, 1)[None]
        pipeline = self.pipeline(request.version, request.task)
        self._cancel.clear()

        def callback(step: int, t: int, latents: torch.Tensor) -> bool:
            if on_step is not None:
                on_step(step + 1, options.steps)
            return self._cancel.is_set()

        start = time.perf_counter()
        if isinstance(pipeline, DiffIRPipeline):
            result = make_restorer(pipeline, options)(lq, None)
            what = "DiffIR"
        else:
            result = pipeline(lq, options, callback=callback)
            what = f"{request.version} / {request.task} · {options.sampler} {options.steps} steps"
        seconds = time.perf_counter() - start
        after, stage1 = result.images[0], result.stage1[0]
        size = tuple(after.shape[-2:])
        before = resize(lq.to(after.device), size)[0]
        alpha = resize_alpha(image.alpha, size)
        png = self._png_path(Path(image_path).stem, request, seed)
        write_image(png, after.permute(1, 2, 0).cpu().numpy(), alpha, quantize="truncate")
        h, w = image.rgb.shape[:2]
        summary = (
            f"{w}×{h} → {size[1]}×{size[0]} in {seconds:.1f} s · {what} · seed {seed} · "
            f"{pipeline.device}"
        )
        return RunResult(to_uint8(before), to_uint8(stage1), to_uint8(after), png, seed, summary)

    def _png_path(self, stem: str, request: RunRequest, seed: int) -> Path:
        old = sorted(self.output_dir.glob("*.png"), key=lambda p: p.stat().st_mtime)
        for path in old[: max(len(old) - KEEP_OUTPUTS + 1, 0)]:
            path.unlink(missing_ok=True)
        what = (
            "diffir_sr"
            if request.version == DIFFIR
            else f"diffbir_{request.version}_{request.task}"
        )
        return self.output_dir / f"{stem}_{what}_x{request.upscale:g}_s{seed}.png"
