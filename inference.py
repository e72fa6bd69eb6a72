"""Restore a file, a folder (recursive), a glob or a file list with DiffBIR.

    python inference.py --input photos/ --output restored/ --task sr --upscale 4
    python inference.py --input "scans/**/*.tif" --output out/ --task denoise --tiled
    python inference.py --input faces.txt --output out/ --task face --version v1
    python inference.py --input group_photos/ --output out/ --task face_background --save-faces
    python inference.py --input lq/ --output stage1/ --stage1-only

The output folder mirrors the input's relative paths. A file list may give a caption after a
tab on each line; it is prepended to the positive prompt of that image. Each output gets a
JSON sidecar (`<output>.json`) with every parameter and the seed; finished outputs are skipped
on a rerun (--overwrite redoes them). An unreadable image is reported and skipped; the exit
code is 0 when everything was restored, 1 when some images failed, 2 when nothing could start
(bad arguments, missing weights, no inputs). Argument parsing and wiring live here; file
walking, decoding and saving are `model.io.folder_jobs`, the restoration itself is
`model.pipelines.restorer.make_restorer` over `model.pipelines.diffbir.DiffBIRPipeline` (and
`model.pipelines.face_background.FaceBackgroundPipeline` for --task face_background).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_args, get_type_hints

from model.diffusion.latent_guidance import LatentGuidance
from model.diffusion.samplers import SAMPLERS
from model.diffusion.schedule import DIFFUSION_PRESETS
from model.io.checkpoint import WeightFileError
from model.io.folder_jobs import (
    OutputSettings,
    collect_inputs,
    make_jobs,
)
from model.io.images import QUANTIZE_MODES
from model.io.logs import setup_logging
from model.io.weights import DEFAULT_WEIGHTS_DIR, MissingWeightsError
from model.nets.stage1 import STAGE1_MODELS
from model.ops.color_fix import COLOR_FIX_MODES
from model.ops.device import PRECISIONS
from model.ops.sizing import RESIZES
from model.ops.tiling import TILE_WEIGHTS
from model.pipelines.faces import DETECTION_MODELS
from model.pipelines.folder_run import FolderRunner, run_record
from model.pipelines.loading import load_pretrained_task
from model.pipelines.options import SIGMA_SCHEDULES, TILED_DEFAULTS, PipelineOptions, tile_fields
from model.pipelines.presets import (
    CUSTOM,
    DEFAULT_UPSCALE,
    FACE_BACKGROUND,
    TASK_CHOICES,
    VERSION_CHOICES,
    read_model_config,
)
from model.pipelines.restorer import Pipeline

logger = logging.getLogger("inference")

OUTPUT_FORMATS = ("png", "jpg", "webp")
_GUIDANCE = get_type_hints(LatentGuidance)


class SetupError(Exception):
    """A problem that stops the run before any image is restored (exit code 2)."""


# fmt: off
# One line per flag: the parser reads as a table.
def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every flag has help, choices come from the registries."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--input", required=True, help="an image, a folder (recursive), a quoted glob, or a .txt/.list file list")
    io.add_argument("--output", type=Path, required=True, help="output folder; relative paths of the inputs are kept")
    io.add_argument("--output-format", choices=OUTPUT_FORMATS, default="png", help="file format of the outputs")
    io.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (1-100)")
    io.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="bits per sample of the outputs (16: png only)")
    io.add_argument("--batch-size", type=int, default=1, help="images per pipeline call (consecutive images of the same size); face_background: also faces per face-model call")
    io.add_argument("--quantize", choices=QUANTIZE_MODES, default="truncate", help="float -> integer samples: truncate (the original's) or round")
    io.add_argument("--overwrite", action="store_true", help="redo outputs that already exist (default: skip them)")
    io.add_argument("--save-stage1", action="store_true", help="also write the stage-1 image under OUTPUT/stage1/")
    io.add_argument("--stage1-only", action="store_true", help="run stage 1 only (no diffusion weights needed)")
    m = p.add_argument_group("model and weights")
    m.add_argument("--task", choices=TASK_CHOICES, default="sr", help="restoration task (face: aligned 512x512 faces; face_background: any image, faces restored by the face model and pasted into the general model's result)")
    m.add_argument("--version", choices=VERSION_CHOICES, default="v2.1", help="DiffBIR release, or custom (needs --model-config and the three checkpoints)")
    m.add_argument("--upscale", type=float, default=None, help=f"output size / input size (default by task: {DEFAULT_UPSCALE})")
    m.add_argument("--model-config", type=Path, default=None, help="YAML with cldm / swinir / stage1 / diffusion entries (custom or tiny architectures)")
    m.add_argument("--stage1-model", choices=tuple(STAGE1_MODELS), default=None, help="stage-1 architecture of a custom model (default: model config, else swinir)")
    m.add_argument("--schedule", choices=tuple(DIFFUSION_PRESETS), default=None, help="diffusion schedule of a custom model (default: model config)")
    m.add_argument("--weights-dir", type=Path, default=DEFAULT_WEIGHTS_DIR, help="folder with the released weight files (downloads go here)")
    m.add_argument("--sd-ckpt", type=Path, default=None, help="Stable Diffusion checkpoint (overrides the version's)")
    m.add_argument("--controlnet-ckpt", type=Path, default=None, help="LAControlNet checkpoint (overrides the version's)")
    m.add_argument("--stage1-ckpt", type=Path, default=None, help="stage-1 checkpoint (overrides the version's)")
    m.add_argument("--offline", action="store_true", help="never download; fail with the list of missing files")
    f = p.add_argument_group("faces (--task face_background)")
    f.add_argument("--face-detector", choices=tuple(DETECTION_MODELS), default="retinaface_resnet50", help="face detector (weights from --weights-dir)")
    f.add_argument("--no-face-parsing", action="store_true", help="paste faces through a soft square instead of the face-parsing outline")
    f.add_argument("--save-faces", action="store_true", help="also write each restored face (512x512) under OUTPUT/faces/")
    _add_sampling_args(p)
    _add_tiling_args(p)
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"), help="auto: cuda > mps > cpu")
    r.add_argument("--precision", choices=tuple(PRECISIONS), default="fp16", help="network precision (VAE and text encoder stay fp32; fp16 on a CPU runs fp32)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--verbose", action="store_true", help="log model loading and other details")
    return p


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    d = PipelineOptions()
    s = p.add_argument_group("sampling")
    s.add_argument("--sampler", choices=tuple(SAMPLERS), default=d.sampler, help="sampler (edm_*: the original v2.1 samplers; spaced: the paper's respaced DDPM; others: diffusers schedulers)")
    s.add_argument("--sigma-schedule", choices=SIGMA_SCHEDULES, default=d.sigma_schedule, help="original: the original's timestep/sigma rule (edm_* samplers) or trailing timesteps (diffusers samplers); karras / exponential sigmas")
    s.add_argument("--eta", type=float, default=d.ddim_eta, help="DDIM eta (sampler ddim only)")
    s.add_argument("--ddim-spacing", choices=("original", "trailing"), default=d.ddim_spacing, help="DDIM timesteps: the original's range(0, 1000, 1000 // steps) + 1, or trailing from t = 999")
    s.add_argument("--steps", type=int, default=d.steps, help="sampling steps")
    s.add_argument("--start", choices=("noise", "cond"), default=d.start, help="start from noise or from the diffused condition latent")
    s.add_argument("--noise-aug", type=int, default=d.noise_aug, help="diffuse the condition latent to this timestep (0: off)")
    s.add_argument("--cfg-scale", type=float, default=d.cfg_scale, help="classifier-free guidance scale (1: off)")
    s.add_argument("--rescale-cfg", action="store_true", help="ramp the guidance scale from 1 to 1 + cfg-scale")
    s.add_argument("--cfg-separate", action="store_true", help="run the two guidance branches as two calls (less memory)")
    s.add_argument("--pos-prompt", default=d.pos_prompt, help="positive prompt")
    s.add_argument("--neg-prompt", default=d.neg_prompt, help="negative prompt")
    s.add_argument("--control-strength", "--strength", dest="control_strength", type=float, default=d.control_strength, help="control strength, multiplies every control scale (less: more creative)")
    s.add_argument("--control-scales", type=_float_list, default=None, help="comma-separated scale per LAControlNet residual (13 for SD 2.1), times --control-strength")
    s.add_argument("--control-start", type=float, default=d.control_start, help="fraction of the steps after which the LAControlNet starts steering")
    s.add_argument("--control-end", type=float, default=d.control_end, help="fraction of the steps after which the frozen UNet runs alone")
    s.add_argument("--seed", type=int, default=d.seed, help="seed of every image (recorded in the sidecar)")
    s.add_argument("--color-fix", choices=COLOR_FIX_MODES, default=d.color_fix, help="colour correction against the stage-1 image")
    s.add_argument("--resize-backend", choices=tuple(RESIZES), default=d.resize_backend, help="resize of the LQ by the upscale factor: pil (bicubic on 8 bits, the original's) or torch (bicubic + antialias on floats)")
    s.add_argument("--min-short-side", type=int, default=d.min_short_side, help="process images with a shorter short side at this size")
    g = p.add_argument_group("latent image guidance")
    g.add_argument("--guidance", action="store_true", help="pull the sample toward the stage-1 image")
    g.add_argument("--g-loss", choices=get_args(_GUIDANCE["loss"]), default="weighted_mse", help="guidance loss")
    g.add_argument("--g-scale", type=float, default=0.0, help="guidance scale")
    g.add_argument("--g-start", type=int, default=1001, help="guide while g-stop < t + 1 < g-start")
    g.add_argument("--g-stop", type=int, default=-1, help="see --g-start")
    g.add_argument("--g-space", choices=get_args(_GUIDANCE["space"]), default="latent", help="compare in latent or RGB space")
    g.add_argument("--g-repeat", type=int, default=1, help="gradient steps per guided timestep")


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_tiling_args(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("tiling (bounded memory; sizes and strides in image pixels)")
    t.add_argument("--tiled", action="store_true", help=f"tile every stage with the original's sizes {TILED_DEFAULTS}")
    for stage, what in (("stage1", "stage-1 input"), ("vae-encoder", "VAE encoder"), ("vae-decoder", "VAE decoder"), ("diffusion", "diffusion")):
        t.add_argument(f"--{stage}-tile-size", type=int, default=None, help=f"{what} tile size")
        t.add_argument(f"--{stage}-tile-stride", type=int, default=None, help=f"{what} tile stride (default half a tile)")
    t.add_argument("--tile-weights", choices=TILE_WEIGHTS, default="symmetric", help="Gaussian weights of the diffusion tiles: symmetric, or the original's (half a pixel off-centre in y)")
    t.add_argument("--diffusion-tile-batch", type=int, default=1, help="diffusion tiles per network call")
# fmt: on


def options_from_args(args: argparse.Namespace) -> PipelineOptions:
    """PipelineOptions from parsed arguments."""
    tiles = tile_fields(args.tiled, **{k: v for k, v in vars(args).items() if "_tile_s" in k})
    guidance = None
    if args.guidance:
        guidance = LatentGuidance(args.g_scale, args.g_start, args.g_stop, args.g_space,
                                  args.g_loss, args.g_repeat)  # fmt: skip
    return PipelineOptions(
        upscale=args.upscale if args.upscale is not None else DEFAULT_UPSCALE[args.task],
        min_short_side=args.min_short_side, resize_backend=args.resize_backend, sampler=args.sampler, sigma_schedule=args.sigma_schedule,
        ddim_eta=args.eta, ddim_spacing=args.ddim_spacing, steps=args.steps, start=args.start, noise_aug=args.noise_aug,
        cfg_scale=args.cfg_scale, rescale_cfg=args.rescale_cfg, cfg_batched=not args.cfg_separate,
        pos_prompt=args.pos_prompt, neg_prompt=args.neg_prompt, control_strength=args.control_strength,
        control_scales=args.control_scales, control_start=args.control_start,
        control_end=args.control_end,
        guidance=guidance, color_fix=args.color_fix, seed=args.seed,
        diffusion_tile_batch_size=args.diffusion_tile_batch, tile_weights=args.tile_weights, **tiles,
    )  # fmt: skip


def output_settings(args: argparse.Namespace) -> OutputSettings:
    """OutputSettings from parsed arguments."""
    return OutputSettings(args.output, args.output_format, args.quality, args.bit_depth,
                          args.quantize, args.save_stage1, args.save_faces)  # fmt: skip


def build(args: argparse.Namespace) -> Pipeline:
    """The pipeline of the arguments (`model.pipelines.loading.load_pretrained_task`)."""
    config = read_model_config(args.model_config) if args.model_config else {}
    if args.version == CUSTOM:
        if args.stage1_model:
            config["stage1"] = args.stage1_model
        if args.schedule:
            config["diffusion"] = args.schedule
    elif args.stage1_model or args.schedule:
        raise SetupError("--stage1-model and --schedule are for --version custom")
    if args.version == CUSTOM and args.task == FACE_BACKGROUND:
        raise SetupError(f"--task {FACE_BACKGROUND} needs a released --version (its face model)")
    checkpoints = {
        "stage1": args.stage1_ckpt,
        "sd": args.sd_ckpt,
        "controlnet": args.controlnet_ckpt,
    }
    return load_pretrained_task(
        args.version, args.task, weights_dir=args.weights_dir, device=args.device,
        dtype=args.precision, checkpoints=checkpoints, model_config=config,
        stage1_only=args.stage1_only, offline=args.offline, face_detector=args.face_detector,
        face_parsing=not args.no_face_parsing, face_batch_size=args.batch_size,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, build, restore; returns the exit code (0 ok, 1 some failed, 2 not started)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bit_depth == 16 and args.output_format != "png":
        parser.error("--bit-depth 16 needs --output-format png")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.save_faces and args.task != FACE_BACKGROUND:
        parser.error(f"--save-faces needs --task {FACE_BACKGROUND}")
    setup_logging(logging.INFO if args.verbose else logging.WARNING)
    try:
        options = options_from_args(args)
        files, root, captions = collect_inputs(args.input, args.output)
        jobs = make_jobs(files, root, output_settings(args), captions)
        todo = [job for job in jobs if args.overwrite or not job.done()]
        if todo:
            pipeline = build(args)
    # ValueError covers model.io.folder_jobs.InputError (no inputs, output over an input)
    except (SetupError, MissingWeightsError, WeightFileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    skipped = len(jobs) - len(todo)
    runner = None
    if todo:
        config = None if args.model_config is None else str(args.model_config)
        record = run_record(pipeline, options, args.version, args.task, vars(args), config,
                            args.stage1_only)  # fmt: skip
        runner = FolderRunner(pipeline, options, record, output_settings(args),
                              args.batch_size, progress=not args.no_progress)  # fmt: skip
        runner.run(todo)
    restored, failed = (runner.restored, runner.failed) if runner else (0, [])
    print(f"done: {restored} restored, {skipped} skipped (already done), {len(failed)} failed "
          f"-> {args.output}", file=sys.stderr)  # fmt: skip
    for message in failed:
        print(f"  failed: {message}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
