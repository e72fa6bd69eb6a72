"""Synthetic test sets (GT crops + degraded LQ) that every method is scored on.

Protocols (degradation settings are read from the project's validation configs, so that they
are DiffBIR's own):

- `realesrgan_x4`: Real-ESRGAN second-order degradation (`configs/dataset/
  general_realesrgan_val.yaml` kernels + `realesrgan_batch_transform_val.yaml`), LQ written at
  1/4 of the GT size, e.g. on 512x512 crops of DIV2K-val.
- `codeformer_face`: first-order blur -> downsample -> noise -> JPEG -> resize back
  (`configs/dataset/general_codeformer_val.yaml`: blur sigma [0.1, 12], downsampling [1, 12],
  noise [0, 15], JPEG quality [30, 100], kernel 41, iso/aniso) on aligned 512x512 faces
  (e.g. CelebA-HQ test for a CelebA-Test-like set). LQ at the GT size.
- `bicubic_x4`: MATLAB-style bicubic downsampling by 4 (basicsr's `imresize`, antialiased).

Source of the face ranges: the DiffBIR repository (XPixelGroup/DiffBIR) ships no test-set
script. Its README says the face model was trained with DifFace's degradation; its
`configs/dataset/face_val.yaml` has CodeFormer's ranges ([0.1, 10] / [0.8, 8] / [0, 20] /
[60, 100]) and its `general_deg_codeformer_val.yaml` the ranges above, the ones this project
uses for a CelebA-Test-like set. The paper's experiment section could not be read here: check
it before comparing numbers with the paper's table.

Every random choice is drawn from generators seeded with the test set's seed and the output
file name, so the same seed (and source folder) gives byte-identical files; `meta.json` records
the sampled parameters of every image, and `existing_testset` tells whether a folder already
holds a given test set. The CLI is `scripts/make_testset.py`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import zlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from basicsr.utils.matlab_functions import imresize
from omegaconf import OmegaConf

from dataset.batch_transform import RealESRGANBatchTransform, SecondOrderParams
from dataset.degradations import CodeformerDegradation
from dataset.realesrgan import RealESRGANKernels
from model.io.file_lists import list_image_files
from model.io.images import ImageReadError, read_image, write_image

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "dataset"
PROTOCOLS = ("realesrgan_x4", "codeformer_face", "bicubic_x4")
CROPS = ("none", "center", "random")
DEFAULT_CROP = {"realesrgan_x4": "center", "codeformer_face": "none", "bicubic_x4": "center"}
SCALE = {"realesrgan_x4": 4, "codeformer_face": 1, "bicubic_x4": 4}
T = TypeVar("T")


@dataclass(frozen=True)
class TestsetConfig:
    """Settings of one test set (recorded in meta.json); checked on creation (ValueError).

    Args:
        protocol: one of `PROTOCOLS`.
        gt: folder of ground-truth images (searched recursively).
        out: output folder (gt/, lq/, meta.json).
        seed: base seed of every random choice.
        crop: "none" (whole image, cut to a multiple of the scale), "center" or "random";
            None for the protocol's `DEFAULT_CROP`.
        crop_size: side of the square crops (a multiple of the scale).
        crops_per_image: random crops taken from each source image (more than 1: random crops).
        limit: use only the first `limit` source images (sorted by path); None for all.
    """

    protocol: str
    gt: Path
    out: Path
    seed: int = 0
    crop: str | None = None
    crop_size: int = 512
    crops_per_image: int = 1
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.crop is None:
            object.__setattr__(self, "crop", DEFAULT_CROP[self.protocol])
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        scale = SCALE[self.protocol]
        if self.crop_size < 1 or self.crop_size % scale:
            raise ValueError(f"crop_size must be a positive multiple of {scale}")
        if self.crops_per_image < 1 or (self.crops_per_image > 1 and self.crop != "random"):
            raise ValueError("crops_per_image must be 1, or more with crop random")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1")

    def settings(self) -> dict[str, Any]:
        """The settings meta.json records (everything but the two folders)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("gt", "out")}


def _stable_seed(*parts: object) -> int:
    """A 32-bit seed from strings/ints that is the same on every run and machine."""
    return zlib.crc32("/".join(str(p) for p in parts).encode("utf-8"))


