"""The registry names and option defaults inference.py's parser shows, importable without torch.

`inference.py --help` must not import torch, diffusers or transformers; the registries they
come from do (`SAMPLERS`, `STAGE1_MODELS`, `PipelineOptions`, ...), so their names are listed
here and tests/test_cli_startup.py checks that each list equals its registry.
"""

from __future__ import annotations

SAMPLERS = (
    "edm_euler", "edm_euler_a", "edm_heun", "edm_dpm_2", "edm_dpm_2_a", "edm_lms",
    "edm_dpm++_2s_a", "edm_dpm++_sde", "edm_dpm++_2m", "edm_dpm++_2m_sde", "edm_dpm++_3m_sde",
    "spaced", "ddpm", "ddim", "dpm++_2m", "dpm++_2m_sde", "dpm++_3m_sde", "euler", "euler_a",
    "heun", "unipc",
)  # fmt: skip
"""`model.diffusion.samplers.SAMPLERS`."""
DIFFUSION_PRESETS = ("v1", "v2", "v2.1")
"""`model.diffusion.schedule.DIFFUSION_PRESETS`."""
STAGE1_MODELS = ("swinir", "bsrnet", "scunet")
"""`model.nets.stage1.STAGE1_MODELS`."""
DETECTION_MODELS = ("retinaface_resnet50", "retinaface_mobile0.25")
"""`model.pipelines.faces.DETECTION_MODELS`."""
CAPTIONERS = ("none", "blip", "llava", "ram")
"""`model.pipelines.captioner.CAPTIONERS`."""
COLOR_FIX_MODES = ("wavelet", "adain", "none")
"""`model.ops.color_fix.COLOR_FIX_MODES`."""
RESIZES = ("pil", "torch")
"""`model.ops.sizing.RESIZES`."""
TILE_WEIGHTS = ("symmetric", "original")
"""`model.ops.tiling.TILE_WEIGHTS`."""
PRECISIONS = ("fp32", "fp16", "bf16")
"""`model.ops.device.PRECISIONS`."""
SIGMA_SCHEDULES = ("original", "karras", "exponential")
"""`model.pipelines.options.SIGMA_SCHEDULES`."""
TILED_DEFAULTS = {"stage1": 512, "vae_encoder": 256, "vae_decoder": 256, "diffusion": 512}
"""`model.pipelines.options.TILED_DEFAULTS`."""
GUIDANCE_LOSSES = ("mse", "weighted_mse")
GUIDANCE_SPACES = ("latent", "rgb")
"""The `loss` and `space` choices of `model.diffusion.latent_guidance.LatentGuidance`."""

OPTION_DEFAULTS = {
    "sampler": "edm_dpm++_3m_sde",
    "sigma_schedule": "original",
    "ddim_eta": 0.0,
    "ddim_spacing": "original",
    "steps": 10,
    "start": "noise",
    "noise_aug": 0,
    "cfg_scale": 6.0,
    "pos_prompt": (
        "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera, "
        "hyper detailed photo - realistic maximum detail, 32k, Color Grading, ultra HD, extreme "
        "meticulous detailing, skin pore detailing, hyper sharpness, perfect without deformations."
    ),
    "neg_prompt": (
        "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, "
        "CG Style, 3D render, unreal engine, blurring, dirty, messy, worst quality, low quality, "
        "frames, watermark, signature, jpeg artifacts, deformed, lowres, over-smooth."
    ),
    "control_strength": 1.0,
    "control_start": 0.0,
    "control_end": 1.0,
    "seed": 231,
    "color_fix": "wavelet",
    "resize_backend": "pil",
    "min_short_side": 512,
    "tile_weights": "symmetric",
    "diffusion_tile_batch_size": 1,
}
"""The defaults of `model.pipelines.options.PipelineOptions` that are CLI flags."""
