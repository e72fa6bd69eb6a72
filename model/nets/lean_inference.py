"""The VAE's inference in less memory, computing the same values: large convolutions in bands
of rows, SiLU in place.

A CPU convolution of an NCHW map reorders its input and output into oneDNN's blocked layout,
two more copies of a map that at 512² output is 128-256 MiB, and a nearest 2x upsampling
before a convolution materialises the upsampled map first. Computing the output a band of rows
at a time (each band with its halo rows and zero padding) keeps those copies band-sized; the
upsampling is done per band as well. The SiLU after each normalisation runs in place (its
input is always a fresh tensor). Nothing changes while a gradient is recorded (latent guidance
differentiates through the decoder), and convolutions of small maps run whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D
from torch import Tensor, nn

# Bytes of (upsampled) input per band; larger maps are convolved in bands.
BAND_BYTES = 32 * 2**20


def _bandable(conv: nn.Conv2d) -> bool:
    """Stride 1, no dilation or groups, odd square kernel with 'same' zero padding."""
    k = conv.kernel_size
    return (
        k[0] == k[1] and k[0] % 2 == 1 and conv.padding == (k[0] // 2,) * 2
        and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
        and conv.padding_mode == "zeros"
    )  # fmt: skip


def _nearest_then_conv(module: nn.Module) -> bool:
    """A diffusers `Upsample2D` that is a nearest 2x upsampling and a bandable convolution."""
    return (
        isinstance(module, Upsample2D) and module.use_conv and module.interpolate
        and module.norm is None and not module.use_conv_transpose and module.name == "conv"
        and _bandable(module.conv)
    )  # fmt: skip


def _use_bands(x: Tensor, upsample: bool) -> bool:
    scale = 4 if upsample else 1
    return not torch.is_grad_enabled() and x.ndim == 4 and x.nbytes * scale > BAND_BYTES


def conv_in_bands(conv: nn.Conv2d, x: Tensor, upsample: bool = False) -> Tensor:
    """`conv(x)`, or `conv(interpolate(x, scale_factor=2, mode="nearest"))` with `upsample`,
    computed a band of output rows at a time."""
    h, w = x.shape[-2:]
    if upsample:
        h, w = 2 * h, 2 * w
    pad = conv.padding[0]
    row_bytes = x[:, :, :1].nbytes * (4 if upsample else 1)
    rows = max(1, BAND_BYTES // row_bytes)
    out: Tensor | None = None
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        lo, hi = max(0, r0 - pad), min(h, r1 + pad)  # input rows the band reads
        if upsample:
            band = F.interpolate(x[:, :, lo // 2 : (hi + 1) // 2], scale_factor=2.0, mode="nearest")
            band = band[:, :, lo % 2 : lo % 2 + hi - lo]
        else:
            band = x[:, :, lo:hi]
        band = F.pad(band, (pad, pad, pad - (r0 - lo), pad - (hi - r1)))
        result = F.conv2d(band, conv.weight, conv.bias)
        if out is None:  # the dtype autocast gives
            out = result.new_empty((x.shape[0], conv.out_channels, h, w))
        out[:, :, r0:r1] = result
    return out


class BandedConv2d(nn.Conv2d):
    """`nn.Conv2d` whose large inference calls run in bands of rows (`conv_in_bands`)."""

    def forward(self, x: Tensor) -> Tensor:
        if _use_bands(x, upsample=False):
            return conv_in_bands(self, x)
        return super().forward(x)


class BandedUpsampleConv(nn.Module):
    """Nearest 2x upsampling then `conv` (diffusers' `Upsample2D` with a convolution; the
    same parameter name), in bands of rows for large inference calls."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        if _use_bands(x, upsample=True):
            return conv_in_bands(self.conv, x, upsample=True)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class LeanSiLU(nn.Module):
    """SiLU, in place when no gradient is recorded."""

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(x, inplace=not torch.is_grad_enabled())


def make_lean(module: nn.Module) -> None:
    """Swap, in place, every bandable `nn.Conv2d` of `module` for a `BandedConv2d`, every
    diffusers `Upsample2D` (nearest, with a convolution) for a `BandedUpsampleConv` and every
    `nn.SiLU` for a `LeanSiLU`; the state dict keys and values stay the same."""
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if _nearest_then_conv(child):
                setattr(parent, name, BandedUpsampleConv(child.conv))
            elif type(child) is nn.Conv2d and _bandable(child):
                child.__class__ = BandedConv2d
            elif type(child) is nn.SiLU:
                setattr(parent, name, LeanSiLU())
