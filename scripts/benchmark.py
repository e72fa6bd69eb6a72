"""Time `DiffBIRPipeline` as `inference.py` runs it, part by part; writes one JSON file.

The whole image is `pipe(lq, options)` with the PipelineOptions inference.py builds (its
defaults; flags override them), the LQ random at output size / upscale. Inside that call the
pipeline's own stages are timed, wrapped on the instance: `run_stage1`, `encode_prompt`
(cached: as inference.py does, the run's prompts are encoded first, "cold", and the text
encoder is freed before the calls), `_vae_encode`,
`_vae_decode`, and each sampler step from its first network call (or the previous step
`callback`) to its callback: network + tiling + CFG + sampler update. Warm-up calls are
excluded; timed regions are bracketed by torch.cuda.synchronize. Memory: CUDA
max_memory_allocated per part (reset before each), else the process peak RSS (only grows).

Weights: random full-size by default (built on the meta device, filled cheaply: speed does not
depend on the values; held in anonymous memory), `--tiny` configs/tiny/, `--weights-dir` a
release via from_pretrained, memory-mapped as inference.py loads it (full-size random files in
the released layouts: `scripts/make_tiny_weights.py --full-size`).
`--method diffir` times `DiffIRPipeline` whole-image calls instead (no parts; DiffIR x4 with the
released architecture, `--diffir-tile-size` tiles its DIRformer). `--precision-error` compares
`--precision` with fp32 on the same weights instead (model/eval/precision_error.py).

    python -m scripts.benchmark --sizes 512,1024,2048 --steps 10 --precision fp16 --out bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from model.diffir import DiffIRS2
from model.diffir.convert import model_kwargs
from model.diffir.pipeline import RELEASED_X4, DiffIRPipeline
from model.diffusion.samplers import SAMPLERS
from model.eval.bench_tables import PARTS, WHOLE, format_table, summary_table
from model.eval.precision_error import precision_errors
from model.io.checkpoint import WeightFileError
from model.io.images import write_image
from model.io.logs import setup_logging
from model.io.weights import MissingWeightsError
from model.ops.device import PRECISIONS, resolve_device
from model.pipelines import presets
from model.pipelines.diffbir import DiffBIRPipeline
from model.pipelines.memory_calibration import calibrate, peak_memory, reset_peak_memory
from model.pipelines.options import TILED_DEFAULTS, PipelineOptions, tile_fields
from model.pipelines.prompts import run_prompts
from model.pipelines.random_weights import TINY_CONFIGS, random_pipeline, tiny_model_config

log = logging.getLogger("benchmark")


def build_pipeline(args: argparse.Namespace, device: torch.device) -> DiffBIRPipeline:
    """Random weights, or the release's files from `--weights-dir` (offline)."""
    config = tiny_model_config() if args.tiny else None
    size = "tiny" if args.tiny else "full-size"
    if args.weights_dir is not None:
        log.info("loading %s %s/%s from %s", size, args.version, args.task, args.weights_dir)
        pipe = DiffBIRPipeline.from_pretrained(
            args.version, args.task, weights_dir=args.weights_dir, device=device,
            dtype=args.precision, model_config=config, offline=True,
        )  # fmt: skip
    else:
        log.info("building %s random %s/%s models on %s", size, args.version, args.task, device)
        spec = presets.model_spec(args.version, args.task, config)
        pipe = random_pipeline(spec, device, args.precision, args.seed)
    pipe.page_idle_weights = not args.keep_weights_resident
    return pipe


def diffir_pipeline(args: argparse.Namespace, device: torch.device) -> DiffIRPipeline:
    """DiffIR x4: random (the released architecture, or --tiny's), or DiffIRS2-GAN.pth of
    --weights-dir."""
    if args.weights_dir is not None:
        return DiffIRPipeline.from_pretrained(args.weights_dir, str(device), offline=True)
    torch.manual_seed(args.seed)
    if args.tiny:
        tiny = OmegaConf.load(TINY_CONFIGS / "diffir_s2.yaml").system.params.network.params
        return DiffIRPipeline(DiffIRS2(**OmegaConf.to_container(tiny)).to(device))
    return DiffIRPipeline(DiffIRS2(**model_kwargs(RELEASED_X4)).to(device))


