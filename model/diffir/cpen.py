"""CPEN: the compact IR prior extraction network, an image -> 256-d IPR vector."""

from __future__ import annotations

from torch import Tensor, nn

from model.diffir.dirformer import IPR_DIM

_FEATS = IPR_DIM // 4  # the original hard-codes n_feats = 64


def _lrelu() -> nn.LeakyReLU:
    return nn.LeakyReLU(0.1, inplace=True)


class _ResBlock(nn.Module):
    """conv - LeakyReLU(0.1) - conv, plus the input."""

    def __init__(self, feats: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(feats, feats, 3, padding=1), _lrelu(), nn.Conv2d(feats, feats, 3, padding=1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + x


class CPEN(nn.Module):
    """Convolutions, residual blocks, global average pooling and an MLP: (B, C, H, W) -> (B, 256).

    The output ends in a LeakyReLU, as the original's. CPEN_S1 sees concat(LQ, unshuffle4(GT)),
    CPEN_S2 the LQ alone (both after the x2 / x1 input unshuffle), see `model.diffir.models`.

    Args:
        in_channels: channels of the prepared input.
        n_encoder_res: residual blocks.
    """

    def __init__(self, in_channels: int, n_encoder_res: int = 6) -> None:
        super().__init__()
        f = _FEATS
        self.E = nn.Sequential(
            nn.Conv2d(in_channels, f, 3, padding=1), _lrelu(),
            *(_ResBlock(f) for _ in range(n_encoder_res)),
            nn.Conv2d(f, f * 2, 3, padding=1), _lrelu(),
            nn.Conv2d(f * 2, f * 2, 3, padding=1), _lrelu(),
            nn.Conv2d(f * 2, f * 4, 3, padding=1), _lrelu(),
            nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.mlp = nn.Sequential(
            nn.Linear(f * 4, f * 4), _lrelu(), nn.Linear(f * 4, f * 4), _lrelu()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.E(x).flatten(1))
