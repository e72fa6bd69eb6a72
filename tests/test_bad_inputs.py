"""A corpus of broken and unusual input files through the inference CLI (stage 1, tiny weights).

Each file either comes out at the right size (alpha kept, 16-bit kept, EXIF orientation
applied) or is reported on one line naming it and the reason; the others go on, and the exit
code and the summary count the failures.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

import inference
from model.io.images import decode_image

UPSCALE = 2
# name -> the reason the run must report for it
BROKEN = {
    "empty.png": "empty file",
    "truncated.png": "not a decodable image",
    "text.png": "not a decodable image",
}
# name -> (stored height, width) of the files that must come out (x UPSCALE)
GOOD = {
    "garbled.jpg": (40, 40),  # damaged entropy data: libjpeg decodes what it can
    "one.png": (1, 1),
    "thin.png": (24, 200),
    "odd.png": (37, 53),
    "gray.png": (30, 30),
    "gray_alpha.png": (30, 30),
    "palette.png": (30, 30),
    "palette_alpha.png": (30, 30),
    "rgba.png": (30, 30),
    "opaque.png": (30, 30),
    "gray16.png": (30, 30),
    "colour16.png": (30, 30),
    "cmyk.jpg": (30, 30),
    "rotated.jpg": (40, 20),  # stored 20x40 with EXIF orientation 6 (90 degrees clockwise)
    "lossy.webp": (30, 30),
    "bitmap.bmp": (30, 30),
    "UPPER.PNG": (30, 30),
    "with space é.png": (30, 30),
    "nested/deeper/inner.png": (30, 30),
}
WITH_ALPHA = ("gray_alpha.png", "palette_alpha.png", "rgba.png", "opaque.png")


def write_corpus(root: Path) -> None:
    """The files of BROKEN and GOOD, and a non-image file that must be ignored."""
    rng = np.random.default_rng(0)

    def rgb(h: int, w: int) -> np.ndarray:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    def save(name: str, image: Image.Image, **kwargs) -> None:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name, **kwargs)

    def encoded(image: Image.Image, fmt: str) -> bytearray:
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        return bytearray(buffer.getvalue())

    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.png").write_bytes(b"")
    png = encoded(Image.fromarray(rgb(40, 40)), "PNG")
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    jpeg = encoded(Image.fromarray(rgb(40, 40)), "JPEG")
    jpeg[len(jpeg) // 2 : len(jpeg) // 2 + 200] = bytes(200)
    (root / "garbled.jpg").write_bytes(jpeg)
    (root / "text.png").write_text("not an image\n")
    (root / "notes.txt").write_text("not an image either, and not an image extension\n")
    for name in ("one.png", "thin.png", "odd.png"):
        save(name, Image.fromarray(rgb(*GOOD[name])))
    save("gray.png", Image.fromarray(rgb(30, 30)[..., 0]))
    save("gray_alpha.png", Image.fromarray(rgb(30, 30)[..., :2], "LA"))
    palette = Image.fromarray(rgb(30, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    save("palette.png", palette)
    save("palette_alpha.png", palette, transparency=0)
    half = np.zeros((30, 30), np.uint8)
    half[:, 15:] = 255
    save("rgba.png", Image.fromarray(np.dstack([rgb(30, 30), half]), "RGBA"))
    save("opaque.png", Image.fromarray(np.dstack([rgb(30, 30), np.full((30, 30), 255, np.uint8)])))
    save("gray16.png", Image.fromarray(rng.integers(0, 65536, (30, 30), dtype=np.uint16)))
    cv2.imwrite(str(root / "colour16.png"), rng.integers(0, 65536, (30, 30, 3), dtype=np.uint16))
    save("cmyk.jpg", Image.fromarray(rgb(30, 30)).convert("CMYK"))
    exif = Image.Exif()
    exif[0x0112] = 6
    save("rotated.jpg", Image.fromarray(rgb(20, 40)), exif=exif)
    for name in ("lossy.webp", "bitmap.bmp", "UPPER.PNG", "with space é.png"):
        save(name, Image.fromarray(rgb(30, 30)))
    save("nested/deeper/inner.png", Image.fromarray(rgb(30, 30)))


def test_decoding_follows_pil_for_exif_cmyk_palette_and_gray_alpha(tmp_path: Path) -> None:
    write_corpus(tmp_path)
    for name in ("rotated.jpg", "cmyk.jpg", "palette_alpha.png", "gray_alpha.png"):
        reference = ImageOps.exif_transpose(Image.open(tmp_path / name)).convert("RGBA")
        expected = np.asarray(reference, dtype=np.float32) / 255
        image = decode_image(tmp_path / name)
        assert image.rgb.shape == expected.shape[:2] + (3,), name
        tolerance = 4 / 255 if name == "cmyk.jpg" else 1e-6  # CMYK->RGB conversions differ
        assert np.abs(image.rgb - expected[..., :3]).mean() < tolerance, name
        if name in WITH_ALPHA:
            np.testing.assert_array_equal(image.alpha, expected[..., 3])
    assert decode_image(tmp_path / "gray16.png").bit_depth == 16


def _output(out: Path, name: str) -> Path:
    return (out / name).with_suffix(".png")


def test_every_bad_input_is_reported_and_the_rest_restored(
    tiny_weights: Path, tmp_path: Path, capsys
) -> None:
    write_corpus(tmp_path / "in")
    out = tmp_path / "out"
    argv = [
        "--input", str(tmp_path / "in"), "--output", str(out), "--stage1-only",
        "--weights-dir", str(tiny_weights), "--model-config", str(tiny_weights / "tiny_config.yaml"),
        "--device", "cpu", "--precision", "fp32", "--min-short-side", "16", "--offline",
        "--upscale", str(UPSCALE), "--bit-depth", "16", "--no-progress",
    ]  # fmt: skip
    assert inference.main(argv) == 1
    err = capsys.readouterr().err
    for name, reason in BROKEN.items():
        lines = [line for line in err.splitlines() if name in line]
        assert lines and all(reason in line for line in lines), (name, err)
        assert not _output(out, name).exists()
    assert "notes" not in err and not _output(out, "notes.txt").exists()
    assert re.search(rf"\b{len(GOOD)} restored\b", err) and re.search(r"\b3 failed\b", err), err
    assert "Traceback" not in err
    for name, (h, w) in GOOD.items():
        image = cv2.imread(str(_output(out, name)), cv2.IMREAD_UNCHANGED)
        assert image is not None, name
        assert image.shape[:2] == (h * UPSCALE, w * UPSCALE), name
        assert image.dtype == np.uint16, name  # --bit-depth 16 keeps 16-bit inputs' precision
        assert image.ndim == 3 and image.shape[2] == (4 if name in WITH_ALPHA else 3), name
    opaque = cv2.imread(str(out / "opaque.png"), cv2.IMREAD_UNCHANGED)[..., 3]
    assert (opaque == 65535).all()  # a resized opaque alpha is not truncated to 65534
    half = cv2.imread(str(out / "rgba.png"), cv2.IMREAD_UNCHANGED)[..., 3]
    assert (half[:, :24] == 0).all() and (half[:, 36:] == 65535).all()  # away from the edge


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_resized_alpha_keeps_zero_and_full_exactly(bit_depth: int, tmp_path: Path) -> None:
    from model.io.images import write_image
    from model.pipelines.inputs import resize_alpha

    alpha = np.zeros((30, 30), np.float32)
    alpha[:, 15:] = 1
    resized = resize_alpha(alpha, (75, 75))
    assert resized.min() >= 0 and resized.max() <= 1  # no bicubic overshoot
    write_image(tmp_path / "a.png", np.zeros((75, 75, 3)), resized, bit_depth, quantize="truncate")
    stored = cv2.imread(str(tmp_path / "a.png"), cv2.IMREAD_UNCHANGED)[..., 3]
    peak = 255 if bit_depth == 8 else 65535
    assert (stored[:, :30] == 0).all() and (stored[:, 45:] == peak).all()


@pytest.mark.slow
def test_a_12_megapixel_image_restores_in_bounded_memory_with_tiles(
    tiny_weights: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    (tmp_path / "in").mkdir()
    big = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "in" / "big.png"), big)
    code = (
        "import resource, sys, inference; rc = inference.main(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024); sys.exit(rc)"
    )
    argv = [
        "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--stage1-only",
        "--weights-dir", str(tiny_weights), "--model-config", str(tiny_weights / "tiny_config.yaml"),
        "--device", "cpu", "--precision", "fp32", "--offline", "--upscale", "1",
        "--stage1-tile-size", "512", "--no-progress",
    ]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    peak_mb = int(done.stdout.split()[-1])
    assert cv2.imread(str(tmp_path / "out" / "big.png")).shape == (3000, 4000, 3)
    # the image itself is 144 MB as float32; tiles keep the network's share small
    assert peak_mb < 3000, peak_mb