def bench_diffir_size(
    pipe: DiffIRPipeline, size: tuple[int, int], args: argparse.Namespace
) -> dict[str, Any]:
    """Whole-image seconds and peak memory at output size `size` (LQ of size / 4)."""
    lq_size = [max(1, round(s / pipe.scale)) for s in size]
    lq = torch.rand((1, 3, *lq_size), generator=torch.Generator().manual_seed(args.seed))
    tile = {"tile_size": args.diffir_tile_size, "tile_stride": args.diffir_tile_stride}
    for _ in range(args.warmup):
        pipe(lq, args.seed, **tile)
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    seconds = []
    for i in range(args.repeat):
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        start = time.perf_counter()
        out = pipe(lq, args.seed, **tile)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        seconds.append(time.perf_counter() - start)
        log.info("%dx%d: call %d/%d, %.3f s", *size, i + 1, args.repeat, seconds[-1])
    return {"size": list(size), "lq_size": lq_size, "output_size": list(out.shape[-2:]),
            WHOLE: {"seconds": summarize(seconds), "peak_memory_bytes": peak_memory(pipe.device)}}  # fmt: skip


def parameter_counts(pipe: DiffBIRPipeline | DiffIRPipeline) -> dict[str, int]:
    """Parameters of every network of the pipeline."""
    if isinstance(pipe, DiffIRPipeline):
        return {"diffir": sum(p.numel() for p in pipe.network.parameters())}
    cldm = pipe.cldm
    modules = {"stage1": pipe.stage1, "controlnet": cldm.controlnet, "unet": cldm.unet,
               "vae": cldm.vae, "text_encoder": cldm.text_encoder}  # fmt: skip
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}


