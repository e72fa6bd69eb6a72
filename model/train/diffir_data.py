"""Real-ESRGAN degradations for super-resolution training: the LQ stays at the small size."""

from __future__ import annotations

import torch

from dataset.batch_transform import RealESRGANBatchTransform, SecondOrderParams


class SRBatchTransform(RealESRGANBatchTransform):
    """`RealESRGANBatchTransform` whose `lq` is (B, 3, H / s, W / s) with s = `stage2_scale`.

    DiffIR (like Real-ESRGAN) restores from the LQ at its own size, so the final resize back
    to the HQ size is skipped; everything else, including the pair queue, is unchanged.
    """

    def degrade(
        self,
        hq: torch.Tensor,
        batch: dict,
        params: SecondOrderParams,
        resize_back: bool = False,
    ) -> torch.Tensor:
        return super().degrade(hq, batch, params, resize_back=resize_back)
