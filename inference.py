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
import dataclasses
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# Only light modules here: --help must not import torch, diffusers or transformers (the
# registries' names come from model.pipelines.cli_names); each function imports what it runs.
from model.io.images import QUANTIZE_MODES
from model.io.logs import setup_logging
from model.io.weights import DEFAULT_WEIGHTS_DIR, MissingWeightsError
from model.pipelines import cli_names as names
from model.pipelines.presets import (
    CUSTOM,
    DEFAULT_UPSCALE,
    FACE_BACKGROUND,
    TASK_CHOICES,
    VERSION_CHOICES,
    read_model_config,
)
from model.pipelines.weight_paths import task_paths

if TYPE_CHECKING:
    from model.io.folder_jobs import Job, OutputSettings
    from model.pipelines.captioner import Captioner
    from model.pipelines.distributed import Dist
    from model.pipelines.options import PipelineOptions
    from model.pipelines.restorer import Pipeline

logger = logging.getLogger("inference")

OUTPUT_FORMATS = ("png", "jpg", "webp")
METHODS = ("diffbir", "diffir")


class SetupError(Exception):
    """A problem that stops the run before any image is restored (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """Errors in one line (flag, value, reason) instead of the whole usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends each flag's default to its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = action.default in (None, argparse.SUPPRESS) or action.default is False
        if hidden or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)"


