"""inference.py end to end on tiny random weights (scripts/make_tiny_weights.py), CPU, fp32.

Inputs are 16×24 (processed at 32×48 with --upscale 2 --min-short-side 32, one 8×8 latent),
so every run is a few seconds. The last test checks that every flag of the parser appears here.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import inference
from model.io import file_pages
from model.nets.cldm import ControlLDM
from model.pipelines import diffbir, loading
from model.pipelines.diffbir import DiffBIRPipeline
from model.pipelines.faces import FFHQ_TEMPLATE_512


@pytest.fixture(scope="module")
def weights(tiny_weights: Path) -> Path:
    return tiny_weights  # conftest: the session's tiny weights


def _write_inputs(folder: Path) -> None:
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    cv2.imwrite(str(folder / "rgb.png"), rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "gray.png"), rng.integers(0, 256, (16, 24), dtype=np.uint8))
    cv2.imwrite(str(folder / "sub" / "rgba.png"), rng.integers(0, 256, (16, 24, 4), dtype=np.uint8))
    cv2.imwrite(str(folder / "deep.png"), rng.integers(0, 65536, (16, 24, 3), dtype=np.uint16))
    cv2.imwrite(str(folder / "odd.jpg"), rng.integers(0, 256, (13, 19, 3), dtype=np.uint8))
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")


def _base(weights: Path, src: Path | str, out: Path) -> list[str]:
    return [
        "--input", str(src), "--output", str(out), "--weights-dir", str(weights),
        "--model-config", str(weights / "tiny_config.yaml"), "--device", "cpu",
        "--precision", "fp32", "--steps", "2", "--min-short-side", "32", "--offline",
        "--no-progress",
    ]  # fmt: skip


def _read(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def test_folder_run_skips_bad_files_and_resumes(weights: Path, tmp_path: Path, capsys) -> None:
    _write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    extra = ["--upscale", "2", "--batch-size", "2", "--seed", "5", "--steps", "1"]
    argv = _base(weights, tmp_path / "in", out) + extra
    assert inference.main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(r"error: \S*bad\.png: not a decodable image", err)
    assert "5 restored, 0 skipped" in err and "1 failed" in err
    expected = {"rgb.png": (32, 48, 3), "gray.png": (32, 48, 3), "sub/rgba.png": (32, 48, 4),
                "deep.png": (32, 48, 3), "odd.png": (26, 38, 3)}  # fmt: skip
    for name, shape in expected.items():
        image = _read(out / name)
        assert image.shape == shape and image.dtype == np.uint8, name
    assert not (out / "bad.png").exists()
    # the alpha channel is the input's, resized
    alpha_in = _read(tmp_path / "in" / "sub" / "rgba.png")[..., 3].astype(np.float32)
    assert abs(_read(out / "sub" / "rgba.png")[..., 3].mean() - alpha_in.mean()) < 4
    sidecar = json.loads((out / "deep.png.json").read_text())
    assert sidecar["seed"] == 5 and sidecar["options"]["seed"] == 5
    assert sidecar["options"]["steps"] == 1 and sidecar["options"]["upscale"] == 2.0
    assert (
        sidecar["options"]["sampler"] == "edm_dpm++_3m_sde"
        and sidecar["options"]["cfg_scale"] == 6.0
    )
    assert sidecar["input_bit_depth"] == 16 and sidecar["input_size"] == [16, 24]
    assert sidecar["output_size"] == [32, 48] and sidecar["version"] == "v2.1"
    assert sidecar["weights"]["controlnet"].endswith("DiffBIR_v2.1.pt")
    assert (
        sidecar["arguments"]["batch_size"] == 2 and sidecar["arguments"]["output_format"] == "png"
    )
    first = {name: (out / name).read_bytes() for name in expected}
    mtimes = {name: (out / name).stat().st_mtime_ns for name in expected}

    assert inference.main(argv) == 1  # the bad file still fails; the rest is skipped
    assert "0 restored, 5 skipped" in capsys.readouterr().err
    assert all((out / name).stat().st_mtime_ns == mtimes[name] for name in expected)

    assert inference.main(argv + ["--overwrite"]) == 1
    assert "5 restored, 0 skipped" in capsys.readouterr().err
    # same seed, same result: overwriting reproduces every file byte for byte
    assert all((out / name).read_bytes() == first[name] for name in expected)


def test_captioner_prompts_each_image_and_is_cached_in_the_sidecar(
    weights: Path, tmp_path: Path, monkeypatch
) -> None:
    from model.pipelines.captioner import TransformersCaptioner
    from scripts.tiny_captioners import write_tiny_blip

    blip = write_tiny_blip(tmp_path / "blip")
    _write_inputs(tmp_path / "in")
    src, out = tmp_path / "in" / "rgb.png", tmp_path / "out"
    argv = _base(weights, src, out) + [
        "--upscale", "2", "--steps", "1", "--captioner", "blip", "--captioner-model", str(blip),
        "--tile-captions", "--pos-prompt", "sharp",
    ]  # fmt: skip
    assert inference.main(argv) == 0
    sidecar = json.loads((out / "rgb.png.json").read_text())
    caption = sidecar["caption"]
    assert caption and sidecar["captioner"] == "blip" and sidecar["options"]["tile_captions"]
    first = (out / "rgb.png").read_bytes()

    def fail(*_):
        raise AssertionError("the sidecar's caption should be reused")

    monkeypatch.setattr(TransformersCaptioner, "__call__", fail)
    assert inference.main(argv + ["--overwrite"]) == 0
    assert json.loads((out / "rgb.png.json").read_text())["caption"] == caption
    assert (out / "rgb.png").read_bytes() == first


def test_max_memory_records_its_tiles_and_refuses_a_budget_below_the_weights(
    weights: Path, tmp_path: Path, capsys
) -> None:
    _write_inputs(tmp_path / "in")
    src, out = tmp_path / "in" / "rgb.png", tmp_path / "out"
    argv = _base(weights, src, out) + ["--upscale", "2", "--steps", "1"]
    assert inference.main(argv + ["--max-memory", "0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-memory 0.01 GB is below what is resident" in err[0]
    run = argv + ["--max-memory", "500", "--precision", "bf16", "--vae-precision", "fp32"]
    assert inference.main(run) == 0
    sidecar = json.loads((out / "rgb.png.json").read_text())
    assert sidecar["tiles"] == {"stage1": None, "vae_encoder": None, "vae_decoder": None,
                                "diffusion": None}  # fmt: skip
    assert sidecar["precision"] == "bf16" and sidecar["arguments"]["vae_precision"] == "fp32"


def test_keep_weights_resident_changes_memory_not_pixels(
    weights: Path, tmp_path: Path, monkeypatch
) -> None:
    _write_inputs(tmp_path / "in")
    src, released = tmp_path / "in" / "rgb.png", []
    release = file_pages.release_file_pages

    def after_a_stage(modules, weight_pages: bool = True) -> None:
        tensors = [t for m in modules for t in m.parameters()]
        released.append(release(tensors) if weight_pages else 0)

    monkeypatch.setattr(diffbir, "hand_back", after_a_stage)
    assert inference.main(_base(weights, src, tmp_path / "paged") + ["--upscale", "2"]) == 0
    assert len(released) >= 4 and sum(released) > 0  # stage 1, VAE x2, diffusion
    released.clear()
    kept = _base(weights, src, tmp_path / "kept") + ["--upscale", "2", "--keep-weights-resident"]
    assert inference.main(kept) == 0 and len(released) >= 4 and sum(released) == 0
    assert (tmp_path / "paged" / "rgb.png").read_bytes() == (
        tmp_path / "kept" / "rgb.png"
    ).read_bytes()


def test_stage1_only_needs_only_the_stage1_weights(weights: Path, tmp_path: Path, capsys) -> None:
    _write_inputs(tmp_path / "in")
    argv = [
        "--input", str(tmp_path / "in" / "sub" / "rgba.png"), "--output", str(tmp_path / "out"),
        "--stage1-only", "--save-stage1", "--task", "denoise", "--output-format", "webp",
        "--quality", "90", "--stage1-tile-size", "64", "--stage1-tile-stride", "32",
        "--weights-dir", str(tmp_path / "empty"), "--offline", "--device", "cpu",
        "--stage1-ckpt", str(weights / "realesrgan_s4_swinir_100k.pth"),
        "--model-config", str(weights / "tiny_config.yaml"), "--min-short-side", "64",
    ]  # fmt: skip
    assert inference.main(argv) == 0
    image = _read(tmp_path / "out" / "rgba.webp")
    assert image.shape == (16, 24, 4)  # denoise keeps the size; WebP keeps the alpha
    assert _read(tmp_path / "out" / "stage1" / "rgba.webp").shape == (16, 24, 4)
    sidecar = json.loads((tmp_path / "out" / "rgba.webp.json").read_text())
    assert sidecar["stage1_only"] is True and set(sidecar["weights"]) == {"stage1"}
    assert "1 restored" in capsys.readouterr().err


def test_missing_weights_offline_lists_every_file(tmp_path: Path, capsys) -> None:
    _write_inputs(tmp_path / "in")
    argv = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
            "--weights-dir", str(tmp_path / "empty"), "--offline", "--device", "cpu"]  # fmt: skip
    assert inference.main(argv) == 2
    err = capsys.readouterr().err
    for filename in (
        "sd2.1-base-zsnr-laionaes5.ckpt",
        "DiffBIR_v2.1.pt",
        "realesrgan_s4_swinir_100k.pth",
    ):
        assert filename in err
    assert "3 weight file(s) missing" in err
    assert inference.main(argv + ["--sd-ckpt", str(tmp_path / "nope.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "nope.ckpt: weight file not found" in err and "--sd-ckpt" in err


def test_custom_version_from_a_file_list(weights: Path, tmp_path: Path, capsys) -> None:
    _write_inputs(tmp_path / "in")
    listing = tmp_path / "in" / "files.txt"
    listing.write_text("rgb.png\nsub/rgba.png\n")
    out = tmp_path / "out"
    custom = _base(weights, listing, out) + [
        "--version", "custom", "--schedule", "v2", "--stage1-model", "swinir",
        "--sd-ckpt", str(weights / "v2-1_512-ema-pruned.ckpt"),
        "--controlnet-ckpt", str(weights / "v2.pth"),
        "--stage1-ckpt", str(weights / "general_swinir_v1.ckpt"),
        "--sampler", "ddim", "--eta", "0.5", "--ddim-spacing", "trailing", "--start", "cond",
        "--noise-aug", "100", "--resize-backend", "torch", "--quantize", "round",
        "--cfg-scale", "3", "--rescale-cfg", "--pos-prompt", "sharp", "--neg-prompt", "blurry",
        "--strength", "0.8", "--color-fix", "adain", "--output-format", "jpg", "--upscale", "2",
        "--batch-size", "2",
    ]  # fmt: skip
    # One batch of both images: at t = 999 the rescaled CFG scale is exactly 1, so only the
    # conditional branch runs, and the tiny UNet cannot normalise one 8×8 latent alone.
    assert inference.main(custom) == 0
    assert _read(out / "rgb.jpg").shape == (32, 48, 3)
    assert _read(out / "sub" / "rgba.jpg").shape == (32, 48, 3)  # JPEG drops the alpha
    options = json.loads((out / "rgb.jpg.json").read_text())["options"]
    assert (options["sampler"], options["ddim_eta"], options["start"]) == ("ddim", 0.5, "cond")
    assert (options["ddim_spacing"], options["resize_backend"]) == ("trailing", "torch")
    assert json.loads((out / "rgb.jpg.json").read_text())["arguments"]["quantize"] == "round"
    assert (options["pos_prompt"], options["neg_prompt"], options["control_strength"]) == (
        "sharp",
        "blurry",
        0.8,
    )
    assert (
        options["rescale_cfg"] and options["color_fix"] == "adain" and options["noise_aug"] == 100
    )
    capsys.readouterr()
    missing = [a for a in custom if a != "--controlnet-ckpt" and not a.endswith("v2.pth")]
    assert inference.main(missing + ["--overwrite"]) == 2
    assert "pass --controlnet-ckpt" in capsys.readouterr().err


def test_tiling_guidance_16bit_and_glob(weights: Path, tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(1)
    (tmp_path / "in").mkdir()
    cv2.imwrite(
        str(tmp_path / "in" / "face.png"), rng.integers(0, 256, (48, 60, 3), dtype=np.uint8)
    )
    argv = _base(weights, str(tmp_path / "in" / "*.png"), tmp_path / "out") + [
        "--version", "v1", "--task", "face", "--upscale", "2", "--bit-depth", "16",
        "--tiled", "--vae-encoder-tile-size", "64", "--vae-encoder-tile-stride", "32",
        "--vae-decoder-tile-size", "64", "--vae-decoder-tile-stride", "32",
        "--diffusion-tile-size", "64", "--diffusion-tile-stride", "32", "--diffusion-tile-batch", "2",
        "--tile-weights", "original",
        "--guidance", "--g-loss", "mse", "--g-scale", "0.01", "--g-start", "1001", "--g-stop", "-1",
        "--g-space", "rgb", "--g-repeat", "1", "--sampler", "euler", "--sigma-schedule", "exponential", "--verbose",
        "--steps", "1",
    ]  # fmt: skip
    assert inference.main(argv) == 0
    image = _read(tmp_path / "out" / "face.png")
    assert image.shape == (96, 120, 3) and image.dtype == np.uint16
    sidecar = json.loads((tmp_path / "out" / "face.png.json").read_text())
    options = sidecar["options"]
    assert options["stage1_tile_size"] == 512 and options["diffusion_tile_size"] == 64
    assert options["tile_weights"] == "original"
    assert options["guidance"] == {"scale": 0.01, "t_start": 1001, "t_stop": -1, "space": "rgb",
                                   "loss": "mse", "repeat": 1}  # fmt: skip
    assert (
        sidecar["weights"]["controlnet"].endswith("v1_face.pth")
        and options["sigma_schedule"] == "exponential"
    )


def test_separate_cfg_branches_with_v2_faces(weights: Path, tmp_path: Path) -> None:
    # 40×40 ×2 -> a 16×16 latent: single-image network calls are fine for the tiny UNet
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "a.png"), np.full((40, 40, 3), 128, dtype=np.uint8))
    argv = _base(weights, tmp_path / "in", tmp_path / "out")
    argv += ["--version", "v2", "--task", "face", "--upscale", "2", "--cfg-separate"]
    assert inference.main(argv) == 0
    assert _read(tmp_path / "out" / "a.png").shape == (80, 80, 3)
    assert (
        json.loads((tmp_path / "out" / "a.png.json").read_text())["options"]["cfg_batched"] is False
    )


class StubDetector:
    """Reports one face at fixed landmarks given in output pixels of an `out_size` image."""

    def __init__(self, landmarks: np.ndarray, out_size: tuple[int, int]) -> None:
        self.landmarks, self.out_size = landmarks, out_size

    def detect_faces(self, image: np.ndarray, conf_threshold: float = 0.8) -> np.ndarray:
        points = self.landmarks * (image.shape[0] / self.out_size[0])
        return np.array([[*points.min(0), *points.max(0), 0.99, *points.ravel()]], np.float32)


@pytest.fixture(scope="module")
def face_weights(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny weights plus random RetinaFace-MobileNet0.25 and ParseNet files."""
    from facexlib.detection.retinaface import RetinaFace
    from facexlib.parsing.parsenet import ParseNet

    out = tmp_path_factory.mktemp("face_weights")
    for path in weights.iterdir():
        (out / path.name).symlink_to(path)
    generator = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():  # torchvision's notice about `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        nets = {"detection_mobilenet0.25_Final.pth": RetinaFace("mobile0.25", device="cpu"),
                "parsing_parsenet.pth": ParseNet(512, 512, parsing_ch=19)}  # fmt: skip
    for name, net in nets.items():
        state = {k: 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point()
                 else v for k, v in net.state_dict().items()}  # fmt: skip
        torch.save(state, out / name)
    return out


