"""Stage-1 restoration network: the modified SwinIR of DiffBIR.

`PixelUnshuffle(8)` → 3×3 conv → residual Swin transformer groups at 1/8 resolution → three
nearest ×2 + conv stages back to full resolution. Module, parameter and buffer names follow the
original implementation, so released checkpoints load with `strict=True`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.checkpoint_io import (
    WeightFileError,
    load_weight_file,
    read_safetensors_config,
    save_safetensors,
)

logger = logging.getLogger(__name__)

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # fixed input shift of the original, not in the state dict
NUM_FEAT = 64  # channels of the reconstruction head, fixed in the original
UPSAMPLERS = ("nearest+conv", "pixelshuffle", "pixelshuffledirect", "")


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


def _residual_conv(dim: int, kind: str) -> nn.Module:
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
        self.conv = _residual_conv(dim, resi_connection)

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


def _residual_groups(
    dim: int,
    depths: tuple[int, ...] | list[int],
    num_heads: tuple[int, ...] | list[int],
    drop_path_rate: float,
    resi_connection: str,
    **layer_kwargs: Any,
) -> nn.ModuleList:
    """One RSTB per entry of `depths`; stochastic depth grows linearly over all blocks."""
    # Rates are computed on the CPU so that the model can also be built on the meta device.
    rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return nn.ModuleList(
        RSTB(
            dim,
            resi_connection,
            num_heads=heads,
            drop_path=rates[start : start + depth],
            **layer_kwargs,
        )
        for start, depth, heads in zip(starts, depths, num_heads, strict=True)
    )


def _pixelshuffle_upsample(scale: int, num_feat: int) -> nn.Sequential:
    """Conv + PixelShuffle stages: log2(scale) ×2 stages, or one ×3 stage."""
    if scale == 3:
        return nn.Sequential(nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3))
    layers: list[nn.Module] = []
    for _ in range(scale.bit_length() - 1):
        layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
    return nn.Sequential(*layers)


def _check_options(upsampler: str, sf: int, unshuffle: bool, unshuffle_scale: int | None) -> None:
    """Reject combinations the original accepts but cannot run (they fail in forward there)."""
    if upsampler not in UPSAMPLERS:
        raise ValueError(f"upsampler must be one of {UPSAMPLERS} or None, got {upsampler!r}")
    if unshuffle and unshuffle_scale != sf:
        raise ValueError(
            f"unshuffle needs unshuffle_scale == sf (got {unshuffle_scale}, {sf}): "
            "the original unshuffles by sf"
        )
    if unshuffle and upsampler == "":
        raise ValueError("unshuffle needs an upsampler: the residual output is at 1/sf size")
    if upsampler == "nearest+conv" and sf not in (2, 4, 8):
        raise ValueError(f"upsampler 'nearest+conv' supports sf 2, 4 or 8, got {sf}")
    if upsampler == "pixelshuffle" and sf != 3 and (sf < 1 or sf & (sf - 1)):
        raise ValueError(f"upsampler 'pixelshuffle' supports sf 2^n or 3, got {sf}")


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class SwinIR(nn.Module):
    """SwinIR with DiffBIR's unshuffle variant; maps [0, 1] images to [0, 1] images.

    Args:
        img_size: feature-map size (× patch_size) for which the shifted-window masks are
            stored; other sizes recompute them. DiffBIR: 64 (a 512×512 input).
        patch_size: divides img_size for the stored mask size; tokens are always pixels.
        in_chans: image channels. embed_dim: transformer width.
        depths, num_heads: blocks and heads per residual group.
        window_size: attention window side. mlp_ratio: MLP hidden width / embed_dim.
        qkv_bias, qk_scale, drop_rate, attn_drop_rate, drop_path_rate, norm_layer, ape,
            patch_norm: as in Swin Transformer. use_checkpoint: recompute blocks in backward.
        sf: upscale factor; with `unshuffle` the input is first unshuffled by sf, so the output
            has the input size. img_range: 1.0 or 255.0, the scale after the mean shift.
        upsampler: 'nearest+conv', 'pixelshuffle', 'pixelshuffledirect' or ''/None (no
            upsampling, residual output for denoising).
        resi_connection: '1conv' or '3conv'. unshuffle, unshuffle_scale: PixelUnshuffle input.
        hq_key, lq_key, learning_rate, weight_decay: accepted so original configs build;
            training options live in the stage-1 system, not here.

    Input (B, in_chans, H, W); H, W are reflect-padded to a multiple of `window_size` and, with
    `unshuffle`, must then be multiples of `size_multiple` (see `model.stage1.restore_stage1`).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 64,
        patch_size: int | tuple[int, int] = 1,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: tuple[int, ...] | list[int] = (6, 6, 6, 6),
        num_heads: tuple[int, ...] | list[int] = (6, 6, 6, 6),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        ape: bool = False,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
        sf: int = 4,
        img_range: float = 1.0,
        upsampler: str | None = "",
        resi_connection: str = "1conv",
        unshuffle: bool = False,
        unshuffle_scale: int | None = None,
        hq_key: str = "jpg",
        lq_key: str = "hint",
        learning_rate: float | None = None,
        weight_decay: float | None = None,
    ) -> None:
        super().__init__()
        upsampler = upsampler or ""
        _check_options(upsampler, sf, unshuffle, unshuffle_scale)
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch_hw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        # Plain values only, so that our safetensors files can carry them as JSON.
        self.config = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            depths=list(depths), num_heads=list(num_heads), window_size=window_size,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, ape=ape,
            patch_norm=patch_norm, use_checkpoint=use_checkpoint, sf=sf, img_range=img_range,
            upsampler=upsampler, resi_connection=resi_connection, unshuffle=unshuffle,
            unshuffle_scale=unshuffle_scale,
        )  # fmt: skip
        self.norm_layer = norm_layer
        self.img_range, self.upscale, self.upsampler = img_range, sf, upsampler
        self.window_size, self.unshuffle, self.ape = window_size, unshuffle, ape
        self.rgb_mean = RGB_MEAN if in_chans == 3 else (0.0,)
        resolution = (img_hw[0] // patch_hw[0], img_hw[1] // patch_hw[1])

        conv_first = nn.Conv2d(in_chans * sf**2 if unshuffle else in_chans, embed_dim, 3, 1, 1)
        self.conv_first = (
            nn.Sequential(nn.PixelUnshuffle(sf), conv_first) if unshuffle else conv_first
        )
        if ape:
            self.absolute_pos_embed = nn.Parameter(
                torch.zeros(1, resolution[0] * resolution[1], embed_dim)
            )
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.patch_embed = PatchEmbed(norm_layer(embed_dim) if patch_norm else None)
        self.pos_drop = nn.Dropout(drop_rate)
        self.layers = _residual_groups(
            embed_dim, depths, num_heads, drop_path_rate, resi_connection,
            input_resolution=resolution, window_size=window_size, use_checkpoint=use_checkpoint,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
            attn_drop=attn_drop_rate, norm_layer=norm_layer,
        )  # fmt: skip
        self.norm = norm_layer(embed_dim)
        self.conv_after_body = _residual_conv(embed_dim, resi_connection)
        self._build_head(embed_dim, in_chans, sf)
        self.apply(_init_weights)

    def _build_head(self, embed_dim: int, out_chans: int, sf: int) -> None:
        if self.upsampler in ("nearest+conv", "pixelshuffle"):
            # default LeakyReLU slope (0.01) here, unlike the 0.2 of the other activations
            self.conv_before_upsample = nn.Sequential(
                nn.Conv2d(embed_dim, NUM_FEAT, 3, 1, 1), nn.LeakyReLU(inplace=True)
            )
        if self.upsampler == "nearest+conv":
            self.num_up = sf.bit_length() - 1  # log2(sf) nearest ×2 + conv stages
            for i in range(1, self.num_up + 1):
                setattr(self, f"conv_up{i}", nn.Conv2d(NUM_FEAT, NUM_FEAT, 3, 1, 1))
            self.conv_hr = nn.Conv2d(NUM_FEAT, NUM_FEAT, 3, 1, 1)
            self.conv_last = nn.Conv2d(NUM_FEAT, out_chans, 3, 1, 1)
        elif self.upsampler == "pixelshuffle":
            self.upsample = _pixelshuffle_upsample(sf, NUM_FEAT)
            self.conv_last = nn.Conv2d(NUM_FEAT, out_chans, 3, 1, 1)
        elif self.upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(
                nn.Conv2d(embed_dim, sf**2 * out_chans, 3, 1, 1), nn.PixelShuffle(sf)
            )
        else:
            self.conv_last = nn.Conv2d(embed_dim, out_chans, 3, 1, 1)

    @property
    def size_multiple(self) -> int:
        """Input sizes that run directly are multiples of this (64 for DiffBIR)."""
        return self.window_size * (self.upscale if self.unshuffle else 1)

    @property
    def output_scale(self) -> int:
        """Output size / input size."""
        return 1 if self.unshuffle or not self.upsampler else self.upscale

    def forward_features(self, x: Tensor) -> Tensor:
        """Residual Swin groups on a (B, C, h, w) feature map; same shape out."""
        x_size = (x.shape[2], x.shape[3])
        x = self.patch_embed(x)  # (B, h·w, C)
        if self.ape:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x, x_size)
        return rearrange(self.norm(x), "b (h w) c -> b c h w", h=x_size[0])

    def _reconstruct(self, feat: Tensor) -> Tensor:
        """Upsampling head of 'nearest+conv' and 'pixelshuffle'."""
        x = self.conv_before_upsample(feat)
        if self.upsampler == "pixelshuffle":
            return self.conv_last(self.upsample(x))
        for i in range(1, self.num_up + 1):
            up = F.interpolate(x, scale_factor=2, mode="nearest")
            x = F.leaky_relu(getattr(self, f"conv_up{i}")(up), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(x), 0.2))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) in [0, 1] → restored image (not clamped)."""
        h, w = x.shape[2:]
        ws = self.window_size
        # reflect-pad to a multiple of the window in pixels, as the original
        x = F.pad(x, (0, -w % ws, 0, -h % ws), mode="reflect")
        mean = torch.tensor(self.rgb_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) * self.img_range
        feat = self.conv_first(x)
        feat = self.conv_after_body(self.forward_features(feat)) + feat
        if self.upsampler == "pixelshuffledirect":
            out = self.upsample(feat)
        elif self.upsampler:
            out = self._reconstruct(feat)
        else:
            out = x + self.conv_last(feat)
        out = out / self.img_range + mean
        # Cropping by H·sf keeps the reflect padding of unshuffle models (original behaviour).
        return out[:, :, : h * self.upscale, : w * self.upscale]


def swinir_diffbir_config() -> dict[str, Any]:
    """Constructor arguments of DiffBIR's stage-1 SwinIR (configs/inference/swinir.yaml)."""
    return dict(
        img_size=64, patch_size=1, in_chans=3, embed_dim=180, depths=[6] * 8,
        num_heads=[6] * 8, window_size=8, mlp_ratio=2, sf=8, img_range=1.0,
        upsampler="nearest+conv", resi_connection="1conv", unshuffle=True, unshuffle_scale=8,
    )  # fmt: skip


