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
walking, decoding and saving are `dataset.image_folder`, the restoration itself is
`model.restorer.make_restorer` over `model.pipeline.DiffBIRPipeline` (and
`model.face_background.FaceBackgroundPipeline` for --task face_background).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, get_args, get_type_hints

import numpy as np
import torch
from tqdm.auto import tqdm

from dataset.image_folder import (
    Job,
    OutputSettings,
    collect_inputs,
    load_image,
    make_jobs,
    save_job,
)
from dataset.image_io import DecodedImage, ImageReadError
from model.checkpoint_io import WeightFileError
from model.color_fix import COLOR_FIX_MODES
from model.diffusion import DIFFUSION_PRESETS
from model.face import DETECTION_MODELS, FaceHelper, load_face_detector, load_face_parser
from model.face_background import FaceBackgroundPipeline
from model.pipeline import PRECISIONS, PipelineOptions
from model.restorer import Pipeline, batch_by_size, make_restorer, resize_alpha
from model.sampling.latent_guidance import LatentGuidance
from model.sampling.schedulers import SAMPLERS
from model.stage1_models import STAGE1_MODELS
from model.versions import (
    CUSTOM,
    DEFAULT_UPSCALE,
    FACE_BACKGROUND,
    ROLES,
    TASK_CHOICES,
    VERSION_CHOICES,
    flow_specs,
    load_pipeline,
    load_pipelines,
    model_spec,
    read_model_config,
)
from model.weights import DEFAULT_WEIGHTS_DIR, MissingWeightsError, resolve_weights

logger = logging.getLogger("inference")

OUTPUT_FORMATS = ("png", "jpg", "webp")
# --tiled: the original CLI's tile sizes (stage 1 and diffusion 512/256, VAE 256).
TILED_DEFAULTS = {"stage1_tile_size": 512, "vae_encoder_tile_size": 256,
                  "vae_decoder_tile_size": 256, "diffusion_tile_size": 512}  # fmt: skip
OOM_HINT = (
    "out of memory; use --tiled, or smaller --stage1-tile-size / --vae-encoder-tile-size / "
    "--vae-decoder-tile-size / --diffusion-tile-size, --batch-size 1, or --precision fp16"
)
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
    s.add_argument("--sampler", choices=tuple(SAMPLERS), default=d.sampler, help="sampler (dpm++_3m_sde + Karras = the original's edm_dpm++_3m_sde)")
    s.add_argument("--no-karras", action="store_true", help="plain sigmas instead of Karras sigmas")
    s.add_argument("--eta", type=float, default=d.ddim_eta, help="DDIM eta (sampler ddim only)")
    s.add_argument("--steps", type=int, default=d.steps, help="sampling steps")
    s.add_argument("--start", choices=("noise", "cond"), default=d.start, help="start from noise or from the diffused condition latent")
    s.add_argument("--noise-aug", type=int, default=d.noise_aug, help="diffuse the condition latent to this timestep (0: off)")
    s.add_argument("--cfg-scale", type=float, default=d.cfg_scale, help="classifier-free guidance scale (1: off)")
    s.add_argument("--rescale-cfg", action="store_true", help="ramp the guidance scale from 1 to 1 + cfg-scale")
    s.add_argument("--cfg-separate", action="store_true", help="run the two guidance branches as two calls (less memory)")
    s.add_argument("--pos-prompt", default=d.pos_prompt, help="positive prompt")
    s.add_argument("--neg-prompt", default=d.neg_prompt, help="negative prompt")
    s.add_argument("--strength", type=float, default=d.strength, help="control strength (less: more creative)")
    s.add_argument("--seed", type=int, default=d.seed, help="seed of every image (recorded in the sidecar)")
    s.add_argument("--color-fix", choices=COLOR_FIX_MODES, default=d.color_fix, help="colour correction against the stage-1 image")
    s.add_argument("--min-short-side", type=int, default=d.min_short_side, help="process images with a shorter short side at this size")
    g = p.add_argument_group("latent image guidance")
    g.add_argument("--guidance", action="store_true", help="pull the sample toward the stage-1 image")
    g.add_argument("--g-loss", choices=get_args(_GUIDANCE["loss"]), default="weighted_mse", help="guidance loss")
    g.add_argument("--g-scale", type=float, default=0.0, help="guidance scale")
    g.add_argument("--g-start", type=int, default=1001, help="guide while g-stop < t + 1 < g-start")
    g.add_argument("--g-stop", type=int, default=-1, help="see --g-start")
    g.add_argument("--g-space", choices=get_args(_GUIDANCE["space"]), default="latent", help="compare in latent or RGB space")
    g.add_argument("--g-repeat", type=int, default=1, help="gradient steps per guided timestep")