def _number(
    kind: type, low: float | None = None, high: float | None = None, above: float | None = None
) -> Callable[[str], float]:
    """An argparse type: a finite `kind` with low <= x <= high and x > above (each optional)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        for bad, rule in (
            (above is not None and value <= above, f"> {above}"),
            (low is not None and value < low, f">= {low}"),
            (high is not None and value > high, f"<= {high}"),
        ):
            if bad:
                raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


_POSITIVE_INT = _number(int, low=1)
_FRACTION = _number(float, low=0, high=1)


# fmt: off
# One line per flag: the parser reads as a table.
def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every flag has help, choices come from the registries."""
    p = _Parser(description=__doc__, formatter_class=_HelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--input", required=True, help="an image, a folder (recursive), a quoted glob, or a .txt/.list file list")
    io.add_argument("--output", type=Path, required=True, help="output folder; relative paths of the inputs are kept")
    io.add_argument("--output-format", choices=OUTPUT_FORMATS, default="png", help="file format of the outputs")
    io.add_argument("--quality", type=_number(int, 1, 100), default=95, help="JPEG/WebP quality (1-100)")
    io.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="bits per sample of the outputs (16: png only)")
    io.add_argument("--batch-size", type=_POSITIVE_INT, default=1, help="images per pipeline call (consecutive images of the same size); face_background: also faces per face-model call")
    io.add_argument("--quantize", choices=QUANTIZE_MODES, default="truncate", help="float -> integer samples: truncate (the original's) or round")
    io.add_argument("--overwrite", action="store_true", help="redo outputs that already exist (default: skip them)")
    io.add_argument("--save-stage1", action="store_true", help="also write the stage-1 image under OUTPUT/stage1/")
    io.add_argument("--stage1-only", action="store_true", help="run stage 1 only (no diffusion weights needed)")
    m = p.add_argument_group("model and weights")
    m.add_argument("--method", choices=METHODS, default="diffbir", help="diffbir, or diffir (DiffIR x4 real-world SR: one fast network, only --task sr; tiles with --stage1-tile-size)")
    m.add_argument("--diffir-ckpt", type=Path, default=None, help="DiffIR weights: our export (.safetensors) or an original .pth (default: DiffIRS2-GAN.pth in --weights-dir)")
    m.add_argument("--diffir-scale", type=int, choices=(1, 2, 4), default=4, help="upscaling factor of an original DiffIR .pth (our exports record theirs)")
    m.add_argument("--task", choices=TASK_CHOICES, default="sr", help="restoration task (face: aligned 512x512 faces; face_background: any image, faces restored by the face model and pasted into the general model's result)")
    m.add_argument("--version", choices=VERSION_CHOICES, default="v2.1", help="DiffBIR release, or custom (needs --model-config and the three checkpoints)")
    m.add_argument("--upscale", type=_number(float, above=0), default=None, help=f"output size / input size (default by task: {DEFAULT_UPSCALE})")
    m.add_argument("--model-config", type=Path, default=None, help="YAML with cldm / swinir / stage1 / diffusion entries (custom or tiny architectures)")
    m.add_argument("--stage1-model", choices=names.STAGE1_MODELS, default=None, help="stage-1 architecture of a custom model (default: model config, else swinir)")
    m.add_argument("--schedule", choices=names.DIFFUSION_PRESETS, default=None, help="diffusion schedule of a custom model (default: model config)")
    m.add_argument("--weights-dir", type=Path, default=DEFAULT_WEIGHTS_DIR, help="folder with the released weight files (downloads go here)")
    m.add_argument("--sd-ckpt", type=Path, default=None, help="Stable Diffusion checkpoint (overrides the version's)")
    m.add_argument("--controlnet-ckpt", type=Path, default=None, help="LAControlNet checkpoint (overrides the version's)")
    m.add_argument("--stage1-ckpt", type=Path, default=None, help="stage-1 checkpoint (overrides the version's)")
    m.add_argument("--offline", action="store_true", help="never download; fail with the list of missing files")
    f = p.add_argument_group("faces (--task face_background)")
    f.add_argument("--face-detector", choices=names.DETECTION_MODELS, default="retinaface_resnet50", help="face detector (weights from --weights-dir)")
    f.add_argument("--no-face-parsing", action="store_true", help="paste faces through a soft square instead of the face-parsing outline")
    f.add_argument("--save-faces", action="store_true", help="also write each restored face (512x512) under OUTPUT/faces/")
    _add_sampling_args(p)
    _add_tiling_args(p)
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"), help="auto: cuda > mps > cpu")
    r.add_argument("--precision", choices=names.PRECISIONS, default="fp16", help="network precision: weights cast, norms in fp32, calls under autocast (fp16 on a CPU runs fp32)")
    r.add_argument("--vae-precision", choices=("auto", "fp32"), default="auto", help="VAE and text encoder: auto = in --precision too (an fp16 VAE that overflows is recomputed in fp32), fp32 = always fp32")
    r.add_argument("--max-memory", type=float, default=None, metavar="GB", help="peak memory budget (GPU allocated / CPU RSS): tile sizes of every stage chosen per image to stay under it (overrides the tile flags)")
    r.add_argument("--keep-weights-resident", action="store_true", help="keep every network's weights in memory between stages (default on a CPU: an idle network's memory-mapped weights go back to the page cache, re-read in about 0.1 s per image)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--verbose", action="store_true", help="log model loading and other details")
    return p


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    d = argparse.Namespace(**names.OPTION_DEFAULTS)
    s = p.add_argument_group("sampling")
    s.add_argument("--sampler", choices=names.SAMPLERS, default=d.sampler, help="sampler (edm_*: the original v2.1 samplers; spaced: the paper's respaced DDPM; others: diffusers schedulers)")
    s.add_argument("--sigma-schedule", choices=names.SIGMA_SCHEDULES, default=d.sigma_schedule, help="original: the original's timestep/sigma rule (edm_* samplers) or trailing timesteps (diffusers samplers); karras / exponential sigmas")
    s.add_argument("--eta", type=_number(float, low=0), default=d.ddim_eta, help="DDIM eta (sampler ddim only)")
    s.add_argument("--ddim-spacing", choices=("original", "trailing"), default=d.ddim_spacing, help="DDIM timesteps: the original's range(0, 1000, 1000 // steps) + 1, or trailing from t = 999")
    s.add_argument("--steps", type=_POSITIVE_INT, default=d.steps, help="sampling steps")
    s.add_argument("--start", choices=("noise", "cond"), default=d.start, help="start from noise or from the diffused condition latent")
    s.add_argument("--noise-aug", type=_number(int, 0, 999), default=d.noise_aug, help="diffuse the condition latent to this timestep (0: off)")
    s.add_argument("--cfg-scale", type=_number(float), default=d.cfg_scale, help="classifier-free guidance scale (1: off)")
    s.add_argument("--rescale-cfg", action="store_true", help="ramp the guidance scale from 1 to 1 + cfg-scale")
    s.add_argument("--cfg-separate", action="store_true", help="run the two guidance branches as two calls (less memory)")
    s.add_argument("--pos-prompt", default=d.pos_prompt, help="positive prompt")
    s.add_argument("--neg-prompt", default=d.neg_prompt, help="negative prompt")
    s.add_argument("--captioner", choices=names.CAPTIONERS, default="none", help="caption each image and use it as the positive prompt (joined with --pos-prompt); a file list's caption takes precedence")
    s.add_argument("--captioner-model", default=None, help="local folder or hub id of the captioner model (default: the registry's, looked for under --weights-dir)")
    s.add_argument("--tile-captions", action="store_true", help="under tiled diffusion, apply the caption to every tile (the original's behaviour; off: tiles get --pos-prompt only)")
    s.add_argument("--control-strength", "--strength", dest="control_strength", type=_number(float, low=0), default=d.control_strength, help="control strength, multiplies every control scale (less: more creative)")
    s.add_argument("--control-scales", type=_float_list, default=None, help="comma-separated scale per LAControlNet residual (13 for SD 2.1), times --control-strength")
    s.add_argument("--control-start", type=_FRACTION, default=d.control_start, help="fraction of the steps after which the LAControlNet starts steering")
    s.add_argument("--control-end", type=_FRACTION, default=d.control_end, help="fraction of the steps after which the frozen UNet runs alone")
    s.add_argument("--seed", type=_number(int, low=0), default=d.seed, help="seed of every image (recorded in the sidecar)")
    s.add_argument("--color-fix", choices=names.COLOR_FIX_MODES, default=d.color_fix, help="colour correction against the stage-1 image")
    s.add_argument("--resize-backend", choices=names.RESIZES, default=d.resize_backend, help="resize of the LQ by the upscale factor: pil (bicubic on 8 bits, the original's) or torch (bicubic + antialias on floats)")
    s.add_argument("--min-short-side", type=_POSITIVE_INT, default=d.min_short_side, help="process images with a shorter short side at this size")
    g = p.add_argument_group("latent image guidance")
    g.add_argument("--guidance", action="store_true", help="pull the sample toward the stage-1 image")
    g.add_argument("--g-loss", choices=names.GUIDANCE_LOSSES, default="weighted_mse", help="guidance loss")
    g.add_argument("--g-scale", type=_number(float), default=0.0, help="guidance scale")
    g.add_argument("--g-start", type=_number(int), default=1001, help="guide while g-stop < t + 1 < g-start")
    g.add_argument("--g-stop", type=_number(int), default=-1, help="see --g-start")
    g.add_argument("--g-space", choices=names.GUIDANCE_SPACES, default="latent", help="compare in latent or RGB space")
    g.add_argument("--g-repeat", type=_POSITIVE_INT, default=1, help="gradient steps per guided timestep")


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_tiling_args(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("tiling (bounded memory; sizes and strides in image pixels)")
    t.add_argument("--tiled", action="store_true", help=f"tile every stage with the original's sizes {names.TILED_DEFAULTS}")
    for stage, what in (("stage1", "stage-1 input"), ("vae-encoder", "VAE encoder"), ("vae-decoder", "VAE decoder"), ("diffusion", "diffusion")):
        t.add_argument(f"--{stage}-tile-size", type=_POSITIVE_INT, default=None, help=f"{what} tile size")
        t.add_argument(f"--{stage}-tile-stride", type=_POSITIVE_INT, default=None, help=f"{what} tile stride (default half a tile)")
    t.add_argument("--tile-weights", choices=names.TILE_WEIGHTS, default=names.OPTION_DEFAULTS["tile_weights"], help="Gaussian weights of the diffusion tiles: symmetric, or the original's (half a pixel off-centre in y)")
    t.add_argument("--diffusion-tile-batch", type=_POSITIVE_INT, default=names.OPTION_DEFAULTS["diffusion_tile_batch_size"], help="diffusion tiles per network call")
# fmt: on


def options_from_args(args: argparse.Namespace) -> PipelineOptions:
    """PipelineOptions from parsed arguments."""
    from model.diffusion.latent_guidance import LatentGuidance
    from model.pipelines.options import PipelineOptions, tile_fields

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
        diffusion_tile_batch_size=args.diffusion_tile_batch, tile_weights=args.tile_weights,
        tile_captions=args.tile_captions, max_memory_gb=args.max_memory, **tiles,
    )  # fmt: skip