def test_face_background(face_weights: Path, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(2)
    cv2.imwrite(str(tmp_path / "in" / "a.png"), rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))

    def run(out: str, *extra: str) -> int:
        argv = _base(face_weights, tmp_path / "in", tmp_path / out) + ["--steps", "1", *extra]
        return inference.main(argv)

    assert run("sr", "--upscale", "2") == 0
    background = _read(tmp_path / "sr" / "a.png")
    faces = ["--task", "face_background", "--face-detector", "retinaface_mobile0.25"]
    # random detector weights find no face: the output is the sr restoration (default x2)
    assert run("none", *faces) == 0
    assert _read(tmp_path / "none" / "a.png").shape == (48, 64, 3)
    assert np.array_equal(_read(tmp_path / "none" / "a.png"), background)
    sidecar = json.loads((tmp_path / "none" / "a.png.json").read_text())
    assert sidecar["task"] == "face_background" and sidecar["faces"] == []
    assert sidecar["weights"]["face_detector"].endswith("detection_mobilenet0.25_Final.pth")
    assert sidecar["weights"]["face_parser"].endswith("parsing_parsenet.pth")
    assert sidecar["weights"]["face_stage1"].endswith("face_swinir_v1.ckpt")
    assert sidecar["weights"]["face_controlnet"].endswith("DiffBIR_v2.1.pt")
    # a stub detector reports one face: it is restored (512x512), saved and pasted back
    face = (FFHQ_TEMPLATE_512 - 256) * 0.08 + np.array([32.0, 24.0])
    monkeypatch.setattr(loading, "load_face_detector", lambda *a: StubDetector(face, (48, 64)))
    assert run("face", *faces, "--no-face-parsing", "--save-faces") == 0
    restored = _read(tmp_path / "face" / "a.png")
    assert restored.shape == (48, 64, 3)
    assert _read(tmp_path / "face" / "faces" / "a_face0.png").shape == (512, 512, 3)
    sidecar = json.loads((tmp_path / "face" / "a.png.json").read_text())
    assert len(sidecar["faces"]) == 1 and "face_parser" not in sidecar["weights"]
    x1, y1, x2, y2 = np.round(sidecar["faces"][0][:4]).astype(int)
    assert np.abs(restored.astype(int) - background)[y1:y2, x1:x2].mean() > 1
    assert np.array_equal(restored[:, :8], background[:, :8])  # far from the face


