"""DIRformer: the Restormer-style U-Net of DiffIR, every block modulated by the 256-d IPR.

Blocks are DMTA (channel attention over L2-normalised q, k with a learnable per-head
temperature) and DGFN (GELU-gated feed-forward); the IPR enters each of them as a per-channel
scale and shift right after the layer norm. Parameter names follow the original `DIRformer`
(Zj-BinXia/DiffIR, DiffIR-RealSR/DiffIR/archs/S2_arch.py) so checkpoints map one to one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IPR_DIM = 256  # CPEN's n_feats (hard-coded 64 in the original) times 4
LAYER_NORMS = ("BiasFree", "WithBias")


class _LastDimNorm(nn.Module):
    def __init__(self, dim: int, with_bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if with_bias else None

    def forward(self, x: Tensor) -> Tensor:
        var = x.var(-1, keepdim=True, unbiased=False)
        if self.bias is None:  # "BiasFree": the numerator is not centred
            return x / torch.sqrt(var + 1e-5) * self.weight
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class ChannelLayerNorm(nn.Module):
    """Layer norm over the channels of an NCHW map (the original's `LayerNorm`).

    "BiasFree" divides by the standard deviation without centring the numerator; "WithBias"
    is the usual (x - mean) / std * w + b. Both use the biased variance and eps 1e-5.
    """

    def __init__(self, dim: int, kind: str) -> None:
        super().__init__()
        if kind not in LAYER_NORMS:
            raise ValueError(f"LayerNorm_type must be one of {LAYER_NORMS}, got {kind!r}")
        self.body = _LastDimNorm(dim, with_bias=kind == "WithBias")

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _modulate(kernel: nn.Module, x: Tensor, ipr: Tensor) -> Tensor:
    """x * k1 + k2 with (k1, k2) = split(Linear(ipr)): the IPR's per-channel scale and shift."""
    scale, shift = kernel(ipr)[:, :, None, None].chunk(2, dim=1)
    return x * scale + shift


class DynamicAttention(nn.Module):
    """DMTA: IPR-modulated multi-head transposed (channel) attention."""

    def __init__(self, dim: int, num_heads: int, bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.kernel = nn.Sequential(nn.Linear(IPR_DIM, dim * 2, bias=False))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(
            dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=bias
        )
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x: Tensor, ipr: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv_dwconv(self.qkv(_modulate(self.kernel, x, ipr)))
        # (B, heads, C/heads, HW) each; attention is over channels, so its cost is linear in HW
        q, k, v = (
            t.reshape(b, self.num_heads, c // self.num_heads, h * w) for t in qkv.chunk(3, 1)
        )
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
        return self.project_out((attn @ v).reshape(b, c, h, w))


class DynamicFeedForward(nn.Module):
    """DGFN: IPR-modulated gated depthwise feed-forward, gelu(x1) * x2."""

    def __init__(self, dim: int, expansion: float, bias: bool) -> None:
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(
            hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias
        )
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)
        self.kernel = nn.Sequential(nn.Linear(IPR_DIM, dim * 2, bias=False))

    def forward(self, x: Tensor, ipr: Tensor) -> Tensor:
        x1, x2 = self.dwconv(self.project_in(_modulate(self.kernel, x, ipr))).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + DMTA(LN(x), ipr), then x + DGFN(LN(x), ipr)."""

    def __init__(self, dim: int, num_heads: int, expansion: float, bias: bool, norm: str) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim, norm)
        self.attn = DynamicAttention(dim, num_heads, bias)
        self.norm2 = ChannelLayerNorm(dim, norm)
        self.ffn = DynamicFeedForward(dim, expansion, bias)

    def forward(self, x: Tensor, ipr: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), ipr)
        return x + self.ffn(self.norm2(x), ipr)


class BlockStack(nn.ModuleList):
    """Transformer blocks applied in sequence, all seeing the same IPR."""

    def forward(self, x: Tensor, ipr: Tensor) -> Tensor:
        for block in self:
            x = block(x, ipr)
        return x


class _Embed(nn.Module):
    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class _Resample(nn.Module):
    """3x3 conv then pixel (un)shuffle by 2: halves or doubles the resolution."""

    def __init__(self, dim: int, down: bool) -> None:
        super().__init__()
        out = dim // 2 if down else dim * 2
        shuffle = nn.PixelUnshuffle(2) if down else nn.PixelShuffle(2)
        self.body = nn.Sequential(nn.Conv2d(dim, out, 3, padding=1, bias=False), shuffle)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def _x4_tail(dim: int, out_channels: int) -> nn.Sequential:
    """Two (conv, pixel shuffle x2) stages, then a 3x3 conv to the output channels."""
    up = nn.Sequential(
        nn.Conv2d(dim, 4 * dim, 3, padding=1), nn.PixelShuffle(2),
        nn.Conv2d(dim, 4 * dim, 3, padding=1), nn.PixelShuffle(2),
    )  # fmt: skip
    return nn.Sequential(up, nn.Conv2d(dim, out_channels, 3, padding=1))


def unshuffle_factor(scale: int) -> int:
    """Pixel-unshuffle factor applied to the LQ so the x4 tail yields `scale` (x4: 1, x2: 2, x1: 4)."""
    if scale not in (1, 2, 4):
        raise ValueError(f"DiffIR scale must be 1, 2 or 4, got {scale}")
    return 4 // scale


class DIRformer(nn.Module):
    """The DiffIR restorer: LQ (B, 3, H, W) in [0, 1] and IPR (B, 256) -> SR (B, 3, sH, sW).

    H and W must be multiples of 8 * (4 / scale) (three downsamplings, after the input
    unshuffle of x2 / x1 models); the output is not clamped.

    Args:
        scale: upscaling factor, 4, 2 or 1 (the tail is always x4; x2 / x1 unshuffle the LQ).
        dim: channels of level 1 (levels use dim, 2dim, 4dim, 8dim).
        num_blocks: transformer blocks per level [1, 2, 3, latent].
        num_refinement_blocks: blocks of the refinement stage (at 2dim).
        heads: attention heads per level.
        ffn_expansion_factor: DGFN hidden width relative to its input.
        bias: biases in the blocks' convolutions.
        layer_norm: "BiasFree" or "WithBias".
        out_channels: output channels.
    """

    def __init__(
        self,
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
        self.scale = scale
        self.unshuffle = unshuffle_factor(scale)

        def stack(level_dim: int, n: int, n_heads: int) -> BlockStack:
            return BlockStack(
                TransformerBlock(level_dim, n_heads, ffn_expansion_factor, bias, layer_norm)
                for _ in range(n)
            )

        self.patch_embed = _Embed(3 * self.unshuffle**2, dim)
        self.encoder_level1 = stack(dim, num_blocks[0], heads[0])
        self.down1_2 = _Resample(dim, down=True)
        self.encoder_level2 = stack(dim * 2, num_blocks[1], heads[1])
        self.down2_3 = _Resample(dim * 2, down=True)
        self.encoder_level3 = stack(dim * 4, num_blocks[2], heads[2])
        self.down3_4 = _Resample(dim * 4, down=True)
        self.latent = stack(dim * 8, num_blocks[3], heads[3])
        self.up4_3 = _Resample(dim * 8, down=False)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, kernel_size=1, bias=bias)
        self.decoder_level3 = stack(dim * 4, num_blocks[2], heads[2])
        self.up3_2 = _Resample(dim * 4, down=False)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, kernel_size=1, bias=bias)
        self.decoder_level2 = stack(dim * 2, num_blocks[1], heads[1])
        self.up2_1 = _Resample(dim * 2, down=False)  # no channel reduction at level 1
        self.decoder_level1 = stack(dim * 2, num_blocks[0], heads[0])
        self.refinement = stack(dim * 2, num_refinement_blocks, heads[0])
        self.tail = _x4_tail(dim * 2, out_channels)

    def forward(self, lq: Tensor, ipr: Tensor) -> Tensor:
        x = F.pixel_unshuffle(lq, self.unshuffle) if self.unshuffle > 1 else lq
        enc1 = self.encoder_level1(self.patch_embed(x), ipr)  # (B, dim, h, w)
        enc2 = self.encoder_level2(self.down1_2(enc1), ipr)  # (B, 2dim, h/2, w/2)
        enc3 = self.encoder_level3(self.down2_3(enc2), ipr)  # (B, 4dim, h/4, w/4)
        latent = self.latent(self.down3_4(enc3), ipr)  # (B, 8dim, h/8, w/8)
        dec3 = self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], 1))
        dec3 = self.decoder_level3(dec3, ipr)
        dec2 = self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], 1))
        dec2 = self.decoder_level2(dec2, ipr)
        dec1 = self.decoder_level1(torch.cat([self.up2_1(dec2), enc1], 1), ipr)  # (B, 2dim, h, w)
        out = self.tail(self.refinement(dec1, ipr))  # (B, 3, 4h, 4w)
        return out + F.interpolate(lq, scale_factor=self.scale, mode="nearest")
