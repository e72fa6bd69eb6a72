"""LAControlNet: a trainable copy of the UNet encoder that steers the frozen UNet.

It sees `concat(z_t, c_img)` (the condition latent is concatenated to the input, there is no
separate hint encoder) and returns one residual per encoder output plus one for the middle
block, each through a 1x1 conv initialised to zero. Built from diffusers' UNet blocks, so its
encoder parameters carry the same names as in `UNet2DConditionModel` and copy over 1:1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn, get_down_block
from torch import nn

from model.nets.unet import UNetLayout, encoder_kwargs_from_original, sd21_unet_cfg

logger = logging.getLogger(__name__)

# UNet2DConditionModel config entries that define the encoder the LAControlNet copies.
_ENCODER_CONFIG_KEYS = (
    "in_channels",
    "block_out_channels",
    "down_block_types",
    "layers_per_block",
    "attention_head_dim",
    "cross_attention_dim",
    "use_linear_projection",
    "transformer_layers_per_block",
    "norm_num_groups",
    "norm_eps",
    "flip_sin_to_cos",
    "freq_shift",
    "upcast_attention",
)


def diffbir_controlnet_cfg() -> dict[str, Any]:
    """The DiffBIR ControlNet config (SD 2.1 encoder + 4 hint channels), original vocabulary."""
    cfg = {k: v for k, v in sd21_unet_cfg().items() if k != "out_channels"}
    cfg["hint_channels"] = 4
    return cfg


@dataclass
class InitReport:
    """How each LAControlNet parameter was initialised from a UNet (keys in our layout)."""

    copied: list[str] = field(default_factory=list)
    zero_extended: list[str] = field(default_factory=list)
    zero_initialised: list[str] = field(default_factory=list)

    def format(self) -> str:
        """A human-readable multi-line summary."""
        lines = [f"copied from the UNet: {len(self.copied)} tensors"]
        lines += [f"zero-extended (extra input channels = 0): {k}" for k in self.zero_extended]
        lines.append(f"newly initialised to zero: {len(self.zero_initialised)} tensors")
        lines += [f"  {k}" for k in self.zero_initialised]
        return "\n".join(lines)


class LAControlNet(ModelMixin, ConfigMixin):
    """Latent-conditioned ControlNet: UNet encoder copy on `concat(z_t, c_img)` + zero convs.

    Args:
        in_channels: channels of the noisy latent z_t.
        hint_channels: channels of the condition latent c_img, concatenated after z_t.
        block_out_channels: channels per level.
        down_block_types: diffusers block type per level ("CrossAttnDownBlock2D" / "DownBlock2D").
        layers_per_block: ResNet blocks per level.
        attention_head_dim: number of attention heads per level (diffusers' naming).
        cross_attention_dim: width of the text context.
        use_linear_projection: linear (True) or 1x1-conv transformer proj_in/proj_out.
        transformer_layers_per_block: transformer depth (int or per level).
        norm_num_groups: GroupNorm groups.
        norm_eps: ResNet GroupNorm epsilon.
        flip_sin_to_cos: timestep embedding puts cos first.
        freq_shift: timestep embedding frequency shift.
        upcast_attention: compute attention in float32.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        hint_channels: int = 4,
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        layers_per_block: int = 2,
        attention_head_dim: int | Sequence[int] = (5, 10, 20, 20),
        cross_attention_dim: int = 1024,
        use_linear_projection: bool = True,
        transformer_layers_per_block: int | Sequence[int] = 1,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        upcast_attention: bool = False,
    ) -> None:
        super().__init__()
        levels = len(block_out_channels)
        heads = (
            [attention_head_dim] * levels
            if isinstance(attention_head_dim, int)
            else attention_head_dim
        )
        depth = transformer_layers_per_block
        depths = [depth] * levels if isinstance(depth, int) else list(depth)
        time_dim = block_out_channels[0] * 4

        self.conv_in = nn.Conv2d(in_channels + hint_channels, block_out_channels[0], 3, padding=1)
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_dim, act_fn="silu")
        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([_zero_conv(block_out_channels[0])])
        out_ch = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            is_last = i == levels - 1
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    transformer_layers_per_block=depths[i],
                    in_channels=in_ch,
                    out_channels=out_ch,
                    temb_channels=time_dim,
                    add_downsample=not is_last,
                    resnet_eps=norm_eps,
                    resnet_act_fn="silu",
                    resnet_groups=norm_num_groups,
                    cross_attention_dim=cross_attention_dim,
                    num_attention_heads=heads[i],
                    attention_head_dim=out_ch // heads[i],
                    downsample_padding=1,
                    use_linear_projection=use_linear_projection,
                    upcast_attention=upcast_attention,
                )
            )
            # One residual per ResNet output, plus one for the downsample output.
            for _ in range(layers_per_block + (0 if is_last else 1)):
                self.controlnet_down_blocks.append(_zero_conv(out_ch))
        self.mid_block = UNetMidBlock2DCrossAttn(
            in_channels=out_ch,
            temb_channels=time_dim,
            transformer_layers_per_block=depths[-1],
            resnet_eps=norm_eps,
            resnet_act_fn="silu",
            resnet_groups=norm_num_groups,
            num_attention_heads=heads[-1],
            cross_attention_dim=cross_attention_dim,
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
        )
        self.controlnet_mid_block = _zero_conv(out_ch)

    @property
    def layout(self) -> UNetLayout:
        return UNetLayout.from_diffusers(self.config)

    def forward(
        self, z_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, c_img: torch.Tensor
    ) -> list[torch.Tensor]:
        """Return the control residuals: one per encoder output, then the middle block's.

        Args:
            z_t: noisy latent (B, in_channels, h, w).
            t: timesteps (B,) or a scalar.
            context: text context (B, L, cross_attention_dim).
            c_img: condition latent (B, hint_channels, h, w).
        """
        t = torch.as_tensor(t, device=z_t.device)
        t_emb = self.time_proj(t.reshape(-1).expand(z_t.shape[0])).to(z_t.dtype)
        emb = self.time_embedding(t_emb)  # (B, 4 * C0)

        h = self.conv_in(torch.cat((z_t, c_img), dim=1))
        outputs = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
            else:
                h, res = block(hidden_states=h, temb=emb)
            outputs.extend(res)
        h = self.mid_block(h, emb, encoder_hidden_states=context)

        control = [conv(x) for conv, x in zip(self.controlnet_down_blocks, outputs, strict=True)]
        control.append(self.controlnet_mid_block(h))
        return control

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, hint_channels: int = 4) -> LAControlNet:
        """Build an LAControlNet shaped like `unet`'s encoder and initialise it for training.

        The report of `init_from_unet` (copied / zero-extended / zero-initialised tensors)
        is logged at INFO level.
        """
        return lacontrolnet_from_unet(unet, hint_channels)[0]

    @torch.no_grad()
    def init_from_unet(self, unet: UNet2DConditionModel) -> InitReport:
        """Copy the UNet encoder weights, zero the hint input channels and the zero convs.

        At this initialisation every residual is exactly zero, so the controlled UNet
        computes exactly the frozen UNet.
        """
        unet_state = unet.state_dict()
        report = InitReport()
        for key, param in self.state_dict(keep_vars=True).items():
            source = unet_state.get(key)
            if source is None:
                if not key.startswith("controlnet_"):
                    raise KeyError(f"LAControlNet.init_from_unet: UNet has no tensor {key!r}")
                param.zero_()
                report.zero_initialised.append(key)
            elif source.shape == param.shape:
                param.copy_(source)
                report.copied.append(key)
            elif key == "conv_in.weight" and source.shape[1] < param.shape[1]:
                # Channels 0..C-1 see z_t as in the UNet; the hint channels start at zero.
                param.zero_()
                param[:, : source.shape[1]].copy_(source)
                report.zero_extended.append(key)
            else:
                raise ValueError(
                    f"LAControlNet.init_from_unet: {key} has shape {tuple(param.shape)}, "
                    f"UNet has {tuple(source.shape)}"
                )
        return report


