"""Stage-1 restoration network: the modified SwinIR of DiffBIR.

`PixelUnshuffle(8)` → 3×3 conv → residual Swin transformer groups at 1/8 resolution → three
nearest ×2 + conv stages back to full resolution. Module, parameter and buffer names follow the
original implementation, so released checkpoints load with `strict=True`. The transformer
building blocks live in `model.nets.swin_blocks`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import trunc_normal_
from torch import Tensor, nn

from model.io.checkpoint import (
    load_state_strict,
    load_weight_file,
    read_safetensors_config,
    save_safetensors,
)
from model.nets.swin_blocks import RSTB, PatchEmbed, residual_conv

logger = logging.getLogger(__name__)

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # fixed input shift of the original, not in the state dict
NUM_FEAT = 64  # channels of the reconstruction head, fixed in the original
UPSAMPLERS = ("nearest+conv", "pixelshuffle", "pixelshuffledirect", "")


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
    `unshuffle`, must then be multiples of `size_multiple` (see `model.nets.stage1.restore_stage1`).
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
        self.conv_after_body = residual_conv(embed_dim, resi_connection)
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


def load_swinir_state(model: SwinIR, state: Mapping[str, Tensor], source: str | Path) -> None:
    """Load `state` strictly; a mismatch raises one `WeightFileError` line naming `source`."""
    load_state_strict(model, state, source, "SwinIR")


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
