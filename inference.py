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
(bad arguments, missing weights, no inputs). Argument parsing, file walking, decoding and
saving live here; the restoration itself is `model.pipeline.DiffBIRPipeline` (and
`model.face_background.FaceBackgroundPipeline` for --task face_background).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, get_args, get_type_hints

import numpy as np
import torch
from tqdm.auto import tqdm

from dataset.file_sources import list_image_files, read_file_list
from dataset.image_io import IMAGE_EXTENSIONS, DecodedImage, ImageReadError, decode_image
from dataset.image_io import write_image as _write_image
from model.checkpoint_io import WeightFileError
from model.color_fix import COLOR_FIX_MODES
from model.diffusion import DIFFUSION_PRESETS
from model.face import DETECTION_MODELS, FaceHelper, load_face_detector, load_face_parser
from model.face_background import FaceBackgroundPipeline
from model.pipeline import PRECISIONS, DiffBIRPipeline, PipelineOptions, resize
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
LIST_SUFFIXES = (".txt", ".list")
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


@dataclasses.dataclass
class Job:
    """One input file, its caption and where its results go."""

    src: Path
    dst: Path
    stage1_dst: Path | None
    caption: str = ""
    faces_dst: Path | None = None

    @property
    def sidecar(self) -> Path:
        return self.dst.with_name(self.dst.name + ".json")

    def face_path(self, index: int) -> Path:
        """Where the restored face `index` goes (with --save-faces)."""
        name = f"{self.faces_dst.stem}_face{index}{self.faces_dst.suffix}"
        return self.faces_dst.with_name(name)

    def done(self) -> bool:
        return self.dst.is_file() and self.sidecar.is_file()


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


