"""ControlLDM: a frozen Stable Diffusion (UNet, VAE, text encoder) steered by an LAControlNet.

The LAControlNet's residuals, each multiplied by its control scale, enter the unmodified
diffusers UNet through `down_block_additional_residuals` (all but the last) and
`mid_block_additional_residual` (the last). The latent scale factor is applied here and
nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import Tensor, nn

from model.io.file_pages import one_maps_read, releasing_replaced
from model.nets.lacontrolnet import LAControlNet

Cond = dict[str, torch.Tensor]


class ControlLDM(nn.Module):
    """Frozen latent diffusion model + trainable LAControlNet.

    Args:
        unet: frozen noise (or v) predictor.
        controlnet: trainable LAControlNet producing one residual per UNet skip + middle.
        vae: frozen autoencoder; latents are `mode(or sample) * latent_scale_factor`.
        text_encoder: frozen module mapping a list of prompts to (B, 77, context_dim).
        latent_scale_factor: SD's latent scaling (0.18215 for SD 2.1).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        controlnet: LAControlNet,
        vae: AutoencoderKL,
        text_encoder: nn.Module,
        latent_scale_factor: float = 0.18215,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        self.vae = vae
        self.text_encoder = text_encoder
        self.latent_scale_factor = float(latent_scale_factor)
        for module in self.frozen_modules():
            module.requires_grad_(False)
            module.eval()
        self._control_scales = [1.0] * controlnet.layout.num_control_tensors

    def frozen_modules(self) -> tuple[nn.Module, ...]:
        """The modules that are never trained (kept in eval mode, no gradients)."""
        return (self.unet, self.vae, self.text_encoder)

    def train(self, mode: bool = True) -> ControlLDM:
        """Set train mode on the LAControlNet only; the frozen modules stay in eval mode."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    @property
    def control_scales(self) -> list[float]:
        """One multiplier per control tensor (13 for SD 2.1); control tensor i uses entry i.

        Extra entries are ignored, as in the original (which always sets 13 of them).
        """
        return self._control_scales

    @control_scales.setter
    def control_scales(self, scales: Sequence[float]) -> None:
        scales = [float(s) for s in scales]
        needed = self.controlnet.layout.num_control_tensors
        if len(scales) < needed:
            raise ValueError(f"control_scales needs {needed} values, got {len(scales)}")
        self._control_scales = scales

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Toggle diffusers' gradient checkpointing of the UNet and the LAControlNet."""
        for module in (self.unet, self.controlnet):
            if enabled:
                module.enable_gradient_checkpointing()
            else:
                module.disable_gradient_checkpointing()

    def control(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Cond) -> list[torch.Tensor]:
        """The LAControlNet residuals, each multiplied by its control scale."""
        control = self.controlnet(x_noisy, t, cond["c_txt"], cond["c_img"])
        if len(self._control_scales) < len(control):
            raise ValueError(
                f"{len(control)} control tensors but only {len(self._control_scales)} control_scales"
            )
        return [c * s for c, s in zip(control, self._control_scales, strict=False)]

    def unet_forward(
        self,
        x_noisy: torch.Tensor,
        t: torch.Tensor,
        c_txt: torch.Tensor,
        control: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The UNet output, with `control` residuals added to its skips and middle (or none)."""
        if control is None:
            return self.unet(x_noisy, t, encoder_hidden_states=c_txt).sample
        return self.unet(
            x_noisy,
            t,
            encoder_hidden_states=c_txt,
            down_block_additional_residuals=tuple(control[:-1]),
            mid_block_additional_residual=control[-1],
        ).sample

    def forward(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Predict eps (or v) for z_t = `x_noisy` at timesteps `t`.

        Args:
            x_noisy: noisy latent (B, 4, h, w).
            t: integer timesteps (B,).
            cond: {"c_txt": text context (B, 77, D), "c_img": condition latent (B, 4, h, w)}.
        """
        return self.unet_forward(x_noisy, t, cond["c_txt"], self.control(x_noisy, t, cond))

    @torch.no_grad()
    def vae_encode(
        self, img: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Latent of `img` (B, 3, H, W) in [-1, 1]: posterior mode (or a sample) x scale factor."""
        posterior = self.vae.encode(img).latent_dist
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.latent_scale_factor

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] (not clamped) of a scaled latent.

        Not under no_grad: latent image guidance differentiates through the decoder (its
        parameters are frozen, so nothing is recorded unless `z` requires grad).
        """
        return self.vae.decode(z / self.latent_scale_factor).sample

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text context (B, 77, context_dim) for a list of prompts."""
        return self.text_encoder(list(prompts))


def cast_cldm(cldm: ControlLDM, dtype: torch.dtype, vae_too: bool = True) -> None:
    """Cast the weights for a run in `dtype`, normalisations kept in fp32 (the original's
    cast_dtype; calls then run under autocast): UNet and LAControlNet, and with `vae_too` the
    VAE and text encoder (else fp32). Weights are cast, not only autocast: one copy in the run
    precision instead of an fp32 copy re-cast at every call. Casting down is lossy."""
    # the text encoder first: its fp32 weights are an anonymous copy, freed as it is cast
    for module in cldm.text_encoder, cldm.vae, cldm.controlnet, cldm.unet:
        if module is None:
            continue
        cast = vae_too or module is cldm.unet or module is cldm.controlnet
        cast_piecewise(module, dtype if cast else torch.float32)


def cast_piecewise(module: nn.Module, dtype: torch.dtype) -> None:
    """`module` in `dtype`, norms back in fp32 (as `nn.Module.to(dtype)` then `.float()` on
    the norms), one submodule's own tensors at a time: the file pages of each memory-mapped
    fp32 source go back right after its cast, so the fp32 weights and their cast copies are
    never resident together. (`_apply`, as `nn.Module.to`: diffusers' own `to` warns about
    casting outside from_pretrained.)"""

    def to(target: torch.dtype) -> Callable[[Tensor], Tensor]:
        return lambda t: t.to(target) if t.is_floating_point() else t

    with one_maps_read():
        for sub in module.modules():
            with releasing_replaced(sub, recurse=False):
                sub._apply(to(dtype), recurse=False)
                if isinstance(sub, nn.GroupNorm | nn.LayerNorm):
                    sub._apply(to(torch.float32), recurse=False)
