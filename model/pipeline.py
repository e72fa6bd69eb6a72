"""The DiffBIR restoration pipeline: LQ images in, restored images out (tensors in [0, 1]).

Data flow (the original's sizing rules by default, see reference README "Format facts"):

    lq (B,3,h,w) ─ stage 1 ─> I_reg, short side >= min_short_side ─ pad ×64 ─ VAE encode ─> c_img
    prompts ─ text encoder ─> c_txt (positive), c_txt (negative)
    x_T (noise or diffused c_img) ─ sampler over ControlLDM [tiles] [CFG] [latent guidance] ─> z_0
    z_0 ─ VAE decode ─ crop ─ colour fix against I_reg ─ resize to (int(h·s), int(w·s)) ─> image

The stage-1 placement follows `model.stage1_models` (BSRNet runs before the upscale resize,
SCUNet and SwinIR after it; SwinIR is raised to the minimum size before it runs, the others
after). Every image has its own seed and random generator, so its result does not depend on
the other images of the batch. File reading, writing and 8-bit conversion are the caller's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from model.cldm import ControlLDM
from model.color_fix import COLOR_FIX_MODES, color_fix
from model.diffusion import Diffusion, ModelFn
from model.sampling.guidance import classifier_free_guidance, rescaled_cfg_scale
from model.sampling.latent_guidance import LatentGuidance, latent_image_guidance
from model.sampling.schedulers import SAMPLERS, Sampler, SpacedDDPM, make_sampler, start_latent
from model.sampling.tiled import tiled_model_fn
from model.sizing import pad_to_multiple, resize_short_side_to
from model.stage1_models import Stage1Model
from model.tiling import tiled_forward

logger = logging.getLogger(__name__)

# The original CLI's prompts (XPixelGroup/DiffBIR inference.py), used with every version.
DEFAULT_POS_PROMPT = (
    "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera, "
    "hyper detailed photo - realistic maximum detail, 32k, Color Grading, ultra HD, extreme "
    "meticulous detailing, skin pore detailing, hyper sharpness, perfect without deformations."
)
DEFAULT_NEG_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, "
    "CG Style, 3D render, unreal engine, blurring, dirty, messy, worst quality, low quality, "
    "frames, watermark, signature, jpeg artifacts, deformed, lowres, over-smooth."
)
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# diffusers schedulers that accept `use_karras_sigmas`.
KARRAS_SAMPLERS = ("dpm++_2m", "dpm++_2m_sde", "dpm++_3m_sde", "euler", "heun", "unipc")
# Condition images are zero-padded to this before VAE encoding (latents ×8), as the original.
PAD_MULTIPLE = 64
# Stage-1 models that see the image after it is raised to the minimum size (the others before).
_RAISE_BEFORE_STAGE1 = ("swinir",)


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """Options of one restoration call; the defaults are the original CLI's (v2.1).

    Args:
        upscale: output size = (int(h·upscale), int(w·upscale)).
        min_short_side: images whose short side is below this are processed at this size
            (bicubic, antialiased) and resized back at the end; 512 for the released models.
        sampler: a `model.sampling.schedulers.SAMPLERS` name; "dpm++_3m_sde" with Karras
            sigmas stands for the original's "edm_dpm++_3m_sde".
        karras_sigmas: use Karras sigmas where the sampler supports them (KARRAS_SAMPLERS).
        ddim_eta: DDIM's eta (sampler "ddim" only).
        steps: sampling steps.
        start: "noise" (x_T ~ N(0, I)) or "cond" (x_T = q_sample(c_img, t_start)).
        noise_aug: > 0 replaces c_img by q_sample(c_img, noise_aug) (both CFG branches).
        cfg_scale: classifier-free guidance scale; 1 runs the conditional branch only.
        rescale_cfg: ramp the scale from 1 (t = T-1) to 1 + cfg_scale (t = 0).
        cfg_batched: run both CFG branches in one network call (2B batch); else two calls.
        pos_prompt, neg_prompt: text of the conditional / unconditional branch.
        strength: control strength, every control scale.
        guidance: latent image guidance toward the stage-1 image, or None.
        color_fix: "wavelet", "adain" or "none", against the stage-1 image.
        seed: seed of every image unless `restore` gets per-image seeds.
        stage1_tile_size, stage1_tile_stride: stage-1 tiles in its input pixels (None: whole;
            stride default half a tile).
        vae_encoder_tile_size, vae_encoder_tile_stride: encoder tiles in image pixels.
        vae_decoder_tile_size, vae_decoder_tile_stride: decoder tiles in image pixels.
        diffusion_tile_size, diffusion_tile_stride: diffusion tiles in image pixels (the latent
            tile is 1/8); diffusion_tile_batch_size tiles per network call.
        progress: show tqdm bars for sampling steps and tiles.
    """

    upscale: float = 1.0
    min_short_side: int = 512
    sampler: str = "dpm++_3m_sde"
    karras_sigmas: bool = True
    ddim_eta: float = 0.0
    steps: int = 10
    start: Literal["noise", "cond"] = "noise"
    noise_aug: int = 0
    cfg_scale: float = 6.0
    rescale_cfg: bool = False
    cfg_batched: bool = True
    pos_prompt: str = DEFAULT_POS_PROMPT
    neg_prompt: str = DEFAULT_NEG_PROMPT
    strength: float = 1.0
    guidance: LatentGuidance | None = None
    color_fix: str = "wavelet"
    seed: int = 231
    stage1_tile_size: int | None = None
    stage1_tile_stride: int | None = None
    vae_encoder_tile_size: int | None = None
    vae_encoder_tile_stride: int | None = None
    vae_decoder_tile_size: int | None = None
    vae_decoder_tile_stride: int | None = None
    diffusion_tile_size: int | None = None
    diffusion_tile_stride: int | None = None
    diffusion_tile_batch_size: int = 1
    progress: bool = False

    def __post_init__(self) -> None:
        if self.upscale <= 0 or self.min_short_side < 1 or self.steps < 1:
            raise ValueError("upscale must be > 0, min_short_side and steps >= 1")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {list(SAMPLERS)}")
        if self.start not in ("noise", "cond"):
            raise ValueError(f"start must be 'noise' or 'cond', got {self.start!r}")
        if self.color_fix not in COLOR_FIX_MODES:
            raise ValueError(f"color_fix must be one of {COLOR_FIX_MODES}, got {self.color_fix!r}")
        if not 0 <= self.noise_aug < 1000:
            raise ValueError(f"noise_aug must be in [0, 999], got {self.noise_aug}")
        for stage, multiple in (("stage1", 64), ("vae_encoder", 8), ("vae_decoder", 8),
                                ("diffusion", 64)):  # fmt: skip
            _check_tiles(stage, *self.tiles(stage), multiple)

    def tiles(self, stage: str) -> tuple[int | None, int | None]:
        """(tile size, stride) of "stage1", "vae_encoder", "vae_decoder" or "diffusion"."""
        size = getattr(self, f"{stage}_tile_size")
        stride = getattr(self, f"{stage}_tile_stride")
        if size is not None and stride is None:
            stride = size // 2
        return size, stride

    def sampler_options(self) -> dict[str, Any]:
        """Keyword arguments of `make_sampler` for this sampler."""
        if self.sampler == "ddim":
            return {"eta": self.ddim_eta}
        if self.sampler in KARRAS_SAMPLERS and self.karras_sigmas:
            return {"use_karras_sigmas": True}
        return {}


def _check_tiles(stage: str, size: int | None, stride: int | None, multiple: int) -> None:
    if size is None:
        return
    if size <= 0 or size % multiple:
        raise ValueError(f"{stage} tile size must be a positive multiple of {multiple}, got {size}")
    if not 0 < stride <= size or stride % 8:
        raise ValueError(
            f"{stage} tile stride must be a multiple of 8 in (0, {size}], got {stride}"
        )


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


def _batched_cfg(model_fn: ModelFn, uncond: dict, scale: float, rescale: bool, T: int) -> ModelFn:
    """Classifier-free guidance with both branches stacked into one call of batch 2B."""

    def guided(x: Tensor, t: Tensor, cond: dict) -> Tensor:
        both = {key: torch.cat([cond[key], uncond[key]]) for key in cond}
        out_cond, out_uncond = model_fn(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        s: float | Tensor = scale
        if rescale and scale > 1:
            s = rescaled_cfg_scale(scale, t, T).to(x).reshape(-1, *[1] * (x.ndim - 1))
        return out_uncond + s * (out_cond - out_uncond)

    return guided


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
        if self.stage1.name in _RAISE_BEFORE_STAGE1:
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
        """x_T per image from its own generator, in the contiguous layout whatever c_img's
        (a channels-last x_T would pick other conv kernels and change the result slightly)."""
        rows = [
            start_latent(sampler, self.diffusion, c_img[i : i + 1], options.steps, options.start, g)
            for i, g in enumerate(generators)
        ]
        return torch.cat(rows).contiguous()

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
            T = self.diffusion.num_timesteps
            if options.cfg_batched:
                model_fn = _batched_cfg(model_fn, uncond, options.cfg_scale, options.rescale_cfg, T)
            else:
                model_fn = classifier_free_guidance(
                    model_fn, uncond, options.cfg_scale, options.rescale_cfg, T
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
