"""The face_background flow (model/pipelines/face_background.py) and shared loading (model/pipelines/loading.py).

Tiny random weights (scripts/make_tiny_weights.py), CPU, fp32. A stub detector reports a face
at known landmarks; face crops are 64×64 (FaceHelper(face_size=64)) so that one face is one
8×8 latent.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from model.io.cldm_files import load_cldm
from model.io.weights import REGISTRY
from model.pipelines.diffbir import DiffBIRPipeline, PipelineOptions
from model.pipelines.face_background import FaceBackgroundPipeline
from model.pipelines.faces import FFHQ_TEMPLATE_512, FaceHelper
from model.pipelines.loading import load_pipelines
from model.pipelines.presets import (
    FACE_BACKGROUND,
    FLOW_TASKS,
    TASK_CHOICES,
    TASKS,
    flow_specs,
    read_model_config,
)

# lq 40×48, ×2 -> 80×96 output; a face centred at (x 48, y 40) covering about 60 px.
LQ_SIZE, OUT_SIZE = (40, 48), (80, 96)
FACE = (FFHQ_TEMPLATE_512 - 256) * 0.12 + np.array([48.0, 40.0])
OPTIONS = PipelineOptions(upscale=2, min_short_side=32, steps=2)


class StubDetector:
    """Reports fixed landmarks (given in output pixels), scaled to the image it is given."""

    def __init__(self, faces: list[np.ndarray]) -> None:
        self.faces, self.seen = faces, []

    def detect_faces(self, image: np.ndarray, conf_threshold: float = 0.8) -> np.ndarray:
        self.seen.append(image.shape)
        scale = np.array([image.shape[1] / OUT_SIZE[1], image.shape[0] / OUT_SIZE[0]])
        rows = [[*(lm * scale).min(0), *(lm * scale).max(0), 0.99, *(lm * scale).ravel()]
                for lm in self.faces]  # fmt: skip
        return np.asarray(rows, np.float32).reshape(-1, 15)


def _pipelines(weights: Path, version: str, stage1_only: bool = False) -> dict:
    specs = flow_specs(version, FACE_BACKGROUND, read_model_config(weights / "tiny_config.yaml"))
    roles = ("stage1",) if stage1_only else ("stage1", "sd", "controlnet")
    paths = {
        part: {role: weights / REGISTRY[spec.weights[role]].filename for role in roles}
        for part, spec in specs.items()
    }
    return load_pipelines(specs, paths, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def pipes(tiny_weights: Path) -> dict[str, DiffBIRPipeline]:
    return _pipelines(tiny_weights, "v2.1")


def _lq(seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, *LQ_SIZE, generator=torch.Generator().manual_seed(seed))


def _flow(pipes: dict, faces: list[np.ndarray], **kwargs) -> FaceBackgroundPipeline:
    helper = FaceHelper(StubDetector(faces), face_size=64)
    return FaceBackgroundPipeline(pipes["background"], pipes["face"], helper, **kwargs)


def test_tasks() -> None:
    assert (*TASKS, FACE_BACKGROUND) == TASK_CHOICES
    assert FLOW_TASKS[FACE_BACKGROUND] == {"background": "sr", "face": "face"}
    specs = flow_specs("v1", FACE_BACKGROUND)
    assert specs["background"].weights == {"stage1": "swinir_general", "sd": "sd21_base",
                                           "controlnet": "v1_general"}  # fmt: skip
    assert specs["face"].weights == {"stage1": "swinir_face", "sd": "sd21_base",
                                     "controlnet": "v1_face"}  # fmt: skip
    specs = flow_specs("v2", FACE_BACKGROUND)
    assert (specs["background"].stage1_model, specs["face"].stage1_model) == ("bsrnet", "swinir")
    assert specs["face"].weights["controlnet"] == specs["background"].weights["controlnet"] == "v2"
    with pytest.raises(ValueError, match="unknown flow task"):
        flow_specs("v2.1", "sr")


def test_a_face_is_restored_by_the_face_model_and_pasted(pipes: dict) -> None:
    flow = _flow(pipes, [FACE])
    lq = _lq(1)
    result = flow.restore(lq, OPTIONS, seeds=[5])
    # faces are searched on the LQ resized to the output size (then raised to 640 to detect)
    assert flow.helper.detector.seen == [(640, 768, 3)]
    assert result.images.shape == result.backgrounds.shape == result.stage1.shape
    assert result.images.shape == (1, 3, *OUT_SIZE) and result.seeds == [5]
    assert len(result.aligned[0]) == 1 and result.faces[0].shape == (1, 3, 64, 64)
    # the background is the general model's restoration, unchanged
    background = pipes["background"].restore(lq, OPTIONS, seeds=[5])
    torch.testing.assert_close(result.backgrounds, background.images, atol=0, rtol=0)
    torch.testing.assert_close(result.stage1, background.stage1, atol=0, rtol=0)
    # the face is the face model's restoration of the aligned crop, with the image's seed
    crop = result.aligned[0].faces
    face_options = dataclasses.replace(OPTIONS, upscale=1)
    expected = pipes["face"].restore(crop, face_options, seeds=[5]).images
    torch.testing.assert_close(result.faces[0], expected, atol=0, rtol=0)
    # ... which differs from the general model's restoration of the same crop
    assert not torch.allclose(pipes["background"].restore(crop, face_options, seeds=[5]).images,
                              expected, atol=1e-3)  # fmt: skip
    # outside the blend mask the output is the background bit for bit; inside it changed
    mask = flow.helper.blend_masks(result.aligned[0], result.faces[0], OUT_SIZE)[0]
    assert 0.1 < (mask > 0).float().mean() < 0.9
    outside, inside = mask == 0, mask > 0.99
    assert torch.equal(result.images[0][:, outside], result.backgrounds[0][:, outside])
    changed = (result.images - result.backgrounds).abs()[0].amax(0)
    assert changed[inside].mean() > 0.02


def test_no_face_gives_the_background_restoration(pipes: dict) -> None:
    lq = _lq(2)
    result = _flow(pipes, []).restore(lq, OPTIONS)
    assert result.faces[0].shape == (0, 3, 64, 64) and len(result.aligned[0]) == 0
    torch.testing.assert_close(
        result.images, pipes["background"].restore(lq, OPTIONS).images, atol=0, rtol=0
    )


def test_batches_seeds_and_captions_reach_both_models(
    pipes: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"background": [], "face": []}
    for part, pipe in pipes.items():
        restore = pipe.restore

        def spy(lq, options, seeds=None, captions=None, part=part, restore=restore):
            calls[part].append((lq.shape[0], options.upscale, list(seeds), captions))
            return restore(lq, options, seeds, captions)

        monkeypatch.setattr(pipe, "restore", spy)
    second = FACE + np.array([20.0, 4.0])
    flow = _flow(pipes, [FACE, second, FACE - 12], face_batch_size=2)
    result = flow.restore(_lq(3, batch=2), OPTIONS, seeds=[7, 8], captions=["a cat", ""])
    assert [len(found) for found in result.aligned] == [3, 3]
    assert calls["background"] == [(2, 2.0, [7, 8], ["a cat", ""])]
    assert calls["face"] == [(2, 1.0, [7, 7], ["a cat"] * 2), (1, 1.0, [7], ["a cat"]),
                             (2, 1.0, [8, 8], [""] * 2), (1, 1.0, [8], [""])]  # fmt: skip
    with pytest.raises(ValueError, match="need 2 seeds"):
        flow.restore(_lq(3, batch=2), OPTIONS, seeds=[1])


def test_stage1_only_flow(pipes: dict, tiny_weights: Path) -> None:
    stage1 = _pipelines(tiny_weights, "v2.1", stage1_only=True)
    flow = _flow(stage1, [FACE])
    lq = _lq(4)
    result = flow.restore(lq, OPTIONS)
    assert not flow.has_diffusion and result.images.shape == (1, 3, *OUT_SIZE)
    face_options = dataclasses.replace(OPTIONS, upscale=1)
    expected = stage1["face"].restore_stage1(result.aligned[0].faces, face_options)
    torch.testing.assert_close(result.faces[0], expected, atol=0, rtol=0)
    torch.testing.assert_close(
        result.backgrounds, stage1["background"].restore_stage1(lq, OPTIONS), atol=0, rtol=0
    )
    with pytest.raises(ValueError, match="both have a diffusion stage"):
        FaceBackgroundPipeline(pipes["background"], stage1["face"], flow.helper)


def test_pipelines_share_what_their_files_share(pipes: dict, tiny_weights: Path) -> None:
    # v2.1: one ControlNet for both tasks -> one ControlLDM; separate stage-1 models
    assert pipes["background"].cldm is pipes["face"].cldm
    assert pipes["background"].stage1 is not pipes["face"].stage1
    # v1: another ControlNet for faces; the UNet, VAE and text encoder are shared
    v1 = _pipelines(tiny_weights, "v1")
    general, face = v1["background"].cldm, v1["face"].cldm
    assert face is not general and face.controlnet is not general.controlnet
    assert face.unet is general.unet and face.vae is general.vae
    assert face.text_encoder is general.text_encoder
    reference = load_cldm(
        read_model_config(tiny_weights / "tiny_config.yaml")["cldm"],
        tiny_weights / REGISTRY["sd21_base"].filename,
        tiny_weights / REGISTRY["v1_face"].filename,
    )
    expected = reference.controlnet.state_dict()
    loaded = face.controlnet.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    assert not torch.equal(
        general.controlnet.state_dict()[next(iter(expected))], expected[next(iter(expected))]
    )