class Probe:
    """Times the parts of whole-image calls inside the calls themselves.

    The pipeline's stage methods (`STAGES`) are wrapped on the instance; a sampler step runs
    from the first network call (a forward pre-hook on the LAControlNet and the UNet) to the
    step callback, then from callback to callback. `measure(lq, options)` runs
    `pipe(lq, options)` once and returns its seconds per part ("step": one value per sampler
    step); `peaks` keeps the largest peak bytes per part.
    """

    STAGES = {"run_stage1": "stage1", "encode_prompt": "text_encode_cached",
              "_vae_encode": "vae_encode", "_vae_decode": "vae_decode"}  # fmt: skip

    def __init__(self, pipe: DiffBIRPipeline) -> None:
        self.pipe, self.device = pipe, pipe.device
        self.peaks: dict[str, int] = {}
        self.shapes: dict[str, list[int]] = {}
        self._run: dict[str, Any] = {}
        self._run_peak = 0
        self._step_start: float | None = None
        self.output: Tensor | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> float:
        """Synchronise, open a new peak-memory window and return the time."""
        self._sync()
        self._run_peak = max(self._run_peak, peak_memory(self.device))
        reset_peak_memory(self.device)
        return time.perf_counter()

    def stop(self, part: str, start: float) -> float:
        """Synchronise and record the peak of `part`; returns the seconds since `start`."""
        self._sync()
        seconds = time.perf_counter() - start
        self._run_peak = max(self._run_peak, peak_memory(self.device))
        peak = self._run_peak if part == WHOLE else peak_memory(self.device)
        self.peaks[part] = max(self.peaks.get(part, 0), peak)
        return seconds

    def _timed(self, part: str, fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def timed(*args: Any, **kwargs: Any) -> Tensor:
            start = self.start()
            out = fn(*args, **kwargs)
            seconds = self.stop(part, start)
            self._run[part] = self._run.get(part, 0.0) + seconds
            log.info("  %s: %.3f s", part, seconds)
            self.shapes[part] = list(out.shape)
            return out

        return timed

    def _network_called(self, module: nn.Module, args: Any) -> None:
        if self._step_start is None:
            self._step_start = self.start()

    def step_done(self, step: int, t: int, latents: Tensor) -> None:
        """The step callback: closes the running step and opens the next."""
        self._run["step"].append(self.stop("step", self._step_start))
        log.info("  step %d: %.3f s", step, self._run["step"][-1])
        self._step_start = self.start()

    @contextlib.contextmanager
    def _attached(self) -> Iterator[None]:
        pipe = self.pipe
        wrappers = {
            name: self._timed(part, getattr(pipe, name)) for name, part in self.STAGES.items()
        }
        vars(pipe).update(wrappers)  # instance attributes shadow the methods
        networks = (pipe.cldm.controlnet, pipe.cldm.unet)
        hooks = [m.register_forward_pre_hook(self._network_called) for m in networks]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for name in wrappers:
                delattr(pipe, name)

    def measure(self, lq: Tensor, options: PipelineOptions) -> dict[str, Any]:
        """One whole-image call; seconds per part and of the whole (WHOLE)."""
        self._run, self._step_start = {"step": []}, None
        with self._attached():
            start = self.start()
            self._run_peak = 0
            result = self.pipe(lq, options, callback=self.step_done)
            self.output = result.images
            self._run[WHOLE] = self.stop(WHOLE, start)
        self.shapes["output"] = list(result.images.shape)
        return self._run

    def text_cold(self, prompts: list[str]) -> float:
        """Seconds of encoding `prompts` (one call each, as the pipeline does) uncached."""
        self.pipe.clear_prompt_cache()
        start = self.start()
        for prompt in prompts:
            self.pipe.encode_prompt([prompt])
        return self.stop("text_encode_cold", start)


def encode_and_release_prompts(
    pipe: DiffBIRPipeline, options: PipelineOptions, repeat: int
) -> dict[str, Any]:
    """As inference.py before a folder run: encode the run's prompts, free the text encoder.
    Returns the cold encoding's seconds (`repeat` times) and peak memory."""
    probe, prompts = (
        Probe(pipe),
        run_prompts(options.pos_prompt, options.neg_prompt, options.cfg_scale),
    )
    seconds = [probe.text_cold(prompts) for _ in range(repeat)]
    pipe.release_text_encoder(prompts)
    log.info("prompts encoded (%.3f s), text encoder freed", statistics.median(seconds))
    return {"seconds": summarize(seconds), "peak_memory_bytes": probe.peaks["text_encode_cold"]}


def summarize(values: list[float]) -> dict[str, Any]:
    """median / min / max / n of a list of seconds, and the values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values), "values": values}  # fmt: skip


def bench_size(
    pipe: DiffBIRPipeline, options: PipelineOptions, size: tuple[int, int], warmup: int,
    repeat: int, text: dict[str, Any], seed: int = 0, save_images: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Every part and the whole image at output size `size` (LQ of size / upscale, random
    8-bit values); `text`: the cold text encoding (`encode_and_release_prompts`).
    `save_images`: also write the LQ and the last output there as PNG."""
    lq_size = [max(1, round(s / options.upscale)) for s in size]
    lq = torch.randint(0, 256, (1, 3, *lq_size), generator=torch.Generator().manual_seed(seed))
    lq = lq.float() / 255
    probe, name = Probe(pipe), "x".join(map(str, size))
    for i in range(warmup):
        log.info("%s: warm-up call %d/%d", name, i + 1, warmup)
        probe.measure(lq, options)
    probe.peaks.clear()
    runs = []
    for i in range(repeat):
        runs.append(probe.measure(lq, options))
        log.info("%s: call %d/%d, %.3f s", name, i + 1, repeat, runs[-1][WHOLE])
    seconds = {part: [r[part] for r in runs] for part in Probe.STAGES.values()}
    seconds["step"] = [s for r in runs for s in r["step"]]
    if save_images is not None:
        save_images.mkdir(parents=True, exist_ok=True)
        for what, image in (("lq", lq), ("out", probe.output)):
            rgb = image[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            write_image(save_images / f"{what}_{name}.png", rgb, quantize="truncate")
    return {
        "size": list(size),
        "lq_size": lq_size,
        "output_size": probe.shapes["output"][-2:],
        "processing_size": probe.shapes["stage1"][-2:],
        "latent_size": probe.shapes["vae_encode"][-2:],
        "steps_per_call": len(runs[0]["step"]),
        WHOLE: {
            "seconds": summarize([r[WHOLE] for r in runs]),
            "peak_memory_bytes": probe.peaks[WHOLE],
        },
        "parts": {
            part: text
            if part == "text_encode_cold"
            else {"seconds": summarize(seconds[part]), "peak_memory_bytes": probe.peaks[part]}
            for part in PARTS
        },  # fmt: skip
        "runs": runs,
    }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def matmul_seconds(device: torch.device, n: int = 4096, repeat: int = 3) -> float:
    """Median seconds of one fp32 n x n matmul: the machine-speed yardstick that
    ../shared/perf/original_cpu.json also records ("calib_mm_fp32_4096"), so that numbers from
    different machines of one kind can be compared."""
    a = torch.randn(n, n, device=device)
    times = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        (a @ a).sum().item()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def environment(device: torch.device) -> dict[str, Any]:
    """Software versions and the device the numbers were taken on."""
    versions = dict(python=platform.python_version(), torch=torch.__version__,
                    diffusers=_version("diffusers"), project=_version("diffbir-reimpl"),
                    cuda=torch.version.cuda)  # fmt: skip
    about = dict(type=device.type, name=_device_name(device), cpu_count=os.cpu_count(),
                 torch_threads=torch.get_num_threads())  # fmt: skip
    return {"versions": versions, "device": about}


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    sizes = [item.strip().lower().split("x") for item in text.split(",")]
    if not all(len(s) in (1, 2) and all(v.isdigit() and int(v) > 0 for v in s) for s in sizes):
        raise argparse.ArgumentTypeError(f"bad sizes {text!r}: use N or HxW (output pixels)")
    return tuple((int(s[0]), int(s[-1])) for s in sizes)


# fmt: off
def build_parser() -> argparse.ArgumentParser:
    """The argument parser; sampling and tiling flags are inference.py's."""
    d = PipelineOptions()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m scripts.benchmark")
    p.add_argument("--method", choices=("diffbir", "diffir"), default="diffbir", help="pipeline to time (diffir: DiffIR x4, whole-image calls only)")
    p.add_argument("--save-images", type=Path, help="write each size's LQ and last output there (lq_<size>.png, out_<size>.png)")
    p.add_argument("--calibrate-memory", action="store_true", help="measure each stage's activation memory at --sizes (two or more; else 256 and 512 px), the --max-memory cost model, instead of timing")
    p.add_argument("--precision-error", action="store_true", help="compare --precision with fp32 on the same weights (relative L2 of each network call, whole-image PSNR; the first --sizes) instead of timing")
    p.add_argument("--diffir-tile-size", type=int, help="--method diffir: DIRformer tile size (LQ pixels)")
    p.add_argument("--diffir-tile-stride", type=int, help="--method diffir: DIRformer tile stride")
    p.add_argument("--sizes", type=_sizes, default="512", help="output sizes, e.g. 512,1024,2048 or 512x768")
    p.add_argument("--warmup", type=int, default=1, help="untimed whole-image calls per size")
    p.add_argument("--repeat", type=int, default=3, help="timed whole-image calls per size")
    p.add_argument("--version", choices=tuple(presets.VERSIONS), default="v2.1", help="release (schedule; files with --weights-dir)")
    p.add_argument("--task", choices=presets.TASKS, default="sr", help="task (default upscale, weights)")
    p.add_argument("--tiny", action="store_true", help="configs/tiny/ models (CPU smoke runs)")
    p.add_argument("--weights-dir", type=Path, help="released weight files, loaded offline (default: random weights)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp16", help="network precision (fp16 on a CPU runs fp32)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--keep-weights-resident", action="store_true", help="as inference.py: idle networks keep their memory-mapped weights (--weights-dir) resident")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and LQ images")
    p.add_argument("--out", type=Path, help="JSON file to write (required unless --table)")
    p.add_argument("--table", type=Path, nargs="+", help="print one markdown table of these benchmark JSONs and exit")
    s = p.add_argument_group("options (PipelineOptions defaults, as inference.py)")
    s.add_argument("--upscale", type=float, help=f"output / LQ size (default by task: {presets.DEFAULT_UPSCALE})")
    s.add_argument("--min-short-side", type=int, default=d.min_short_side, help="processing size of smaller images")
    s.add_argument("--sampler", choices=tuple(SAMPLERS), default=d.sampler, help="sampler")
    s.add_argument("--steps", type=int, default=d.steps, help="sampling steps")
    s.add_argument("--cfg-scale", type=float, default=d.cfg_scale, help="classifier-free guidance scale (1: off)")
    s.add_argument("--cfg-separate", action="store_true", help="the two guidance branches as two calls")
    s.add_argument("--tiled", action="store_true", help=f"tile every stage with inference.py's sizes {TILED_DEFAULTS}")
    for stage in ("stage1", "vae-encoder", "vae-decoder", "diffusion"):
        s.add_argument(f"--{stage}-tile-size", type=int, help=f"{stage} tile size (pixels)")
        s.add_argument(f"--{stage}-tile-stride", type=int, help=f"{stage} tile stride (default half a tile)")
    s.add_argument("--diffusion-tile-batch", type=int, default=d.diffusion_tile_batch_size, help="diffusion tiles per network call")
    return p
# fmt: on


def options_from_args(args: argparse.Namespace) -> PipelineOptions:
    """The PipelineOptions inference.py would build from the same flags."""
    tiles = tile_fields(args.tiled, **{k: v for k, v in vars(args).items() if "_tile_s" in k})
    upscale = args.upscale if args.upscale is not None else presets.DEFAULT_UPSCALE[args.task]
    return PipelineOptions(
        upscale=upscale, min_short_side=args.min_short_side, sampler=args.sampler,
        steps=args.steps, cfg_scale=args.cfg_scale, cfg_batched=not args.cfg_separate,
        diffusion_tile_batch_size=args.diffusion_tile_batch, **tiles,
    )  # fmt: skip


def run_benchmark(
    pipe: DiffBIRPipeline, options: PipelineOptions, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Every size of `args`; a size that runs out of memory is reported and skipped."""
    text = encode_and_release_prompts(pipe, options, args.repeat)
    results = []
    for size in args.sizes:
        log.info("measuring %dx%d (%d warm-up, %d timed calls)", *size, args.warmup, args.repeat)
        try:
            results.append(bench_size(pipe, options, size, args.warmup, args.repeat, text,
                                      args.seed, args.save_images))  # fmt: skip
        except torch.OutOfMemoryError:
            results.append({"size": list(size), "error": "out of memory; try --tiled"})
            log.error("%dx%d: out of memory; try --tiled or --precision fp16", *size)
        torch.cuda.empty_cache()  # a no-op without CUDA
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0, or 1 when weights are missing or a size ran out of memory."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.table:
        try:
            print(summary_table([json.loads(path.read_text()) for path in args.table], args.table))
        except ValueError as exc:
            parser.error(str(exc))
        return 0
    if args.out is None:
        parser.error("--out is required")
    setup_logging()
    if args.repeat < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--repeat and --threads must be >= 1, --warmup >= 0")
    if args.weights_dir is not None and not args.weights_dir.is_dir():
        parser.error(f"--weights-dir {args.weights_dir}: not a folder")
    try:
        options = options_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    start = time.perf_counter()
    try:
        build = diffir_pipeline if args.method == "diffir" else build_pipeline
        compared = args.precision
        if args.precision_error:  # built in fp32, then cast to the compared precision
            args.precision = "fp32"
        pipe = build(args, device)
    except (MissingWeightsError, WeightFileError) as exc:  # names the files and where to get them
        log.error("%s", exc)
        return 1
    build_seconds = time.perf_counter() - start
    build_peak = peak_memory(device)  # no window opened yet: the process's peak so far
    parameters = parameter_counts(pipe)  # before the text encoder is freed
    if args.calibrate_memory or args.precision_error:
        if args.calibrate_memory:
            sizes = [h for h, _ in args.sizes] if len(args.sizes) > 1 else (256, 512)
            key, result = "memory_calibration", calibrate(pipe, sizes)
        else:
            key = "precision_error"
            result = precision_errors(pipe, compared, args.sizes[0][0], args.steps, args.seed)
        weights = {role: str(path) for role, path in pipe.weight_paths.items()}
        report = {**environment(pipe.device), "precision": pipe.precision,
                  "weights": weights or "random", key: result}  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(result, indent=1))
        return 0
    if args.method == "diffir":
        results = [bench_diffir_size(pipe, size, args) for size in args.sizes]
    else:
        results = run_benchmark(pipe, options, args)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    weights = {role: str(path) for role, path in pipe.weight_paths.items()}
    settings.update(
        weights=weights or ("random tiny" if args.tiny else "random full-size"),
        device=str(pipe.device), precision=pipe.precision, options=dataclasses.asdict(options),
        requested={"device": args.device, "precision": args.precision},
    )  # fmt: skip
    report = {
        **environment(pipe.device),
        "settings": settings,
        "parameters": parameters,
        "calib_mm_fp32_4096_seconds": matmul_seconds(device),
        "build_seconds": build_seconds,
        "build_peak_memory_bytes": build_peak,
        "memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "process_peak_rss",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(format_table(report))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