def output_settings(args: argparse.Namespace) -> OutputSettings:
    """OutputSettings from parsed arguments."""
    from model.io.folder_jobs import OutputSettings

    return OutputSettings(args.output, args.output_format, args.quality, args.bit_depth,
                          args.quantize, args.save_stage1, args.save_faces)  # fmt: skip


def build(args: argparse.Namespace) -> Pipeline:
    """The pipeline of the arguments (`model.pipelines.loading.load_pretrained_task`)."""
    if args.method == "diffir":
        from model.diffir.pipeline import DiffIRPipeline

        weights = args.diffir_ckpt or args.weights_dir
        return DiffIRPipeline.from_pretrained(weights, args.device, args.diffir_scale, offline=True)
    config = read_model_config(args.model_config) if args.model_config else {}
    if args.version == CUSTOM:
        if args.stage1_model:
            config["stage1"] = args.stage1_model
        if args.schedule:
            config["diffusion"] = args.schedule
    elif args.stage1_model or args.schedule:
        raise SetupError("--stage1-model and --schedule are for --version custom")
    from model.pipelines.loading import load_pretrained_task

    return load_pretrained_task(
        args.version, args.task, weights_dir=args.weights_dir, device=args.device,
        dtype=args.precision, vae_precision=args.vae_precision, checkpoints=checkpoints(args),
        model_config=config,
        stage1_only=args.stage1_only, offline=args.offline, face_detector=args.face_detector,
        face_parsing=not args.no_face_parsing, face_batch_size=args.batch_size,
    )  # fmt: skip