def test_face_background_setup_errors(weights: Path, tmp_path: Path, capsys) -> None:
    _write_inputs(tmp_path / "in")
    base = _base(weights, tmp_path / "in" / "rgb.png", tmp_path / "out")
    # the tiny weights have no face detector / parser: offline, one error lists both
    assert inference.main(base + ["--task", "face_background"]) == 2
    err = capsys.readouterr().err
    assert "2 weight file(s) missing" in err and str(weights) in err
    for part in ("detection_Resnet50_Final.pth", "parsing_parsenet.pth",
                 "https://github.com/xinntao/facexlib/releases/download/v0.1.0/"):  # fmt: skip
        assert part in err
    argv = base + ["--task", "face_background", "--no-face-parsing"]
    assert inference.main(argv + ["--face-detector", "retinaface_mobile0.25"]) == 2
    err = capsys.readouterr().err
    assert "1 weight file(s) missing" in err and "detection_mobilenet0.25_Final.pth" in err
    assert inference.main(argv + ["--version", "custom", "--schedule", "v2"]) == 2
    assert "needs a released --version" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        inference.main(base + ["--save-faces"])
    assert exit_info.value.code == 2


def test_file_list_captions_reach_the_pipeline(weights: Path, tmp_path: Path, monkeypatch) -> None:
    _write_inputs(tmp_path / "in")
    listing = tmp_path / "in" / "files.txt"
    listing.write_text("rgb.png\ta red bird\ngray.png\n# skipped\nodd.jpg\tsnow\n")
    seen = []
    restore = DiffBIRPipeline.restore

    def spy(self, lq, options=None, seeds=None, captions=None):
        seen.append(captions)
        return restore(self, lq, options, seeds, captions)

    monkeypatch.setattr(DiffBIRPipeline, "restore", spy)
    out = tmp_path / "out"
    argv = _base(weights, listing, out) + ["--steps", "1", "--batch-size", "2", "--upscale", "1"]
    assert inference.main(argv) == 0
    # rgb and gray (16x24) form one batch, odd.jpg (13x19) another
    assert seen == [["a red bird", ""], ["snow"]]
    assert json.loads((out / "rgb.png.json").read_text())["caption"] == "a red bird"
    assert json.loads((out / "gray.png.json").read_text())["caption"] == ""


