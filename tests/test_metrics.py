"""PSNR/SSIM against closed forms and against BasicSR's reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from basicsr.metrics import calculate_psnr, calculate_ssim

from model.eval.metrics import psnr, rgb_to_y, ssim


def _bgr_pair(seed: int, h: int = 40, w: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Two uint8 BGR (H, W, 3) images as cv2 reads them: a random one and a noisy copy."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    return a, b


def _batch(bgr: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """uint8 BGR (H, W, 3) -> RGB (1, 3, H, W) in [0, 1]."""
    return torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1)[None].to(dtype) / 255


def _checkerboard(shape: tuple[int, ...]) -> torch.Tensor:
    h, w = shape[-2:]
    board = (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 * 2 - 1
    return board.to(torch.float64).expand(shape)


def test_psnr_of_known_mse() -> None:
    x = torch.full((2, 3, 16, 16), 0.5, dtype=torch.float64)
    d = torch.tensor([0.01, 0.1], dtype=torch.float64).view(2, 1, 1, 1)
    y = x + d * _checkerboard(x.shape)  # every pixel off by exactly d: MSE = d^2
    expected = 10 * torch.log10(1 / d.flatten() ** 2)
    assert torch.allclose(psnr(x, y), expected, rtol=0, atol=1e-10)
    assert torch.allclose(psnr(x * 255, y * 255, data_range=255.0), expected, atol=1e-10)
    got32 = psnr(x.float(), y.float())
    assert got32.dtype == torch.float64 and got32.shape == (2,)
    assert torch.allclose(got32, expected, atol=1e-5)


def test_psnr_y_channel_of_a_gray_shift() -> None:
    # Adding d to R, G and B moves BT.601 Y by d * (65.481 + 128.553 + 24.966) on [0, 255].
    x = torch.full((1, 3, 12, 12), 0.4, dtype=torch.float64)
    d = 0.02
    y = x + d * _checkerboard(x.shape)
    expected = 10 * math.log10(255**2 / (219.0 * d) ** 2)
    assert psnr(x, y, y_channel=True).item() == pytest.approx(expected, abs=1e-10)
    assert rgb_to_y(torch.ones(1, 3, 1, 1)).item() == pytest.approx(235.0)
    assert rgb_to_y(torch.zeros(1, 3, 1, 1)).item() == pytest.approx(16.0)


def test_crop_border_ignores_edges() -> None:
    x = torch.rand(1, 3, 20, 20, dtype=torch.float64)
    y = x.clone()
    y[..., :3, :] = 0.0  # damage only the top 3 rows
    assert math.isfinite(psnr(x, y).item())
    assert psnr(x, y, crop_border=3).item() == math.inf
    assert ssim(x, y, crop_border=3).item() == pytest.approx(1.0, abs=1e-12)
    assert ssim(x, y).item() < 0.99


@pytest.mark.parametrize("y_channel", [False, True])
@pytest.mark.parametrize("crop_border", [0, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_psnr_matches_basicsr(y_channel: bool, crop_border: int, dtype: torch.dtype) -> None:
    for seed in range(3):
        a, b = _bgr_pair(seed)
        ref = calculate_psnr(a, b, crop_border=crop_border, test_y_channel=y_channel)
        got = psnr(_batch(a, dtype), _batch(b, dtype), crop_border=crop_border, y_channel=y_channel)
        # BasicSR computes Y in float32 (to_y_channel), which moves PSNR by < 5e-7 dB here.
        assert got.item() == pytest.approx(ref, rel=0, abs=1e-6)


def test_psnr_y_matches_float64_reference_exactly() -> None:
    a, b = _bgr_pair(7)

    def y64(bgr: np.ndarray) -> np.ndarray:
        return bgr[..., ::-1].astype(np.float64) @ np.array([65.481, 128.553, 24.966]) / 255 + 16

    mse = np.mean((y64(a)[4:-4, 4:-4] - y64(b)[4:-4, 4:-4]) ** 2)
    ref = 10 * np.log10(255.0**2 / mse)
    got = psnr(_batch(a), _batch(b), crop_border=4, y_channel=True).item()
    assert got == pytest.approx(ref, rel=0, abs=1e-10)


def test_ssim_of_identical_images_is_one() -> None:
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(
        ssim(x, x, y_channel=True, crop_border=4), torch.ones(3, dtype=torch.float64)
    )


def test_ssim_of_constant_images() -> None:
    # No variance: SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1) on [0, 255].
    a, b = 0.3, 0.6
    x = torch.full((1, 1, 16, 16), a, dtype=torch.float64)
    y = torch.full((1, 1, 16, 16), b, dtype=torch.float64)
    c1 = (0.01 * 255) ** 2
    expected = (2 * a * b * 255**2 + c1) / ((a * 255) ** 2 + (b * 255) ** 2 + c1)
    assert ssim(x, y).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("y_channel", [False, True])
@pytest.mark.parametrize("crop_border", [0, 4])
def test_ssim_matches_basicsr(y_channel: bool, crop_border: int) -> None:
    pairs = [_bgr_pair(seed) for seed in range(3)]
    got = ssim(
        torch.cat([_batch(a, torch.float32) for a, _ in pairs]),
        torch.cat([_batch(b, torch.float32) for _, b in pairs]),
        crop_border=crop_border,
        y_channel=y_channel,
    )
    ref = [
        calculate_ssim(a, b, crop_border=crop_border, test_y_channel=y_channel) for a, b in pairs
    ]
    # Measured difference is ~1e-9 (float32 input, BasicSR's float32 Y); 1e-4 is the contract.
    assert np.allclose(got.numpy(), ref, rtol=0, atol=1e-7)
    assert len(set(np.round(ref, 6))) == 3  # three different images, not one value thrice


def test_gray_input_is_its_own_luma() -> None:
    x, y = torch.rand(2, 1, 24, 24), torch.rand(2, 1, 24, 24)
    assert torch.equal(psnr(x, y, y_channel=True), psnr(x, y))
    assert torch.equal(ssim(x, y, y_channel=True), ssim(x, y))


def test_bad_inputs_raise() -> None:
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(x, torch.rand(1, 3, 16, 15))
    with pytest.raises(ValueError, match="crop_border"):
        psnr(x, x, crop_border=8)
    with pytest.raises(ValueError, match="11x11"):
        ssim(x, x, crop_border=3)
    with pytest.raises(ValueError, match="expected"):
        ssim(torch.rand(1, 2, 16, 16), torch.rand(1, 2, 16, 16))
