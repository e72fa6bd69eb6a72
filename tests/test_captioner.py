"""Captioners (model/pipelines/captioner.py) on tiny random BLIP / LLaVA models built from
configs (scripts/tiny_captioners.py), and the rule that keeps captions off tiled diffusion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.io.folder_jobs import Job
from model.pipelines.captioner import (
    LLAVA_PROMPT,
    CaptionerError,
    caption_jobs,
    load_captioner,
    pad_to_square,
)
from model.pipelines.diffbir import DiffBIRPipeline
from scripts.tiny_captioners import write_tiny_captioners


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("captioners")
    write_tiny_captioners(out)
    return out


def _photo(h: int = 40, w: int = 60, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", ["blip", "llava"])
def test_tiny_captioners_give_one_caption_per_image(captioner_dir: Path, name: str) -> None:
    captioner = load_captioner(name, weights_dir=captioner_dir, offline=True, max_new_tokens=6)
    captions = captioner([_photo(seed=0), _photo(24, 24, seed=1)])
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions)
    # decoder-only LLaVA returns prompt + answer: only the answer is the caption
    assert all("ASSISTANT" not in c and "short description" not in c for c in captions)
    assert all(len(c.split()) <= 6 for c in captions)


def test_llava_pads_to_a_square_of_the_mean_colour() -> None:
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    square = np.asarray(pad_to_square(image, (10, 20, 30)))
    assert square.shape == (60, 60, 3)
    assert (square[20:40] == (255, 0, 0)).all()  # the image, centred vertically
    assert (square[:20] == (10, 20, 30)).all() and (square[40:] == (10, 20, 30)).all()
    assert "<image>" in LLAVA_PROMPT and LLAVA_PROMPT.endswith("ASSISTANT:")


def test_missing_model_offline_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--captioner llava.*offline"):
        load_captioner("llava", weights_dir=tmp_path, offline=True)
    with pytest.raises(CaptionerError, match="unknown captioner"):
        load_captioner("gpt", weights_dir=tmp_path)


class _Counting:
    name = "blip"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images):
        self.calls += len(images)
        return [f"caption {self.calls}" for _ in images]


def test_caption_jobs_keeps_list_captions_and_reuses_sidecars(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        _photo().save(tmp_path / f"{name}.png")
    jobs = [Job(tmp_path / f"{n}.png", tmp_path / "out" / f"{n}.png", None) for n in "abc"]
    jobs[0].caption = "from the file list"
    jobs[1].sidecar.parent.mkdir(parents=True)
    jobs[1].sidecar.write_text(json.dumps({"captioner": "blip", "caption": "cached"}))
    jobs[2].sidecar.write_text(json.dumps({"captioner": "llava", "caption": "other model"}))
    captioner = _Counting()
    done = caption_jobs(jobs, captioner, progress=False)
    assert [j.caption for j in done] == ["from the file list", "cached", "caption 1"]
    assert captioner.calls == 1


def test_captions_are_kept_off_tiled_diffusion_unless_asked(tiny_pipe) -> None:
    pipe = DiffBIRPipeline(tiny_pipe.stage1, tiny_pipe.cldm, tiny_pipe.diffusion, "cpu")
    lq = torch.rand(1, 3, 128, 160, generator=torch.Generator().manual_seed(0))
    tiled = dict(upscale=1, min_short_side=128, steps=1, cfg_scale=1.0, seed=3,
                 diffusion_tile_size=128, diffusion_tile_stride=64)  # fmt: skip

    def run(**kwargs) -> torch.Tensor:
        return pipe(lq, **{**tiled, **kwargs}).images

    plain = run()
    assert torch.equal(run(captions=["a red boat"]), plain)
    assert not torch.allclose(run(captions=["a red boat"], tile_captions=True), plain)