def checkpoints(args: argparse.Namespace) -> dict[str, Path | None]:
    """The explicit weight files by role (--stage1-ckpt, --sd-ckpt, --controlnet-ckpt)."""
    return {"stage1": args.stage1_ckpt, "sd": args.sd_ckpt, "controlnet": args.controlnet_ckpt}


def find_weights(args: argparse.Namespace) -> None:
    """Find (or fetch) every weight file of the run before the networks are imported, so that
    a missing file or an unreachable hub fails in seconds (`model.pipelines.weight_paths`)."""
    if args.version == CUSTOM and args.task == FACE_BACKGROUND:
        raise SetupError(f"--task {FACE_BACKGROUND} needs a released --version (its face model)")
    if args.method == "diffir":
        from model.diffir.pipeline import DEFAULT_WEIGHTS
        from model.io.weights import resolve_weights

        if args.diffir_ckpt is None:
            resolve_weights([DEFAULT_WEIGHTS], [args.weights_dir], download=not args.offline)
        elif not args.diffir_ckpt.is_file():
            raise SetupError(f"--diffir-ckpt {args.diffir_ckpt}: file not found")
        return
    task_paths(args.version, args.task, checkpoints=checkpoints(args),
               weights_dir=args.weights_dir, offline=args.offline, stage1_only=args.stage1_only,
               face_detector=args.face_detector, face_parsing=not args.no_face_parsing)  # fmt: skip


def load_run_captioner(args: argparse.Namespace) -> Captioner | None:
    """The --captioner model on the run's device (fp32 on a CPU), or None."""
    from model.ops.device import PRECISIONS, resolve_device
    from model.pipelines.captioner import load_captioner

    if args.captioner == "none" or args.stage1_only:
        return None
    device = resolve_device(args.device)
    dtype = PRECISIONS[args.precision if device.type == "cuda" else "fp32"]
    return load_captioner(args.captioner, args.captioner_model, args.weights_dir, str(device),
                          dtype, args.offline)  # fmt: skip


# arguments that say where files are and how the run executes, not what an output looks like
RUNTIME_ARGS = ("input", "output", "overwrite", "batch_size", "device", "weights_dir", "offline",
                "keep_weights_resident", "no_progress", "verbose")  # fmt: skip


def run_parameters(args: argparse.Namespace, options: PipelineOptions) -> dict:
    """What makes an output what it is; a rerun skips a finished output only when its sidecar
    holds the same (the options, and every argument but `RUNTIME_ARGS`)."""
    kept = {k: v for k, v in vars(args).items() if k not in RUNTIME_ARGS}
    return {"options": dataclasses.asdict(options), "arguments": kept}


def release_text_encoder(pipeline: Pipeline, options: PipelineOptions, jobs: list[Job]) -> None:
    """Without per-image captions a run has one or two prompts: encode them once and free the
    text encoder (about 1.4 GB in fp32) before restoring."""
    from model.pipelines.diffbir import DiffBIRPipeline

    if not isinstance(pipeline, DiffBIRPipeline) or not pipeline.has_diffusion:
        return
    if any(job.caption for job in jobs):
        return
    from model.pipelines.prompts import run_prompts

    pipeline.release_text_encoder(
        run_prompts(options.pos_prompt, options.neg_prompt, options.cfg_scale)
    )