def _jsonable(value: Any) -> Any:
    """Dataclasses, tensors and numpy values as plain JSON values (1-element batches unwrapped)."""
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, torch.Tensor | np.ndarray):
        value = value.tolist()
        return value[0] if isinstance(value, list) and len(value) == 1 else value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def _load_params(name: str, *keys: str) -> dict[str, Any]:
    """The `{target, params}` block at `keys` of a YAML under configs/dataset/."""
    cfg = OmegaConf.load(CONFIG_DIR / name)
    for key in keys:
        cfg = cfg[key]
    return OmegaConf.to_container(cfg, resolve=True)


def _build(block: dict[str, Any], cls: type[T]) -> T:
    """`cls(**params)` of a `{target, params}` block whose target names `cls`."""
    target = f"{cls.__module__}.{cls.__qualname__}"
    if block.get("target") != target:
        raise ValueError(f"expected target {target}, got {block.get('target')!r}")
    return cls(**block.get("params", {}))


# --------------------------------------------------------------------------- degradations


class RealESRGANx4:
    """Real-ESRGAN second-order degradation with the LQ kept at the stage-2 (1/4) size.

    The validation transform's own `degrade(..., resize_back=False)`: it skips the transform's
    last step, the resize back to the HQ size that DiffBIR's training pairs need.
    """

    def __init__(self, seed: int) -> None:
        self.kernels_cfg = _load_params("general_realesrgan_val.yaml", "params", "kernels")
        self.transform_cfg = _load_params("realesrgan_batch_transform_val.yaml")
        self.transform_cfg["params"].update(seed=seed, deterministic=True)
        self.kernels = _build(self.kernels_cfg, RealESRGANKernels)
        self.transform = _build(self.transform_cfg, RealESRGANBatchTransform)
        if self.transform.stage2_scale != 4:
            raise ValueError(
                f"realesrgan_x4 needs stage2_scale 4, got {self.transform.stage2_scale}"
            )

    def settings(self) -> dict[str, Any]:
        return {"kernels": self.kernels_cfg, "batch_transform": self.transform_cfg}

    def draw(self, key: int) -> tuple[dict[str, torch.Tensor], SecondOrderParams]:
        """Kernels and batch parameters of the image with seed key `key`."""
        rng = np.random.default_rng([self.transform.seed, key])
        kernels = {k: v[None] for k, v in self.kernels(rng).items()}  # (1, K, K)
        # the generator the deterministic transform itself would use for index `key`
        g = torch.Generator().manual_seed(self.transform.seed * 1_000_003 + key)
        return kernels, self.transform.sample_params(1, g)

    @torch.no_grad()
    def __call__(self, hq: np.ndarray, key: int) -> tuple[np.ndarray, dict[str, Any]]:
        kernels, params = self.draw(key)
        hq_t = torch.from_numpy(np.ascontiguousarray(hq.transpose(2, 0, 1)))[None]
        lq = self.transform.degrade(hq_t, kernels, params, resize_back=False)
        lq = lq[0].permute(1, 2, 0).numpy()
        return lq, _jsonable(params)


