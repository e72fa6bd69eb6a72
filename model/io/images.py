"""Robust image decoding and encoding: 8/16-bit, gray, alpha, palette, unicode paths.

Every image leaves this module as float32 RGB in [0, 1], shape (H, W, 3); the alpha channel,
when the file has one, comes separately as float32 (H, W) in [0, 1] so that inference can
re-attach it to the restored image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_JPEG_MAGIC = b"\xff\xd8"
_WRITE_8BIT_ONLY = (".jpg", ".jpeg", ".webp", ".bmp")
_NO_ALPHA = (".jpg", ".jpeg", ".bmp")


class ImageReadError(OSError):
    """An image file that cannot be decoded; the message is `"<path>: <reason>"`."""


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image file.

    Args:
        rgb: float32 (H, W, 3) in [0, 1], colour channels as stored (alpha not applied).
        alpha: float32 (H, W) in [0, 1], or None when the file has no alpha channel.
        bit_depth: 8, 16 or 32 (float TIFF): the precision of the file's samples.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    bit_depth: int


def _read_bytes(path: Path) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read file ({e.strerror or e})") from None
    if data.size == 0:
        raise ImageReadError(f"{path}: empty file")
    return data


def _decode(path: Path, data: np.ndarray) -> np.ndarray:
    # IMREAD_UNCHANGED keeps alpha and 16-bit samples but ignores EXIF orientation; JPEG has no
    # alpha, so JPEGs are decoded with flags that keep bit depth and gray but apply orientation.
    if data[:2].tobytes() == _JPEG_MAGIC:
        flags = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
    else:
        flags = cv2.IMREAD_UNCHANGED
    try:
        img = cv2.imdecode(data, flags)
    except cv2.error as e:
        raise ImageReadError(
            f"{path}: decoder failed ({str(e).strip().splitlines()[-1]})"
        ) from None
    if img is None or img.size == 0:
        raise ImageReadError(f"{path}: not a decodable image (corrupt, truncated or unsupported)")
    return img


def _to_unit_float(path: Path, img: np.ndarray) -> tuple[np.ndarray, int]:
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0, 8
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0, 16
    if img.dtype in (np.float32, np.float64):
        # float files (TIFF/EXR-like) are taken as linear [0, 1] values
        return np.clip(np.nan_to_num(img.astype(np.float32)), 0.0, 1.0), 32
    raise ImageReadError(f"{path}: unsupported sample type {img.dtype}")


def decode_image(path: str | os.PathLike) -> DecodedImage:
    """Decode an image file into RGB and optional alpha, both float32 in [0, 1].

    Gray images become 3 equal channels; palette images are expanded; EXIF orientation is
    applied to JPEG files. Raises `ImageReadError("<path>: <reason>")` for missing, empty,
    corrupt, truncated or non-image files.
    """
    path = Path(path)
    img = _decode(path, _read_bytes(path))
    img, bit_depth = _to_unit_float(path, img)
    if img.ndim == 2:
        img = img[:, :, None]
    channels = img.shape[2]
    alpha = None
    if channels in (2, 4):
        alpha = np.ascontiguousarray(img[:, :, -1])
        img = img[:, :, :-1]
    if channels in (1, 2):
        rgb = np.repeat(img, 3, axis=2)
    elif channels in (3, 4):
        rgb = np.ascontiguousarray(img[:, :, ::-1])  # OpenCV stores BGR
    else:
        raise ImageReadError(f"{path}: unsupported channel count {channels}")
    return DecodedImage(rgb=rgb, alpha=alpha, bit_depth=bit_depth)


def read_image(path: str | os.PathLike, background: float = 1.0) -> np.ndarray:
    """Read an image as float32 RGB (H, W, 3) in [0, 1].

    Transparent images are composited over a uniform `background` (white by default), because
    the colour stored under fully transparent pixels is arbitrary.
    """
    image = decode_image(path)
    if image.alpha is None:
        return image.rgb
    a = image.alpha[:, :, None]
    return (image.rgb * a + background * (1.0 - a)).astype(np.float32)


QUANTIZE_MODES = ("truncate", "round")


def quantise(img: np.ndarray, bit_depth: int = 8, mode: str = "round") -> np.ndarray:
    """Float in [0, 1] -> uint8 / uint16, clipped; "round" to nearest or "truncate" (the
    original's `(x * 255).to(uint8)`)."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize mode must be one of {QUANTIZE_MODES}, got {mode!r}")
    peak, dtype = (255.0, np.uint8) if bit_depth == 8 else (65535.0, np.uint16)
    scaled = np.clip(img, 0.0, 1.0) * peak
    return (np.floor(scaled) if mode == "truncate" else scaled.round()).astype(dtype)


def write_image(
    path: str | os.PathLike,
    rgb: np.ndarray,
    alpha: np.ndarray | None = None,
    bit_depth: int = 8,
    quality: int = 95,
    quantize: str = "round",
) -> None:
    """Write float RGB (H, W, 3) in [0, 1] to png/jpg/webp/bmp/tif, creating parent folders.

    Args:
        path: output file; its extension picks the format.
        rgb: float (H, W, 3) in [0, 1]; values outside are clipped.
        alpha: optional float (H, W) in [0, 1]; only for png, webp and tif.
        bit_depth: 8, or 16 for png/tif.
        quality: JPEG/WebP quality (1-100).
        quantize: "round" or "truncate" (see `quantise`) for the colour; alpha is rounded.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        raise ValueError(
            f"{path}: unsupported output format {ext!r}; use one of {IMAGE_EXTENSIONS}"
        )
    if bit_depth not in (8, 16) or (bit_depth == 16 and ext in _WRITE_8BIT_ONLY):
        raise ValueError(f"{path}: bit depth {bit_depth} not supported for {ext}")
    if alpha is not None and ext in _NO_ALPHA:
        raise ValueError(f"{path}: format {ext} cannot store an alpha channel")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"{path}: expected an (H, W, 3) image, got shape {rgb.shape}")
    img = quantise(rgb[:, :, ::-1], bit_depth, quantize)
    if alpha is not None:
        # always rounded: a resized opaque alpha of 0.9999998 must stay 255, not truncate to 254
        img = np.concatenate([img, quantise(alpha, bit_depth, "round")[:, :, None]], axis=2)
    params = []
    if ext in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    elif ext == ".webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, int(quality)]
    ok, encoded = cv2.imencode(ext, img, params)
    if not ok:
        raise OSError(f"{path}: encoding as {ext} failed")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded.tobytes())  # unlike ndarray.tofile, a full disk sets errno
