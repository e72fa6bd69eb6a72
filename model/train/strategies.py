"""Sharded training of stage 2 on many GPUs: a Lightning FSDP strategy that fits the ControlLDM.

    trainer:
      strategy: {target: model.train.strategies.fsdp_stage2, params: {cpu_offload: false}}

Every UNet and LAControlNet block (down, mid, up) is one FSDP unit, so a GPU holds the full
weights of one block at a time; the VAE and the text encoder stay in the root unit.
`use_orig_params` lets one unit hold frozen SD and trainable LAControlNet tensors, and keeps
the parameter names, so checkpoints keep only `cldm.controlnet.*` as with DDP.
"""

from __future__ import annotations

from diffusers.models.unets.unet_2d_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)
from pytorch_lightning.strategies import FSDPStrategy

BLOCKS = {CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D}


def fsdp_stage2(
    sharding_strategy: str = "FULL_SHARD", cpu_offload: bool = False, **kwargs
) -> FSDPStrategy:
    """FSDP over the UNet / LAControlNet blocks.

    Args:
        sharding_strategy: "FULL_SHARD" (weights, gradients and optimizer state sharded),
            "SHARD_GRAD_OP" (ZeRO-2: gradients and optimizer state) or "HYBRID_SHARD"
            (full sharding within a node, replicas across nodes).
        cpu_offload: keep the sharded parameters in host memory (slower, for small GPUs).
        **kwargs: further `FSDPStrategy` arguments (e.g. `state_dict_type: sharded`).
    """
    return FSDPStrategy(
        sharding_strategy=sharding_strategy,
        cpu_offload=cpu_offload,
        auto_wrap_policy=BLOCKS,
        use_orig_params=True,
        **kwargs,
    )