def _add_tiling_args(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("tiling (bounded memory; sizes and strides in image pixels)")
    t.add_argument("--tiled", action="store_true", help=f"tile every stage with the original's sizes {TILED_DEFAULTS}")
    for stage, what in (("stage1", "stage-1 input"), ("vae-encoder", "VAE encoder"), ("vae-decoder", "VAE decoder"), ("diffusion", "diffusion")):
        t.add_argument(f"--{stage}-tile-size", type=int, default=None, help=f"{what} tile size")
        t.add_argument(f"--{stage}-tile-stride", type=int, default=None, help=f"{what} tile stride (default half a tile)")
    t.add_argument("--diffusion-tile-batch", type=int, default=1, help="diffusion tiles per network call")
# fmt: on


def options_from_args(args: argparse.Namespace) -> PipelineOptions:
    """PipelineOptions from parsed arguments."""
    tiles = {}
    for stage in ("stage1", "vae_encoder", "vae_decoder", "diffusion"):
        size = getattr(args, f"{stage}_tile_size")
        if size is None and args.tiled:
            size = TILED_DEFAULTS[f"{stage}_tile_size"]
        tiles[f"{stage}_tile_size"] = size
        tiles[f"{stage}_tile_stride"] = getattr(args, f"{stage}_tile_stride")
    guidance = None
    if args.guidance:
        guidance = LatentGuidance(args.g_scale, args.g_start, args.g_stop, args.g_space,
                                  args.g_loss, args.g_repeat)  # fmt: skip
    return PipelineOptions(
        upscale=args.upscale if args.upscale is not None else DEFAULT_UPSCALE[args.task],
        min_short_side=args.min_short_side, sampler=args.sampler, karras_sigmas=not args.no_karras,
        ddim_eta=args.eta, steps=args.steps, start=args.start, noise_aug=args.noise_aug,
        cfg_scale=args.cfg_scale, rescale_cfg=args.rescale_cfg, cfg_batched=not args.cfg_separate,
        pos_prompt=args.pos_prompt, neg_prompt=args.neg_prompt, strength=args.strength,
        guidance=guidance, color_fix=args.color_fix, seed=args.seed,
        diffusion_tile_batch_size=args.diffusion_tile_batch, **tiles,
    )  # fmt: skip


def output_settings(args: argparse.Namespace) -> OutputSettings:
    """OutputSettings from parsed arguments."""
    return OutputSettings(args.output, args.output_format, args.quality, args.bit_depth,
                          args.save_stage1, args.save_faces)  # fmt: skip


def weight_paths(
    args: argparse.Namespace, weights: dict[str, str], extra: dict[str, str] | None = None
) -> dict[str, Path]:
    """Weight files by role: explicit flags first, then the registry (maybe downloading).

    `weights` are the registry names of the ROLES; `extra` more roles and registry names
    (no flags), found in the same search so that one error lists every missing file.
    """
    roles = ("stage1",) if args.stage1_only else ROLES
    flags = {"stage1": "--stage1-ckpt", "sd": "--sd-ckpt", "controlnet": "--controlnet-ckpt"}
    explicit = {r: getattr(args, flags[r][2:].replace("-", "_")) for r in roles}
    paths = {r: p for r, p in explicit.items() if p is not None}
    for role, path in paths.items():
        if not path.is_file():
            raise MissingWeightsError(f"{path}: weight file not found (given by {flags[role]})")
    needed = {r: weights[r] for r in roles if r not in paths and r in weights}
    needed.update(extra or {})
    missing = [flags[r] for r in roles if r not in paths and r not in weights]
    if missing:
        raise MissingWeightsError(
            f"a custom model needs its weight files: pass {', '.join(missing)}"
        )
    names = list(dict.fromkeys(needed.values()))
    found = resolve_weights(names, [args.weights_dir], download=not args.offline)
    return {**paths, **{r: found[name] for r, name in needed.items()}}


def build(args: argparse.Namespace) -> tuple[Pipeline, dict[str, Path]]:
    """The pipeline and the weight paths it was loaded from."""
    config = read_model_config(args.model_config) if args.model_config else {}
    if args.version == CUSTOM:
        if args.stage1_model:
            config["stage1"] = args.stage1_model
        if args.schedule:
            config["diffusion"] = args.schedule
    elif args.stage1_model or args.schedule:
        raise SetupError("--stage1-model and --schedule are for --version custom")
    if args.task == FACE_BACKGROUND:
        return build_face_background(args, config)
    spec = model_spec(args.version, args.task, config)
    paths = weight_paths(args, dict(spec.weights))
    return load_pipeline(spec, paths, args.device, args.precision), paths


def build_face_background(
    args: argparse.Namespace, config: dict[str, Any]
) -> tuple[FaceBackgroundPipeline, dict[str, Path]]:
    """The background pipeline (the --*-ckpt flags apply to it; the face model shares its SD
    file), the face pipeline (the version's face weights) and the face detector / parser."""
    if args.version == CUSTOM:
        raise SetupError(f"--task {FACE_BACKGROUND} needs a released --version (its face model)")
    specs = flow_specs(args.version, FACE_BACKGROUND, config)
    face_roles = ("stage1",) if args.stage1_only else ("stage1", "controlnet")
    extra = {f"face_{role}": specs["face"].weights[role] for role in face_roles}
    extra["face_detector"] = args.face_detector
    if not args.no_face_parsing:
        extra["face_parser"] = "face_parsenet"
    paths = weight_paths(args, dict(specs["background"].weights), extra)
    parts = {"background": {r: paths[r] for r in ROLES if r in paths}}
    parts["face"] = {**parts["background"], **{r: paths[f"face_{r}"] for r in face_roles}}
    pipelines = load_pipelines(specs, parts, args.device, args.precision)
    device = pipelines["background"].device
    detector = load_face_detector(paths["face_detector"], args.face_detector, device)
    parser = None if args.no_face_parsing else load_face_parser(paths["face_parser"], device)
    pipeline = FaceBackgroundPipeline(
        pipelines["background"],
        pipelines["face"],
        FaceHelper(detector, parser),
        face_batch_size=args.batch_size,
    )
    return pipeline, paths


class Runner:
    """Restores jobs batch by batch, reports failures and keeps the counts."""

    def __init__(
        self,
        pipeline: Pipeline,
        options: PipelineOptions,
        record: dict[str, Any],
        args: argparse.Namespace,
    ) -> None:
        self.restorer = make_restorer(pipeline, options)
        self.record, self.args = record, args
        self.settings = output_settings(args)
        self.failed: list[str] = []
        self.restored = 0

    def fail(self, message: str) -> None:
        self.failed.append(message)
        tqdm.write(f"error: {message}", file=sys.stderr)

    def run(self, jobs: list[Job]) -> None:
        bar = tqdm(total=len(jobs), unit="img", disable=self.args.no_progress, file=sys.stderr)
        loaded = self.load(jobs, bar)
        for batch in batch_by_size(loaded, self.args.batch_size, lambda item: item[2].shape[-2:]):
            self.restore(batch, bar)
        bar.close()

    def load(self, jobs: list[Job], bar: tqdm) -> Iterator[tuple[Job, DecodedImage, torch.Tensor]]:
        """The decodable jobs with their images; unreadable files are reported and counted."""
        for job in jobs:
            try:
                yield (job, *load_image(job))
            except ImageReadError as exc:
                self.fail(str(exc))
                bar.update(1)

    def restore(self, batch: list[tuple[Job, DecodedImage, torch.Tensor]], bar: tqdm) -> None:
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
    args: argparse.Namespace,
    options: PipelineOptions,
    pipeline: Pipeline,
    paths: dict[str, Path],
) -> dict[str, Any]:
    """The run-wide part of every sidecar."""
    return {
        "version": args.version, "task": args.task, "stage1_only": args.stage1_only,
        "seed": options.seed, "device": str(pipeline.device), "precision": pipeline.precision,
        "weights": {role: str(path) for role, path in paths.items()},
        "model_config": None if args.model_config is None else str(args.model_config),
        "options": dataclasses.asdict(options),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


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
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        options = options_from_args(args)
        files, root, captions = collect_inputs(args.input, args.output)
        jobs = make_jobs(files, root, output_settings(args), captions)
        todo = [job for job in jobs if args.overwrite or not job.done()]
        if todo:
            pipeline, paths = build(args)
    # ValueError covers dataset.image_folder.InputError (no inputs, output over an input)
    except (SetupError, MissingWeightsError, WeightFileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    skipped = len(jobs) - len(todo)
    runner = None
    if todo:
        runner = Runner(pipeline, options, run_record(args, options, pipeline, paths), args)
        runner.run(todo)
    restored, failed = (runner.restored, runner.failed) if runner else (0, [])
    print(f"done: {restored} restored, {skipped} skipped (already done), {len(failed)} failed "
          f"-> {args.output}", file=sys.stderr)  # fmt: skip
    for message in failed:
        print(f"  failed: {message}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