def collect_inputs(spec: str, exclude: Path) -> tuple[list[Path], Path, dict[Path, str]]:
    """(image files, the folder their relative paths are taken from, captions by file) for
    --input; only file lists have captions (after a tab), the other files get none."""
    path = Path(spec)
    captions: dict[Path, str] = {}
    if path.is_dir():
        files, root = [Path(f) for f in list_image_files(path)], path
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        listed, texts = read_file_list(path)
        files, root = [Path(f) for f in listed], None
        captions = {f.resolve(): text for f, text in zip(files, texts, strict=True) if text}
    elif path.is_file():
        files, root = [path], path.parent
    elif glob.has_magic(spec):
        found = sorted(glob.glob(spec, recursive=True))
        files = [Path(f) for f in found if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        root = None
    else:
        raise SetupError(f"{spec}: no such file, folder or file list")
    if not files:
        raise SetupError(f"{spec}: no images found")
    if root is None:
        root = Path(os.path.commonpath([f.resolve().parent for f in files]))
        files = [f.resolve() for f in files]
    out = exclude.resolve()
    if out != root.resolve() and out.is_relative_to(root.resolve()):
        # an output folder inside the input folder: never take earlier outputs as inputs
        files = [f for f in files if not f.resolve().is_relative_to(out)]
        if not files:
            raise SetupError(f"{spec}: no images found outside the output folder")
    return files, root, captions


def make_jobs(
    files: list[Path],
    root: Path,
    args: argparse.Namespace,
    captions: dict[Path, str] | None = None,
) -> list[Job]:
    """One job per file; outputs mirror the paths relative to `root`."""
    captions = captions or {}
    jobs, taken = [], set()
    for src in files:
        rel = src.relative_to(root) if src.is_relative_to(root) else Path(src.name)
        dst = args.output / rel.with_suffix(f".{args.output_format}")
        if dst in taken:  # e.g. a.png and a.jpg: keep both
            dst = dst.with_name(f"{rel.stem}_{src.suffix[1:]}.{args.output_format}")
        if dst.resolve() == src.resolve():
            raise SetupError(
                f"{src}: the output would overwrite the input; choose another --output"
            )
        taken.add(dst)
        rel_dst = dst.relative_to(args.output)
        stage1_dst = args.output / "stage1" / rel_dst if args.save_stage1 else None
        faces_dst = args.output / "faces" / rel_dst if args.save_faces else None
        caption = captions.get(src.resolve(), "")
        jobs.append(Job(src, dst, stage1_dst, caption, faces_dst))
    return jobs


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


Pipeline = DiffBIRPipeline | FaceBackgroundPipeline


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


def load_image(job: Job) -> tuple[DecodedImage, torch.Tensor]:
    """The decoded file and its RGB as a (1, 3, H, W) float tensor."""
    image = decode_image(job.src)
    return image, torch.from_numpy(image.rgb).permute(2, 0, 1)[None]


def write_image(
    path: Path, rgb: np.ndarray, alpha: np.ndarray | None, args: argparse.Namespace
) -> None:
    """Write atomically; 8-bit output truncates like the original's (x*255).to(uint8)."""
    if args.bit_depth == 8:
        rgb = np.floor(rgb * 255.0) / 255.0
        alpha = None if alpha is None else np.floor(alpha * 255.0) / 255.0
    if args.output_format == "jpg":
        alpha = None
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    _write_image(partial, rgb, alpha, bit_depth=args.bit_depth, quality=args.quality)
    os.replace(partial, path)


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def save(
    job: Job,
    image: DecodedImage,
    out: torch.Tensor,
    stage1: torch.Tensor,
    record: dict[str, Any],
    args: argparse.Namespace,
    faces: torch.Tensor | None = None,
) -> None:
    """Write the optional faces and stage-1 image, the output (alpha re-attached, resized) and,
    last, the sidecar (a rerun skips a job only when its sidecar exists)."""
    if job.faces_dst is not None and faces is not None:
        for i, face in enumerate(faces):
            write_image(job.face_path(i), _to_numpy(face), None, args)
    alpha = None
    if image.alpha is not None:
        a = torch.from_numpy(image.alpha)[None, None]
        alpha = resize(a, tuple(out.shape[-2:]))[0, 0].clamp(0, 1).numpy()
    write_image(job.dst, _to_numpy(out), alpha, args)
    if job.stage1_dst is not None:
        write_image(job.stage1_dst, _to_numpy(stage1), alpha, args)
    sidecar = {"input": str(job.src), "output": str(job.dst),
               "stage1_output": None if job.stage1_dst is None else str(job.stage1_dst),
               "input_size": list(image.rgb.shape[:2]), "output_size": list(out.shape[-2:]),
               "input_bit_depth": image.bit_depth, "alpha": image.alpha is not None,
               "caption": job.caption, **record}  # fmt: skip
    partial = job.sidecar.with_name(f".{job.sidecar.name}.partial")
    partial.write_text(json.dumps(sidecar, indent=2))
    os.replace(partial, job.sidecar)


@dataclasses.dataclass
class Restored:
    """A restorer's results for a batch, images at the output size in [0, 1].

    Args:
        images: (B, 3, H, W) restored images.
        stage1: (B, 3, H, W) stage-1 images.
        faces: face_background only: per image its restored faces (N_i, 3, 512, 512).
        boxes: face_background only: per image its face boxes (N_i, 5) in output pixels
            (x1, y1, x2, y2, score).
    """

    images: torch.Tensor
    stage1: torch.Tensor
    faces: list[torch.Tensor] | None = None
    boxes: list[np.ndarray] | None = None


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
    if not pipeline.has_diffusion:

        def stage1_only(lq: torch.Tensor, captions: Sequence[str] | None) -> Restored:
            out = pipeline.restore_stage1(lq, options)
            return Restored(out, out)

        return stage1_only

    def restore(lq: torch.Tensor, captions: Sequence[str] | None) -> Restored:
        result = pipeline.restore(lq, options, captions=captions)
        return Restored(result.images, result.stage1)

    return restore


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
        self.failed: list[str] = []
        self.restored = 0

    def fail(self, message: str) -> None:
        self.failed.append(message)
        tqdm.write(f"error: {message}", file=sys.stderr)

    def run(self, jobs: list[Job]) -> None:
        bar = tqdm(total=len(jobs), unit="img", disable=self.args.no_progress, file=sys.stderr)
        pending: list[tuple[Job, DecodedImage, torch.Tensor]] = []
        for job in jobs:
            try:
                pending.append((job, *load_image(job)))
            except ImageReadError as exc:
                self.fail(str(exc))
                bar.update(1)
                continue
            size = pending[-1][2].shape[-2:]
            if len(pending) > 1 and pending[0][2].shape[-2:] != size:
                self.restore(pending[:-1], bar)
                pending = pending[-1:]
            if len(pending) == self.args.batch_size:
                self.restore(pending, bar)
                pending = []
        if pending:
            self.restore(pending, bar)
        bar.close()

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
                save(job, image, result.images[i], result.stage1[i], record, self.args, faces)
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
        jobs = make_jobs(files, root, args, captions)
        todo = [job for job in jobs if args.overwrite or not job.done()]
        if todo:
            pipeline, paths = build(args)
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
