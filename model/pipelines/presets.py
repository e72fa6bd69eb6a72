"""DiffBIR releases (v1, v2, v2.1) and custom models: which weights, schedule and stage 1.

A version preset names, per task, the registry keys (`model.io.weights.REGISTRY`) of the SD
checkpoint, the LAControlNet and the stage-1 cleaner it was released with, the stage-1
architecture (`model.nets.stage1.STAGE1_MODELS`) and the diffusion schedule
(`model.diffusion.schedule.DIFFUSION_PRESETS`). The architecture of every version is SD 2.1-base +
DiffBIR's LAControlNet + DiffBIR's SwinIR unless a model config says otherwise (tiny test
models, or a user's own "custom" model).

A flow task (FLOW_TASKS, e.g. "face_background") combines pipelines of several model tasks:
`flow_specs` gives a spec per part and `load_pipelines` builds them sharing the models that
their weight files share.

A model config is a YAML mapping with any of:

    cldm:      ControlLDM config in the original vocabulary (unet_cfg, controlnet_cfg, vae_cfg,
               clip_cfg, latent_scale_factor); default `model.convert.sd.sd21_cldm_cfg()`
    swinir:    SwinIR constructor arguments; default `model.nets.swinir.swinir_diffbir_config()`
    stage1:    stage-1 architecture name (custom only; default "swinir")
    diffusion: a DIFFUSION_PRESETS name or `model.diffusion.schedule.Diffusion` arguments (custom only;
               required there)

`scripts/make_tiny_weights.py` writes such a file (`tiny_config.yaml`) next to its weights.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

if TYPE_CHECKING:
    from model.diffusion.schedule import Diffusion

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("sr", "denoise", "face")
FACE_BACKGROUND = "face_background"
# Tasks with their own flow (`model.pipelines.face_background`): the model task whose weights each part
# uses. face_background: the background with the general (sr) model, faces with the face model.
FLOW_TASKS: dict[str, dict[str, str]] = {FACE_BACKGROUND: {"background": "sr", "face": "face"}}
TASK_CHOICES: tuple[str, ...] = (*TASKS, *FLOW_TASKS)
# The original CLI's --upscale defaults to 4 for every task; denoising and aligned faces keep
# the input size here, which is how those tasks are used, and unaligned faces use the x2 of
# the original README's example.
DEFAULT_UPSCALE: dict[str, float] = {"sr": 4.0, "denoise": 1.0, "face": 1.0, FACE_BACKGROUND: 2.0}
CUSTOM = "custom"
MODEL_CONFIG_KEYS = ("cldm", "swinir", "stage1", "diffusion")
# Weight roles of a pipeline, in loading order.
ROLES = ("stage1", "sd", "controlnet")


@dataclasses.dataclass(frozen=True)
class Stage1Choice:
    """A stage-1 cleaner: architecture name (STAGE1_MODELS) and weight name (REGISTRY)."""

    model: str
    weight: str


@dataclasses.dataclass(frozen=True)
class VersionPreset:
    """What one DiffBIR release uses (reference README, "Weights used per version").

    Args:
        name: version name ("v1", "v2", "v2.1").
        diffusion: DIFFUSION_PRESETS name of its training schedule.
        sd: REGISTRY name of its Stable Diffusion checkpoint.
        controlnet: task -> REGISTRY name of its LAControlNet.
        stage1: task -> stage-1 cleaner.
    """

    name: str
    diffusion: str
    sd: str
    controlnet: Mapping[str, str]
    stage1: Mapping[str, Stage1Choice]

    def weights(self, task: str) -> dict[str, str]:
        """REGISTRY names by role ("stage1", "sd", "controlnet") for `task`."""
        check_task(task)
        return {
            "stage1": self.stage1[task].weight,
            "sd": self.sd,
            "controlnet": self.controlnet[task],
        }


_SWINIR_FACE = Stage1Choice("swinir", "swinir_face")

VERSIONS: dict[str, VersionPreset] = {
    "v1": VersionPreset(
        "v1",
        diffusion="v1",
        sd="sd21_base",
        controlnet={"sr": "v1_general", "denoise": "v1_general", "face": "v1_face"},
        stage1={
            "sr": Stage1Choice("swinir", "swinir_general"),
            "denoise": Stage1Choice("swinir", "swinir_general"),
            "face": _SWINIR_FACE,
        },
    ),
    "v2": VersionPreset(
        "v2",
        diffusion="v2",
        sd="sd21_base",
        controlnet={"sr": "v2", "denoise": "v2", "face": "v2"},
        stage1={
            "sr": Stage1Choice("bsrnet", "bsrnet"),
            "denoise": Stage1Choice("scunet", "scunet_psnr"),
            "face": _SWINIR_FACE,
        },
    ),
    "v2.1": VersionPreset(
        "v2.1",
        diffusion="v2.1",
        sd="sd21_zsnr",
        controlnet={"sr": "v2.1", "denoise": "v2.1", "face": "v2.1"},
        stage1={
            "sr": Stage1Choice("swinir", "swinir_realesrgan"),
            "denoise": Stage1Choice("swinir", "swinir_realesrgan"),
            "face": _SWINIR_FACE,
        },
    ),
}
VERSION_CHOICES: tuple[str, ...] = (*VERSIONS, CUSTOM)


def check_task(task: str) -> None:
    """Raise ValueError for a task no version supports."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a pipeline except the weight files.

    Args:
        cldm: ControlLDM config, original vocabulary.
        diffusion: DIFFUSION_PRESETS name or `Diffusion` keyword arguments.
        stage1_model: STAGE1_MODELS name.
        stage1_config: SwinIR constructor arguments (None: the file's or DiffBIR's).
        weights: REGISTRY names by role; empty for custom models (paths are given).
    """

    cldm: Mapping[str, Any]
    diffusion: str | Mapping[str, Any]
    stage1_model: str
    stage1_config: Mapping[str, Any] | None
    weights: Mapping[str, str]


def read_model_config(path: str | Path) -> dict[str, Any]:
    """Read and check a model config YAML (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model config not found")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a model config must be a mapping, found {type(raw).__name__}")
    unknown = sorted(set(raw) - set(MODEL_CONFIG_KEYS))
    if unknown:
        raise ValueError(
            f"{path}: unknown model config keys {unknown}; allowed: {', '.join(MODEL_CONFIG_KEYS)}"
        )
    check_model_config(raw, str(path))
    return raw


