"""Swin transformer building blocks of the stage-1 SwinIR.

Window partitioning, shifted-window masks, window attention with a relative position bias,
Swin blocks, their stacks and the residual groups (RSTB). Module, parameter and buffer names
follow the original implementation, so released checkpoints load with `strict=True`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """(B, H, W, C) → (B·nW, ws·ws, C), windows in row-major order per image."""
    return rearrange(x, "b (h p) (w q) c -> (b h w) (p q) c", p=window_size, q=window_size)


def window_merge(windows: Tensor, window_size: int, h: int, w: int) -> Tensor:
    """Inverse of `window_partition`: (B·nW, ws·ws, C) → (B, H, W, C)."""
    ws = window_size
    return rearrange(windows, "(b h w) (p q) c -> b (h p) (w q) c", h=h // ws, w=w // ws, p=ws)


def shifted_window_mask(
    h: int, w: int, window_size: int, shift_size: int, device: torch.device | None = None
) -> Tensor:
    """Attention mask (nW, N, N) for shifted windows: -100 between tokens that came from
    different image regions before the cyclic shift, 0 elsewhere (as the original)."""

    def regions(n: int) -> Tensor:
        # 0 for [0, n-ws), 1 for [n-ws, n-shift), 2 for [n-shift, n)
        idx = torch.arange(n, device=device)
        return (idx >= n - window_size).long() + (idx >= n - shift_size).long()

    region = regions(h)[:, None] * 3 + regions(w)[None, :]
    windows = window_partition(region[None, :, :, None].float(), window_size).squeeze(-1)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def relative_position_index(window_size: int) -> Tensor:
    """(N, N) int64 index into the (2·ws-1)² relative position bias table."""
    ws = window_size
    grid = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    coords = torch.stack(grid).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # (N, N, 2)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    Args:
        dim: token channels. window_size: window side ws (N = ws² tokens). num_heads: heads.
        qkv_bias: bias on the qkv projection. qk_scale: overrides head_dim**-0.5 when set.
        attn_drop, proj_drop: dropout rates.
    """

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B·nW, N, C); mask: (nW, N, N) of 0/-100, or None. Returns (B·nW, N, C)."""
        n = x.shape[1]
        q, k, v = rearrange(self.qkv(x), "b n (s h d) -> s b h n d", s=3, h=self.num_heads)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = rearrange(bias, "(i j) h -> h i j", i=n).unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:
            # Put the windows of one image on the head axis so the per-window mask broadcasts
            # over the batch: (B·nW, heads, N, d) → (B, nW·heads, N, d).
            nw = mask.shape[0]
            q, k, v = (rearrange(t, "(b w) h n d -> b (w h) n d", w=nw) for t in (q, k, v))
            bias = (bias + mask.unsqueeze(1).to(bias.dtype)).flatten(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias.to(q.dtype),
            dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.scale,
        )
        if mask is not None:
            out = rearrange(out, "b (w h) n d -> (b w) h n d", w=mask.shape[0])
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))


class SwinTransformerBlock(nn.Module):
    """(Shifted) window attention + MLP, both pre-normed and residual.

    Args:
        dim: token channels. input_resolution: feature size (H, W) for which `attn_mask` is
        stored. num_heads, window_size, shift_size: attention layout; a window no smaller than
        the feature map disables partitioning and shifting, as in the original.
        mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path, norm_layer: as in SwinIR.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        if min(self.input_resolution) <= window_size:
            window_size, shift_size = min(self.input_resolution), 0
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must be in [0, window_size={window_size})")
        self.window_size, self.shift_size = window_size, shift_size
        mask = (
            shifted_window_mask(*self.input_resolution, window_size, shift_size)
            if shift_size
            else None
        )
        self.register_buffer("attn_mask", mask)
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(
            dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop=drop
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def _mask(self, h: int, w: int, device: torch.device) -> Tensor | None:
        if not self.shift_size:
            return None  # the original's recomputed mask is all zeros in this case
        if (h, w) == self.input_resolution:
            return self.attn_mask
        return shifted_window_mask(h, w, self.window_size, self.shift_size, device)

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        """x: (B, H·W, C) tokens of an (H, W) = x_size feature map."""
        h, w = x_size
        ws, s = self.window_size, self.shift_size
        y = rearrange(self.norm1(x), "b (h w) c -> b h w c", h=h)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = window_merge(self.attn(window_partition(y, ws), self._mask(h, w, x.device)), ws, h, w)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + self.drop_path(rearrange(y, "b h w c -> b (h w) c"))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BasicLayer(nn.Module):
    """A stack of Swin blocks; odd blocks use shifted windows.

    Args:
        dim, input_resolution, num_heads, window_size: see `SwinTransformerBlock`.
        drop_path: one rate per block. use_checkpoint: recompute blocks in backward.
        **block_kwargs: the remaining `SwinTransformerBlock` options.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int,
        drop_path: list[float],
        use_checkpoint: bool = False,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                input_resolution,
                num_heads,
                window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2,
                drop_path=rate,
                **block_kwargs,
            )
            for i, rate in enumerate(drop_path)
        )

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, x_size, use_reentrant=False)
            else:
                x = block(x, x_size)
        return x


def residual_conv(dim: int, kind: str) -> nn.Module:
    """The conv closing a residual group: '1conv' (3×3) or '3conv' (bottleneck to dim/4)."""
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if kind == "3conv":
        return nn.Sequential(
            nn.Conv2d(dim, dim // 4, 3, 1, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim // 4, dim // 4, 1, 1, 0),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim // 4, dim, 3, 1, 1),
        )
    raise ValueError(f"resi_connection must be '1conv' or '3conv', got {kind!r}")


class RSTB(nn.Module):
    """Residual Swin Transformer Block: Swin blocks → conv on the image layout → + input.

    Args:
        dim: channels. resi_connection: '1conv' or '3conv'. **layer_kwargs: `BasicLayer`.
    """

    def __init__(self, dim: int, resi_connection: str = "1conv", **layer_kwargs: Any) -> None:
        super().__init__()
        self.residual_group = BasicLayer(dim, **layer_kwargs)
        self.conv = residual_conv(dim, resi_connection)

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        y = rearrange(self.residual_group(x, x_size), "b (h w) c -> b c h w", h=x_size[0])
        return rearrange(self.conv(y), "b c h w -> b (h w) c") + x


class PatchEmbed(nn.Module):
    """Tokens are single pixels of the feature map; only the optional norm has weights."""

    def __init__(self, norm: nn.Module | None) -> None:
        super().__init__()
        self.norm = norm if norm is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(rearrange(x, "b c h w -> b (h w) c"))
