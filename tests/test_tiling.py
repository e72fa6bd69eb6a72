"""Tiled forward (layout, blending, exactness) and the sizing helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import load_fixture, strip_prefix
from torch import nn

from model.nets.stage1 import restore_stage1
from model.nets.swinir import SwinIR
from model.ops.sizing import crop_to, pad_to_multiple, resize_short_side_to
from model.ops.tiling import gaussian_weights, tile_starts, tiled_forward

# Measured: a pointwise fn differs from untiled by <= 6e-7 (float rounding of the weighted
# mean); a stack of three 3x3 convs by 3.3e-6 (tile 64 / stride 32) and 2.0e-5 (32 / 16).
POINTWISE_ATOL = 1e-6


def pointwise(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(3 * x) * 2 - x


@pytest.mark.parametrize(
    ("size", "tile", "stride"), [(100, 32, 16), (96, 32, 32), (64, 64, 8), (70, 48, 40), (5, 8, 4)]
)
def test_tile_starts_cover_the_range(size: int, tile: int, stride: int) -> None:
    starts = tile_starts(size, tile, stride)
    assert starts[0] == 0
    assert starts[-1] == max(size - tile, 0)  # last tile snapped to the border
    assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:], strict=False))
    covered = torch.zeros(size, dtype=torch.bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()


def test_gaussian_weights_positive_and_symmetric() -> None:
    w = gaussian_weights(48, 64)
    assert w.shape == (48, 64) and w.dtype == torch.float32
    assert (w > 0).all()
    assert torch.equal(w, w.flip(0)) and torch.equal(w, w.flip(1))
    assert w[24, 32] > 1e5 * w[0, 0]  # border pixels defer to a neighbouring tile's centre


@pytest.mark.parametrize(("h", "w"), [(64, 64), (40, 64), (64, 24)])
def test_one_tile_is_exactly_fn(h: int, w: int) -> None:
    conv = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.rand(2, 3, h, w)
    with torch.no_grad():
        assert torch.equal(tiled_forward(conv, x, 64, 32, progress=False), conv(x))


@pytest.mark.parametrize(("tile", "stride"), [(32, 16), (32, 24), (64, 32), (48, 8), (128, 64)])
def test_pointwise_fn_is_reproduced(tile: int, stride: int) -> None:
    x = torch.rand(2, 3, 96, 160)  # 128 / 64: tiles clipped to 96 rows, 3 columns
    y = tiled_forward(pointwise, x, tile, stride, progress=False)
    torch.testing.assert_close(y, pointwise(x), atol=POINTWISE_ATOL, rtol=0)


@pytest.mark.parametrize(("tile", "stride", "atol"), [(64, 32, 1e-5), (32, 16, 5e-5)])
def test_convolution_fn_is_close(tile: int, stride: int, atol: float) -> None:
    convs = nn.Sequential(*[nn.Conv2d(3, 3, 3, padding=1) for _ in range(3)])
    x = torch.rand(1, 3, 96, 160)
    with torch.no_grad():
        y, expected = tiled_forward(convs, x, tile, stride, progress=False), convs(x)
    # tile-edge outputs differ, but their weight is ~1e-4 of a neighbouring tile centre's
    assert (y - expected).abs().max() < atol


def test_scaling_and_channel_change() -> None:
    x = torch.rand(1, 3, 64, 96)
    proj = torch.randn(4, 3)

    def up(t: torch.Tensor) -> torch.Tensor:  # 3 → 4 channels, 2× nearest
        return (
            torch.einsum("oc,bchw->bohw", proj, t).repeat_interleave(2, -2).repeat_interleave(2, -1)
        )

    def down(t: torch.Tensor) -> torch.Tensor:  # 3 → 4 channels, 2×2 mean (an "encoder")
        return torch.einsum("oc,bchw->bohw", proj, F.avg_pool2d(t, 2))

    y_up = tiled_forward(up, x, 32, 16, scale=2, progress=False)
    torch.testing.assert_close(y_up, up(x), atol=POINTWISE_ATOL, rtol=0)
    y_down = tiled_forward(down, x, 32, 16, scale=0.5, multiple=2, progress=False)
    torch.testing.assert_close(y_down, down(x), atol=POINTWISE_ATOL, rtol=0)


def test_one_tile_at_a_time_and_dtype_kept() -> None:
    calls: list[tuple[int, ...]] = []

    def fn(t: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(t.shape))
        return t * 2

    x = torch.rand(1, 3, 96, 160).half()
    y = tiled_forward(fn, x, 64, 32, progress=False)
    assert len(calls) == len(tile_starts(96, 64, 32)) * len(tile_starts(160, 64, 32)) == 8
    assert set(calls) == {(1, 3, 64, 64)}
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, x * 2, atol=2e-3, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(tile_size=32, tile_stride=48), "tile_stride"),
        (dict(tile_size=48, tile_stride=16, multiple=32), "tile_size 48"),
        (dict(tile_size=32, tile_stride=0), "tile_stride"),
        (dict(tile_size=32, tile_stride=16, multiple=3), "multiple of 3"),
        (dict(tile_size=32, tile_stride=16, scale=0.3), "not an integer"),
        (dict(tile_size=32, tile_stride=12, scale=0.125), "not an integer"),
    ],
)
def test_bad_layouts_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiled_forward(pointwise, torch.rand(1, 3, 64, 64), progress=False, **kwargs)


def test_progress_bar_can_be_disabled(capsys) -> None:
    x = torch.rand(1, 3, 64, 64)
    tiled_forward(pointwise, x, 32, 16, progress=False)
    assert capsys.readouterr().err == ""
    tiled_forward(pointwise, x, 32, 16, progress=True, desc="demo")
    assert "demo" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_swinir() -> SwinIR:
    tensors, meta = load_fixture("swinir_tiny")
    model = SwinIR(**meta["config"]).eval()
    model.load_state_dict(strip_prefix(tensors, "swinir."), strict=True)
    return model


def test_tiled_swinir(tiny_swinir: SwinIR) -> None:
    lq = torch.rand(1, 3, 120, 184)  # padded to 128x192
    with torch.no_grad():
        full = restore_stage1(tiny_swinir, lq)
        assert torch.equal(restore_stage1(tiny_swinir, lq, tile_size=192), full)
        err = {
            (t, s): (restore_stage1(tiny_swinir, lq, t, s) - full).abs().mean().item()
            for t, s in [(64, 64), (64, 32), (128, 64)]
        }
    # The random-weight SwinIR sees far beyond a tile (output std 0.18), so tiles cannot be
    # exact. Measured mean |diff| over 3 seeds: 0.056-0.059 without overlap (64/64),
    # 0.041-0.043 at 64/32, 0.005-0.006 at 128/64 (max |diff| 0.09-0.13).
    assert err[(64, 32)] < 0.05 and err[(128, 64)] < 0.01
    assert err[(128, 64)] < err[(64, 32)] < err[(64, 64)]


def test_restore_stage1_tile_must_be_multiple_of_64(tiny_swinir: SwinIR) -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        restore_stage1(tiny_swinir, torch.rand(1, 3, 200, 260), tile_size=100)


def test_pad_and_crop() -> None:
    x = torch.rand(2, 3, 37, 64)
    padded, (h, w) = pad_to_multiple(x, 64)
    assert padded.shape == (2, 3, 64, 64) and (h, w) == (37, 64)
    assert torch.equal(padded[..., :37, :], x) and not padded[..., 37:, :].any()
    assert torch.equal(crop_to(padded, h, w), x)
    same, _ = pad_to_multiple(padded, 32)
    assert same is padded
    reflect, _ = pad_to_multiple(x, 8, mode="reflect")
    assert torch.equal(reflect[..., 37:, :], x[..., 33:36, :].flip(-2))
    with pytest.raises(ValueError, match="larger"):
        crop_to(x, 38, 64)


@pytest.mark.parametrize(
    ("h", "w", "expected"),
    [
        (300, 400, (512, 682)),
        (400, 300, (682, 512)),
        (256, 256, (512, 512)),
        (100, 512, (512, 2621)),
    ],
)
def test_resize_short_side(h: int, w: int, expected: tuple[int, int]) -> None:
    x = torch.rand(1, 3, h, w)
    y = resize_short_side_to(x)
    assert y.shape[-2:] == expected
    torch.testing.assert_close(
        y, F.interpolate(x, size=expected, mode="bicubic", antialias=True), atol=0, rtol=0
    )


def test_resize_short_side_keeps_large_images() -> None:
    x = torch.rand(1, 3, 512, 700)
    assert resize_short_side_to(x) is x
