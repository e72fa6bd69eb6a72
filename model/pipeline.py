"""The DiffBIR restoration pipeline: LQ images in, restored images out (tensors in [0, 1]).

Data flow (the original's sizing rules by default, see reference README "Format facts"):

    lq (B,3,h,w) ─ stage 1 ─> I_reg, short side >= min_short_side ─ pad ×64 ─ VAE encode ─> c_img
    prompts ─ text encoder ─> c_txt (positive), c_txt (negative)
    x_T (noise or diffused c_img) ─ sampler over ControlLDM [tiles] [CFG] [latent guidance] ─> z_0
    z_0 ─ VAE decode ─ crop ─ colour fix against I_reg ─ resize to (int(h·s), int(w·s)) ─> image

The stage-1 placement follows the `Stage1Model` attributes (`model.stage1_models`):
`runs_before_upscale` (BSRNet) runs before the upscale resize, the others after it;
`runs_after_raise` (SwinIR) sees its input raised to the minimum size, the others have their
output raised. Options are `model.pipeline_options.PipelineOptions`. Every image has its own
seed and random generator, so its result does not depend on the other images of the batch.
File reading, writing and 8-bit conversion are the caller's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from model.cldm import ControlLDM
from model.color_fix import color_fix
from model.diffusion import Diffusion, ModelFn
from model.pipeline_options import (
    DEFAULT_NEG_PROMPT,
    DEFAULT_POS_PROMPT,
    KARRAS_SAMPLERS,
    PipelineOptions,
)
from model.sampling.guidance import classifier_free_guidance
from model.sampling.latent_guidance import latent_image_guidance
from model.sampling.schedulers import Sampler, SpacedDDPM, make_sampler, start_latent
from model.sampling.tiled import tiled_model_fn
from model.sizing import pad_to_multiple, resize_short_side_to
from model.stage1_models import Stage1Model
from model.tiling import tiled_forward

logger = logging.getLogger(__name__)

# The options and default prompts live in model.pipeline_options; importable from here too.
__all__ = [
    "DEFAULT_NEG_PROMPT",
    "DEFAULT_POS_PROMPT",
    "KARRAS_SAMPLERS",
    "PAD_MULTIPLE",
    "PRECISIONS",
    "DiffBIRPipeline",
    "PipelineOptions",
    "PipelineResult",
    "resize",
    "resolve_device",
    "short_side_size",
]
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Condition images are zero-padded to this before VAE encoding (latents ×8), as the original.
PAD_MULTIPLE = 64


@dataclasses.dataclass
class PipelineResult:
    """Outputs of `DiffBIRPipeline.restore`, both (B, 3, H_out, W_out) in [0, 1] on the device.

    Args:
        images: restored images.
        stage1: the stage-1 images (I_reg) resized to the output size.
        seeds: the seed used for each image.
    """

    images: Tensor
    stage1: Tensor
    seeds: list[int]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device for `device`; "auto" picks cuda, else mps, else cpu."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic antialiased resize to `size` (a no-op at the same size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", antialias=True)


def short_side_size(h: int, w: int, side: int) -> tuple[int, int]:
    """The size with short side `side` and the long side scaled and truncated (the original's)."""
    if h == w:
        return side, side
    return (side, int(w * side / h)) if h < w else (int(h * side / w), side)


class DiffBIRPipeline:
    """Two-stage blind image restoration on tensors.

    Args:
        stage1: the stage-1 cleaner (`model.stage1_models.load_stage1_model`).
        cldm: the ControlLDM, or None for a stage-1-only pipeline.
        diffusion: its training schedule (None with `cldm=None`).
        device: "auto" (cuda > mps > cpu) or a torch device; the models are moved there.
        precision: "fp32", "fp16" or "bf16". Lower precision runs stage 1 and the ControlLDM
            network under autocast, with UNet/LAControlNet weights cast (norms kept in fp32) on
            accelerators; the VAE and text encoder always run in fp32. fp16 on a CPU falls back
            to fp32.
    """

    def __init__(
        self,
        stage1: Stage1Model,
        cldm: ControlLDM | None = None,
        diffusion: Diffusion | None = None,
        device: str | torch.device = "auto",
        precision: str = "fp32",
    ) -> None:
        if (cldm is None) != (diffusion is None):
            raise ValueError("cldm and diffusion go together (both None for stage 1 only)")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.device = resolve_device(device)
        if self.device.type == "cpu" and precision == "fp16":
            logger.warning("fp16 is not supported well on the CPU; using fp32")
            precision = "fp32"
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.stage1 = stage1.eval().to(self.device)
        self.cldm, self.diffusion = cldm, diffusion
        if cldm is not None:
            self.cldm = cldm.eval().to(self.device)
            self.diffusion = diffusion.to(self.device)
            if self.dtype != torch.float32 and self.device.type != "cpu":
                self._cast_network()

    def _cast_network(self) -> None:
        # Like the original's cast_dtype: blocks in half precision, normalisations in fp32.
        for module in (self.cldm.unet, self.cldm.controlnet):
            # nn.Module.to: diffusers' own `to` warns about casting outside from_pretrained
            torch.nn.Module.to(module, self.dtype)
            for sub in module.modules():
                if isinstance(sub, torch.nn.GroupNorm | torch.nn.LayerNorm):
                    sub.float()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def has_diffusion(self) -> bool:
        """False for a stage-1-only pipeline."""
        return self.cldm is not None

    def output_size(self, lq: Tensor, options: PipelineOptions) -> tuple[int, int]:
        """(int(h·upscale), int(w·upscale)) for lq (B, 3, h, w)."""
        h, w = lq.shape[-2:]
        return int(h * options.upscale), int(w * options.upscale)

    def run_stage1(self, lq: Tensor, options: PipelineOptions) -> Tensor:
        """I_reg (B, 3, H', W'): stage 1 at the processing size (short side >= min_short_side)."""
        out_size, side = self.output_size(lq, options), options.min_short_side
        tile_size, tile_stride = options.tiles("stage1")

        def run(x: Tensor) -> Tensor:
            with self._autocast():
                return self.stage1(x, tile_size, tile_stride, options.progress).float()

        if self.stage1.runs_before_upscale:
            x = run(lq)
            if min(out_size) < side:
                return resize(x, short_side_size(*out_size, side))
            return resize(x, out_size)
        x = resize(lq, out_size)
        if self.stage1.runs_after_raise:
            return run(resize_short_side_to(x, side))
        return resize_short_side_to(run(x), side)

    @torch.no_grad()
    def restore_stage1(self, lq: Tensor, options: PipelineOptions | None = None) -> Tensor:
        """Stage 1 alone: (B, 3, H_out, W_out) in [0, 1] (no diffusion weights needed)."""
        options = options or PipelineOptions()
        lq = lq.to(self.device, torch.float32)
        return resize(self.run_stage1(lq, options), self.output_size(lq, options)).clamp(0, 1)

    @torch.no_grad()
    def restore(
        self,
        lq: Tensor,
        options: PipelineOptions | None = None,
        seeds: Sequence[int] | None = None,
        captions: Sequence[str] | None = None,
    ) -> PipelineResult:
        """Restore a batch `lq` (B, 3, h, w) in [0, 1] of equal-sized images.

        Args:
            lq: low-quality images, any size.
            options: see `PipelineOptions`.
            seeds: one seed per image (default `options.seed` for all).
            captions: optional per-image captions, prepended to the positive prompt as
                "caption, pos_prompt" (the original's joining).
        """
        if not self.has_diffusion:
            raise RuntimeError("this pipeline has no diffusion stage; use restore_stage1")
        options = options or PipelineOptions()
        lq = lq.to(self.device, torch.float32)
        batch = lq.shape[0]
        seeds = [options.seed] * batch if seeds is None else [int(s) for s in seeds]
        if len(seeds) != batch or (captions is not None and len(captions) != batch):
            raise ValueError(f"need {batch} seeds and captions, got {len(seeds)}")
        out_size = self.output_size(lq, options)
        cond_img = self.run_stage1(lq, options)
        sample = self._diffuse(cond_img, options, seeds, captions)
        sample = color_fix(sample, cond_img, options.color_fix)
        return PipelineResult(
            images=resize(sample, out_size).clamp(0, 1),
            stage1=resize(cond_img, out_size).clamp(0, 1),
            seeds=seeds,
        )

    __call__ = restore

    def _prompts(self, text: str, captions: Sequence[str] | None, batch: int) -> list[str]:
        if captions is None:
            return [text] * batch
        return [", ".join(p for p in (caption, text) if p) for caption in captions]

    def _diffuse(
        self,
        cond_img: Tensor,
        options: PipelineOptions,
        seeds: list[int],
        captions: Sequence[str] | None,
    ) -> Tensor:
        """Sample a latent conditioned on I_reg (B, 3, H', W'); returns the decoded image in
        [0, 1] (not clamped) at I_reg's size."""
        batch, h0, w0 = cond_img.shape[0], *cond_img.shape[-2:]
        padded, _ = pad_to_multiple(cond_img, PAD_MULTIPLE)
        c_img = self._vae_encode(padded, options)  # (B, 4, H/8, W/8)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        sampler = make_sampler(options.sampler, self.diffusion, **options.sampler_options())
        x_T = self._start_latents(sampler, c_img, options, generators)
        guidance_target = padded if _rgb_guidance(options) else c_img
        if options.noise_aug > 0:
            t = torch.full((batch,), options.noise_aug, dtype=torch.long, device=self.device)
            c_img = self.diffusion.q_sample(c_img, t, _randn(c_img, generators))
        cond = {"c_txt": self.cldm.encode_text(self._prompts(options.pos_prompt, captions, batch)),
                "c_img": c_img}  # fmt: skip
        uncond = {"c_txt": self.cldm.encode_text([options.neg_prompt] * batch), "c_img": c_img}
        model_fn = self._model_fn(sampler, options, uncond, guidance_target)
        with self._control_strength(options.strength):
            z_0 = self._sample(sampler, model_fn, x_T, options, cond, generators)
        return (self._vae_decode(z_0, options)[..., :h0, :w0] + 1) / 2

    def _start_latents(
        self, sampler: Sampler, c_img: Tensor, options: PipelineOptions, generators: list
    ) -> Tensor:
        """x_T per image from its own generator (contiguous, see `start_latent`)."""
        rows = [
            start_latent(sampler, self.diffusion, c_img[i : i + 1], options.steps, options.start, g)
            for i, g in enumerate(generators)
        ]
        return torch.cat(rows)

    def _model_fn(
        self, sampler: Sampler, options: PipelineOptions, uncond: dict, target: Tensor
    ) -> ModelFn:
        """ControlLDM under autocast, wrapped with tiling, then CFG, then latent guidance."""

        def network(x: Tensor, t: Tensor, cond: dict) -> Tensor:
            with self._autocast():
                return self.cldm(x, t, cond).float()

        model_fn: ModelFn = network
        tile_size, tile_stride = options.tiles("diffusion")
        if tile_size is not None:
            model_fn = tiled_model_fn(
                model_fn, tile_size // 8, tile_stride // 8, options.diffusion_tile_batch_size
            )
        if options.cfg_scale != 1:
            model_fn = classifier_free_guidance(
                model_fn,
                uncond,
                options.cfg_scale,
                options.rescale_cfg,
                self.diffusion.num_timesteps,
                batched=options.cfg_batched,
            )
        guidance = options.guidance
        if guidance is not None and guidance.scale > 0:
            model_fn = latent_image_guidance(
                model_fn,
                self.diffusion,
                target,
                guidance,
                timesteps=sampler.timesteps(options.steps),
                decode=lambda z: (self.cldm.vae_decode(z) + 1) / 2,
            )
        return model_fn

    def _sample(
        self,
        sampler: Sampler,
        model_fn: ModelFn,
        x_T: Tensor,
        options: PipelineOptions,
        cond: dict,
        generators: list[torch.Generator],
    ) -> Tensor:
        """Run the sampler with per-image random streams."""
        if isinstance(sampler, SpacedDDPM):
            # The respaced sampler takes one generator; pass its per-step noise precomputed.
            noise = [_randn(x_T, generators) for _ in range(options.steps)]
            return sampler.sampler.sample(
                model_fn, x_T, options.steps, cond, noise=noise, progress=options.progress
            )
        # diffusers draws per-image noise from a list of generators (randn_tensor).
        generator: Any = generators if len(generators) > 1 else generators[0]
        return sampler.sample(model_fn, x_T, options.steps, cond, generator, options.progress)

    @contextlib.contextmanager
    def _control_strength(self, strength: float) -> Iterator[None]:
        previous = list(self.cldm.control_scales)
        self.cldm.control_scales = [strength] * len(previous)
        try:
            yield
        finally:
            self.cldm.control_scales = previous

    def _vae_encode(self, img: Tensor, options: PipelineOptions) -> Tensor:
        tile_size, tile_stride = options.tiles("vae_encoder")
        x = img * 2 - 1
        if tile_size is None:
            return self.cldm.vae_encode(x)
        return tiled_forward(
            self.cldm.vae_encode, x, tile_size, tile_stride, scale=1 / 8, multiple=8,
            progress=options.progress, desc="VAE encoder tiles",
        )  # fmt: skip

    def _vae_decode(self, z: Tensor, options: PipelineOptions) -> Tensor:
        tile_size, tile_stride = options.tiles("vae_decoder")
        if tile_size is None:
            return self.cldm.vae_decode(z)
        return tiled_forward(
            self.cldm.vae_decode, z, tile_size // 8, tile_stride // 8, scale=8,
            progress=options.progress, desc="VAE decoder tiles",
        )  # fmt: skip


def _rgb_guidance(options: PipelineOptions) -> bool:
    # RGB-space guidance compares with the (padded) stage-1 image, latent-space with c_img.
    return options.guidance is not None and options.guidance.space == "rgb"


def _randn(like: Tensor, generators: list[torch.Generator]) -> Tensor:
    """Standard normal noise shaped like `like`, row i drawn from generators[i] on the CPU."""
    rows = [torch.randn((1, *like.shape[1:]), generator=g) for g in generators]
    return torch.cat(rows).to(like)
