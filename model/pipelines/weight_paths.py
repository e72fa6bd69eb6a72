"""The weight files of a run by role: explicit paths first, then the registry (maybe fetched).

Light on purpose (no torch): inference.py resolves every file of a run here before it imports
the networks, so a missing file or an unreachable hub fails in seconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from model.io.weights import DEFAULT_WEIGHTS_DIR, MissingWeightsError, resolve_weights
from model.pipelines.presets import CUSTOM, FACE_BACKGROUND, FLOW_TASKS, ROLES, VERSIONS

CHECKPOINT_FLAGS = {"stage1": "--stage1-ckpt", "sd": "--sd-ckpt", "controlnet": "--controlnet-ckpt"}


def resolve_paths(
    weights: Mapping[str, str],
    roles: Sequence[str],
    checkpoints: Mapping[str, str | Path | None] | None = None,
    weights_dir: str | Path = DEFAULT_WEIGHTS_DIR,
    offline: bool = False,
    extra: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Weight files by role: explicit `checkpoints` first, then the registry (maybe downloading).

    Args:
        weights: registry names by role (a spec's `weights`; empty for custom models).
        roles: the roles needed ("stage1", "sd", "controlnet").
        checkpoints: explicit paths by role (None entries are ignored).
        weights_dir: where the registry looks first and downloads to.
        offline: never download.
        extra: more roles and registry names (face weights), found in the same search so
            that one error lists every missing file.
    """
    paths = {r: Path(p) for r, p in (checkpoints or {}).items() if p is not None and r in roles}
    for role, path in paths.items():
        if not path.is_file():
            raise MissingWeightsError(
                f"{path}: weight file not found (given as the {role} checkpoint, "
                f"{CHECKPOINT_FLAGS[role]})"
            )
    unknown = [CHECKPOINT_FLAGS[r] for r in roles if r not in paths and r not in weights]
    if unknown:
        raise MissingWeightsError(
            f"a custom model needs its weight files: pass {', '.join(unknown)}"
        )
    needed = {r: weights[r] for r in roles if r not in paths}
    needed.update(extra or {})
    names = list(dict.fromkeys(needed.values()))
    found = resolve_weights(names, [Path(weights_dir)], download=not offline)
    return {**paths, **{r: found[name] for r, name in needed.items()}}


def task_paths(
    version: str,
    task: str,
    *,
    checkpoints: Mapping[str, str | Path | None] | None = None,
    weights_dir: str | Path = DEFAULT_WEIGHTS_DIR,
    offline: bool = False,
    stage1_only: bool = False,
    face_detector: str = "retinaface_resnet50",
    face_parsing: bool = True,
) -> dict[str, Path]:
    """Every weight file a `version`/`task` run needs, by role.

    The roles are "stage1" (and "sd", "controlnet" unless `stage1_only`); face_background adds
    the face model's "face_stage1" (and "face_controlnet"), "face_detector" and, with
    `face_parsing`, "face_parser". Arguments as `model.pipelines.loading.load_pretrained`.
    """
    if version != CUSTOM and version not in VERSIONS:
        raise ValueError(f"unknown version {version!r}; choose one of {', '.join(VERSIONS)}")
    if task == FACE_BACKGROUND and version == CUSTOM:
        raise ValueError(f"task {FACE_BACKGROUND} needs a released version (its face model)")
    roles = ("stage1",) if stage1_only else ROLES
    parts = FLOW_TASKS.get(task, {"background": task})
    weights = {} if version == CUSTOM else VERSIONS[version].weights(parts["background"])
    extra = {}
    if "face" in parts:
        face = VERSIONS[version].weights(parts["face"])
        extra = {f"face_{role}": face[role] for role in roles if role != "sd"}
        extra["face_detector"] = face_detector
        if face_parsing:
            extra["face_parser"] = "face_parsenet"
    return resolve_paths(weights, roles, checkpoints, weights_dir, offline, extra)