def _summary(keys: list[str], what: str) -> str:
    shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    return f"{len(keys)} {what} ({shown})"


def load_swinir_state(model: SwinIR, state: Mapping[str, Tensor], source: str | Path) -> None:
    """Load `state` strictly; a mismatch raises one `WeightFileError` line naming `source`."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        _summary(keys, what)
        for keys, what in ((missing, "missing keys"), (unexpected, "unexpected keys"),
                           (wrong, "shape mismatches"))
        if keys
    ]  # fmt: skip
    if problems:
        raise WeightFileError(
            f"{source}: not a SwinIR state dict for this config: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)


def load_swinir(path: str | Path, config: Mapping[str, Any] | None = None) -> SwinIR:
    """Build a SwinIR and load a released file or one of our safetensors files, strictly.

    The config is, in order: `config`, the one stored in a safetensors file, the DiffBIR preset.
    Returns the model on the CPU in eval mode.
    """
    state = load_weight_file(path)
    if config is None and Path(path).suffix == ".safetensors":
        config = read_safetensors_config(path)
    model = SwinIR(**(config if config is not None else swinir_diffbir_config()))
    load_swinir_state(model, state, path)
    logger.info("loaded SwinIR weights from %s", path)
    return model.eval()


def save_swinir(model: SwinIR, path: str | Path) -> None:
    """Save weights and constructor config as safetensors (readable by `load_swinir`)."""
    if model.norm_layer is not nn.LayerNorm:
        raise ValueError(f"{path}: only models with norm_layer=nn.LayerNorm can store their config")
    save_safetensors(model.state_dict(), path, model.config)
