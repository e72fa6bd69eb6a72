"""Web demo of DiffBIR (Gradio): upload an image, pick the task and settings, compare, download.

    python -m scripts.app                                   # http://127.0.0.1:7860
    python -m scripts.app --weights-dir weights --device cuda --port 8080
    python -m scripts.app --weights-dir weights/tiny --model-config weights/tiny/tiny_config.yaml \\
        --device cpu --offline                              # tiny random weights, CPU

Pipelines are built on first use and kept (least recently used first out) so that switching
task or version does not reload the weights every time; tasks that use the same weight files
share one pipeline. The restoration itself is `model.pipelines.diffbir.DiffBIRPipeline`; this module
only decodes the upload, maps the controls to `PipelineOptions` and writes the PNG. Gradio is
imported inside `build_app`/`main` after analytics are turned off, so importing this module
has no side effects.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from model.diffusion.callbacks import SamplingStopped
from model.diffusion.latent_guidance import LatentGuidance
from model.diffusion.samplers import SAMPLERS
from model.io.images import ImageReadError, decode_image, write_image
from model.io.logs import setup_logging
from model.io.weights import DEFAULT_WEIGHTS_DIR, MissingWeightsError
from model.ops.color_fix import COLOR_FIX_MODES
from model.ops.device import PRECISIONS
from model.ops.sizing import resize
from model.pipelines.diffbir import DiffBIRPipeline
from model.pipelines.inputs import resize_alpha, to_uint8
from model.pipelines.options import DEFAULT_NEG_PROMPT, DEFAULT_POS_PROMPT, PipelineOptions
from model.pipelines.presets import (
    CUSTOM,
    DEFAULT_UPSCALE,
    ROLES,
    TASKS,
    VERSIONS,
    model_spec,
    read_model_config,
)

if TYPE_CHECKING:
    import gradio as gr

logger = logging.getLogger(__name__)

TILE_STAGES = ("stage 1", "VAE", "diffusion")
OOM_MESSAGE = (
    "Out of memory. Open 'Tiling' and tick stage 1, VAE and diffusion (or use smaller tiles), "
    "lower the upscale factor, or restore a smaller image."
)
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
        device: "auto" (cuda > mps > cpu) or a torch device name.
        precision: "fp32", "fp16" or "bf16" (fp16 on a CPU runs fp32).
        offline: never download; a missing file is reported with where to get it.
        max_pipelines: pipelines kept in memory at once.
    """

    weights_dir: Path = DEFAULT_WEIGHTS_DIR
    model_config: Path | None = None
    checkpoints: Mapping[str, Path] = dataclasses.field(default_factory=dict)
    device: str = "auto"
    precision: str = "fp16"
    offline: bool = False
    max_pipelines: int = 2