def _check_arguments(cls: type, given: Any, where: str) -> None:
    if not isinstance(given, Mapping):
        raise ValueError(
            f"{where}: expected a mapping of {cls.__name__} arguments, got {type(given).__name__}"
        )
    known = [name for name in inspect.signature(cls).parameters if name != "self"]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(
            f"{where}: unknown {cls.__name__} argument(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(known)}"
        )


def check_model_config(config: Mapping[str, Any], source: str = "model config") -> None:
    """Raise one ValueError line naming `source` and the entry for a malformed `swinir:`,
    `stage1:` or `diffusion:` entry (wrong type, unknown argument or name)."""
    from model.diffusion.schedule import DIFFUSION_PRESETS, Diffusion
    from model.nets.stage1 import STAGE1_MODELS
    from model.nets.swinir import SwinIR

    if config.get("swinir") is not None:
        _check_arguments(SwinIR, config["swinir"], f"{source}: swinir")
    stage1 = config.get("stage1", "swinir")
    if stage1 not in STAGE1_MODELS:
        raise ValueError(
            f"{source}: unknown stage-1 model {stage1!r}; choose one of {list(STAGE1_MODELS)}"
        )
    diffusion = config.get("diffusion")
    if isinstance(diffusion, str) and diffusion not in DIFFUSION_PRESETS:
        raise ValueError(
            f"{source}: unknown diffusion preset {diffusion!r}; choose one of "
            f"{list(DIFFUSION_PRESETS)} or give Diffusion arguments"
        )
    if diffusion is not None and not isinstance(diffusion, str):
        _check_arguments(Diffusion, diffusion, f"{source}: diffusion")


def model_spec(version: str, task: str, model_config: Mapping[str, Any] | None = None) -> ModelSpec:
    """Resolve a version (or "custom") and task, with an optional model config, to a spec."""
    from model.convert.sd import original_params, sd21_cldm_cfg
    from model.diffusion.schedule import DIFFUSION_PRESETS

    check_task(task)
    config = dict(model_config or {})
    check_model_config(config)
    cldm = original_params(config["cldm"]) if "cldm" in config else sd21_cldm_cfg()
    swinir = config.get("swinir")
    if version == CUSTOM:
        if "diffusion" not in config:
            raise ValueError(
                "a custom model needs its schedule: set `diffusion:` in the model config to one "
                f"of {', '.join(DIFFUSION_PRESETS)} or to Diffusion arguments"
            )
        return ModelSpec(cldm, config["diffusion"], config.get("stage1", "swinir"), swinir, {})
    if version not in VERSIONS:
        raise ValueError(f"unknown version {version!r}; choose one of {', '.join(VERSION_CHOICES)}")
    for key in ("stage1", "diffusion"):
        if key in config:
            raise ValueError(
                f"model config key {key!r} is for custom models; version {version} fixes it"
            )
    preset = VERSIONS[version]
    choice = preset.stage1[task]
    return ModelSpec(
        cldm,
        preset.diffusion,
        choice.model,
        swinir if choice.model == "swinir" else None,
        preset.weights(task),
    )


def build_diffusion(diffusion: str | Mapping[str, Any]) -> Diffusion:
    """A `Diffusion` from a DIFFUSION_PRESETS name or its keyword arguments."""
    from model.diffusion.schedule import DIFFUSION_PRESETS, Diffusion

    if isinstance(diffusion, str):
        if diffusion not in DIFFUSION_PRESETS:
            raise ValueError(
                f"unknown diffusion preset {diffusion!r}; choose one of {list(DIFFUSION_PRESETS)}"
            )
        return DIFFUSION_PRESETS[diffusion]()
    return Diffusion(**diffusion)


def flow_specs(
    version: str, task: str, model_config: Mapping[str, Any] | None = None
) -> dict[str, ModelSpec]:
    """The spec of each part of a FLOW_TASKS task, e.g. {"background": ..., "face": ...}."""
    if task not in FLOW_TASKS:
        raise ValueError(f"unknown flow task {task!r}; choose one of {', '.join(FLOW_TASKS)}")
    return {
        part: model_spec(version, base, model_config) for part, base in FLOW_TASKS[task].items()
    }
