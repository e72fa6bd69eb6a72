"""Learned image-quality metrics from pyiqa, with their weights read from a local folder.

pyiqa downloads each metric's weights on first use. For offline evaluation the weights can sit
in a folder with the torch-hub layout (`pyiqa/`, `checkpoints/`, `clip/`): `check_weights`
names the first missing file and where to get it, `weights_location` points pyiqa,
torchvision and OpenAI-CLIP at that folder, and `build_pyiqa_metric` combines both. pyiqa is
imported lazily, so this module loads without it.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch

# Our metric name -> pyiqa model name. MANIQA as in the DiffBIR paper: trained on PIPAL.
# lpips is LPIPS v0.1 on AlexNet (the DiffBIR paper's); lpips_vgg the same on VGG16 (DiffIR's
# paper computes LPIPS with the lpips package's VGG network).
PYIQA_NAMES = {
    "lpips": "lpips",
    "lpips_vgg": "lpips-vgg",
    "niqe": "niqe",
    "musiq": "musiq",
    "maniqa": "maniqa-pipal",
    "clipiqa": "clipiqa",
    "fid": "fid",
}

# Where pyiqa keeps the URL of each file a metric reads: (sub-folder of the torch hub dir,
# module, attribute, key). Read from pyiqa itself so that the file names follow its version.
_WEIGHT_SOURCES = {
    "lpips": (
        ("pyiqa", "pyiqa.archs.lpips_arch", "default_model_urls", "0.1_alex"),
        ("checkpoints", "torchvision.models", "AlexNet_Weights", "IMAGENET1K_V1"),
    ),
    "lpips_vgg": (
        ("pyiqa", "pyiqa.archs.lpips_arch", "default_model_urls", "0.1_vgg"),
        ("checkpoints", "torchvision.models", "VGG16_Weights", "IMAGENET1K_V1"),
    ),
    "niqe": (("pyiqa", "pyiqa.archs.niqe_arch", "default_model_urls", "url"),),
    "musiq": (("pyiqa", "pyiqa.archs.musiq_arch", "default_model_urls", "koniq10k"),),
    "maniqa": (("pyiqa", "pyiqa.archs.maniqa_arch", "default_model_urls", "pipal"),),
    "clipiqa": (("clip", "pyiqa.archs.clip_model", "_MODELS", "RN50"),),
    "fid": (("pyiqa", "pyiqa.archs.inception", "FID_WEIGHTS_URL", None),),
}


class MetricUnavailable(RuntimeError):
    """A metric that cannot be built (missing weights, no pyiqa, ...); message is one line."""


def weight_urls(metric: str) -> list[tuple[str, str]]:
    """(sub-folder of the torch hub dir, URL) of every weight file pyiqa's `metric` reads."""
    found = []
    for sub, module, attr, key in _WEIGHT_SOURCES[metric]:
        value = getattr(importlib.import_module(module), attr)
        if key is not None:  # a dict of URLs, or a torchvision weights enum
            value = value[key] if isinstance(value, dict) else getattr(value, key).url
        found.append((sub, value))
    return found


def check_weights(metric: str, weights_dir: Path) -> None:
    """Raise MetricUnavailable naming the first weight file of `metric` missing locally."""
    for sub, url in weight_urls(metric):
        name = Path(urlparse(url).path).name
        folder = weights_dir / sub
        if not (folder / name).is_file():
            raise MetricUnavailable(
                f"{metric}: weight file {name} not found in {folder} (download it from {url}, "
                f"or run once online and copy ~/.cache/torch/hub/{sub}/{name})"
            )


def _no_pretrained_create_model(name: str, **kwargs):
    import timm

    return timm.create_model(name, **{**kwargs, "pretrained": False})


@contextlib.contextmanager
def weights_location(weights_dir: Path | None) -> Iterator[None]:
    """Make pyiqa, torchvision and OpenAI-CLIP read (and cache) weights under `weights_dir`.

    Everything changed is restored on exit.
    """
    from pyiqa.archs import maniqa_arch
    from pyiqa.utils import download_util

    saved = (torch.hub.get_dir(), download_util.DEFAULT_CACHE_DIR, maniqa_arch.timm)
    # MANIQA builds its ViT with pretrained=True (a 350 MB download from the HF hub) and then
    # overwrites every weight from its own checkpoint (strict load): skip the useless download.
    maniqa_arch.timm = types.SimpleNamespace(create_model=_no_pretrained_create_model)
    if weights_dir is not None:
        # pyiqa freezes its cache folder at import time; torchvision and CLIP ask torch.hub.
        torch.hub.set_dir(str(weights_dir))
        download_util.DEFAULT_CACHE_DIR = str(weights_dir / "pyiqa")
    try:
        yield
    finally:
        torch.hub.set_dir(saved[0])
        download_util.DEFAULT_CACHE_DIR, maniqa_arch.timm = saved[1], saved[2]


def build_pyiqa_metric(metric: str, device: str, weights_dir: Path | None) -> torch.nn.Module:
    """Create pyiqa's model for `metric`; raises MetricUnavailable with a one-line reason."""
    try:
        import pyiqa
    except ImportError:
        raise MetricUnavailable(f"{metric}: needs pyiqa (pip install pyiqa)") from None
    if weights_dir is not None:
        check_weights(metric, weights_dir)
    try:
        with weights_location(weights_dir):
            return pyiqa.create_metric(PYIQA_NAMES[metric], device=torch.device(device))
    except Exception as e:  # a metric that fails to load must not stop the others
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MetricUnavailable(f"{metric}: could not be created ({reason})") from e