@dataclasses.dataclass(frozen=True)
class RunRequest:
    """The settings of one restoration, one field per control of the UI (same names).

    Args:
        task, version: see `model.pipelines.presets`.
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
        stage1: the stage-1 image.
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
        self._pipelines: OrderedDict[tuple, DiffBIRPipeline] = OrderedDict()
        self._lock = threading.Lock()
        self._cancel = threading.Event()

    @property
    def versions(self) -> list[str]:
        """Selectable versions: the releases, plus "custom" when all three files are given."""
        custom = set(ROLES) <= set(self.config.checkpoints)
        return [*VERSIONS, *([CUSTOM] if custom else [])]

    def pipeline(self, version: str, task: str) -> DiffBIRPipeline:
        """The pipeline of (version, task), built on first use; tasks whose model spec is
        the same (v2.1 sr and denoise) share one."""
        if version not in self.versions:
            raise ValueError(f"unknown version {version!r}; choose one of {self.versions}")
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
            pipeline = DiffBIRPipeline.from_pretrained(
                version, task, weights_dir=self.config.weights_dir, device=self.config.device,
                dtype=self.config.precision, checkpoints=self.config.checkpoints,
                model_config=self.model_config, offline=self.config.offline,
            )  # fmt: skip
            self._pipelines[key] = pipeline
            return pipeline

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

        `on_step(done, total)` reports sampler progress. A `cancel()` during the run raises
        `SamplingStopped`.
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
        result = pipeline(lq, options, callback=callback)
        seconds = time.perf_counter() - start
        after, stage1 = result.images[0], result.stage1[0]
        size = tuple(after.shape[-2:])
        before = resize(lq.to(after.device), size)[0]
        alpha = resize_alpha(image.alpha, size)
        png = self._png_path(Path(image_path).stem, request, seed)
        write_image(png, after.permute(1, 2, 0).cpu().numpy(), alpha, quantize="truncate")
        h, w = image.rgb.shape[:2]
        summary = (
            f"{w}×{h} → {size[1]}×{size[0]} in {seconds:.1f} s · {request.version} / "
            f"{request.task} · {options.sampler} {options.steps} steps · seed {seed} · "
            f"{pipeline.device}"
        )
        return RunResult(to_uint8(before), to_uint8(stage1), to_uint8(after), png, seed, summary)

    def _png_path(self, stem: str, request: RunRequest, seed: int) -> Path:
        old = sorted(self.output_dir.glob("*.png"), key=lambda p: p.stat().st_mtime)
        for path in old[: max(len(old) - KEEP_OUTPUTS + 1, 0)]:
            path.unlink(missing_ok=True)
        name = f"{stem}_diffbir_{request.version}_{request.task}_x{request.upscale:g}_s{seed}.png"
        return self.output_dir / name


def error_message(exc: BaseException) -> str:
    """The message the UI shows for a failed run (no traceback)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return OOM_MESSAGE
    if isinstance(exc, MissingWeightsError | ImageReadError | ValueError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _import_gradio() -> Any:
    # Set before the import: Gradio reads it to decide on usage analytics and version checks.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio

    return gradio


# fmt: off
# One line per control: the layout reads as a table.
def build_app(config: AppConfig, restorer: Restorer | None = None) -> gr.Blocks:
    """The Gradio Blocks UI over a `Restorer` (made from `config` unless given)."""
    gr = _import_gradio()
    restorer = restorer or Restorer(config)
    d = RunRequest()
    fields: dict[str, Any] = {}
    with gr.Blocks(title="DiffBIR", analytics_enabled=False, delete_cache=(3600, 7200)) as app:
        gr.Markdown("# DiffBIR: blind image restoration\nStage 1 removes the degradation; a "
                    "ControlNet-steered Stable Diffusion then regenerates the detail.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Input", type="filepath", image_mode=None, sources=["upload", "clipboard"], height=320, elem_id="input-image")
                with gr.Row():
                    fields["task"] = gr.Radio(list(TASKS), value=d.task, label="Task", info="face: aligned 512×512 faces", elem_id="task")
                    fields["version"] = gr.Dropdown(restorer.versions, value=d.version, label="Version", elem_id="version")
                fields["upscale"] = gr.Slider(1, 8, value=d.upscale, step=0.5, label="Upscale", elem_id="upscale")
                with gr.Row():
                    run = gr.Button("Run", variant="primary", elem_id="run")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                _sampling_controls(gr, fields, d)
                _guidance_controls(gr, fields, d)
                _tiling_controls(gr, fields, d)
            with gr.Column(scale=2):
                views, pack = _views(gr)
                compare = gr.Radio(["input", "stage 1"], value="input", label="Compare the result with", elem_id="compare")
                summary = gr.Markdown(elem_id="summary")
                download = gr.DownloadButton("Download full-resolution PNG", interactive=False, elem_id="download")
        shown = gr.State()  # (before, stage 1, after) of the last run, for the compare switch
        on_run, on_switch = _handlers(gr, restorer, list(fields), pack)
        run.click(on_run, [image, compare, *fields.values()], [*views, summary, download, fields["seed"], shown], api_name="restore")
        cancel.click(restorer.cancel, None, None, queue=False, api_name=False)
        compare.change(on_switch, [compare, shown], views, api_name=False)
        fields["task"].change(lambda task: DEFAULT_UPSCALE[task], fields["task"], fields["upscale"], api_name=False)
    return app


def _handlers(gr: Any, restorer: Restorer, names: list[str], pack: Any) -> tuple[Any, Any]:
    """The Run handler (values of the `names` controls in order) and the compare switch."""
    tracker = gr.Progress()  # Gradio finds it as a parameter default

    def shown(against: str, last: tuple | None) -> list:
        if last is None:
            return pack(None, None)
        before, stage1, after = last
        return pack(stage1 if against == "stage 1" else before, after)

    def on_run(path: str | None, against: str, *values: Any, progress: Any = tracker) -> tuple:
        if not path:
            raise gr.Error("Upload an image first.")
        request = RunRequest(**dict(zip(names, values, strict=True)))
        request = dataclasses.replace(request, tile_stages=tuple(request.tile_stages or ()))
        progress(0, desc=f"Restoring with {request.version} / {request.task} …")
        try:
            res = restorer.restore(path, request, lambda done, total: progress((done, total), desc="sampling", unit="steps"))
        except SamplingStopped as exc:
            raise gr.Error(f"Cancelled after {exc.steps_done} of {request.steps} steps.") from None
        except Exception as exc:
            logger.exception("restoration failed")
            if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise gr.Error(error_message(exc)) from None
        last = (res.before, res.stage1, res.after)
        button = gr.DownloadButton(f"Download {res.png.name}", value=str(res.png), interactive=True)
        return (*shown(against, last), res.summary, button, res.seed, last)

    def on_switch(against: str, last: tuple | None) -> Any:
        values = shown(against, last)
        return values[0] if len(values) == 1 else values  # one output takes the bare value

    return on_run, on_switch


def _sampling_controls(gr: Any, fields: dict[str, Any], d: RunRequest) -> None:
    with gr.Accordion("Sampling", open=False):
        with gr.Row():
            fields["sampler"] = gr.Dropdown(list(SAMPLERS), value=d.sampler, label="Sampler")
            fields["steps"] = gr.Slider(1, 100, value=d.steps, step=1, label="Steps", elem_id="steps")
        with gr.Row():
            fields["cfg_scale"] = gr.Slider(1, 15, value=d.cfg_scale, step=0.5, label="CFG scale", info="1: no classifier-free guidance")
            fields["control_strength"] = gr.Slider(0, 2, value=d.control_strength, step=0.05, label="Control strength", info="lower: more creative")
        fields["pos_prompt"] = gr.Textbox(d.pos_prompt, label="Positive prompt", lines=2)
        fields["neg_prompt"] = gr.Textbox(d.neg_prompt, label="Negative prompt", lines=2)
        with gr.Row():
            fields["seed"] = gr.Number(d.seed, label="Seed", precision=0, elem_id="seed")
            fields["random_seed"] = gr.Checkbox(d.random_seed, label="Random seed", info="the seed used is shown above")
        with gr.Row():
            fields["color_fix"] = gr.Dropdown(list(COLOR_FIX_MODES), value=d.color_fix, label="Colour fix")
            fields["min_short_side"] = gr.Number(d.min_short_side, label="Minimum short side", precision=0, info="smaller images are processed at this size", elem_id="min-short-side")


def _guidance_controls(gr: Any, fields: dict[str, Any], d: RunRequest) -> None:
    with gr.Accordion("Latent image guidance", open=False):
        fields["guidance_scale"] = gr.Slider(0, 1, value=d.guidance_scale, step=0.01, label="Guidance scale", info="0: off; pulls the sample toward the stage-1 image")
        with gr.Row():
            fields["guidance_space"] = gr.Radio(["latent", "rgb"], value=d.guidance_space, label="Space")
            fields["guidance_loss"] = gr.Radio(["mse", "weighted_mse"], value=d.guidance_loss, label="Loss")
        with gr.Row():
            fields["guidance_start"] = gr.Number(d.guidance_start, label="Start (t)", precision=0, info="guide while stop < t + 1 < start")
            fields["guidance_stop"] = gr.Number(d.guidance_stop, label="Stop (t)", precision=0)


def _tiling_controls(gr: Any, fields: dict[str, Any], d: RunRequest) -> None:
    with gr.Accordion("Tiling (large images, less memory)", open=False):
        fields["tile_stages"] = gr.CheckboxGroup(list(TILE_STAGES), value=list(d.tile_stages), label="Tiled stages")
        for key, what in (("stage1", "Stage 1"), ("vae", "VAE"), ("diffusion", "Diffusion")):
            with gr.Row():
                fields[f"{key}_tile_size"] = gr.Number(getattr(d, f"{key}_tile_size"), label=f"{what} tile size (px)", precision=0)
                fields[f"{key}_tile_stride"] = gr.Number(getattr(d, f"{key}_tile_stride"), label=f"{what} tile stride (px)", precision=0)


def _views(gr: Any) -> tuple[list[Any], Any]:
    """Before/after components and a function packing (before, after) into their values."""
    if hasattr(gr, "ImageSlider"):
        slider = gr.ImageSlider(label="Before / after", type="numpy", format="png", elem_id="result")
        return [slider], lambda before, after: [None if after is None else (before, after)]
    views = [gr.Image(label="Before", format="png", elem_id="before"), gr.Image(label="After", format="png", elem_id="result")]
    return views, lambda before, after: [before, after]


def launch_app(
    app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
    block: bool = True,
) -> None:
    """Serve `app`; with block=False return once the server is up (tests)."""
    app.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=share, show_error=True, ssr_mode=False,
        quiet=not block, prevent_thread_lock=not block, inbrowser=False,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every flag has help."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights-dir", type=Path, default=DEFAULT_WEIGHTS_DIR, help="folder with the released weight files (downloads go here)")
    p.add_argument("--model-config", type=Path, default=None, help="YAML with cldm / swinir / stage1 / diffusion entries (tiny or custom architectures)")
    p.add_argument("--sd-ckpt", type=Path, default=None, help="Stable Diffusion checkpoint (overrides every version's)")
    p.add_argument("--controlnet-ckpt", type=Path, default=None, help="LAControlNet checkpoint (overrides every version's)")
    p.add_argument("--stage1-ckpt", type=Path, default=None, help="stage-1 checkpoint (overrides every version's); all three enable the custom version")
    p.add_argument("--offline", action="store_true", help="never download weights; report the missing files instead")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"), help="auto: cuda > mps > cpu")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp16", help="network precision (fp16 on a CPU runs fp32)")
    p.add_argument("--max-pipelines", type=int, default=2, help="pipelines kept in memory (each version/task pair builds one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    p.add_argument("--verbose", action="store_true", help="log model loading and other details")
    return p
# fmt: on


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, build the UI and serve it until interrupted; 2 when it cannot start."""
    args = build_parser().parse_args(argv)
    setup_logging(logging.INFO if args.verbose else logging.WARNING)
    checkpoints = {role: getattr(args, f"{role}_ckpt") for role in ROLES}
    config = AppConfig(
        weights_dir=args.weights_dir,
        model_config=args.model_config,
        checkpoints={r: p for r, p in checkpoints.items() if p is not None},
        device=args.device,
        precision=args.precision,
        offline=args.offline,
        max_pipelines=args.max_pipelines,
    )
    try:
        app = build_app(config)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    launch_app(app, args.host, args.port, args.share)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
