"""The original's LQ resize (PIL bicubic on 8 bits) and 8-bit truncation, and their switches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.io.images import quantise, read_image, write_image
from model.ops.sizing import resize, resize_pil
from model.pipelines.diffbir import DiffBIRPipeline


def test_pil_resize_is_pils_bicubic_on_the_8_bit_image() -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    x = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
    want = np.asarray(Image.fromarray(array).resize((50, 30), Image.Resampling.BICUBIC))
    got = resize_pil(x, (30, 50))[0].permute(1, 2, 0).numpy() * 255
    assert np.array_equal(np.round(got).astype(np.uint8), want)
    # it differs from torch's float bicubic, but only by about 8-bit rounding
    diff = (resize(x, (30, 50)).clamp(0, 1) - resize_pil(x, (30, 50))).abs()
    assert 0 < float(diff.max()) < 0.1


def test_resize_backend_reaches_stage_1(tiny_weights: Path) -> None:
    pipe = DiffBIRPipeline.from_pretrained(
        "v2.1", "sr", weights_dir=tiny_weights, offline=True, device="cpu", stage1_only=True,
        model_config=tiny_weights / "tiny_config.yaml",
    )  # fmt: skip
    seen = []
    pipe.stage1.network.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    lq = torch.rand(1, 3, 16, 16)
    for backend in ("pil", "torch"):
        pipe(lq, upscale=4, min_short_side=8, resize_backend=backend)
    pil_in, torch_in = seen[0][..., :64, :64], seen[1][..., :64, :64]
    # the PIL path feeds stage 1 8-bit values, the torch path does not
    assert torch.equal(pil_in, (pil_in * 255).round() / 255)
    assert not torch.equal(torch_in, (torch_in * 255).round() / 255)


def test_quantize_truncates_or_rounds(tmp_path: Path) -> None:
    rgb = np.full((4, 4, 3), 100.7 / 255, dtype=np.float32)
    assert (quantise(rgb, 8, "truncate") == 100).all() and (quantise(rgb, 8, "round") == 101).all()
    write_image(tmp_path / "t.png", rgb, quantize="truncate")
    write_image(tmp_path / "r.png", rgb, quantize="round")
    assert np.allclose(read_image(tmp_path / "t.png") * 255, 100)
    assert np.allclose(read_image(tmp_path / "r.png") * 255, 101)
