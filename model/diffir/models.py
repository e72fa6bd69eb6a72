"""DiffIR's two networks: DiffIRS1 (CPEN_S1 + DIRformer) and DiffIRS2 (CPEN_S2 + denoiser + DIRformer).

Stage 1 extracts the IPR from the LQ and the ground truth; stage 2 estimates the same IPR from
the LQ alone by a T-step diffusion over the 256-d vector, conditioned on CPEN_S2(LQ).
Images are NCHW float in [0, 1]; LQ sides must be multiples of `pad_window(scale)` (see
`model.diffir.padding`), the output is (B, 3, scale H, scale W) and not clamped. `.config` is
the constructor arguments plus `type`, stored with our safetensors files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.diffir.cpen import CPEN
from model.diffir.diffusion import IPRDenoiser, IPRSchedule, reverse_chain
from model.diffir.dirformer import IPR_DIM, DIRformer, unshuffle_factor


def _unshuffled(lq: Tensor, factor: int) -> Tensor:
    return F.pixel_unshuffle(lq, factor) if factor > 1 else lq


def _restorer_args(**kwargs: Any) -> dict[str, Any]:
    """DIRformer arguments as plain JSON values (lists, not tuples)."""
    return {k: list(v) if isinstance(v, tuple | list) else v for k, v in kwargs.items()}


class DiffIRS1(nn.Module):
    """Stage 1: IPR = CPEN_S1(LQ, GT); SR = DIRformer(LQ, IPR).

    Args:
        n_encoder_res: residual blocks of CPEN_S1.
        scale, dim, num_blocks, num_refinement_blocks, heads, ffn_expansion_factor, bias,
            layer_norm, out_channels: the DIRformer's (`model.diffir.dirformer.DIRformer`).
    """

    def __init__(
        self,
        n_encoder_res: int = 6,
        scale: int = 4,
        dim: int = 48,
        num_blocks: Sequence[int] = (4, 6, 6, 8),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        bias: bool = False,
        layer_norm: str = "WithBias",
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        restorer = _restorer_args(
            scale=scale, dim=dim, num_blocks=num_blocks,
            num_refinement_blocks=num_refinement_blocks, heads=heads,
            ffn_expansion_factor=ffn_expansion_factor, bias=bias, layer_norm=layer_norm,
            out_channels=out_channels,
        )  # fmt: skip
        self.config = {"type": "DiffIRS1", "n_encoder_res": n_encoder_res, **restorer}
        self.scale = scale
        self.restorer = DIRformer(**restorer)
        u = unshuffle_factor(scale)
        self.cpen = CPEN(3 * u * u + 48, n_encoder_res)  # + 48: the GT pixel-unshuffled by 4

    def cpen_s1(self, lq: Tensor, gt: Tensor) -> Tensor:
        """IPR (B, 256) of the pair; GT is (B, 3, scale H, scale W) with sides divisible by 4."""
        u = unshuffle_factor(self.scale)
        return self.cpen(torch.cat([_unshuffled(lq, u), F.pixel_unshuffle(gt, 4)], dim=1))

    def forward_s1(self, lq: Tensor, gt: Tensor) -> Tensor:
        """SR restored under the ground-truth prior."""
        return self.restorer(lq, self.cpen_s1(lq, gt))

    forward = forward_s1


class DiffIRS2(nn.Module):
    """Stage 2: IPR by diffusion from CPEN_S2(LQ); SR = DIRformer(LQ, IPR).

    Args:
        n_encoder_res: residual blocks of CPEN_S2.
        n_denoise_res: extra Linear + LeakyReLU layers of the denoiser.
        linear_start, linear_end, timesteps: the beta schedule (linear in sqrt space).
        scale, dim, num_blocks, num_refinement_blocks, heads, ffn_expansion_factor, bias,
            layer_norm, out_channels: the DIRformer's.
    """

    def __init__(
        self,
        n_encoder_res: int = 6,
        scale: int = 4,
        dim: int = 48,
        num_blocks: Sequence[int] = (4, 6, 6, 8),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        bias: bool = False,
        layer_norm: str = "WithBias",
        out_channels: int = 3,
        n_denoise_res: int = 1,
        linear_start: float = 0.1,
        linear_end: float = 0.99,
        timesteps: int = 4,
    ) -> None:
        super().__init__()
        restorer = _restorer_args(
            scale=scale, dim=dim, num_blocks=num_blocks,
            num_refinement_blocks=num_refinement_blocks, heads=heads,
            ffn_expansion_factor=ffn_expansion_factor, bias=bias, layer_norm=layer_norm,
            out_channels=out_channels,
        )  # fmt: skip
        diffusion = dict(
            n_denoise_res=n_denoise_res, linear_start=linear_start, linear_end=linear_end,
            timesteps=timesteps,
        )  # fmt: skip
        self.config = {"type": "DiffIRS2", "n_encoder_res": n_encoder_res, **restorer, **diffusion}
        self.scale = scale
        self.restorer = DIRformer(**restorer)
        u = unshuffle_factor(scale)
        self.cpen = CPEN(3 * u * u, n_encoder_res)
        self.denoiser = IPRDenoiser(n_denoise_res, timesteps)
        self.schedule = IPRSchedule(timesteps, linear_start, linear_end)

    @property
    def timesteps(self) -> int:
        return self.schedule.timesteps

    def cpen_s2(self, lq: Tensor) -> Tensor:
        """The denoiser's condition c (B, 256) from the LQ alone."""
        return self.cpen(_unshuffled(lq, unshuffle_factor(self.scale)))

    def sample_ipr(self, lq: Tensor, noise: Tensor) -> list[Tensor]:
        """Eval path: the IPR after each of the T reverse steps from x_T = `noise` (B, 256)."""
        return reverse_chain(self.denoiser, self.schedule, noise, self.cpen_s2(lq))[0]

    def train_ipr(self, lq: Tensor, ipr_s1: Tensor, noise: Tensor) -> list[Tensor]:
        """Training path: q_sample(ipr_s1, T-1, noise), then the same T steps (differentiable)."""
        x_t = self.schedule.q_sample(ipr_s1, self.timesteps - 1, noise)
        return reverse_chain(self.denoiser, self.schedule, x_t, self.cpen_s2(lq))[0]

    def forward_s2(
        self, lq: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """SR from the LQ; x_T = `noise`, or drawn from N(0, I) with `generator`."""
        if noise is None:
            noise = torch.randn(
                (lq.shape[0], IPR_DIM), generator=generator, device=lq.device, dtype=lq.dtype
            )
        return self.restorer(lq, self.sample_ipr(lq, noise)[-1])

    forward = forward_s2
