"""Faces in unaligned images: detect, align to the FFHQ template, paste restored faces back.

The original DiffBIR (v2, v2.1 `unaligned` face task) restores every detected face at 512×512
with the face model and the whole image with the general model, then blends each restored face
into the restored background through a soft mask. This module holds the geometry and the
masks; the restoration itself is whatever function the caller passes in.

Detection and parsing networks come from facexlib (RetinaFace, ParseNet). Their weights are
loaded from local files here: facexlib's own initialisers download into site-packages, so
they are not used.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.io.checkpoint import load_state_strict, load_weight_file
from model.io.weights import DEFAULT_WEIGHTS_DIR, resolve_weights

log = logging.getLogger(__name__)

# Five landmarks (left eye, right eye, nose tip, left and right mouth corner) of an FFHQ face
# at 512×512, as used by facexlib and DiffBIR.
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ]
)
# Fill outside the source image when a face crop reaches past its border (DiffBIR's gray).
BORDER_VALUE = (135 / 255, 133 / 255, 132 / 255)
# ParseNet (CelebAMask-HQ classes) → blend weight: background, hat, neck, neck-lace and cloth
# are left to the background restoration; skin, brows, eyes, nose, mouth, ears, hair are pasted.
_PARSE_KEEP = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0], np.float32)
_PARSE_SIZE = 512

DETECTION_MODELS = {"retinaface_resnet50": "resnet50", "retinaface_mobile0.25": "mobile0.25"}


class FaceDetector(Protocol):
    """What FaceHelper needs from a detector (facexlib's RetinaFace has it)."""

    def detect_faces(self, image: np.ndarray, conf_threshold: float = 0.8) -> np.ndarray:
        """(H, W, 3) BGR image in [0, 255] → (N, 15): box x1 y1 x2 y2, score, 5 (x, y)."""


@dataclass
class AlignedFaces:
    """Faces cut from one image, with what is needed to put them back.

    Args:
        faces: (N, 3, S, S) aligned crops in [0, 1], float32, on the image's device.
        affines: (N, 2, 3) float64; maps image pixel coordinates to face pixel coordinates.
        landmarks: (N, 5, 2) detected landmarks in image pixel coordinates.
        boxes: (N, 5) detected boxes x1, y1, x2, y2 and score, in image pixel coordinates.
        image_size: (H, W) of the image the faces were cut from.
    """

    faces: Tensor
    affines: np.ndarray
    landmarks: np.ndarray
    boxes: np.ndarray
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return self.faces.shape[0]


@dataclass
class FaceRestoration:
    """Result of `FaceHelper.restore`: the blended image and its parts."""

    image: Tensor
    aligned: AlignedFaces
    restored_faces: Tensor


def _as_chw(img: Tensor, name: str) -> Tensor:
    if img.dim() == 4 and img.shape[0] == 1:
        img = img[0]
    if img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(
            f"{name}: expected an RGB image (3, H, W) or (1, 3, H, W), got {tuple(img.shape)}"
        )
    return img


def _to_hwc(img: Tensor) -> np.ndarray:
    return np.ascontiguousarray(img.detach().float().permute(1, 2, 0).cpu().numpy())


def _inverse_affine(
    affine: np.ndarray, image_size: Sequence[int], size: Sequence[int]
) -> tuple[np.ndarray, float]:
    """Face pixel → target pixel map, for a target that is `image_size` resized to `size`."""
    inv = cv2.invertAffineTransform(affine)
    sy, sx = size[0] / image_size[0], size[1] / image_size[1]
    inv[0] *= sx
    inv[1] *= sy
    # Pixel centres: x_target = s·x + (s - 1)/2 for a resize by s (cv2/torch half-pixel rule).
    inv[0, 2] += 0.5 * (sx - 1)
    inv[1, 2] += 0.5 * (sy - 1)
    return inv, max(sx, sy)


class FaceHelper:
    """Cut faces out of an image at the FFHQ alignment and blend restored ones back.

    Stateless: `detect_and_align` returns everything `paste_back` needs.

    Args:
        detector: a `FaceDetector` (facexlib RetinaFace), or a stub in tests.
        parser: optional face-parsing net mapping (B, 3, 512, 512) in [-1, 1] to a tuple whose
            first item is (B, 19, 512, 512) class logits (facexlib ParseNet). With it the blend
            mask follows the face outline; without it, a soft square.
        face_size: side of the aligned crops (512 for DiffBIR's face model).
        detect_size: the image is upscaled so its short side is at least this before detection
            (DiffBIR: 640); landmarks are mapped back to the input's pixels.
        conf_threshold: minimum detector score.
        eye_dist_threshold: faces whose eyes are closer than this many pixels (profiles, tiny
            faces) are skipped.
    """

    def __init__(
        self,
        detector: FaceDetector,
        parser: nn.Module | None = None,
        face_size: int = 512,
        detect_size: int = 640,
        conf_threshold: float = 0.8,
        eye_dist_threshold: float = 5.0,
    ) -> None:
        self.detector = detector
        self.parser = parser
        self.face_size = face_size
        self.detect_size = detect_size
        self.conf_threshold = conf_threshold
        self.eye_dist_threshold = eye_dist_threshold
        self.template = FFHQ_TEMPLATE_512 * (face_size / 512)

    def detect(self, image: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (N, 5) and landmarks (N, 5, 2) in `image` pixels, best score first."""
        rgb = _to_hwc(_as_chw(image, "image")) * 255
        h, w = rgb.shape[:2]
        scale = max(1.0, self.detect_size / min(h, w))
        if scale > 1:
            rgb = cv2.resize(rgb, (int(w * scale), int(h * scale)), interpolation=cv2.INTER_LINEAR)
        with torch.no_grad():
            dets = np.asarray(
                self.detector.detect_faces(rgb[..., ::-1].copy(), self.conf_threshold)
            )
        dets = dets.reshape(-1, 15).astype(np.float64)
        dets[:, :4] /= scale
        dets[:, 5:] /= scale
        landmarks = dets[:, 5:].reshape(-1, 5, 2)
        keep = np.linalg.norm(landmarks[:, 0] - landmarks[:, 1], axis=-1) >= self.eye_dist_threshold
        boxes = dets[keep, :5]
        return boxes, landmarks[keep]

    def align(self, image: Tensor, landmarks: np.ndarray) -> tuple[Tensor, np.ndarray]:
        """Warp each face given by 5 landmarks to the template: (N, 3, S, S), (N, 2, 3)."""
        chw = _as_chw(image, "image")
        rgb = _to_hwc(chw)
        faces, affines = [], []
        for points in landmarks:
            # LMEDS as facexlib/DiffBIR: a similarity fit robust to one bad landmark.
            affine = cv2.estimateAffinePartial2D(points, self.template, method=cv2.LMEDS)[0]
            if affine is None:
                raise ValueError(f"degenerate face landmarks {points.tolist()}")
            size = (self.face_size, self.face_size)
            face = cv2.warpAffine(rgb, affine, size, borderValue=BORDER_VALUE)
            faces.append(torch.from_numpy(face).permute(2, 0, 1))
            affines.append(affine)
        empty = torch.empty(0, 3, self.face_size, self.face_size)
        stacked = torch.stack(faces) if faces else empty
        return stacked.to(chw.device), np.asarray(affines, np.float64).reshape(-1, 2, 3)

    def detect_and_align(self, image: Tensor) -> AlignedFaces:
        """Detect the faces of `image` ((3, H, W) or (1, 3, H, W) in [0, 1]) and align them."""
        boxes, landmarks = self.detect(image)
        faces, affines = self.align(image, landmarks)
        log.info("detected %d face(s)", len(faces))
        return AlignedFaces(faces, affines, landmarks, boxes, tuple(image.shape[-2:]))

    def parse_masks(self, faces: Tensor) -> np.ndarray:
        """(N, S, S) soft face-outline masks in [0, 1] of aligned faces (N, 3, S, S)."""
        param = next(self.parser.parameters(), None)
        x = faces.detach().float()
        if param is not None:
            x = x.to(device=param.device, dtype=param.dtype)
        if x.shape[-1] != _PARSE_SIZE:
            x = F.interpolate(x, size=(_PARSE_SIZE, _PARSE_SIZE), mode="bilinear")
        with torch.no_grad():
            labels = self.parser(x * 2 - 1)[0].argmax(dim=1).cpu().numpy()
        masks = []
        for label in labels:
            mask = _PARSE_KEEP[label]
            # Twice a wide blur, then a black frame, as DiffBIR: no edge of the crop shows.
            mask = cv2.GaussianBlur(cv2.GaussianBlur(mask, (101, 101), 11), (101, 101), 11)
            mask[:10], mask[-10:], mask[:, :10], mask[:, -10:] = 0, 0, 0, 0
            masks.append(cv2.resize(mask, (faces.shape[-1], faces.shape[-2])))
        return np.stack(masks)

    def _square_masks(
        self, inv: np.ndarray, scale: float, size: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The warped crop square, slightly eroded (hard), and its soft version."""
        h, w = size
        square = np.ones((self.face_size, self.face_size), np.float32)
        hard = cv2.warpAffine(square, inv, (w, h))
        # Erosion removes the partially covered (bilinear) rim of the warped square.
        kernel = max(1, int(2 * scale))
        hard = cv2.erode(hard, np.ones((kernel, kernel), np.uint8))
        # Blend width: 1/20 of the face side (DiffBIR/facexlib), eroded in and blurred out.
        edge = int(float(hard.sum()) ** 0.5) // 20
        if edge == 0:
            return hard, hard
        soft = cv2.erode(hard, np.ones((2 * edge, 2 * edge), np.uint8))
        soft = cv2.GaussianBlur(soft, (2 * edge + 1, 2 * edge + 1), 0)
        return hard, soft

    def _check_faces(self, aligned: AlignedFaces, restored: Tensor | Sequence[Tensor]) -> Tensor:
        if not isinstance(restored, Tensor):
            parts = [f.reshape(-1, *f.shape[-3:]) for f in restored]
            restored = torch.cat(parts) if parts else aligned.faces[:0]
        expected = (len(aligned), 3, self.face_size, self.face_size)
        if tuple(restored.shape) != expected:
            raise ValueError(
                f"restored faces: expected shape {expected} (one per aligned face), "
                f"got {tuple(restored.shape)}"
            )
        return restored

    def _masks(
        self, aligned: AlignedFaces, restored_faces: Tensor, size: Sequence[int]
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield (face → background affine, hard mask, blend mask) for each face."""
        use_parse = self.parser is not None and len(aligned) > 0
        parse = self.parse_masks(restored_faces) if use_parse else None
        for i, affine in enumerate(aligned.affines):
            inv, scale = _inverse_affine(affine, aligned.image_size, size)
            hard, soft = self._square_masks(inv, scale, size)
            if parse is not None:
                outline = cv2.warpAffine(parse[i], inv, (size[1], size[0]), flags=cv2.INTER_CUBIC)
                # Cubic warping overshoots slightly; the mask stays a blend weight.
                soft = np.minimum(soft, np.clip(outline, 0, 1))
            yield inv, hard, np.clip(soft, 0, 1)  # float blur sums may exceed 1 by an ulp

    def blend_masks(
        self, aligned: AlignedFaces, restored_faces: Tensor, size: Sequence[int]
    ) -> list[Tensor]:
        """The (H, W) blend weight of each face on a background of `size` = (H, W)."""
        restored_faces = self._check_faces(aligned, restored_faces)
        return [torch.from_numpy(soft) for _, _, soft in self._masks(aligned, restored_faces, size)]

    def paste_back(
        self, background: Tensor, aligned: AlignedFaces, restored_faces: Tensor | Sequence[Tensor]
    ) -> Tensor:
        """Blend restored faces into `background`, in order, through soft masks.

        Args:
            background: (3, H', W') or (1, 3, H', W') in [0, 1], the restored whole image; it
                may be larger than the image the faces came from (an upscaled output): face
                positions are scaled to it.
            aligned: from `detect_and_align`.
            restored_faces: (N, 3, S, S) in [0, 1], or a list of N (1, 3, S, S) / (3, S, S).

        Returns:
            The blended image, with the shape, dtype and device of `background`.
        """
        restored_faces = self._check_faces(aligned, restored_faces)
        bg = _as_chw(background, "background")
        if len(aligned) == 0:
            return background.clone()
        size = tuple(bg.shape[-2:])
        out = _to_hwc(bg)
        masks = self._masks(aligned, restored_faces, size)
        for face, (inv, hard, soft) in zip(restored_faces, masks, strict=True):
            warped = cv2.warpAffine(_to_hwc(face), inv, (size[1], size[0]))
            m = soft[..., None]
            out = m * (hard[..., None] * warped) + (1 - m) * out
        result = torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)
        result = result.to(device=background.device, dtype=background.dtype)
        return result.reshape(background.shape)

    def restore(
        self, image: Tensor, background: Tensor, restore_face: Callable[[Tensor], Tensor]
    ) -> FaceRestoration:
        """Detect faces in `image`, restore each with `restore_face` ((1, 3, S, S) → same,
        in [0, 1]) and paste them onto `background` (the separately restored image)."""
        aligned = self.detect_and_align(image)
        restored = [restore_face(face[None]) for face in aligned.faces]
        restored_faces = self._check_faces(aligned, restored)
        return FaceRestoration(
            self.paste_back(background, aligned, restored_faces), aligned, restored_faces
        )


def find_face_weights(
    weights_dirs: str | Path | Sequence[str | Path] = DEFAULT_WEIGHTS_DIR,
    detection_model: str = "retinaface_resnet50",
    use_parsing: bool = True,
    download: bool = True,
) -> dict[str, Path]:
    """Local paths of the detection (and parsing) weights, from the weight registry.

    Raises:
        MissingWeightsError: listing every missing file, the folders searched and its URL.
    """
    if detection_model not in DETECTION_MODELS:
        raise ValueError(
            f"unknown face detector {detection_model!r}; choose from {', '.join(DETECTION_MODELS)}"
        )
    dirs = [weights_dirs] if isinstance(weights_dirs, str | Path) else list(weights_dirs)
    names = [detection_model] + (["face_parsenet"] if use_parsing else [])
    return resolve_weights(names, dirs, download=download)


def _load_strict(net: nn.Module, path: Path, what: str) -> nn.Module:
    """Load a whole state dict; a wrong file gets a one-line error naming it."""
    load_state_strict(net, load_weight_file(path), path, what)
    return net.eval()


def load_face_detector(
    path: str | Path,
    detection_model: str = "retinaface_resnet50",
    device: str | torch.device = "cpu",
) -> nn.Module:
    """facexlib RetinaFace with the weights of a local file (no download)."""
    from facexlib.detection.retinaface import RetinaFace

    if detection_model not in DETECTION_MODELS:
        raise ValueError(
            f"unknown face detector {detection_model!r}; choose from {', '.join(DETECTION_MODELS)}"
        )
    with warnings.catch_warnings():  # torchvision's notice about `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        net = RetinaFace(
            network_name=DETECTION_MODELS[detection_model], device=torch.device(device)
        )
    return _load_strict(net, Path(path), detection_model)


def load_face_parser(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """facexlib ParseNet (512×512, 19 classes) with the weights of a local file."""
    from facexlib.parsing.parsenet import ParseNet

    net = ParseNet(in_size=_PARSE_SIZE, out_size=_PARSE_SIZE, parsing_ch=19)
    return _load_strict(net, Path(path), "ParseNet").to(device)


def load_face_helper(
    weights_dir: str | Path | Sequence[str | Path] = DEFAULT_WEIGHTS_DIR,
    detection_model: str = "retinaface_resnet50",
    use_parsing: bool = True,
    device: str | torch.device = "cpu",
    **helper_kwargs: float,
) -> FaceHelper:
    """A FaceHelper with facexlib's detector (and parser) loaded from `weights_dir`.

    `helper_kwargs` go to `FaceHelper` (face_size, detect_size, conf_threshold, ...).
    """
    paths = find_face_weights(weights_dir, detection_model, use_parsing)
    detector = load_face_detector(paths[detection_model], detection_model, device)
    parser = load_face_parser(paths["face_parsenet"], device) if use_parsing else None
    return FaceHelper(detector, parser, **helper_kwargs)
