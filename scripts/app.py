"""Web demo of DiffBIR and DiffIR (Gradio): upload an image, pick the method, task and
settings, compare, download.

    python -m scripts.app                                   # http://127.0.0.1:7860
    python -m scripts.app --weights-dir weights --device cuda --port 8080
    python -m scripts.app --weights-dir weights/tiny --model-config weights/tiny/tiny_config.yaml \\
        --device cpu --offline                              # tiny random weights, CPU

The Version list holds the DiffBIR versions and "diffir" (DiffIR: one fast x4 network, task sr
only; picking it hides the controls it does not read). The restoration, with its pipeline
cache, is `model.pipelines.demo.Restorer`; this module is the UI over it. Gradio is imported
inside `build_app`/`main` after analytics are turned off, so importing this module has no side
effects.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model.diffusion.callbacks import SamplingStopped
from model.diffusion.samplers import SAMPLERS
from model.io.images import ImageReadError
from model.io.logs import setup_logging
from model.io.weights import DEFAULT_WEIGHTS_DIR, MissingWeightsError
from model.ops.color_fix import COLOR_FIX_MODES
from model.ops.device import PRECISIONS
from model.pipelines.demo import DIFFIR, TILE_STAGES, AppConfig, Restorer, RunRequest
from model.pipelines.presets import DEFAULT_UPSCALE, ROLES, TASKS

if TYPE_CHECKING:
    import gradio as gr

logger = logging.getLogger(__name__)

OOM_MESSAGE = (
    "Out of memory. Open 'Tiling' and tick stage 1, VAE and diffusion (or use smaller tiles), "
    "lower the upscale factor, or restore a smaller image."
)
# Controls DiffIR does not read: hidden while it is the chosen version.
DIFFBIR_ONLY = ("sampler", "steps", "cfg_scale", "control_strength", "pos_prompt", "neg_prompt",
                "color_fix", "min_short_side")  # fmt: skip


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
                    "ControlNet-steered Stable Diffusion then regenerates the detail. Version "
                    "*diffir* runs DiffIR instead: x4 real-world SR by one fast network whose "
                    "prior comes from a 4-step diffusion over a 256-d vector.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Input", type="filepath", image_mode=None, sources=["upload", "clipboard"], height=320, elem_id="input-image")
                with gr.Row():
                    fields["task"] = gr.Radio(list(TASKS), value=d.task, label="Task", info="face: aligned 512×512 faces", elem_id="task")
                    fields["version"] = gr.Dropdown(restorer.versions, value=d.version, label="Version", info="diffir: DiffIR (task sr)", elem_id="version")
                fields["upscale"] = gr.Slider(1, 8, value=d.upscale, step=0.5, label="Upscale", elem_id="upscale")
                with gr.Row():
                    run = gr.Button("Run", variant="primary", elem_id="run")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                _sampling_controls(gr, fields, d)
                guidance = _guidance_controls(gr, fields, d)
                tile_rows = _tiling_controls(gr, fields, d)
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
        hidden = [*(fields[name] for name in DIFFBIR_ONLY), guidance, *tile_rows]
        fields["version"].change(_version_switch(gr, len(hidden)), fields["version"], [fields["task"], *hidden], api_name=False)
    return app


def _version_switch(gr: Any, hidden: int) -> Any:
    """Handler of the Version list: DiffIR fixes the task to sr and hides the `hidden`
    controls it does not read; a DiffBIR version shows them again."""

    def on_version(version: str) -> list:
        diffbir = version != DIFFIR
        task = gr.update(interactive=True) if diffbir else gr.update(value="sr", interactive=False)
        return [task, *(gr.update(visible=diffbir) for _ in range(hidden))]

    return on_version


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


def _guidance_controls(gr: Any, fields: dict[str, Any], d: RunRequest) -> Any:
    with gr.Accordion("Latent image guidance", open=False) as accordion:
        fields["guidance_scale"] = gr.Slider(0, 1, value=d.guidance_scale, step=0.01, label="Guidance scale", info="0: off; pulls the sample toward the stage-1 image")
        with gr.Row():
            fields["guidance_space"] = gr.Radio(["latent", "rgb"], value=d.guidance_space, label="Space")
            fields["guidance_loss"] = gr.Radio(["mse", "weighted_mse"], value=d.guidance_loss, label="Loss")
        with gr.Row():
            fields["guidance_start"] = gr.Number(d.guidance_start, label="Start (t)", precision=0, info="guide while stop < t + 1 < start")
            fields["guidance_stop"] = gr.Number(d.guidance_stop, label="Stop (t)", precision=0)
    return accordion


def _tiling_controls(gr: Any, fields: dict[str, Any], d: RunRequest) -> list[Any]:
    """The tiling controls; returns the VAE and diffusion rows (DiffIR tiles stage 1 only)."""
    rows = []
    with gr.Accordion("Tiling (large images, less memory)", open=False):
        fields["tile_stages"] = gr.CheckboxGroup(list(TILE_STAGES), value=list(d.tile_stages), label="Tiled stages", info="DiffIR: stage 1 tiles its restorer (input pixels)")
        for key, what in (("stage1", "Stage 1"), ("vae", "VAE"), ("diffusion", "Diffusion")):
            with gr.Row() as row:
                fields[f"{key}_tile_size"] = gr.Number(getattr(d, f"{key}_tile_size"), label=f"{what} tile size (px)", precision=0)
                fields[f"{key}_tile_stride"] = gr.Number(getattr(d, f"{key}_tile_stride"), label=f"{what} tile stride (px)", precision=0)
            rows += [row] if key != "stage1" else []
    return rows


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
    p.add_argument("--diffir-ckpt", type=Path, default=None, help="DiffIR weights: our export (.safetensors) or an original .pth (default: DiffIRS2-GAN.pth in --weights-dir)")
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
    if args.diffir_ckpt is not None and not args.diffir_ckpt.is_file():
        print(f"error: --diffir-ckpt {args.diffir_ckpt}: file not found", file=sys.stderr)
        return 2
    checkpoints = {role: getattr(args, f"{role}_ckpt") for role in ROLES}
    config = AppConfig(
        weights_dir=args.weights_dir,
        model_config=args.model_config,
        checkpoints={r: p for r, p in checkpoints.items() if p is not None},
        diffir_ckpt=args.diffir_ckpt,
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
