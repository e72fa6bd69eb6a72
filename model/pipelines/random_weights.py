"""Random full-size (or tiny) weights for a pipeline, built cheaply: what the benchmark and the
memory calibration run when no released files are given (speed does not depend on values).

    pipe = random_pipeline(presets.model_spec("v2.1", "sr"), torch.device("cpu"), "bf16")
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from model.convert.sd import sd_builders
from model.nets.cldm import ControlLDM
from model.nets.lacontrolnet import build_lacontrolnet
from model.nets.stage1 import Stage1Model
from model.nets.swinir import SwinIR, swinir_diffbir_config
from model.ops.device import PRECISIONS
from model.pipelines import presets
from model.pipelines.diffbir import DiffBIRPipeline

log = logging.getLogger(__name__)

TINY_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "tiny"

# Random values tiled into every parameter (copying is ~15x faster than drawing on a CPU);
# a prime length, so that rows of a weight matrix do not repeat.
POOL_SIZE = 1_000_003


def tiny_model_config() -> dict[str, Any]:
    """The model config ({"cldm", "swinir"}) of configs/tiny/, as make_tiny_weights records it."""
    return {
        name: OmegaConf.to_container(OmegaConf.load(TINY_CONFIGS / f"{name}.yaml"), resolve=True)
        for name in ("cldm", "swinir")
    }


def _fill_(module: nn.Module, pool: Tensor) -> None:
    """Every parameter from tiled `pool` (N(0, 1)) values: / sqrt(fan_in) with >= 2 dims,
    1 + 0.1·N for 1-D weights (norm scales), 0.1·N otherwise."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            flat = param.view(-1)
            for start in range(0, flat.numel(), len(pool)):
                chunk = flat[start : start + len(pool)]
                chunk.copy_(pool[: chunk.numel()])
            if param.ndim >= 2:
                flat.mul_((param.numel() / param.shape[0]) ** -0.5)
            else:
                flat.mul_(0.1).add_(1.0 if name.endswith("weight") else 0.0)


def _random_module(
    build: Callable[[], nn.Module], device: torch.device, pool: Tensor, dtype: torch.dtype
) -> nn.Module:
    """`build()` on `device` with random weights: built on the meta device and allocated and
    filled from `pool` directly in `dtype` (never an fp32 copy of a bf16 run's weights), or
    built normally when it has buffers (masks and indices keep constructed values)."""
    with torch.device("meta"):
        module = build()
    if next(module.buffers(), None) is not None:
        with torch.device(device):
            return build()
    module = nn.Module.to(module, dtype).to_empty(device=device)  # diffusers' own `to` warns
    _fill_(module, pool)
    return module


def random_pipeline(
    spec: presets.ModelSpec, device: torch.device, precision: str, seed: int = 0
) -> DiffBIRPipeline:
    """The pipeline of `spec` with random weights (stage 1: DiffBIR's SwinIR)."""
    if spec.stage1_model != "swinir":
        log.warning("random weights: stage 1 is DiffBIR's SwinIR, not %s", spec.stage1_model)
    torch.manual_seed(seed)
    pool = torch.randn(POOL_SIZE, device=device)
    # fp16 on a CPU runs fp32 (DiffBIRPipeline.to)
    run_dtype = PRECISIONS["fp32" if device.type == "cpu" and precision == "fp16" else precision]
    builders = dict(sd_builders(spec.cldm))
    builders["controlnet"] = partial(build_lacontrolnet, **spec.cldm["controlnet_cfg"])
    builders["swinir"] = partial(SwinIR, **(spec.stage1_config or swinir_diffbir_config()))
    parts = {}
    for name, build in builders.items():
        start = time.perf_counter()
        dtype = torch.float32 if name == "swinir" else run_dtype
        parts[name] = _random_module(build, device, pool, dtype)
        count = sum(p.numel() for p in parts[name].parameters())
        log.info("built %s: %.1fM random parameters in %.1f s", name, count / 1e6,
                 time.perf_counter() - start)  # fmt: skip
    swinir = parts.pop("swinir")
    # as model.nets.stage1.load_swinir_stage1 wraps a loaded SwinIR
    stage1 = Stage1Model("swinir", swinir, swinir.output_scale, swinir.size_multiple,
                         "constant", runs_before_upscale=False, runs_after_raise=True)  # fmt: skip
    cldm = ControlLDM(latent_scale_factor=spec.cldm["latent_scale_factor"], **parts)
    return DiffBIRPipeline(stage1, cldm, presets.build_diffusion(spec.diffusion), device, precision)