def lacontrolnet_from_unet(
    unet: UNet2DConditionModel, hint_channels: int = 4
) -> tuple[LAControlNet, InitReport]:
    """`LAControlNet.from_unet`, also returning how each tensor was initialised."""
    kwargs = {k: unet.config[k] for k in _ENCODER_CONFIG_KEYS}
    with torch.device("meta"):
        controlnet = LAControlNet(hint_channels=hint_channels, **kwargs)
    # init_from_unet writes every tensor, so skip the random init. On the UNet's device, in
    # float32 whatever the UNet's dtype (it is the trained part).
    controlnet = controlnet.to_empty(device=unet.device)
    report = controlnet.init_from_unet(unet)
    logger.info("LAControlNet initialised from the UNet:\n%s", report.format())
    return controlnet, report


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def build_lacontrolnet(**controlnet_cfg: Any) -> LAControlNet:
    """Build an LAControlNet from an original `controlnet_cfg` (e.g. `diffbir_controlnet_cfg()`).

    `use_checkpoint: True` turns on gradient checkpointing (active only under autograd).
    """
    if "out_channels" in controlnet_cfg:
        raise ValueError("controlnet config: out_channels is not a ControlNet setting")
    kwargs = encoder_kwargs_from_original(controlnet_cfg)
    controlnet = LAControlNet(hint_channels=int(controlnet_cfg["hint_channels"]), **kwargs)
    if controlnet_cfg.get("use_checkpoint", False):
        controlnet.enable_gradient_checkpointing()
    return controlnet
