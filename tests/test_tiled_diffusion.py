"""Tiled diffusion (model/sampling/tiled.py) as a model-function wrapper."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model.diffusion.cfg import classifier_free_guidance
from model.diffusion.samplers import make_sampler
from model.diffusion.schedule import diffusion_sd21_zsnr
from model.diffusion.tiled import tiled_model_fn
from model.ops.tiling import tile_starts


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_cond(batch: int, h: int, w: int, seed: int = 0) -> dict:
    g = gen(seed)
    return {
        "c_txt": torch.randn(batch, 77, 8, generator=g),
        "c_img": torch.randn(batch, 4, h, w, generator=g),
    }


def pointwise(z_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """A network whose output at a pixel depends only on that pixel (and t, c_txt)."""
    text = cond["c_txt"].mean((1, 2)).view(-1, 1, 1, 1)
    return torch.tanh(0.7 * z_t - 0.3 * cond["c_img"]) + 1e-4 * t.view(-1, 1, 1, 1) + text


class TinyConvNet(nn.Module):
    """A network with a 3×3 receptive field: tiling changes its output near tile borders."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.conv(torch.cat([z_t, cond["c_img"]], 1)) + 1e-4 * t.view(-1, 1, 1, 1)


@pytest.fixture(scope="module")
def conv_net() -> TinyConvNet:
    torch.manual_seed(0)
    return TinyConvNet().requires_grad_(False)


@pytest.mark.parametrize("tile_size", [16, 24, 64])
def test_one_tile_is_the_plain_network(tile_size: int, conv_net: TinyConvNet) -> None:
    z_t, t, cond = (
        torch.randn(2, 4, 16, 12, generator=gen(1)),
        torch.tensor([500, 500]),
        make_cond(2, 16, 12),
    )
    tiled = tiled_model_fn(conv_net, tile_size, tile_size // 2)
    assert torch.equal(tiled(z_t, t, cond), conv_net(z_t, t, cond))


@pytest.mark.parametrize("tile_batch_size", [1, 3, 100])
def test_pointwise_network_is_unchanged_by_tiling(tile_batch_size: int) -> None:
    z_t, t, cond = (
        torch.randn(2, 4, 40, 56, generator=gen(1)),
        torch.tensor([900, 900]),
        make_cond(2, 40, 56),
    )
    calls = []

    def counted(z: torch.Tensor, t: torch.Tensor, c: dict) -> torch.Tensor:
        calls.append(z.shape[0] // 2)
        return pointwise(z, t, c)

    out, plain = (
        tiled_model_fn(counted, 16, 12, tile_batch_size)(z_t, t, cond),
        pointwise(z_t, t, cond),
    )
    assert sum(calls) == 3 * 5  # tiles at y = 0, 12, 24 and x = 0, 12, 24, 36, 40
    assert max(calls) == min(tile_batch_size, 15)
    # measured: max |difference| 1.2e-7 (float32 rounding of the weighted mean)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-6)


def test_network_sees_aligned_tiles_no_larger_than_the_tile() -> None:
    h, w, tile, stride, batch_size = 20, 36, 16, 8, 2
    z_t = torch.randn(2, 4, h, w, generator=gen(1))
    cond = {"c_txt": torch.randn(2, 77, 8, generator=gen(2)), "c_img": z_t.clone()}
    calls = []

    def model_fn(z: torch.Tensor, t: torch.Tensor, c: dict) -> torch.Tensor:
        calls.append(z.shape)
        assert torch.equal(c["c_img"], z)  # the c_img crop matches the z_t crop
        assert torch.equal(c["c_txt"], cond["c_txt"].repeat(z.shape[0] // 2, 1, 1))
        assert torch.equal(t, torch.full((z.shape[0],), 7))
        return z * 2

    out = tiled_model_fn(model_fn, tile, stride, batch_size)(z_t, torch.tensor([7, 7]), cond)
    n_tiles = len(tile_starts(h, tile, stride)) * len(tile_starts(w, tile, stride))
    assert n_tiles == 2 * 4
    assert len(calls) == math.ceil(n_tiles / batch_size)
    assert all(shape == (2 * batch_size, 4, tile, tile) for shape in calls)
    assert out.shape == z_t.shape
    torch.testing.assert_close(out, z_t * 2, atol=1e-6, rtol=1e-6)


def test_convolutional_network_on_a_large_latent(conv_net: TinyConvNet) -> None:
    z_t, t, cond = (
        torch.randn(1, 4, 48, 40, generator=gen(1)),
        torch.tensor([100]),
        make_cond(1, 48, 40),
    )
    out = tiled_model_fn(conv_net, 16, 8, tile_batch_size=4)(z_t, t, cond)
    plain = conv_net(z_t, t, cond)
    assert out.shape == plain.shape and torch.isfinite(out).all()
    # tiles see zero padding at their borders, but the Gaussian weights give tile borders
    # ~4e-6 of a neighbouring tile centre's weight: measured mean |difference| 3.4e-6 relative
    assert (out - plain).abs().max() > 0
    assert (out - plain).abs().mean() < 1e-4 * plain.abs().mean()
    # tile batching does not change the result
    one_by_one = tiled_model_fn(conv_net, 16, 8, tile_batch_size=1)(z_t, t, cond)
    torch.testing.assert_close(out, one_by_one, atol=1e-6, rtol=1e-6)


def test_tiling_inside_cfg_and_a_sampler() -> None:
    """CFG wraps the tiled network, so both branches are cropped; a sampler runs on top."""
    cond, uncond = make_cond(1, 24, 40, seed=0), make_cond(1, 24, 40, seed=1)
    tiled = classifier_free_guidance(tiled_model_fn(pointwise, 16, 8), uncond, 4.0)
    plain = classifier_free_guidance(pointwise, uncond, 4.0)
    sampler = make_sampler("dpm++_2m_sde", diffusion_sd21_zsnr())
    x_T = torch.randn(1, 4, 24, 40, generator=gen(3))
    with torch.no_grad():
        a = sampler.sample(tiled, x_T, 5, cond, gen(4), progress=False)
        b = sampler.sample(plain, x_T, 5, cond, gen(4), progress=False)
    assert a.shape == x_T.shape and torch.isfinite(a).all()
    # measured: max |difference| 5.4e-7
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_bad_tile_options() -> None:
    for size, stride in ((16, 0), (16, 17)):
        with pytest.raises(ValueError, match="tile_stride"):
            tiled_model_fn(pointwise, size, stride)
    with pytest.raises(ValueError, match="tile_batch_size"):
        tiled_model_fn(pointwise, 16, 8, tile_batch_size=0)
    with pytest.raises(TypeError, match="cond as a dict"):
        tiled_model_fn(pointwise, 8, 8)(torch.zeros(1, 4, 16, 16), torch.tensor([1]), [1, 2])


# ---- the original's tiled evaluation (tests/fixtures/sampling, tiles/*) ----------------------
