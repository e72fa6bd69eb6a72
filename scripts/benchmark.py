"""Time the DiffBIR pipeline parts and record their peak memory; writes one JSON file.

Measured per image size: stage 1 (SwinIR), VAE encode, one sampling step (one call of the
guided, optionally tiled ControlLDM: LAControlNet + UNet, twice with CFG), VAE decode, and the
whole image (stage 1 -> encode -> N sampler steps -> decode; the empty-prompt text context is
computed once per run, as a folder run would). Weights are random and full size by default
(no download; speed does not depend on the values), `--tiny` uses configs/tiny/ and
`--weights-dir` the released files.

Timing: warmup runs are excluded; each timed run is bracketed by `torch.cuda.synchronize`.
Peak memory: `torch.cuda.max_memory_allocated` per part on CUDA (reset before each part);
on the CPU the process peak RSS (`resource.getrusage`), which only grows, so there it bounds
the whole run up to that part.

    python -m scripts.benchmark --sizes 512,1024 --steps 50 --precision fp16 --out bench.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from model.convert.cldm import original_params
from model.convert.sd import build_sd_modules, sd21_cldm_cfg
from model.diffusion.cfg import classifier_free_guidance
from model.diffusion.samplers import SAMPLERS, make_sampler
from model.diffusion.schedule import DIFFUSION_PRESETS, Diffusion, ModelFn
from model.diffusion.tiled import tiled_model_fn
from model.io.checkpoint import WeightFileError
from model.io.cldm_files import load_cldm
from model.io.weights import MissingWeightsError, resolve_weights
from model.nets.cldm import ControlLDM
from model.nets.lacontrolnet import build_lacontrolnet
from model.nets.stage1 import restore_stage1
from model.nets.swinir import SwinIR, load_swinir, swinir_diffbir_config

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PARTS = ("stage1", "vae_encode", "step", "vae_decode", "total")
TINY_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "tiny"
# registry names (model/weights.py) of (SD, LAControlNet, SwinIR) per release
RELEASE_WEIGHTS = {
    "v1": ("sd21_base", "v1_general", "swinir_general"),
    "v2": ("sd21_base", "v2", "swinir_general"),
    "v2.1": ("sd21_zsnr", "v2.1", "swinir_realesrgan"),
}
SIZE_MULTIPLE = 64  # SwinIR window 8 x unshuffle 8; the pipeline pads to it


@dataclass(frozen=True)
class BenchConfig:
    """What to measure (recorded in the JSON).

    Args:
        sizes: (H, W) output sizes in pixels, multiples of 64.
        steps: sampler steps of the whole-image run.
        sampler: a name of `model.diffusion.samplers.SAMPLERS`.
        version: release whose schedule (and, with `weights_dir`, files) is used.
        precision: "fp32", "fp16" or "bf16" (weights and activations).
        device: torch device string.
        warmup, repeat: untimed and timed runs of every part.
        cfg_scale: classifier-free guidance scale; > 1 calls the network twice per step.
        stage1_tile, stage1_stride: stage-1 tiles in pixels (None: whole image).
        vae_tiling: diffusers' VAE tiling; vae_tile_size its tile in pixels (None: default).
        latent_tile, latent_stride: tiled diffusion in latent pixels (None: whole latent).
        tiny: the configs of configs/tiny/ instead of the full-size models.
        weights_dir: folder of released weight files (None: random weights); with `tiny`, a
            folder written by `scripts.make_tiny_weights`.
        seed: seed of the random inputs and weights.
    """

    sizes: tuple[tuple[int, int], ...] = ((512, 512),)
    steps: int = 50
    sampler: str = "spaced"
    version: str = "v2"
    precision: str = "fp32"
    device: str = "cpu"
    warmup: int = 1
    repeat: int = 3
    cfg_scale: float = 1.0
    stage1_tile: int | None = None
    stage1_stride: int | None = None
    vae_tiling: bool = False
    vae_tile_size: int | None = None
    latent_tile: int | None = None
    latent_stride: int | None = None
    tiny: bool = False
    weights_dir: Path | None = None
    seed: int = 0


@dataclass
class Models:
    """The networks under test and where their weights came from."""

    swinir: SwinIR
    cldm: ControlLDM
    diffusion: Diffusion
    weights: str


# --------------------------------------------------------------------------- models


def tiny_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    """(ControlLDM config, SwinIR config) of the tiny CPU test models (configs/tiny/)."""
    found = []
    for name in ("cldm.yaml", "swinir.yaml"):
        path = TINY_CONFIG_DIR / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tiny config not found")
        found.append(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    return original_params(found[0]), found[1]


def _random_models(cldm_cfg: dict[str, Any], swinir_cfg: dict[str, Any]) -> tuple[Any, Any]:
    """A randomly initialised ControlLDM and SwinIR, built on the current default device."""
    modules = build_sd_modules(cldm_cfg)
    controlnet = build_lacontrolnet(**cldm_cfg["controlnet_cfg"])
    cldm = ControlLDM(
        controlnet=controlnet, latent_scale_factor=cldm_cfg["latent_scale_factor"], **modules
    )
    return cldm, SwinIR(**swinir_cfg)


def build_models(cfg: BenchConfig) -> Models:
    """The networks of `cfg` on its device and in its precision, in eval mode."""
    device, dtype = torch.device(cfg.device), PRECISIONS[cfg.precision]
    cldm_cfg, swinir_cfg = (
        tiny_configs() if cfg.tiny else (sd21_cldm_cfg(), swinir_diffbir_config())
    )
    size = "tiny" if cfg.tiny else "full-size"
    if cfg.weights_dir is not None:
        names = RELEASE_WEIGHTS[cfg.version]
        paths = resolve_weights(names, [cfg.weights_dir], download=False)
        cldm = load_cldm(cldm_cfg, paths[names[0]], paths[names[1]])
        swinir = load_swinir(paths[names[2]], swinir_cfg)
        weights = f"{size} files: " + ", ".join(str(paths[n]) for n in names)
    else:
        torch.manual_seed(cfg.seed)
        # random init on the target device: much faster on a GPU than on the CPU
        with torch.device(device):
            cldm, swinir = _random_models(cldm_cfg, swinir_cfg)
        weights = f"random {size}"
    cldm, swinir = cldm.to(device, dtype).eval(), swinir.to(device, dtype).eval()
    if cfg.vae_tiling:
        cldm.vae.enable_tiling()
        if cfg.vae_tile_size is not None:
            factor = 2 ** (len(cldm.vae.config.block_out_channels) - 1)
            cldm.vae.tile_sample_min_size = cfg.vae_tile_size
            cldm.vae.tile_latent_min_size = cfg.vae_tile_size // factor
    diffusion = DIFFUSION_PRESETS[cfg.version]()
    return Models(swinir=swinir, cldm=cldm, diffusion=diffusion, weights=weights)


def parameter_counts(models: Models) -> dict[str, int]:
    """Parameters of every network."""
    modules = {"swinir": models.swinir, "controlnet": models.cldm.controlnet}
    modules.update(unet=models.cldm.unet, vae=models.cldm.vae)
    modules["text_encoder"] = models.cldm.text_encoder
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> int:
    """Peak bytes: allocated by torch on CUDA since the last reset, process RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB else


