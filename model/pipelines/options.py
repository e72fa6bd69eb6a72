"""Options of one restoration call (`model.pipelines.diffbir.DiffBIRPipeline`) and their checks.

The defaults are the original CLI's (XPixelGroup/DiffBIR `inference.py`, v2.1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from model.diffusion.latent_guidance import LatentGuidance
from model.diffusion.samplers import SAMPLERS
from model.ops.color_fix import COLOR_FIX_MODES
from model.ops.sizing import RESIZES
from model.ops.tiling import TILE_WEIGHTS

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
# diffusers schedulers that accept `use_karras_sigmas` / `use_exponential_sigmas`.
SIGMA_SCHEDULE_SAMPLERS = ("dpm++_2m", "dpm++_2m_sde", "dpm++_3m_sde", "euler", "heun", "unipc")
SIGMA_SCHEDULES = ("original", "karras", "exponential")
# Tile sizes must be multiples of these (stage 1 and diffusion: one SwinIR window / 8 latents
# of 8 pixels; the VAE: one latent pixel).
TILE_MULTIPLES = {"stage1": 64, "vae_encoder": 8, "vae_decoder": 8, "diffusion": 64}
# "Tiled" runs: the original CLI's tile sizes (stage 1 and diffusion 512, VAE 256).
TILED_DEFAULTS = {"stage1": 512, "vae_encoder": 256, "vae_decoder": 256, "diffusion": 512}


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """Options of one restoration call; the defaults are the original CLI's (v2.1).

    Args:
        upscale: output size = (int(h·upscale), int(w·upscale)).
        resize_backend: how the LQ is resized by the upscale factor: "pil" (bicubic on the
            8-bit image, as the original) or "torch" (bicubic with antialiasing on floats).
        min_short_side: images whose short side is below this are processed at this size
            (bicubic, antialiased) and resized back at the end; 512 for the released models.
        sampler: a `model.diffusion.samplers.SAMPLERS` name; the default "edm_dpm++_3m_sde" is
            the original v2.1 default (k-diffusion's DPM-Solver++(3M) SDE on its EDM wrapper).
        sigma_schedule: "original" (the EDM samplers: the original's timestep/sigma rule; the
            diffusers samplers: their trailing timesteps), "karras" or "exponential" (EDM
            samplers and SIGMA_SCHEDULE_SAMPLERS).
        ddim_eta: DDIM's eta (sampler "ddim" only).
        ddim_spacing: DDIM's timesteps: "original" (range(0, T, T // steps) + 1, as the
            original; 7 steps take 8) or "trailing" (from t = T − 1, ending at ᾱ = 1).
        steps: sampling steps.
        start: "noise" (x_T ~ N(0, I)) or "cond" (x_T = q_sample(c_img, t_start)).
        noise_aug: > 0 replaces c_img by q_sample(c_img, noise_aug) (both CFG branches).
        cfg_scale: classifier-free guidance scale; 1 runs the conditional branch only.
        rescale_cfg: ramp the scale from 1 (t = T-1) to 1 + cfg_scale (t = 0).
        cfg_batched: run both CFG branches in one network call (2B batch); else two calls.
        pos_prompt, neg_prompt: text of the conditional / unconditional branch.
        control_strength: multiplies every control scale (the original's `--strength`; named so
            as not to clash with diffusers' img2img `strength`).
        control_scales: one scale per LAControlNet residual (13 for SD 2.1, encoder order then
            the middle block), or None for all 1; each is multiplied by `control_strength`.
        control_start, control_end: the LAControlNet steers the sampling steps k with
            control_start <= k / steps < control_end (fractions of the steps); the frozen UNet
            alone runs the others.
        guidance: latent image guidance toward the stage-1 image, or None.
        color_fix: "wavelet", "adain" or "none", against the stage-1 image.
        seed: seed of every image unless `restore` gets per-image seeds.
        stage1_tile_size, stage1_tile_stride: stage-1 tiles in its input pixels (None: whole;
            stride default half a tile).
        vae_encoder_tile_size, vae_encoder_tile_stride: encoder tiles in image pixels.
        vae_decoder_tile_size, vae_decoder_tile_stride: decoder tiles in image pixels.
        diffusion_tile_size, diffusion_tile_stride: diffusion tiles in image pixels (the latent
            tile is 1/8); diffusion_tile_batch_size tiles per network call.
        tile_weights: Gaussian weights of the diffusion tiles, "symmetric" (centred on both
            axes) or "original" (the original's, half a pixel off-centre in y).
        tile_captions: apply per-image captions to every diffusion tile (as the original does);
            off by default, since a global caption on each tile invents its content there.
        max_memory_gb: a peak-memory budget (CUDA allocated, or process RSS on a CPU): the tile
            sizes of every stage are chosen per input to stay under it (`memory_plan`),
            overriding the tile fields; None: the tile fields as given.
        progress: show tqdm bars for sampling steps and tiles.
    """

    upscale: float = 1.0
    resize_backend: str = "pil"
    min_short_side: int = 512
    sampler: str = "edm_dpm++_3m_sde"
    sigma_schedule: str = "original"
    ddim_eta: float = 0.0
    ddim_spacing: str = "original"
    steps: int = 10
    start: Literal["noise", "cond"] = "noise"
    noise_aug: int = 0
    cfg_scale: float = 6.0
    rescale_cfg: bool = False
    cfg_batched: bool = True
    pos_prompt: str = DEFAULT_POS_PROMPT
    neg_prompt: str = DEFAULT_NEG_PROMPT
    control_strength: float = 1.0
    control_scales: tuple[float, ...] | None = None
    control_start: float = 0.0
    control_end: float = 1.0
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
    tile_weights: str = "symmetric"
    tile_captions: bool = False
    max_memory_gb: float | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if self.upscale <= 0:
            raise ValueError(f"upscale must be > 0, got {self.upscale}")
        if self.min_short_side < 1:
            raise ValueError(f"min_short_side must be >= 1, got {self.min_short_side}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0 <= self.control_start < self.control_end <= 1:
            raise ValueError(
                "need 0 <= control_start < control_end <= 1, got "
                f"{self.control_start} and {self.control_end}"
            )
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {list(SAMPLERS)}")
        if self.sigma_schedule not in SIGMA_SCHEDULES:
            raise ValueError(
                f"sigma_schedule must be one of {SIGMA_SCHEDULES}, got {self.sigma_schedule!r}"
            )
        if self.tile_weights not in TILE_WEIGHTS:
            raise ValueError(
                f"tile_weights must be one of {TILE_WEIGHTS}, got {self.tile_weights!r}"
            )
        if self.resize_backend not in RESIZES:
            raise ValueError(
                f"resize_backend must be one of {list(RESIZES)}, got {self.resize_backend!r}"
            )
        if self.ddim_spacing not in ("original", "trailing"):
            raise ValueError(
                f"ddim_spacing must be original or trailing, got {self.ddim_spacing!r}"
            )
        if self.start not in ("noise", "cond"):
            raise ValueError(f"start must be 'noise' or 'cond', got {self.start!r}")
        if self.color_fix not in COLOR_FIX_MODES:
            raise ValueError(f"color_fix must be one of {COLOR_FIX_MODES}, got {self.color_fix!r}")
        if not 0 <= self.noise_aug < 1000:
            raise ValueError(f"noise_aug must be in [0, 999], got {self.noise_aug}")
        for stage, multiple in TILE_MULTIPLES.items():
            _check_tiles(stage, *self.tiles(stage), multiple)

    def pad_multiple(self) -> int:
        """The condition image's padding: ×64 (latents ×8), or ×8 when the VAE encoder or the
        diffusion is tiled, as the original."""
        tiled = self.vae_encoder_tile_size is not None or self.diffusion_tile_size is not None
        return 8 if tiled else 64

    def tiles(self, stage: str) -> tuple[int | None, int | None]:
        """(tile size, stride) of "stage1", "vae_encoder", "vae_decoder" or "diffusion"."""
        size = getattr(self, f"{stage}_tile_size")
        stride = getattr(self, f"{stage}_tile_stride")
        if size is not None and stride is None:
            stride = size // 2
        return size, stride

    def control_scale_list(self, count: int) -> list[float]:
        """The `count` control scales of this call (`control_scales` x `control_strength`)."""
        scales = self.control_scales if self.control_scales is not None else (1.0,) * count
        if len(scales) != count:
            raise ValueError(f"control_scales needs {count} values, got {len(scales)}")
        return [float(s) * self.control_strength for s in scales]

    def control_steps(self, steps: int) -> range:
        """The sampling step indices the LAControlNet steers."""
        return range(math.ceil(self.control_start * steps), math.ceil(self.control_end * steps))

    def sampler_options(self) -> dict[str, Any]:
        """Keyword arguments of `make_sampler` for this sampler."""
        if self.sampler == "ddim":
            return {"eta": self.ddim_eta, "timestep_spacing": self.ddim_spacing}
        if self.sampler.startswith("edm_"):
            return {"sigma_schedule": self.sigma_schedule}
        if self.sampler in SIGMA_SCHEDULE_SAMPLERS and self.sigma_schedule != "original":
            return {f"use_{self.sigma_schedule}_sigmas": True}
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


def tile_fields(tiled: bool, **given: int | None) -> dict[str, int | None]:
    """The `<stage>_tile_size` / `<stage>_tile_stride` options from the given ones (None: not
    set); with `tiled`, unset sizes take TILED_DEFAULTS."""
    fields: dict[str, int | None] = {}
    for stage, default in TILED_DEFAULTS.items():
        size = given.get(f"{stage}_tile_size")
        fields[f"{stage}_tile_size"] = default if size is None and tiled else size
        fields[f"{stage}_tile_stride"] = given.get(f"{stage}_tile_stride")
    return fields