def test_out_of_memory_suggests_tiling(weights: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    _write_inputs(tmp_path / "in")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(DiffBIRPipeline, "restore", out_of_memory)
    assert inference.main(_base(weights, tmp_path / "in" / "rgb.png", tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "rgb.png: out of memory; use --tiled" in err and "1 failed" in err


def test_setup_errors(weights: Path, tmp_path: Path, capsys) -> None:
    _write_inputs(tmp_path / "in")
    base = _base(weights, tmp_path / "in", tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        inference.main(base + ["--bit-depth", "16", "--output-format", "jpg"])
    assert exit_info.value.code == 2
    assert inference.main(base + ["--schedule", "v2"]) == 2
    assert "for --version custom" in capsys.readouterr().err
    assert inference.main(_base(weights, tmp_path / "nothing*.png", tmp_path / "out")) == 2
    assert inference.main(_base(weights, tmp_path / "missing", tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "nothing*.png: no images found" in err and "missing: no such file" in err
    assert inference.main(_base(weights, tmp_path / "in" / "rgb.png", tmp_path / "in")) == 2
    assert "would overwrite the input" in capsys.readouterr().err


def test_control_flags_reach_the_pipeline(
    weights: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    _write_inputs(tmp_path / "in")
    calls: list[tuple[bool, list[float]]] = []  # (LAControlNet ran, control scales) per step
    unet_forward = ControlLDM.unet_forward

    def spy(self, x, t, c_txt, control=None):
        calls.append((control is not None, list(self.control_scales)))
        return unet_forward(self, x, t, c_txt, control)

    monkeypatch.setattr(ControlLDM, "unet_forward", spy)
    scales = [round(0.1 * (i + 1), 1) for i in range(13)]
    argv = _base(weights, tmp_path / "in" / "rgb.png", tmp_path / "out") + [
        "--upscale", "2", "--steps", "4", "--sampler", "ddim", "--control-strength", "0.5",
        "--control-scales", ",".join(map(str, scales)), "--control-start", "0.25",
        "--control-end", "0.75",
    ]  # fmt: skip
    assert inference.main(argv) == 0
    options = json.loads((tmp_path / "out" / "rgb.png.json").read_text())["options"]
    assert (options["control_strength"], options["control_scales"]) == (0.5, scales)
    assert (options["control_start"], options["control_end"]) == (0.25, 0.75)
    # batched CFG, one network call per step: steps 1 and 2 of 4 are steered, each residual
    # by its scale times the strength
    assert [steered for steered, _ in calls] == [False, True, True, False]
    assert all(s == pytest.approx([0.5 * x for x in scales]) for steered, s in calls if steered)
    capsys.readouterr()
    assert inference.main(argv[:-4] + ["--control-start", "0.75", "--control-end", "0.25"]) == 2
    assert "control_start < control_end" in capsys.readouterr().err


def test_every_flag_is_exercised() -> None:
    source = Path(__file__).read_text()
    flags = [
        flag
        for action in inference.build_parser()._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag != "--help"
    ]
    assert len(flags) > 50
    unused = [flag for flag in flags if f'"{flag}"' not in source]
    assert not unused, f"flags never used in the CLI tests: {unused}"


def test_diffir_method_flags_fail_early(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--method diffir serves --task sr only and names a missing --diffir-ckpt (folders are
    restored in tests/test_diffir_pipeline.py)."""
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    base = ["--input", str(image), "--output", str(tmp_path / "out"), "--method", "diffir"]
    with pytest.raises(SystemExit) as exc:
        inference.main([*base, "--task", "face"])
    assert exc.value.code == 2 and "--method diffir" in capsys.readouterr().err
    missing = tmp_path / "missing.pth"
    assert inference.main([*base, "--diffir-ckpt", str(missing), "--diffir-scale", "2"]) == 2
    assert "missing.pth: file not found" in capsys.readouterr().err