def measure(
    fn: Callable[[], Any], warmup: int, repeat: int, device: torch.device
) -> tuple[list[float], int]:
    """Run `fn` `warmup` times untimed, then `repeat` timed runs; (seconds, peak bytes)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)  # nothing queued may leak into the timed region
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, peak_memory(device)


def summarize_times(times: list[float]) -> dict[str, Any]:
    """mean / std (sample; 0 for one run) / min / max / n of a list of seconds."""
    std = statistics.stdev(times) if len(times) > 1 else 0.0
    return {
        "mean": statistics.fmean(times),
        "std": std,
        "min": min(times),
        "max": max(times),
        "n": len(times),
        "values": times,
    }


def guided_model_fn(cldm: ControlLDM, cfg: BenchConfig, cond: dict) -> ModelFn:
    """The network as the sampler calls it: tiled, guided, fed in the model precision.

    The sampler keeps its latents in float32; they are cast for the network and back.
    """
    network: ModelFn = cldm
    if cfg.latent_tile is not None:
        stride = cfg.latent_stride or cfg.latent_tile // 2
        network = tiled_model_fn(network, cfg.latent_tile, stride)
    if cfg.cfg_scale != 1:
        uncond = {"c_txt": cond["c_txt"], "c_img": cond["c_img"]}  # negative prompt ""
        network = classifier_free_guidance(network, uncond, cfg.cfg_scale)
    dtype = PRECISIONS[cfg.precision]

    def fn(z_t: torch.Tensor, t: torch.Tensor, c: Any) -> torch.Tensor:
        return network(z_t.to(dtype), t, c).float()

    return fn


def bench_size(models: Models, cfg: BenchConfig, size: tuple[int, int]) -> dict[str, Any]:
    """Timings and peak memory of every part at one image size."""
    device, dtype = torch.device(cfg.device), PRECISIONS[cfg.precision]
    cldm, sampler = models.cldm, make_sampler(cfg.sampler, models.diffusion)
    g = torch.Generator(device).manual_seed(cfg.seed)
    lq = torch.rand((1, 3, *size), generator=g, device=device).to(dtype)
    c_txt = cldm.encode_text([""]).to(dtype)

    def stage1() -> torch.Tensor:
        return restore_stage1(models.swinir, lq, cfg.stage1_tile, cfg.stage1_stride).clamp(0, 1)

    def encode(img: torch.Tensor) -> torch.Tensor:
        return cldm.vae_encode(img * 2 - 1)

    def whole_image() -> torch.Tensor:
        c_img = encode(stage1())
        x_T = torch.randn(c_img.shape, generator=g, device=device)
        cond = {"c_txt": c_txt, "c_img": c_img}
        model_fn = guided_model_fn(cldm, cfg, cond)
        z_0 = sampler.sample(model_fn, x_T, cfg.steps, cond, generator=g, progress=False)
        return (cldm.vae_decode(z_0.to(dtype)) + 1) / 2

    img = stage1()
    c_img = encode(img)
    cond = {"c_txt": c_txt, "c_img": c_img}
    z_t = torch.randn(c_img.shape, generator=g, device=device)
    t = torch.full((1,), sampler.timesteps(cfg.steps)[0], dtype=torch.long, device=device)
    step_fn = guided_model_fn(cldm, cfg, cond)
    parts = {
        "stage1": stage1,
        "vae_encode": lambda: encode(img),
        "step": lambda: step_fn(z_t, t, cond),
        "vae_decode": lambda: cldm.vae_decode(c_img),
        "total": whole_image,
    }
    timings, memory = {}, {}
    for name in PARTS:
        times, memory[name] = measure(parts[name], cfg.warmup, cfg.repeat, device)
        timings[name] = summarize_times(times)
        log.info("%dx%d %s: %.4f s", *size, name, timings[name]["mean"])
    return {
        "size": list(size),
        "latent_size": list(c_img.shape[-2:]),
        "network_calls_per_step": 2 if cfg.cfg_scale != 1 else 1,
        "timings": timings,
        "peak_memory_bytes": memory,
    }


# --------------------------------------------------------------------------- run


def environment(device: torch.device) -> dict[str, Any]:
    """Software versions and the device the numbers were taken on."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "diffusers": metadata.version("diffusers"),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, device_memory_bytes=int(props.total_memory))
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def _oom_message(size: tuple[int, int]) -> str:
    return (
        f"{size[0]}x{size[1]}: out of memory; try --stage1-tile 512, --vae-tiling, "
        "--latent-tile 64, --precision fp16"
    )


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Build the models and measure every size; a size that runs out of memory is reported."""
    device = torch.device(cfg.device)
    start = time.perf_counter()
    models = build_models(cfg)
    build_seconds = time.perf_counter() - start
    results = []
    with torch.inference_mode():
        for size in cfg.sizes:
            try:
                results.append(bench_size(models, cfg, size))
                continue
            except torch.OutOfMemoryError:
                log.error("%s", _oom_message(size))
            # after the except block, so that the traceback's tensors are freed first
            results.append({"size": list(size), "error": _oom_message(size)})
            torch.cuda.empty_cache()
    config = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
    return {
        "config": config,
        "environment": environment(device),
        "models": {
            "weights": models.weights,
            "parameters": parameter_counts(models),
            "build_seconds": build_seconds,
        },
        "memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "process_peak_rss",
        "results": results,
    }


def format_table(report: dict[str, Any]) -> str:
    """Mean seconds per part and size, as a markdown table."""
    lines = [f"| size | {' | '.join(PARTS)} | peak memory (GiB) |", "|---" * (len(PARTS) + 2) + "|"]
    for r in report["results"]:
        size = "x".join(map(str, r["size"]))
        if "error" in r:
            lines.append(f"| {size} | {r['error']} |")
            continue
        cells = [f"{r['timings'][p]['mean']:.4f}" for p in PARTS]
        peak = max(r["peak_memory_bytes"].values()) / 2**30
        lines.append(f"| {size} | {' | '.join(cells)} | {peak:.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        try:
            h, w = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
        except ValueError:
            h = w = 0
        if h <= 0 or w <= 0 or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise argparse.ArgumentTypeError(
                f"bad size {item!r}: use N or HxW, multiples of {SIZE_MULTIPLE}"
            )
        sizes.append((h, w))
    return tuple(sizes)


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")[0]
    p = argparse.ArgumentParser(description=doc, prog="python -m scripts.benchmark")
    p.add_argument("--sizes", type=_sizes, default="512", help="e.g. 512,1024 or 512x768")
    p.add_argument("--steps", type=int, default=50, help="sampler steps of the whole image")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="spaced", help="sampler name")
    p.add_argument("--version", choices=sorted(RELEASE_WEIGHTS), default="v2", help="release")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32", help="dtype")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:1")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of every part")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of every part")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="CFG scale (>1: 2 calls/step)")
    p.add_argument("--stage1-tile", type=int, help="stage-1 tile in pixels (multiple of 64)")
    p.add_argument("--stage1-stride", type=int, help="stage-1 tile stride (default tile/2)")
    p.add_argument("--vae-tiling", action="store_true", help="diffusers VAE tiling")
    p.add_argument("--vae-tile-size", type=int, help="VAE tile in pixels (with --vae-tiling)")
    p.add_argument("--latent-tile", type=int, help="tiled diffusion: tile in latent pixels")
    p.add_argument("--latent-stride", type=int, help="tiled diffusion stride (default tile/2)")
    p.add_argument("--tiny", action="store_true", help="configs/tiny/ models (CPU smoke runs)")
    weights_help = "released weight files (default: random); with --tiny: make_tiny_weights's"
    p.add_argument("--weights-dir", type=Path, help=weights_help)
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and inputs")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0, or 1 when weights are missing or a size ran out of memory."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.steps < 1 or args.repeat < 1 or args.warmup < 0:
        parser.error("--steps and --repeat must be >= 1, --warmup >= 0")
    if args.weights_dir is not None and not args.weights_dir.is_dir():
        parser.error(f"--weights-dir {args.weights_dir}: not a folder")
    if args.vae_tile_size is not None and not args.vae_tiling:
        parser.error("--vae-tile-size needs --vae-tiling")
    if args.stage1_tile is not None and (args.stage1_tile < 1 or args.stage1_tile % SIZE_MULTIPLE):
        parser.error(f"--stage1-tile must be a positive multiple of {SIZE_MULTIPLE}")
    if any(v is not None and v < 1 for v in (args.latent_tile, args.latent_stride)):
        parser.error("--latent-tile and --latent-stride must be >= 1")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    options = {k: v for k, v in vars(args).items() if k != "out"}
    cfg = BenchConfig(**{**options, "device": device})
    try:
        report = run_benchmark(cfg)
    except (MissingWeightsError, WeightFileError) as e:  # names the files and where to get them
        log.error("%s", e)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(format_table(report))
    return 1 if any("error" in r for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
