"""Face detection glue, FFHQ alignment and paste-back (model/pipelines/faces.py).

Random-weight detectors find nothing meaningful, so the geometry is tested with a stub
detector that reports known landmarks; the facexlib networks are only built to test loading.
"""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.io.checkpoint import WeightFileError
from model.io.weights import MissingWeightsError
from model.pipelines.faces import (
    FFHQ_TEMPLATE_512,
    FaceHelper,
    find_face_weights,
    load_face_helper,
)

H, W = 320, 400


def similarity(scale: float, angle_deg: float, center: tuple[float, float]) -> np.ndarray:
    """Landmarks of a template face scaled, rotated and centred at `center` (x, y)."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return (FFHQ_TEMPLATE_512 - 256) @ rot.T * scale + np.asarray(center)


class StubDetector:
    """Reports fixed landmarks, scaled to whatever image size it is given."""

    def __init__(self, landmarks: list[np.ndarray], size: tuple[int, int] = (H, W)) -> None:
        self.landmarks, self.size, self.seen = landmarks, size, []

    def detect_faces(self, image: np.ndarray, conf_threshold: float = 0.8) -> np.ndarray:
        self.seen.append(image)
        sx, sy = image.shape[1] / self.size[1], image.shape[0] / self.size[0]
        rows = []
        for lm in self.landmarks:
            pts = lm * [sx, sy]
            rows.append([*pts.min(0), *pts.max(0), 0.99, *pts.ravel()])
        return np.asarray(rows, np.float32).reshape(-1, 15)


def smooth_image(h: int = H, w: int = W) -> torch.Tensor:
    """A band-limited textured image in [0, 1], (1, 3, h, w)."""
    y, x = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    chans = [
        0.5 + 0.25 * torch.sin(x / 7.0) * torch.cos(y / 9.0) + 0.2 * torch.sin((x + y) / 23.0),
        0.5 + 0.3 * torch.cos(x / 11.0 - y / 13.0),
        0.5 + 0.3 * torch.sin(y / 8.0 + 1.0),
    ]
    return torch.stack(chans)[None].clamp(0, 1)


def blob_image(landmarks: np.ndarray, sigma: float = 2.0) -> torch.Tensor:
    """Gaussian dots at the landmarks in channel 0, (1, 3, H, W)."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    img = np.zeros((3, H, W), np.float32)
    for px, py in landmarks:
        img[0] += np.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * sigma**2))
    return torch.from_numpy(img)[None]


def centroid(channel: np.ndarray, at: np.ndarray, radius: int = 20) -> np.ndarray:
    x0, y0 = np.round(at).astype(int)
    win = channel[y0 - radius : y0 + radius + 1, x0 - radius : x0 + radius + 1].astype(np.float64)
    ys, xs = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return np.array([x0 + (win * xs).sum() / win.sum(), y0 + (win * ys).sum() / win.sum()])


FACE = similarity(0.4, 20.0, (200.0, 160.0))  # its crop lies inside the image


def test_alignment_maps_landmarks_to_ffhq_template() -> None:
    detector = StubDetector([FACE])
    helper = FaceHelper(detector)
    aligned = helper.detect_and_align(blob_image(FACE))

    # Detection ran on the image upscaled to a short side of 640, in BGR order.
    assert min(detector.seen[0].shape[:2]) == 640
    assert detector.seen[0][..., 2].max() > 200 and detector.seen[0][..., 0].max() == 0
    assert len(aligned) == 1 and aligned.faces.shape == (1, 3, 512, 512)
    assert aligned.image_size == (H, W)
    np.testing.assert_allclose(aligned.landmarks[0], FACE, atol=0.01)
    mapped = np.c_[FACE, np.ones(5)] @ aligned.affines[0].T
    np.testing.assert_allclose(mapped, FFHQ_TEMPLATE_512, atol=0.05)

    # The dots themselves land on the template points of the warped crop.
    face = aligned.faces[0, 0].numpy()
    for point in FFHQ_TEMPLATE_512:
        assert np.abs(centroid(face, point) - point).max() < 1.0


def test_alignment_scales_template_with_face_size() -> None:
    aligned = FaceHelper(StubDetector([FACE]), face_size=256).detect_and_align(blob_image(FACE))
    assert aligned.faces.shape == (1, 3, 256, 256)
    face = aligned.faces[0, 0].numpy()
    for point in FFHQ_TEMPLATE_512 / 2:
        assert np.abs(centroid(face, point, radius=10) - point).max() < 1.0