def keep_weights_resident(pipeline: Pipeline) -> None:
    """--keep-weights-resident: no network hands its weight pages back when idle."""
    from model.pipelines.diffbir import DiffBIRPipeline
    from model.pipelines.face_background import FaceBackgroundPipeline

    parts = [pipeline]
    if isinstance(pipeline, FaceBackgroundPipeline):
        parts = [pipeline.background, pipeline.face]
    for part in parts:
        if isinstance(part, DiffBIRPipeline):
            part.page_idle_weights = False


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, build, restore; returns the exit code (0 ok, 1 some failed, 2 not started).
    Under torchrun every process runs this, sharing the jobs (`model.pipelines.folder_run`);
    rank 0 prints the summary of all of them and every process returns its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bit_depth == 16 and args.output_format != "png":
        parser.error("--bit-depth 16 needs --output-format png")
    if args.save_faces and args.task != FACE_BACKGROUND:
        parser.error(f"--save-faces needs --task {FACE_BACKGROUND}")
    if args.method == "diffir" and (args.task != "sr" or args.stage1_only):
        parser.error("--method diffir restores --task sr only (and has no --stage1-only)")
    setup_logging(logging.INFO if args.verbose else logging.WARNING)
    from model.pipelines.distributed import from_env, shutdown

    dist = from_env()
    try:
        return _run(args, dist)
    finally:
        shutdown(dist)


def _run(args: argparse.Namespace, dist: Dist) -> int:
    from model.io.checkpoint import WeightFileError
    from model.io.folder_jobs import check_writable, collect_inputs, make_jobs, triage
    from model.pipelines.captioner import CaptionerError, caption_jobs
    from model.pipelines.distributed import all_gather, device_for, run_id

    settings, pipeline, captioner, error = output_settings(args), None, None, None
    try:
        files, root, captions = collect_inputs(args.input, args.output)
        jobs = make_jobs(files, root, settings, captions)
        check_writable(args.output)
        if args.overwrite or not all(job.done() for job in jobs):
            find_weights(args)
        options = options_from_args(args)
        parameters = run_parameters(args, options)
        todo, skipped, skipped_other = triage(jobs, parameters, args.overwrite)
        if todo:
            args.device = device_for(args.device, dist)
            captioner = load_run_captioner(args)
            pipeline = build(args)
            if args.keep_weights_resident:
                keep_weights_resident(pipeline)
            if captioner is None:  # the prompts are known: free the text encoder before the check
                release_text_encoder(pipeline, options, todo)
            if args.max_memory is not None:
                from model.pipelines.memory_plan import check_budget

                check_budget(args.max_memory, pipeline.stage_resident_bytes())
    # ValueError covers model.io.folder_jobs.InputError (no inputs, output over an input)
    except (SetupError, MissingWeightsError, WeightFileError, CaptionerError, ValueError,
            OSError) as exc:  # fmt: skip
        error = f"error: {exc}"
    errors = [e for e in dict.fromkeys(all_gather(dist, error)) if e]
    if errors:
        if dist.is_main:
            print("\n".join(errors), file=sys.stderr)
        return 2
    from model.io.claims import Claims
    from model.pipelines.folder_run import Counts, FolderRunner, finish, run_record

    if captioner is not None:
        todo = caption_jobs(todo, captioner, not args.no_progress and dist.is_main, dist)
        del captioner  # freed before the restoration
    claims, counts = Claims(run_id(dist), dist.rank, dist.world_size), Counts()
    if pipeline is not None:
        config = None if args.model_config is None else str(args.model_config)
        version = args.version if args.method == "diffbir" else "diffir"
        record = run_record(pipeline, options, version, args.task, vars(args), parameters,
                            config, args.stage1_only)  # fmt: skip
        record["captioner"] = args.captioner
        release_text_encoder(pipeline, options, todo)
        runner = FolderRunner(pipeline, options, record, settings, claims, args.batch_size,
                              args.overwrite, progress=not args.no_progress and dist.is_main)  # fmt: skip
        counts = runner.run(todo)
    summary = finish(dist, claims, counts, jobs, skipped, skipped_other)
    if dist.is_main:
        print("\n".join(summary.lines(args.output)), file=sys.stderr)
    return summary.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
