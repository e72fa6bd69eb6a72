"""The VAE's lean inference (model/nets/lean_inference.py) computes what plain modules do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from model.nets import lean_inference
from model.nets.lean_inference import BandedConv2d, BandedUpsampleConv, LeanSiLU, make_lean


@pytest.fixture
def small_bands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bands of a few rows, so that small test maps are split (unevenly)."""
    monkeypatch.setattr(lean_inference, "BAND_BYTES", 3 * 4 * 8 * 17)


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("upsample", [False, True])
def test_bands_equal_the_whole_convolution(small_bands: None, kernel: int, upsample: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, kernel, padding=kernel // 2)
    x = torch.randn(2, 8, 13, 17)  # odd sizes: bands do not divide the rows
    reference = conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if upsample else x)
    with torch.no_grad():
        banded = BandedUpsampleConv(conv)(x) if upsample else lean_inference.conv_in_bands(conv, x)
    assert banded.shape == reference.shape
    torch.testing.assert_close(banded, reference, rtol=1e-5, atol=1e-6)


def test_gradients_flow_through_the_plain_path(small_bands: None) -> None:
    conv = nn.Conv2d(4, 4, 3, padding=1)
    banded = nn.Conv2d(4, 4, 3, padding=1)
    banded.load_state_dict(conv.state_dict())
    banded.__class__ = BandedConv2d
    x = torch.randn(1, 4, 16, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(banded(x).square().sum(), x)
    (expected,) = torch.autograd.grad(conv(x).square().sum(), x)
    torch.testing.assert_close(grad, expected)
    y = torch.randn(3, 5)
    z = LeanSiLU()(y)  # with gradients on: not in place
    assert not torch.equal(z, y)


def test_a_lean_vae_decodes_and_encodes_as_the_plain_one(small_bands: None) -> None:
    torch.manual_seed(0)
    kwargs = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                  norm_num_groups=32, latent_channels=4)  # fmt: skip
    plain = AutoencoderKL(**kwargs).eval()
    lean = AutoencoderKL(**kwargs).eval()
    lean.load_state_dict(plain.state_dict())
    make_lean(lean)
    assert lean.state_dict().keys() == plain.state_dict().keys()
    kinds = {type(m) for m in lean.modules()}
    assert {BandedConv2d, BandedUpsampleConv, LeanSiLU} <= kinds and nn.SiLU not in kinds
    z, img = torch.randn(1, 4, 12, 10), torch.rand(1, 3, 24, 20) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(
            lean.decode(z).sample, plain.decode(z).sample, rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(lean.encode(img).latent_dist.mode(),
                                   plain.encode(img).latent_dist.mode(), rtol=1e-5, atol=1e-5)  # fmt: skip
