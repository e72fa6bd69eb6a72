"""How far a bf16/fp16 pipeline is from fp32 on the same weights (`benchmark --precision-error`).

Each network call runs in fp32, then the pipeline is cast as `--precision` casts it
(`DiffBIRPipeline.to`: weights cast, norms fp32, the VAE and text encoder too with
`vae_precision="auto"`) and the same calls run on the same fp32 inputs, so each error is that
call's alone: the text encoder, the VAE encoder (a random image), one LAControlNet + UNet
evaluation at a few timesteps (x_t = q_sample of that latent) and the VAE decoder. The error is
the relative L2 norm ||low - fp32|| / ||fp32||. The whole image (`restore` with one seed) is
compared too, by PSNR: the sampler compounds every call's error over its steps.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from model.pipelines.diffbir import DiffBIRPipeline
from model.pipelines.options import PipelineOptions

log = logging.getLogger(__name__)

TIMESTEPS = (999, 500, 50)


def relative_l2(value: Tensor, reference: Tensor) -> float:
    """||value - reference|| / ||reference||, in float64."""
    value, reference = value.double(), reference.double()
    return float((value - reference).norm() / reference.norm())


def psnr(value: Tensor, reference: Tensor) -> float:
    """PSNR in dB of images in [0, 1] (inf when equal)."""
    mse = float((value.double() - reference.double()).pow(2).mean())
    return math.inf if mse == 0 else -10 * math.log10(mse)


def _calls(pipe: DiffBIRPipeline, size: int, seed: int) -> dict[str, Callable[[], Tensor]]:
    """The calls compared, on inputs made once in fp32 (the pipeline must be fp32 now)."""
    device, options = pipe.device, PipelineOptions(progress=False)
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, size, size, generator=generator).to(device)
    noise = torch.randn(1, 4, size // 8, size // 8, generator=generator).to(device)
    with torch.no_grad():
        text = pipe.encode_prompt([options.pos_prompt])
        c_img = pipe._vae_encode(image, options)

    def network(t: int) -> Callable[[], Tensor]:
        steps = torch.full((1,), t, dtype=torch.long, device=device)
        x_t = pipe.diffusion.q_sample(c_img, steps, noise)

        def run() -> Tensor:
            with pipe._running(pipe.cldm.unet, pipe.cldm.controlnet), pipe._autocast():
                return pipe.cldm(x_t.to(pipe.dtype), steps, {"c_txt": text, "c_img": c_img})

        return run

    def text_encoder() -> Tensor:
        pipe.clear_prompt_cache()
        return pipe.encode_prompt([options.pos_prompt])

    return {
        "text_encoder": text_encoder,
        "vae_encode": lambda: pipe._vae_encode(image, options),
        **{f"network_t{t}": network(t) for t in TIMESTEPS},
        "vae_decode": lambda: pipe._vae_decode(c_img, options),
    }


def precision_errors(
    pipe: DiffBIRPipeline, precision: str, size: int = 512, steps: int = 10, seed: int = 0
) -> dict[str, Any]:
    """Errors of `pipe` cast to `precision` against its fp32 self, at `size` px (the VAE
    calls; the network at size / 8), and the whole image of a `size / 4` LQ at x4 (default
    options otherwise: CFG 6, batched). Leaves `pipe` in `precision`."""
    if pipe.precision != "fp32":
        raise ValueError(f"the pipeline must be built in fp32 to compare; it is {pipe.precision}")
    lq = torch.rand(1, 3, size // 4, size // 4, generator=torch.Generator().manual_seed(seed))
    whole = PipelineOptions(upscale=4, min_short_side=size, steps=steps, seed=seed, progress=False)
    calls = {**_calls(pipe, size, seed), "whole_image": lambda: pipe(lq, whole).images}
    results: dict[str, dict[str, Tensor | float]] = {}
    for dtype in ("fp32", precision):
        pipe.to(dtype=dtype)
        for name, call in calls.items():
            start = time.perf_counter()
            with torch.no_grad():
                out = call().float()
            results.setdefault(name, {})[dtype] = out
            results[name][f"{dtype}_seconds"] = time.perf_counter() - start
            log.info("%s %s: %.2f s", dtype, name, results[name][f"{dtype}_seconds"])
    report: dict[str, Any] = {"precision": precision, "size": size, "steps": steps,
                              "cfg_scale": whole.cfg_scale}  # fmt: skip
    for name, values in results.items():
        low, ref = values[precision], values["fp32"]
        error = {"psnr_db": psnr(low, ref)} if name == "whole_image" else {}
        report[name] = {
            "relative_l2": relative_l2(low, ref), **error,
            "fp32_seconds": values["fp32_seconds"], f"{precision}_seconds": values[f"{precision}_seconds"],
        }  # fmt: skip
    return report
