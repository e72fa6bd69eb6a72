"""Image decoding/encoding: bit depths, gray, alpha, palette, orientation, bad files."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from model.io.images import ImageReadError, decode_image, read_image, write_image


@pytest.fixture
def rgb8() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)


def test_8bit_rgb_png_round_trip(tmp_path, rgb8):
    cv2.imwrite(str(tmp_path / "a.png"), rgb8[:, :, ::-1])
    img = decode_image(tmp_path / "a.png")
    assert img.rgb.dtype == np.float32 and img.rgb.shape == (12, 10, 3)
    assert img.alpha is None and img.bit_depth == 8
    np.testing.assert_array_equal((img.rgb * 255).round().astype(np.uint8), rgb8)


def test_16bit_png_keeps_precision(tmp_path):
    bgr16 = np.random.default_rng(1).integers(0, 65536, (8, 6, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "a.png"), bgr16)
    img = decode_image(tmp_path / "a.png")
    assert img.bit_depth == 16
    np.testing.assert_array_equal((img.rgb * 65535).round().astype(np.uint16), bgr16[:, :, ::-1])


def test_16bit_tiff_and_gray(tmp_path):
    gray16 = np.random.default_rng(2).integers(0, 65536, (8, 6), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "g.tif"), gray16)
    img = decode_image(tmp_path / "g.tif")
    assert img.rgb.shape == (8, 6, 3) and img.bit_depth == 16
    for c in range(3):
        np.testing.assert_allclose(img.rgb[:, :, c], gray16 / 65535.0, atol=1e-6)


def test_gray_jpeg_becomes_rgb(tmp_path):
    cv2.imwrite(str(tmp_path / "g.jpg"), np.full((8, 8), 128, np.uint8))
    rgb = read_image(tmp_path / "g.jpg")
    assert rgb.shape == (8, 8, 3)
    np.testing.assert_allclose(rgb, 128 / 255, atol=2 / 255)


def test_rgba_alpha_exposed_and_composited_on_white(tmp_path, rgb8):
    alpha = np.zeros((12, 10), np.uint8)
    alpha[:, 5:] = 255
    cv2.imwrite(str(tmp_path / "a.png"), np.dstack([rgb8[:, :, ::-1], alpha]))
    img = decode_image(tmp_path / "a.png")
    np.testing.assert_array_equal(img.alpha, alpha / 255.0)
    np.testing.assert_allclose(img.rgb, rgb8 / 255.0, atol=1e-6)
    composited = read_image(tmp_path / "a.png")
    np.testing.assert_allclose(composited[:, :5], 1.0)
    np.testing.assert_allclose(composited[:, 5:], rgb8[:, 5:] / 255.0, atol=1e-6)


def test_gray_alpha_and_palette(tmp_path):
    la = np.stack([np.full((4, 4), 100, np.uint8), np.full((4, 4), 255, np.uint8)], axis=2)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    img = decode_image(tmp_path / "la.png")
    np.testing.assert_allclose(img.rgb, 100 / 255, atol=1e-6)
    np.testing.assert_allclose(img.alpha, 1.0)
    palette = Image.fromarray(np.zeros((4, 4), np.uint8), "P")
    palette.putpalette([10, 200, 30] + [0] * 765)
    palette.save(tmp_path / "p.png")
    rgb = read_image(tmp_path / "p.png")
    np.testing.assert_allclose(rgb[0, 0], np.array([10, 200, 30]) / 255, atol=1e-6)


def test_jpeg_exif_orientation_applied(tmp_path, rgb8):
    im = Image.fromarray(rgb8)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert read_image(tmp_path / "r.jpg").shape == (10, 12, 3)


def test_unicode_path(tmp_path, rgb8):
    path = tmp_path / "图像 ü.png"
    write_image(path, rgb8 / 255.0)
    np.testing.assert_allclose(read_image(path), rgb8 / 255.0, atol=1e-6)


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.png", b"", "empty file"),
        ("text.png", b"this is not an image", "not a decodable image"),
        ("trunc.png", None, "not a decodable image"),
    ],
)
def test_bad_files_raise_one_line_error(tmp_path, rgb8, name, content, reason):
    path = tmp_path / name
    if content is None:
        ok, buf = cv2.imencode(".png", rgb8)
        content = buf.tobytes()[:40]
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as info:
        read_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "nope.png")


def test_write_formats_and_parent_folders(tmp_path, rgb8):
    smooth = np.broadcast_to(np.linspace(0.2, 0.8, 16)[None, :, None], (16, 16, 3))
    write_image(tmp_path / "x" / "y" / "a.jpg", smooth, quality=100)
    np.testing.assert_allclose(read_image(tmp_path / "x" / "y" / "a.jpg"), smooth, atol=0.02)
    img = rgb8 / 255.0
    write_image(tmp_path / "a.webp", img, alpha=np.full(img.shape[:2], 0.5), quality=101)
    assert decode_image(tmp_path / "a.webp").alpha is not None
    write_image(tmp_path / "a16.png", img, bit_depth=16)
    assert decode_image(tmp_path / "a16.png").bit_depth == 16


def test_write_rejects_bad_requests(tmp_path, rgb8):
    with pytest.raises(ValueError, match="bit depth"):
        write_image(tmp_path / "a.jpg", rgb8 / 255.0, bit_depth=16)
    with pytest.raises(ValueError, match="alpha"):
        write_image(tmp_path / "a.jpg", rgb8 / 255.0, alpha=np.ones((12, 10)))
    with pytest.raises(ValueError, match="format"):
        write_image(tmp_path / "a.gif", rgb8 / 255.0)