class CodeformerFace:
    """CodeFormer-style first-order degradation; LQ at the GT size."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.cfg = _load_params("general_codeformer_val.yaml", "params", "degradation")
        self.degradation = _build(self.cfg, CodeformerDegradation)

    def settings(self) -> dict[str, Any]:
        return {"degradation": self.cfg}

    def __call__(self, hq: np.ndarray, key: int) -> tuple[np.ndarray, dict[str, Any]]:
        rng = np.random.default_rng([self.seed, key])
        params = self.degradation.sample_params(rng)
        return self.degradation.apply(hq, params, rng), _jsonable(params)


class Bicubicx4:
    """MATLAB `imresize(img, 1/4)` (bicubic, antialiased), the classic SR benchmark LQ."""

    def settings(self) -> dict[str, Any]:
        return {"resize": "basicsr.utils.matlab_functions.imresize", "scale": 0.25}

    def __call__(self, hq: np.ndarray, key: int) -> tuple[np.ndarray, dict[str, Any]]:
        del key
        return np.clip(imresize(hq, 0.25), 0.0, 1.0).astype(np.float32), {}


def build_protocol(protocol: str, seed: int) -> RealESRGANx4 | CodeformerFace | Bicubicx4:
    """The degradation of `protocol`, seeded with `seed`."""
    if protocol == "realesrgan_x4":
        return RealESRGANx4(seed)
    if protocol == "codeformer_face":
        return CodeformerFace(seed)
    if protocol == "bicubic_x4":
        return Bicubicx4()
    raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")


# --------------------------------------------------------------------------- folder


def crop_boxes(
    h: int, w: int, cfg: TestsetConfig, scale: int, rng: np.random.Generator
) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of every crop of an h x w image; ValueError if too small."""
    if cfg.crop == "none":
        if h < scale or w < scale:
            raise ValueError(f"smaller than the scale factor {scale}")
        return [(0, 0, h - h % scale, w - w % scale)]  # the usual SR "mod crop"
    s = cfg.crop_size
    if h < s or w < s:
        raise ValueError(f"{h}x{w} is smaller than the {s}x{s} crop")
    if cfg.crop == "center":
        return [((h - s) // 2, (w - s) // 2, s, s)]
    tops = rng.integers(0, h - s, size=cfg.crops_per_image, endpoint=True)
    lefts = rng.integers(0, w - s, size=cfg.crops_per_image, endpoint=True)
    return [(int(t), int(left), s, s) for t, left in zip(tops, lefts, strict=True)]


def _output_name(rel: Path, k: int, count: int) -> str:
    stem = rel.with_suffix("").as_posix()
    return f"{stem}_{k:02d}.png" if count > 1 else f"{stem}.png"


def _versions() -> dict[str, str | None]:
    import cv2

    found: dict[str, str | None] = {"python": sys.version.split()[0], "opencv": cv2.__version__}
    for package in ("numpy", "torch", "basicsr-fixed", "basicsr"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def make_testset(cfg: TestsetConfig) -> dict[str, Any]:
    """Write gt/, lq/ and meta.json under `cfg.out`; returns the meta dictionary.

    Unreadable or too small source images are logged, listed under "skipped" and left out.
    """
    degrade = build_protocol(cfg.protocol, cfg.seed)
    scale = SCALE[cfg.protocol]
    sources = [Path(p) for p in list_image_files(cfg.gt)][: cfg.limit]
    images: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for path in sources:
        rel = path.relative_to(cfg.gt)
        try:
            img = read_image(path)
            rng = np.random.default_rng([cfg.seed, _stable_seed("crop", rel.as_posix())])
            boxes = crop_boxes(*img.shape[:2], cfg, scale, rng)
        except (ImageReadError, ValueError) as e:
            log.error("%s: skipped (%s)", path, e)
            skipped.append({"source": rel.as_posix(), "reason": str(e)})
            continue
        for k, (top, left, h, w) in enumerate(boxes):
            name = _output_name(rel, k, len(boxes))
            hq = np.ascontiguousarray(img[top : top + h, left : left + w])
            # degrade the 8-bit GT that is written, so that GT and LQ match exactly
            hq = np.round(hq * 255.0).astype(np.float32) / 255.0
            lq, params = degrade(hq, _stable_seed(name))
            write_image(cfg.out / "gt" / name, hq)
            write_image(cfg.out / "lq" / name, lq)
            entry = {"name": name, "source": rel.as_posix(), "box": [top, left, h, w]}
            entry.update(gt_size=[h, w], lq_size=list(lq.shape[:2]), params=params)
            images.append(entry)
        log.info("%s: %d image(s)", rel, len(boxes))
    meta = {
        "protocol": cfg.protocol,
        "seed": cfg.seed,
        "scale": scale,
        "gt_source": str(cfg.gt),
        "settings": cfg.settings(),
        "degradation": degrade.settings(),
        "images": images,
        "skipped": skipped,
        "versions": _versions(),
    }
    text = json.dumps(meta, indent=1, ensure_ascii=False, allow_nan=False)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "meta.json").write_text(text + "\n", encoding="utf-8")
    return meta


def existing_testset(cfg: TestsetConfig) -> dict[str, Any] | None:
    """The meta of the test set already at `cfg.out`, or None when there is none.

    Raises ValueError when `cfg.out` holds a test set made with other settings or data.
    """
    meta_path = cfg.out / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("settings") != cfg.settings() or meta.get("gt_source") != str(cfg.gt):
        raise ValueError(
            f"{cfg.out}: holds a test set made with other settings or data "
            f"({meta.get('settings')}, from {meta.get('gt_source')})"
        )
    return meta
