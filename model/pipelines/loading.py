"""Loading pipelines: weight files resolved through the registry, models built and shared.

`load_pretrained` is what `DiffBIRPipeline.from_pretrained` runs; `load_pretrained_task` also
builds the face_background flow. Explicit paths always win over the registry, which looks in
the weights folder, then the Hugging Face cache, then downloads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from model.convert.controlnet import load_controlnet_original
from model.convert.sd import original_params
from model.io.checkpoint import WeightFileError
from model.io.cldm_files import load_cldm, read_controlnet_original
from model.io.weights import DEFAULT_WEIGHTS_DIR
from model.nets.cldm import ControlLDM
from model.nets.lacontrolnet import LAControlNet, build_lacontrolnet
from model.nets.stage1 import load_stage1_model
from model.pipelines.diffbir import DiffBIRPipeline
from model.pipelines.face_background import FaceBackgroundPipeline
from model.pipelines.faces import FaceHelper, load_face_detector, load_face_parser
from model.pipelines.presets import (
    CUSTOM,
    FACE_BACKGROUND,
    ROLES,
    ModelSpec,
    build_diffusion,
    flow_specs,
    model_spec,
    read_model_config,
)
from model.pipelines.weight_paths import task_paths

logger = logging.getLogger(__name__)


def load_pipeline(
    spec: ModelSpec,
    paths: Mapping[str, str | Path],
    device: str | torch.device = "auto",
    precision: str | torch.dtype = "fp32",
    vae_precision: str = "auto",
) -> DiffBIRPipeline:
    """Build a pipeline from a spec and weight paths by role.

    Args:
        spec: from `model_spec`.
        paths: {"stage1": path} for a stage-1-only pipeline, plus "sd" and "controlnet" for the
            full one (released layouts or our safetensors files).
        device: "auto" (cuda > mps > cpu) or a torch device.
        precision: "fp32", "fp16" or "bf16".
        vae_precision: "auto" (the VAE and text encoder in `precision` too) or "fp32".
    """
    pipelines = load_pipelines({"main": spec}, {"main": paths}, device, precision, vae_precision)
    return pipelines["main"]


def load_pipelines(
    specs: Mapping[str, ModelSpec],
    paths: Mapping[str, Mapping[str, str | Path]],
    device: str | torch.device = "auto",
    precision: str | torch.dtype = "fp32",
    vae_precision: str = "auto",
) -> dict[str, DiffBIRPipeline]:
    """Build several pipelines (e.g. `flow_specs`' parts) that share what their files share.

    Pipelines with the same SD and ControlNet files share one ControlLDM; with the same SD
    file but another ControlNet (v1's general and face models) they share its UNet, VAE and
    text encoder. Only the stage-1 models are always separate.

    Args:
        specs: name -> spec (`model_spec`, `flow_specs`).
        paths: name -> weight paths by role, as for `load_pipeline`.
        device: "auto" (cuda > mps > cpu) or a torch device.
        precision: "fp32", "fp16" or "bf16".
        vae_precision: "auto" (the VAE and text encoder in `precision` too) or "fp32".
    """
    loaded: list[tuple[ModelSpec, Mapping[str, str | Path], ControlLDM]] = []
    pipelines = {}
    for name, spec in specs.items():
        files = paths[name]
        try:
            stage1 = load_stage1_model(spec.stage1_model, files["stage1"], spec.stage1_config)
        except TypeError as exc:  # a model config value of the wrong type
            raise ValueError(f"model config swinir: {exc}") from exc
        cldm = diffusion = None
        if "sd" in files or "controlnet" in files:
            if "sd" not in files or "controlnet" not in files:
                raise ValueError(
                    "the diffusion stage needs both an SD and a ControlNet weight file"
                )
            cldm = _shared_cldm(spec, files, loaded)
            loaded.append((spec, files, cldm))
            try:
                diffusion = build_diffusion(spec.diffusion)
            except TypeError as exc:
                raise ValueError(f"model config diffusion: {exc}") from exc
        pipelines[name] = DiffBIRPipeline(
            stage1,
            cldm,
            diffusion,
            device=device,
            precision=precision,
            vae_precision=vae_precision,
        )
    return pipelines


def _same_file(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _shared_cldm(
    spec: ModelSpec,
    files: Mapping[str, str | Path],
    loaded: Sequence[tuple[ModelSpec, Mapping[str, str | Path], ControlLDM]],
) -> ControlLDM:
    """The ControlLDM for `files`, reusing the parts of an already loaded one where possible."""
    for other_spec, other_files, cldm in loaded:
        if other_spec.cldm != spec.cldm or not _same_file(other_files["sd"], files["sd"]):
            continue
        if _same_file(other_files["controlnet"], files["controlnet"]):
            return cldm
        controlnet = load_controlnet_file(spec.cldm, files["controlnet"])
        shared = ControlLDM(
            cldm.unet, controlnet, cldm.vae, cldm.text_encoder, cldm.latent_scale_factor
        )
        return shared.eval()
    return load_cldm(spec.cldm, files["sd"], files["controlnet"])


def load_controlnet_file(cfg: Mapping[str, Any], path: str | Path) -> LAControlNet:
    """The LAControlNet of `cfg` (original vocabulary) from a released or our file (CPU)."""
    state = read_controlnet_original(path)
    with torch.device("meta"):
        controlnet = build_lacontrolnet(**original_params(cfg)["controlnet_cfg"])
    # No random init and no copy: the network has no buffers, and the strict load assigns
    # every parameter.
    try:
        load_controlnet_original(controlnet, state, assign=True)
    except (KeyError, ValueError) as exc:
        raise WeightFileError(f"{path}: {exc}") from exc
    return controlnet.eval()


def _spec_config(version: str, model_config: str | Path | Mapping[str, Any] | None) -> dict:
    if model_config is None:
        return {}
    if isinstance(model_config, str | Path):
        return read_model_config(model_config)
    return dict(model_config)


def load_pretrained(
    version: str = "v2.1",
    task: str = "sr",
    *,
    weights_dir: str | Path = DEFAULT_WEIGHTS_DIR,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "fp32",
    vae_precision: str = "auto",
    checkpoints: Mapping[str, str | Path | None] | None = None,
    model_config: str | Path | Mapping[str, Any] | None = None,
    stage1_only: bool = False,
    offline: bool = False,
) -> DiffBIRPipeline:
    """The pipeline of a release (or "custom") for `task`; see `DiffBIRPipeline.from_pretrained`.

    Args:
        version: VERSION_CHOICES.
        task: "sr", "denoise" or "face".
        weights_dir: the registry's first folder and download target.
        device: "auto" (cuda > mps > cpu) or a torch device.
        dtype: "fp32", "fp16", "bf16" or a torch dtype.
        vae_precision: "auto" (the VAE and text encoder in `dtype` too) or "fp32".
        checkpoints: explicit weight paths by role ("stage1", "sd", "controlnet").
        model_config: a model config (YAML path or mapping, see `model.pipelines.presets`).
        stage1_only: load stage 1 alone (no diffusion weights needed).
        offline: never download.
    """
    spec = model_spec(version, task, _spec_config(version, model_config))
    paths = task_paths(version, task, checkpoints=checkpoints, weights_dir=weights_dir,
                       offline=offline, stage1_only=stage1_only)  # fmt: skip
    pipeline = load_pipeline(spec, paths, device, dtype, vae_precision)
    pipeline.weight_paths = paths
    return pipeline


def load_face_background(
    version: str = "v2.1",
    *,
    weights_dir: str | Path = DEFAULT_WEIGHTS_DIR,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "fp32",
    vae_precision: str = "auto",
    checkpoints: Mapping[str, str | Path | None] | None = None,
    model_config: str | Path | Mapping[str, Any] | None = None,
    stage1_only: bool = False,
    offline: bool = False,
    face_detector: str = "retinaface_resnet50",
    face_parsing: bool = True,
    face_batch_size: int = 1,
) -> FaceBackgroundPipeline:
    """The face_background flow of a release: the background pipeline (`checkpoints` apply to
    it; the face model shares its SD file), the face pipeline (the version's face weights) and
    the face detector / parser. The other arguments are those of `load_pretrained`."""
    if version == CUSTOM:
        raise ValueError(f"task {FACE_BACKGROUND} needs a released version (its face model)")
    specs = flow_specs(version, FACE_BACKGROUND, _spec_config(version, model_config))
    paths = task_paths(version, FACE_BACKGROUND, checkpoints=checkpoints, weights_dir=weights_dir,
                       offline=offline, stage1_only=stage1_only, face_detector=face_detector,
                       face_parsing=face_parsing)  # fmt: skip
    parts = {"background": {r: paths[r] for r in ROLES if r in paths}}
    parts["face"] = {
        **parts["background"],
        **{r: paths[f"face_{r}"] for r in ROLES if f"face_{r}" in paths},
    }
    pipelines = load_pipelines(specs, parts, device, dtype, vae_precision)
    device = pipelines["background"].device
    detector = load_face_detector(paths["face_detector"], face_detector, device)
    parser = load_face_parser(paths["face_parser"], device) if face_parsing else None
    pipeline = FaceBackgroundPipeline(
        pipelines["background"], pipelines["face"], FaceHelper(detector, parser),
        face_batch_size=face_batch_size,
    )  # fmt: skip
    pipeline.weight_paths = paths
    return pipeline


def load_pretrained_task(
    version: str, task: str, **kwargs: Any
) -> DiffBIRPipeline | FaceBackgroundPipeline:
    """`load_face_background` for the face_background flow, `load_pretrained` otherwise
    (face-only keyword arguments are dropped there)."""
    if task == FACE_BACKGROUND:
        return load_face_background(version, **kwargs)
    for key in ("face_detector", "face_parsing", "face_batch_size"):
        kwargs.pop(key, None)
    return load_pretrained(version, task, **kwargs)
