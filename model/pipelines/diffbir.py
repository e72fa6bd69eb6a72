"""DiffBIRPipeline: LQ images in, restored images out, in the shape of a diffusers pipeline.

Data flow (the original's sizing rules by default, see reference README "Format facts"):

    lq (B,3,h,w) ─ stage 1 ─> I_reg, short side >= min_short_side ─ pad ×64 ─ VAE encode ─> c_img
    prompts ─ text encoder (cached per prompt) ─> c_txt (positive), c_txt (negative, CFG only)
    x_T (noise, diffused c_img or `latents`) ─ sampler over ControlLDM [tiles] [CFG] [guidance] ─> z_0
    z_0 ─ VAE decode ─ crop ─ colour fix against I_reg ─ resize to (int(h·s), int(w·s)) ─> image

`DiffBIRPipeline.from_pretrained("v2.1", task="sr")` loads a release (`model.pipelines.loading`);
`pipe(images, ...)` takes tensors, PIL images or numpy arrays and returns a `PipelineResult`.
Stage-1 placement is `model.nets.stage1.Stage1Model.at_processing_size`. Each image has its
own random stream (a seed, or a generator), so its result does not depend on the batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.diffusion.callbacks import StepCallback
from model.diffusion.noise import randn_rows
from model.diffusion.samplers import make_sampler
from model.diffusion.schedule import Diffusion
from model.io.file_pages import hand_back, trim_heap
from model.nets.cldm import ControlLDM, cast_cldm
from model.nets.stage1 import Stage1Model
from model.ops.color_fix import color_fix
from model.ops.device import PRECISIONS, cpu_has_native_bf16, precision_name, resolve_device
from model.ops.sizing import RESIZES, pad_to_multiple, resize
from model.ops.tiling import tiled_forward
from model.pipelines import memory_plan
from model.pipelines.inputs import OutputType, PipelineResult, to_batch, to_output
from model.pipelines.options import PipelineOptions
from model.pipelines.prompts import PromptCache, TextConditions
from model.pipelines.sampling import (
    Generators,
    build_model_fn,
    per_image_generators,
    run_sampler,
    start_latents,
)

logger = logging.getLogger(__name__)
VAE_PRECISIONS = ("auto", "fp32")

# enable_vae_tiling(): the original CLI's --vae_encoder_tile_size / --vae_decoder_tile_size.
VAE_TILE_SIZE = 256


class DiffBIRPipeline:
    """Two-stage blind image restoration.

    Args:
        stage1: the stage-1 cleaner (`model.nets.stage1.load_stage1_model`).
        cldm: the ControlLDM, or None for a stage-1-only pipeline.
        diffusion: its training schedule (None with `cldm=None`).
        device: "auto" (cuda > mps > cpu) or a torch device; the models are moved there.
        precision: "fp32", "fp16" or "bf16" (or a torch dtype). Lower precision casts the
            UNet/LAControlNet weights (norms kept in fp32) and runs stage 1 and the networks
            under autocast, as the original does. fp16 on a CPU falls back to fp32.
        vae_precision: "auto": the VAE and text encoder in `precision` too (weights cast,
            autocast, as the original's autocast runs them; an fp16 VAE that overflows is
            recomputed in fp32); "fp32": both always in fp32.

    Attributes:
        options: the defaults of every call; keyword arguments of a call override them, and
            `set_sampler`, `enable_vae_tiling` change them.
        weight_paths: the files `from_pretrained` loaded, by role.
        page_idle_weights: hand the pages of memory-mapped weights (the released files, loaded
            with mmap) back to the OS when their network has run (`model.io.file_pages`): only
            the running network's weights stay resident. Re-reading them from the page cache
            takes about 0.1 s per image; True by default.
    """

    def __init__(
        self,
        stage1: Stage1Model,
        cldm: ControlLDM | None = None,
        diffusion: Diffusion | None = None,
        device: str | torch.device = "auto",
        precision: str | torch.dtype = "fp32",
        vae_precision: str = "auto",
    ) -> None:
        if (cldm is None) != (diffusion is None):
            raise ValueError("cldm and diffusion go together (both None for stage 1 only)")
        self.stage1, self.cldm, self.diffusion = stage1.eval(), cldm, diffusion
        if cldm is not None:
            self.cldm = cldm.eval()
        self.options = PipelineOptions()
        self.weight_paths: dict[str, Path] = {}
        self.offload = False
        self.page_idle_weights = True
        self._prompt_cache = PromptCache(self._encode_text)
        self._warned_tile_captions = False
        if vae_precision not in VAE_PRECISIONS:
            raise ValueError(
                f"vae_precision must be one of {VAE_PRECISIONS}, got {vae_precision!r}"
            )
        self.vae_precision = vae_precision
        self.device = resolve_device(device)
        self.precision = "fp32"
        self.to(self.device, precision)

    @classmethod
    def from_pretrained(
        cls, version: str = "v2.1", task: str = "sr", **kwargs: Any
    ) -> DiffBIRPipeline:
        """A released model set (or "custom"), its weights found or downloaded by the registry.

        Args:
            version: "v1", "v2", "v2.1" or "custom" (then `model_config` and `checkpoints`).
            task: "sr", "denoise" or "face".
            **kwargs: of `model.pipelines.loading.load_pretrained`: weights_dir, device,
                dtype, checkpoints ({"stage1"|"sd"|"controlnet": path}), model_config,
                stage1_only, offline.
        """
        from model.pipelines.loading import load_pretrained

        return load_pretrained(version, task, **kwargs)

    # ---- state: device, precision, offload, options -------------------------------------------

    def to(
        self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
    ) -> DiffBIRPipeline:
        """Move the models to `device` and/or run them at `dtype` ("fp16", torch.bfloat16, ...)."""
        if device is not None:
            self.device = resolve_device(device)
        if dtype is not None:
            precision = precision_name(dtype)
            if self.device.type == "cpu" and precision == "fp16":
                logger.warning("fp16 is not supported well on the CPU; using fp32")
                precision = "fp32"
            if self.device.type == "cpu" and precision == "bf16" and not cpu_has_native_bf16():
                logger.warning(
                    "this CPU has no native bf16 (no avx512_bf16 / amx_bf16): bf16 runs emulated, "
                    "several times slower than fp32; use --precision fp32"
                )
            self.precision = precision
        self._prompt_cache.clear()
        home = torch.device("cpu") if self.offload else self.device
        self.stage1.to(home)
        if self.cldm is not None:
            self.cldm.to(home)
            self.diffusion.to(self.device)
            self._cast_network()
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The network precision as a torch dtype."""
        return PRECISIONS[self.precision]

    @property
    def has_diffusion(self) -> bool:
        """False for a stage-1-only pipeline."""
        return self.cldm is not None

    def _cast_network(self) -> None:
        cast_cldm(self.cldm, self.dtype, vae_too=self.vae_precision == "auto")

    def enable_model_cpu_offload(self, device: str | torch.device = "cuda") -> None:
        """Keep every network on the CPU and move each to `device` only while it runs
        (stage 1, text encoder, VAE, LAControlNet + UNet): peak accelerator memory is about the
        largest of them instead of their sum."""
        self.offload = True
        self.to(device)

    def disable_model_cpu_offload(self) -> None:
        """Keep every network on the pipeline's device."""
        self.offload = False
        self.to(self.device)

    def enable_vae_tiling(self, tile_size: int = VAE_TILE_SIZE, stride: int | None = None) -> None:
        """VAE encoder and decoder in overlapping tiles of `tile_size` image pixels by default."""
        self.options = dataclasses.replace(
            self.options,
            vae_encoder_tile_size=tile_size, vae_encoder_tile_stride=stride,
            vae_decoder_tile_size=tile_size, vae_decoder_tile_stride=stride,
        )  # fmt: skip

    def disable_vae_tiling(self) -> None:
        """VAE encoder and decoder on whole images by default."""
        self.enable_vae_tiling(None, None)

    def set_sampler(self, name: str, **sampler_options: Any) -> None:
        """Swap the default sampler, e.g. `set_sampler("ddim", ddim_eta=0.5)` (options are
        `PipelineOptions` fields: steps, karras_sigmas, ddim_eta, ...)."""
        self.options = dataclasses.replace(self.options, sampler=name, **sampler_options)

    @contextlib.contextmanager
    def _running(self, *modules: nn.Module) -> Iterator[None]:
        """The block runs `modules`: with CPU offload on the device meanwhile; on a CPU their
        weight pages (`page_idle_weights`) and the heap's free pages are handed back after."""
        if self.offload:
            for module in modules:
                module.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                for module in modules:
                    module.to("cpu")
            if self.device.type == "cpu":
                hand_back(modules, weight_pages=self.page_idle_weights)

    def stage_resident_bytes(self, options: PipelineOptions | None = None) -> dict[str, int]:
        """{stage: bytes resident while it runs} (CPU RSS, CUDA allocated), predicted from now:
        networks whose weights come and go count while they run (`memory_plan`)."""
        idle_out = self.page_idle_weights if self.device.type == "cpu" else self.offload
        networks = memory_plan.stage_networks(
            self.stage1, self.cldm, _rgb_guidance(options or self.options)
        )
        return memory_plan.stage_residents(networks, self.device, idle_out)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # ---- the diffusers-style call --------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        images: Any,
        options: PipelineOptions | None = None,
        *,
        captions: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
        generator: Generators | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        callback: StepCallback | None = None,
        output_type: OutputType = "pt",
        **overrides: Any,
    ) -> PipelineResult:
        """Restore equal-sized images.

        Args:
            images: a (B, 3, H, W) or (3, H, W) tensor in [0, 1], a PIL image, an HWC numpy
                array (uint8, uint16 or float in [0, 1]), or a list of these.
            options: the call's options (default `self.options`); `overrides` (any
                `PipelineOptions` field, e.g. steps=20, cfg_scale=4) replace single fields.
            captions: per-image captions, joined with the positive prompt as
                "caption, pos_prompt" (the original's joining).
            seeds: one seed per image (default `options.seed` for all); ignored with `generator`.
            generator: a torch.Generator (shared by the batch) or one per image, on the
                pipeline's device; it draws x_T and the sampler's noise.
            latents: x_T (B, 4, H'/8, W'/8) at the padded processing size, instead of drawing it.
            prompt_embeds, negative_prompt_embeds: text contexts (1 or B, 77, D) instead of
                encoding the prompts.
            callback: `callback(step, t, latents)` after every sampler step; returning True
                stops the run with `model.diffusion.callbacks.SamplingStopped`.
            output_type: "pt" (tensors), "pil" or "np" (uint8 HWC).
        """
        options = dataclasses.replace(options or self.options, **overrides)
        lq, alphas = to_batch(images)
        if not self.has_diffusion:
            out = self.restore_stage1(lq, options)
            wrapped = to_output(out, output_type, alphas)
            return PipelineResult(wrapped, wrapped, [None] * len(lq))
        result = self.restore(
            lq, options, seeds, captions, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            callback=callback,
        )  # fmt: skip
        return PipelineResult(
            to_output(result.images, output_type, alphas),
            to_output(result.stage1, output_type, alphas),
            result.seeds,
            result.tiles,
        )

    # ---- tensor-level stages -------------------------------------------------------------------

    def output_size(self, lq: Tensor, options: PipelineOptions) -> tuple[int, int]:
        """(int(h·upscale), int(w·upscale)) for lq (B, 3, h, w)."""
        h, w = lq.shape[-2:]
        return int(h * options.upscale), int(w * options.upscale)

    def run_stage1(self, lq: Tensor, options: PipelineOptions) -> Tensor:
        """I_reg (B, 3, H', W'): stage 1 at the processing size (short side >= min_short_side)."""
        with self._running(self.stage1):
            return self.stage1.at_processing_size(
                lq, self.output_size(lq, options), options.min_short_side,
                *options.tiles("stage1"), progress=options.progress, autocast=self._autocast,
                upscale_resize=RESIZES[options.resize_backend],
            )  # fmt: skip

    @torch.no_grad()
    def restore_stage1(self, lq: Tensor, options: PipelineOptions | None = None) -> Tensor:
        """Stage 1 alone: (B, 3, H_out, W_out) in [0, 1] (no diffusion weights needed)."""
        options = options or self.options
        lq = lq.to(self.device, torch.float32)
        out_size = self.output_size(lq, options)
        if options.max_memory_gb is not None:
            residents = self.stage_resident_bytes(options)
            options = memory_plan.plan_for_budget(options, out_size, len(lq), residents, self.dtype)
        return resize(self.run_stage1(lq, options), out_size).clamp(0, 1)

    @torch.no_grad()
    def restore(
        self,
        lq: Tensor,
        options: PipelineOptions | None = None,
        seeds: Sequence[int] | None = None,
        captions: Sequence[str] | None = None,
        *,
        generator: Generators | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        callback: StepCallback | None = None,
    ) -> PipelineResult:
        """Restore a batch `lq` (B, 3, h, w) in [0, 1] of equal-sized images; tensors out.

        The arguments are those of `__call__`.
        """
        if not self.has_diffusion:
            raise RuntimeError("this pipeline has no diffusion stage; use restore_stage1")
        options = options or self.options
        lq = lq.to(self.device, torch.float32)
        batch = lq.shape[0]
        if captions is not None and len(captions) != batch:
            raise ValueError(f"need {batch} captions, got {len(captions)}")
        generators, used_seeds = per_image_generators(batch, options.seed, seeds, generator)
        out_size = self.output_size(lq, options)
        if options.max_memory_gb is not None:
            residents = self.stage_resident_bytes(options)
            options = memory_plan.plan_for_budget(options, out_size, batch, residents, self.dtype)
        cond_img = self.run_stage1(lq, options)
        texts = TextConditions(captions, prompt_embeds, negative_prompt_embeds)
        sample = self._diffuse(cond_img, options, generators, texts, latents, callback)
        sample = color_fix(sample, cond_img, options.color_fix)
        return PipelineResult(
            images=resize(sample, out_size).clamp(0, 1),
            stage1=resize(cond_img, out_size).clamp(0, 1),
            seeds=used_seeds,
            tiles=memory_plan.chosen_tiles(options) if options.max_memory_gb is not None else None,
        )

    def encode_prompt(self, prompts: Sequence[str]) -> Tensor:
        """Text contexts (B, 77, D) of `prompts`; each distinct prompt is encoded once and
        kept (`model.pipelines.prompts.PromptCache`)."""
        return self._prompt_cache(prompts, self.device)

    def clear_prompt_cache(self) -> None:
        """Forget the cached prompt embeddings (the next call encodes its prompts again)."""
        self._prompt_cache.clear()

    def _encode_text(self, prompts: list[str]) -> Tensor:
        if self.cldm.text_encoder is None:
            raise RuntimeError(
                f"the text encoder was released (release_text_encoder); cannot encode {prompts}"
            )
        with self._running(self.cldm.text_encoder), self._vae_text_autocast():
            return self.cldm.encode_text(prompts).float()

    def release_text_encoder(self, keep: Sequence[str] = ()) -> None:
        """Encode the prompts `keep`, then free the text encoder (when a run's prompts are all
        known): cached prompts keep working, a new one raises RuntimeError."""
        for prompt in keep:  # one at a time, as calls encode them: the same numbers
            self.encode_prompt([prompt])
        self.cldm.text_encoder = None
        gc.collect()
        trim_heap()  # a cast text encoder's weights lie in the heap

    def _vae_text_autocast(self) -> contextlib.AbstractContextManager:
        return self._autocast() if self.vae_precision == "auto" else contextlib.nullcontext()

    def _tile_safe(
        self, texts: TextConditions, c_img: Tensor, options: PipelineOptions
    ) -> TextConditions:
        """`texts` without the per-image captions when the diffusion runs on several tiles
        (unless `options.tile_captions`): one caption of the whole image applied to each tile
        makes every tile show what it describes (the original's open problem #138)."""
        tile_size, _ = options.tiles("diffusion")
        if texts.captions is None or tile_size is None or options.tile_captions:
            return texts
        if max(c_img.shape[-2:]) <= tile_size // 8:
            return texts
        if not self._warned_tile_captions:
            logger.warning(
                "captions are not applied under tiled diffusion (the tiles get the positive "
                "prompt only); --tile-captions applies each caption to every tile"
            )
            self._warned_tile_captions = True
        return dataclasses.replace(texts, captions=None)

    def _diffuse(
        self,
        cond_img: Tensor,
        options: PipelineOptions,
        generators: list[torch.Generator],
        texts: TextConditions,
        latents: Tensor | None,
        callback: StepCallback | None,
    ) -> Tensor:
        """Sample a latent conditioned on I_reg (B, 3, H', W'); returns the decoded image in
        [0, 1] (not clamped) at I_reg's size."""
        batch, h0, w0 = cond_img.shape[0], *cond_img.shape[-2:]
        padded, _ = pad_to_multiple(cond_img, options.pad_multiple())
        c_img = self._vae_encode(padded, options)  # (B, 4, H/8, W/8)
        sampler = make_sampler(options.sampler, self.diffusion, **options.sampler_options())
        if latents is not None:
            if latents.shape != c_img.shape:
                raise ValueError(
                    f"latents must be {tuple(c_img.shape)}, got {tuple(latents.shape)}"
                )
            x_T = latents.to(self.device, torch.float32)
        else:
            x_T = start_latents(sampler, self.diffusion, c_img, options, generators)
        guidance_target = padded if _rgb_guidance(options) else c_img
        if options.noise_aug > 0:
            t = torch.full((batch,), options.noise_aug, dtype=torch.long, device=self.device)
            c_img = self.diffusion.q_sample(c_img, t, randn_rows(c_img, generators))
        texts = self._tile_safe(texts, c_img, options)
        encode = self.encode_prompt
        cond = {"c_txt": texts.positive(encode, options.pos_prompt, batch), "c_img": c_img}
        uncond = None
        if options.cfg_scale != 1:
            uncond = {"c_txt": texts.negative(encode, options.neg_prompt, batch), "c_img": c_img}
        model_fn = build_model_fn(
            self.cldm, self.diffusion, sampler, options, uncond, guidance_target, self._autocast
        )
        modules = (self.cldm.unet, self.cldm.controlnet)
        if options.guidance is not None and options.guidance.space == "rgb":
            modules += (self.cldm.vae,)
        with self._control_scales(options), self._running(*modules):
            z_0 = run_sampler(sampler, model_fn, x_T, options, cond, generators, callback)
        return (self._vae_decode(z_0, options)[..., :h0, :w0] + 1) / 2

    @contextlib.contextmanager
    def _control_scales(self, options: PipelineOptions) -> Iterator[None]:
        previous = list(self.cldm.control_scales)
        self.cldm.control_scales = options.control_scale_list(len(previous))
        try:
            yield
        finally:
            self.cldm.control_scales = previous

    def _vae_encode(self, img: Tensor, options: PipelineOptions) -> Tensor:
        tile_size, tile_stride = options.tiles("vae_encoder")

        def encode(x: Tensor) -> Tensor:
            if tile_size is None:
                return self.cldm.vae_encode(x)
            return tiled_forward(
                self.cldm.vae_encode, x, tile_size, tile_stride, scale=1 / 8, multiple=8,
                progress=options.progress, desc="VAE encoder tiles",
            )  # fmt: skip

        return self._run_vae(encode, img * 2 - 1)

    def _vae_decode(self, z: Tensor, options: PipelineOptions) -> Tensor:
        tile_size, tile_stride = options.tiles("vae_decoder")

        def decode(z: Tensor) -> Tensor:
            if tile_size is None:
                return self.cldm.vae_decode(z)
            return tiled_forward(
                self.cldm.vae_decode, z, tile_size // 8, tile_stride // 8, scale=8,
                progress=options.progress, desc="VAE decoder tiles",
            )  # fmt: skip

        return self._run_vae(decode, z)

    def _run_vae(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """`fn` (VAE encode or decode) in the VAE's precision, fp32 out. SD 2.1's VAE can
        overflow in fp16: a non-finite fp16 result is recomputed with the VAE in fp32."""
        vae = self.cldm.vae
        with self._running(vae), self._vae_text_autocast():
            out = fn(x).float()
        if next(vae.parameters()).dtype != torch.float16 or torch.isfinite(out).all():
            return out
        logger.warning("the fp16 VAE overflowed; recomputing this image with the VAE in fp32")
        nn.Module.to(vae, torch.float32)
        try:
            with self._running(vae):
                return fn(x.float()).float()
        finally:
            self._cast_network()


def _rgb_guidance(options: PipelineOptions) -> bool:
    # RGB-space guidance compares with the (padded) stage-1 image, latent-space with c_img.
    return options.guidance is not None and options.guidance.space == "rgb"