def test_crop_outside_image_is_filled_gray() -> None:
    edge_face = similarity(0.5, 0.0, (40.0, 40.0))  # the crop reaches past the top-left corner
    aligned = FaceHelper(StubDetector([edge_face])).detect_and_align(smooth_image())
    torch.testing.assert_close(
        aligned.faces[0, :, 0, 0], torch.tensor([135, 133, 132]) / 255, atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("scale", [1, 2])
def test_paste_back_of_unchanged_faces_reproduces_background(scale: int) -> None:
    image = smooth_image()
    helper = FaceHelper(StubDetector([FACE]))
    aligned = helper.detect_and_align(image)
    background = F.interpolate(image, scale_factor=scale, mode="bilinear") if scale > 1 else image

    out = helper.paste_back(background, aligned, aligned.faces)
    mask = helper.blend_masks(aligned, aligned.faces, background.shape[-2:])[0]
    assert out.shape == background.shape and out.dtype == background.dtype
    inside = mask > 0
    assert inside.sum() > 0.1 * inside.numel()
    err = (out - background).abs()[0].amax(0)
    # Two bilinear resamplings (align, paste) of a smooth image agree within 1e-3; pasting half
    # a pixel off (facexlib's offset for upscaled outputs) gives errors above 0.01 here.
    assert err[inside].max() < 0.002
    assert err[inside].mean() < 0.0005
    assert torch.equal(out[0][:, ~inside], background[0][:, ~inside])


def test_soft_mask_has_no_hard_seam() -> None:
    helper = FaceHelper(StubDetector([FACE]))
    aligned = helper.detect_and_align(smooth_image())
    mask = helper.blend_masks(aligned, aligned.faces, (H, W))[0]
    assert mask.shape == (H, W) and mask.dtype == torch.float32
    assert mask.min() >= 0 and mask.max() <= 1
    assert mask.max() > 0.999  # the face centre is fully the restored face
    # A ramp, not a step: along the row through the face centre the weight falls from 1 to 0
    # over more than 8 pixels on each side (the unblurred square drops within one pixel).
    cx, cy = FACE.mean(0).round().astype(int)
    assert mask[cy, cx] > 0.999
    ramp = (mask[cy] > 0.02) & (mask[cy] < 0.98)
    assert ramp[:cx].sum() > 8 and ramp[cx:].sum() > 8
    step = max((mask[1:] - mask[:-1]).abs().max(), (mask[:, 1:] - mask[:, :-1]).abs().max())
    assert step < 0.15


def test_multiple_faces_are_pasted_in_their_own_places() -> None:
    faces = [similarity(0.35, -10.0, (110.0, 120.0)), similarity(0.3, 15.0, (300.0, 200.0))]
    helper = FaceHelper(StubDetector(faces))
    image = smooth_image()
    aligned = helper.detect_and_align(image)
    assert len(aligned) == 2
    colours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    restored = colours[:, :, None, None].expand(2, 3, 512, 512)
    out = helper.paste_back(image, aligned, list(restored.unbind(0)))
    for lm, colour in zip(faces, colours, strict=True):
        cx, cy = lm.mean(0).round().astype(int)
        torch.testing.assert_close(out[0, :, cy, cx], colour, atol=1e-4, rtol=0)
    assert torch.equal(out[..., :5, :], image[..., :5, :])  # far from both faces


def test_zero_faces_returns_background_unchanged() -> None:
    helper = FaceHelper(StubDetector([]))
    image = smooth_image()
    aligned = helper.detect_and_align(image)
    assert len(aligned) == 0 and aligned.faces.shape == (0, 3, 512, 512)
    background = torch.rand(3, 2 * H, 2 * W)
    out = helper.paste_back(background, aligned, aligned.faces)
    assert torch.equal(out, background) and out is not background
    result = helper.restore(image, background, restore_face=lambda x: 1 - x)
    assert torch.equal(result.image, background) and result.restored_faces.shape[0] == 0


def test_small_and_profile_faces_are_skipped() -> None:
    tiny = similarity(0.03, 0.0, (300.0, 60.0))  # eyes about 3.8 px apart
    aligned = FaceHelper(StubDetector([FACE, tiny])).detect_and_align(smooth_image())
    assert len(aligned) == 1
    np.testing.assert_allclose(aligned.landmarks[0], FACE, atol=0.01)


def test_restore_calls_the_face_function_per_face() -> None:
    faces = [similarity(0.35, 0.0, (110.0, 120.0)), similarity(0.3, 0.0, (300.0, 200.0))]
    helper = FaceHelper(StubDetector(faces))
    image = smooth_image()
    calls = []

    def restore_face(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return x

    result = helper.restore(image, image, restore_face)
    assert calls == [(1, 3, 512, 512)] * 2
    torch.testing.assert_close(result.restored_faces, result.aligned.faces)
    assert (result.image - image).abs().max() < 0.05


def test_paste_back_rejects_wrong_number_of_faces() -> None:
    helper = FaceHelper(StubDetector([FACE]))
    aligned = helper.detect_and_align(smooth_image())
    with pytest.raises(ValueError, match="expected shape"):
        helper.paste_back(smooth_image(), aligned, torch.rand(2, 3, 512, 512))
    with pytest.raises(ValueError, match="background"):
        helper.paste_back(torch.rand(2, 3, H, W), aligned, aligned.faces)


class DiscParser(nn.Module):
    """Stub parser: class 1 (skin) inside a disc of the crop, background elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.shape[-2:] == (512, 512) and x.min() >= -1 and x.max() <= 1
        y, xx = torch.meshgrid(torch.arange(512.0), torch.arange(512.0), indexing="ij")
        disc = ((xx - 256) ** 2 + (y - 300) ** 2 < 150**2).float()
        logits = torch.zeros(x.shape[0], 19, 512, 512)
        logits[:, 1] = disc
        logits[:, 0] = 1 - disc
        return logits + self.dummy, x


def test_parsing_mask_restricts_the_blend_to_the_face_outline() -> None:
    image = smooth_image()
    plain = FaceHelper(StubDetector([FACE]))
    parsed = FaceHelper(StubDetector([FACE]), parser=DiscParser())
    aligned = parsed.detect_and_align(image)
    square = plain.blend_masks(aligned, aligned.faces, (H, W))[0]
    outline = parsed.blend_masks(aligned, aligned.faces, (H, W))[0]
    assert outline.min() >= 0 and outline.max() <= 1
    assert torch.all(outline <= square + 1e-6)
    # Crop corners are outside the disc: nothing pasted there although the square covers them.
    inv = cv2.invertAffineTransform(aligned.affines[0])
    for corner in [(60, 60), (452, 60)]:
        x, y = np.round(inv @ [*corner, 1]).astype(int)
        assert square[y, x] > 0.99 and outline[y, x] < 0.01
    cx, cy = FACE.mean(0).round().astype(int)
    assert outline[cy, cx] > 0.99
    step = (outline[1:] - outline[:-1]).abs().max()
    assert step < 0.15


def test_missing_weights_error_lists_files_places_and_urls(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as info:
        load_face_helper(tmp_path)
    msg = str(info.value)
    for part in [
        "2 weight file(s) missing",
        str(tmp_path),
        "detection_Resnet50_Final.pth",
        "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth",
        "parsing_parsenet.pth",
        "https://github.com/xinntao/facexlib/releases/download/v0.2.2/parsing_parsenet.pth",
    ]:
        assert part in msg
    with pytest.raises(MissingWeightsError) as info:
        find_face_weights([tmp_path, tmp_path / "b"], "retinaface_mobile0.25", use_parsing=False)
    msg = str(info.value)
    assert "1 weight file(s)" in msg and "mobilenet0.25" in msg and "parsenet" not in msg
    assert str(tmp_path / "b") in msg
    with pytest.raises(ValueError, match="unknown face detector"):
        find_face_weights(tmp_path, "yolov5")


@pytest.fixture()
def no_download(monkeypatch):
    """Any facexlib or torch.hub download fails the test."""
    import facexlib.detection
    import facexlib.parsing
    import facexlib.utils
    import facexlib.utils.misc

    def refuse(*args, **kwargs):
        raise AssertionError("attempted a download")

    for module in (facexlib.detection, facexlib.parsing, facexlib.utils, facexlib.utils.misc):
        monkeypatch.setattr(module, "load_file_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def _save_random(net: nn.Module, path, prefix: str = "") -> dict[str, torch.Tensor]:
    state = {
        k: torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()
    }
    torch.save({prefix + k: v for k, v in state.items()}, path)
    return state


def _check_local_loading(tmp_path, detection_model: str, filename: str) -> None:
    from facexlib.detection.retinaface import RetinaFace
    from facexlib.parsing.parsenet import ParseNet

    network = "resnet50" if detection_model.endswith("resnet50") else "mobile0.25"
    with warnings.catch_warnings():  # torchvision's notice about `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        detector = RetinaFace(network, device="cpu")
    # Released detection files carry the DataParallel "module." prefix.
    det_state = _save_random(detector, tmp_path / filename, "module.")
    parse_state = _save_random(ParseNet(512, 512, parsing_ch=19), tmp_path / "parsing_parsenet.pth")

    helper = load_face_helper(tmp_path, detection_model, conf_threshold=1.1)
    for net, state in [(helper.detector, det_state), (helper.parser, parse_state)]:
        loaded = net.state_dict()
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
        assert not net.training
    # The real networks run through the helper (threshold above 1: no face can pass).
    aligned = helper.detect_and_align(torch.rand(1, 3, 48, 64))
    assert len(aligned) == 0


def test_load_face_helper_from_local_files(tmp_path, no_download) -> None:
    _check_local_loading(tmp_path, "retinaface_mobile0.25", "detection_mobilenet0.25_Final.pth")


@pytest.mark.slow
def test_load_resnet50_detector_from_local_files(tmp_path, no_download) -> None:
    _check_local_loading(tmp_path, "retinaface_resnet50", "detection_Resnet50_Final.pth")


def test_wrong_weight_file_names_the_file(tmp_path, no_download) -> None:
    from facexlib.detection.retinaface import RetinaFace

    path = tmp_path / "detection_mobilenet0.25_Final.pth"
    state = _save_random(RetinaFace("mobile0.25", device="cpu"), path)
    state.pop("body.stage1.0.0.weight")
    torch.save(state, path)
    with pytest.raises(WeightFileError, match="detection_mobilenet0.25_Final.pth: not a") as info:
        load_face_helper(tmp_path, "retinaface_mobile0.25", use_parsing=False)
    assert "1 missing keys" in str(info.value)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightFileError, match="cannot read weights"):
        load_face_helper(tmp_path, "retinaface_mobile0.25", use_parsing=False)
