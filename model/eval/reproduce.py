"""Reproduce configs (configs/reproduce/*.yaml): loading and checks, the steps, the paper table.

A config names the test set (`data`: a synthetic protocol of `dataset.testsets`, or a public
folder with or without ground truth), the method (`method`: diffbir, the default, or diffir),
the DiffBIR task and version, the sampling settings (`inference`: `PipelineOptions` fields;
DiffIR reads only `DIFFIR_OPTIONS`, and its weights are `checkpoint` or DiffIRS2-GAN.pth), the
evaluation settings (`evaluate`: `EvalConfig` fields), the metrics, the paper's numbers with
their source (`paper`) and other measurements with their source and protocol (`reference`). `load_config` checks all
of it but the synthetic test-set settings (`dataset.testsets.TestsetConfig` checks those) and
reports the first problem in one line naming the file; `render_table` puts the paper's row (when
it has numbers) and each reference row next to a run's, or next to empty cells before a run. The
run itself (test set, restoration, scoring) is wired by `scripts/reproduce.py`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from model.diffusion.latent_guidance import LatentGuidance
from model.eval.scoring import (
    ALL_METRICS,
    FULL_REFERENCE,
    LOWER_IS_BETTER,
    EvalConfig,
    metric_device,
)
from model.pipelines.options import PipelineOptions
from model.pipelines.presets import DEFAULT_UPSCALE, TASK_CHOICES, VERSION_CHOICES

DATA_KINDS = ("synthetic", "paired", "lq_only")
CONFIG_KEYS = ("name", "title", "method", "task", "version", "checkpoint", "data", "inference",
               "metrics", "evaluate", "paper", "reference")  # fmt: skip
METHODS = {"diffbir": "DiffBIR", "diffir": "DiffIR"}  # config value -> name in the table
# the PipelineOptions fields DiffIR reads (model.pipelines.restorer.make_restorer)
DIFFIR_OPTIONS = ("upscale", "seed", "stage1_tile_size", "stage1_tile_stride")
# what the reference rows of each method's configs are
REFERENCE_NOTES = {
    "diffbir": "DiffBIR re-measured by other groups with their own protocol, not the DiffBIR "
    "paper's numbers",
    "diffir": "other methods as the DiffIR paper's table reports them (the paper row's protocol)",
}
# data keys of the folder kinds (synthetic ones are TestsetConfig fields besides these two)
DATA_KEYS = {"paired": ("kind", "lq", "gt", "source"), "lq_only": ("kind", "lq", "source")}
# EvalConfig fields that the run sets itself: not allowed under `evaluate`
EVALUATE_RESERVED = frozenset({"results", "gt", "metrics", "metric_weights_dir", "device"})
VALUE_FORMAT = {"psnr": ".2f", "musiq": ".2f", "fid": ".2f"}  # others: 4 decimals
# a `reference` entry: label, source, protocol and values required, note optional
REFERENCE_KEYS = ("label", "source", "protocol", "values", "note")
# metrics a paper or reference may report that model.eval.scoring does not compute (column "†")
NOT_COMPUTED = ("dists",)
VALUE_METRICS = (*ALL_METRICS, *NOT_COMPUTED)
# column order of the metrics the run does not score (the run's own come first, in its order)
COLUMN_ORDER = ("psnr", "ssim", "lpips", "lpips_vgg", "dists", "fid", "niqe", "musiq", "maniqa",
                "clipiqa")  # fmt: skip
LOWER = LOWER_IS_BETTER | {"dists"}
EMPTY = "—"  # a cell without a number


class ConfigError(ValueError):
    """A config, command line or setup that cannot be run (exit code 2)."""


@dataclasses.dataclass(frozen=True)
class ReproduceConfig:
    """A checked reproduce config.

    Args:
        path: the YAML file (named in every error).
        name, title, task: as in the file.
        version: the DiffBIR version; "diffir" for method diffir.
        data: the `data` section (kind, folders or test-set settings, source).
        options: the pipeline options of `inference` (upscale defaults to the task's).
        inference_keys: the options the config sets, upscale always included (shown in steps).
        evaluate: `EvalConfig` fields of the `evaluate` section.
        metrics: metric names (`model.eval.scoring.ALL_METRICS`).
        paper: source, values (metric -> number) and note.
        reference: other measurements, each with label, source, protocol, values
            (metric -> number) and an optional note.
        method: "diffbir" or "diffir".
        checkpoint: DiffIR weights (relative: under --weights-dir), or None.
    """

    path: Path
    name: str
    title: str
    task: str
    version: str
    data: dict[str, Any]
    options: PipelineOptions
    inference_keys: tuple[str, ...]
    evaluate: dict[str, Any]
    metrics: tuple[str, ...]
    paper: dict[str, Any]
    reference: tuple[dict[str, Any], ...] = ()
    method: str = "diffbir"
    checkpoint: str | None = None

    def option_settings(self) -> dict[str, Any]:
        """The options the config sets (validated values), in `PipelineOptions` field order."""
        return {k: getattr(self.options, k) for k in self.inference_keys}


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of a run: its name, a note, and the settings it runs with."""

    name: str
    note: str
    settings: dict[str, Any]


# --------------------------------------------------------------------------- config


def check_keys(
    values: Mapping[str, Any],
    valid: Collection[str],
    where: str,
    kind: str,
    reserved: Collection[str] = (),
) -> None:
    """ConfigError for the first key of `values` that is reserved or not in `valid`, naming the
    closest valid key."""
    for key in values:
        if key in reserved:
            raise ConfigError(f"{where}: `{key}` is set by reproduce.py")
        if key not in valid:
            close = difflib.get_close_matches(key, [v for v in valid if v not in reserved], n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"valid: {', '.join(valid)}"
            raise ConfigError(f"{where}: `{key}` is not a {kind}; {hint}")


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _require(cfg: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = cfg.get(key)
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: `{key}` missing or not a {getattr(kind, '__name__', kind)}")
    return value


def _check_data(data: dict[str, Any], metrics: list[str], where: str) -> None:
    kind = data.get("kind")
    if kind not in DATA_KINDS:
        raise ConfigError(f"{where}: data.kind must be one of {DATA_KINDS}, got {kind!r}")
    if kind == "synthetic":
        _require(data, "protocol", str, f"{where}: data")
        return
    check_keys(data, DATA_KEYS[kind], f"{where}: data", f"data key of kind {kind}")
    _require(data, "lq", str, f"{where}: data")
    if kind == "paired":
        _require(data, "gt", str, f"{where}: data")
    if kind == "lq_only" and any(m in (*FULL_REFERENCE, "fid") for m in metrics):
        raise ConfigError(f"{where}: data without ground truth allows no-reference metrics only")


def _check_values(values: Any, where: str, allow_empty: bool) -> dict[str, float]:
    """`values` as {metric: number}; ConfigError naming the first bad metric name or value."""
    if values is None and allow_empty:
        return {}
    if not isinstance(values, dict) or (not values and not allow_empty):
        raise ConfigError(f"{where}: `values` missing or not a mapping of metric names to numbers")
    check_keys(values, VALUE_METRICS, f"{where}.values", "metric name")
    for metric, value in values.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise ConfigError(f"{where}.values.{metric}: {value!r} is not a number")
    return values


def _one_line(entry: Mapping[str, Any], key: str, where: str, required: bool = True) -> None:
    value = entry.get(key)
    if value is None and not required:
        return
    if not isinstance(value, str) or not value.strip() or "\n" in value.strip():
        raise ConfigError(f"{where}: `{key}` missing or not a one-line string, got {value!r}")


def _check_reference(entries: Any, where: str) -> tuple[dict[str, Any], ...]:
    """The `reference` list checked: each entry a mapping of label, source, protocol, values."""
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise ConfigError(
            f"{where}: `reference` must be a list of entries ({', '.join(REFERENCE_KEYS)})"
        )
    labels: set[str] = set()
    for i, entry in enumerate(entries):
        at = f"{where}: reference[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: must be a mapping of {', '.join(REFERENCE_KEYS)}")
        check_keys(entry, REFERENCE_KEYS, at, "reference key")
        for key in ("label", "source", "protocol"):
            _one_line(entry, key, at)
        _one_line(entry, "note", at, required=False)
        _check_values(entry.get("values"), at, allow_empty=False)
        if entry["label"] in labels:
            raise ConfigError(f"{at}: label {entry['label']!r} used twice")
        labels.add(entry["label"])
    return tuple(entries)


def _pipeline_options(inference: dict[str, Any], task: str, where: str) -> PipelineOptions:
    check_keys(inference, _field_names(PipelineOptions), where, "PipelineOptions field")
    values = {"upscale": DEFAULT_UPSCALE[task], **inference}
    guidance = values.get("guidance")
    if guidance is not None and not isinstance(guidance, dict):
        raise ConfigError(f"{where}: `guidance` must be a mapping of LatentGuidance fields")
    if guidance is not None:
        check_keys(guidance, _field_names(LatentGuidance), f"{where}.guidance",
                   "LatentGuidance field")  # fmt: skip
    if isinstance(values.get("control_scales"), list):
        values["control_scales"] = tuple(values["control_scales"])
    try:
        if guidance is not None:
            values["guidance"] = LatentGuidance(**guidance)
        return PipelineOptions(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def _check_method(cfg: dict[str, Any], where: str) -> tuple[str, str, str | None]:
    """(method, version, checkpoint) of a config: DiffIR has no version and restores task sr;
    a checkpoint is DiffIR's only."""
    method = cfg.get("method", "diffbir")
    if method not in METHODS:
        raise ConfigError(f"{where}: method {method!r} not in {tuple(METHODS)}")
    checkpoint = cfg.get("checkpoint")
    if method == "diffbir":
        if checkpoint is not None:
            raise ConfigError(f"{where}: `checkpoint` is for method diffir")
        version = _require(cfg, "version", str, where)
        if version not in VERSION_CHOICES:
            raise ConfigError(f"{where}: version {version!r} not in {VERSION_CHOICES}")
        return method, version, None
    if "version" in cfg:
        raise ConfigError(f"{where}: `version` is for method diffbir (DiffIR has one network)")
    if cfg["task"] != "sr":
        raise ConfigError(f"{where}: method diffir restores task sr only, not {cfg['task']!r}")
    if checkpoint is not None and not (isinstance(checkpoint, str) and checkpoint.strip()):
        raise ConfigError(f"{where}: `checkpoint` must be a file name or path")
    check_keys(cfg.get("inference") or {}, DIFFIR_OPTIONS, f"{where}: inference", "DiffIR option")
    return method, "diffir", checkpoint


def load_config(path: Path, overrides: Sequence[str] = ()) -> ReproduceConfig:
    """Read a reproduce config, apply `KEY=VALUE` overrides (dotted keys, list items by index,
    YAML values) and check it (ConfigError)."""
    if not path.is_file():
        raise ConfigError(f"{path}: config not found")
    bad = [item for item in overrides if "=" not in item or item.startswith("=")]
    if bad:
        raise ConfigError(f"{path}: override {bad[0]!r} is not KEY=VALUE")
    try:
        merged = OmegaConf.load(path)
        for item in overrides:  # one by one: a dotted key may index a list (reference.0.source)
            key, _, value = item.partition("=")
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"_={value}"]))["_"]
            OmegaConf.update(merged, key, parsed, merge=True)
        cfg = OmegaConf.to_container(merged, resolve=True)
    except Exception as e:  # omegaconf/yaml errors have many types; report one line
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: a reproduce config must be a mapping")
    where = str(path)
    check_keys(cfg, CONFIG_KEYS, where, "reproduce config key")
    for key in ("name", "title", "task"):
        _require(cfg, key, str, where)
    if cfg["task"] not in TASK_CHOICES:
        raise ConfigError(f"{where}: task {cfg['task']!r} not in {TASK_CHOICES}")
    metrics = _require(cfg, "metrics", list, where)
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if not metrics or unknown:
        raise ConfigError(f"{where}: unknown metrics {unknown}; choose from {ALL_METRICS}")
    _check_data(_require(cfg, "data", dict, where), metrics, where)
    paper = _require(cfg, "paper", dict, where)
    values = _check_values(paper.get("values"), f"{where}: paper", allow_empty=True)
    if values and not (isinstance(paper.get("source"), str) and paper["source"].strip()):
        raise ConfigError(f"{where}: paper.values need `paper.source` (where they were read)")
    reference = _check_reference(cfg.get("reference"), where)
    for section in ("inference", "evaluate"):
        if not isinstance(cfg.get(section) or {}, dict):
            raise ConfigError(f"{where}: `{section}` must be a mapping of fields to values")
    method, version, checkpoint = _check_method(cfg, where)
    inference = cfg.get("inference") or {}
    evaluate = cfg.get("evaluate") or {}
    check_keys(evaluate, _field_names(EvalConfig), f"{where}: evaluate", "EvalConfig field",
               EVALUATE_RESERVED)  # fmt: skip
    options = _pipeline_options(inference, cfg["task"], f"{where}: inference")
    keys = tuple(k for k in _field_names(PipelineOptions) if k in inference or k == "upscale")
    return ReproduceConfig(
        path=path, name=cfg["name"], title=cfg["title"], task=cfg["task"],
        version=version, data=cfg["data"], options=options, inference_keys=keys,
        evaluate=evaluate, metrics=tuple(metrics), paper=paper, reference=reference,
        method=method, checkpoint=checkpoint,
    )  # fmt: skip


def eval_config(
    cfg: ReproduceConfig,
    results: Path,
    gt: Path | None,
    device: str = "auto",
    metric_weights_dir: Path | None = None,
) -> EvalConfig:
    """The scoring settings of a run: the config's metrics and `evaluate` fields."""
    try:
        return EvalConfig(
            results=results, gt=gt, metrics=cfg.metrics, device=metric_device(device),
            metric_weights_dir=metric_weights_dir, **cfg.evaluate,
        )  # fmt: skip
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cfg.path}: evaluate: {e}") from e


# --------------------------------------------------------------------------- output


def _show(value: Any) -> str:
    """A setting as text; strings that are empty or hold spaces are quoted (prompts)."""
    if isinstance(value, bool) or (isinstance(value, str) and (not value or " " in value)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def format_steps(steps: Sequence[Step]) -> str:
    """Numbered steps, each followed by its settings (`key: value`, None ones left out)."""
    lines = []
    for i, step in enumerate(steps, 1):
        lines.append(f"{i}. {step.name}" + (f" ({step.note})" if step.note else ""))
        lines += [f"     {k}: {_show(v)}" for k, v in step.settings.items() if v is not None]
    return "\n".join(lines)


def _format(metric: str, value: Any) -> str:
    """A run's mean as text (its metric's decimals); strings (inf/nan) as written."""
    if isinstance(value, str):  # inf/nan as written in summary.json
        return value
    return f"{value:{VALUE_FORMAT.get(metric, '.4f')}}" if value is not None else EMPTY


def _reported(metric: str, value: float | None) -> str:
    """A number copied from a paper: the metric's decimals when they keep it, else as written."""
    if value is None:
        return EMPTY
    text = _format(metric, value)
    return text if float(text) == value else str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def run_label(cfg: ReproduceConfig) -> str:
    """'this run (v2; upscale 4, sampler spaced, steps 50, ...)' from the key options
    (DiffIR: 'this run (DiffIR; upscale 4, seed 231)')."""
    o = cfg.options
    if cfg.method == "diffir":
        return f"this run (DiffIR; upscale {o.upscale:g}, seed {o.seed})"
    return (
        f"this run ({cfg.version}; upscale {o.upscale:g}, sampler {o.sampler}, steps {o.steps}, "
        f"cfg_scale {o.cfg_scale:g}, seed {o.seed})"
    )


def table_metrics(cfg: ReproduceConfig) -> tuple[str, ...]:
    """The table's columns: the run's metrics, then those only the paper or a reference reports."""
    reported = [cfg.paper.get("values") or {}, *(r["values"] for r in cfg.reference)]
    extra = {m for values in reported for m in values if m not in cfg.metrics}
    rank = {m: i for i, m in enumerate(COLUMN_ORDER)}
    return (*cfg.metrics, *sorted(extra, key=lambda m: (rank.get(m, len(rank)), m)))


def _header(cfg: ReproduceConfig, metric: str) -> str:
    mark = "" if metric in cfg.metrics else "†" if metric in NOT_COMPUTED else "*"
    return f"{metric.upper()}{'↓' if metric in LOWER else '↑'}{mark}"


def render_table(
    cfg: ReproduceConfig, summary: Mapping[str, Any] | None, steps: Sequence[Step]
) -> str:
    """Markdown: the paper's row (when it has numbers), each reference row and this run's, where
    the numbers come from, and the steps. `summary` None (a dry run): this run's cells empty."""
    metrics = table_metrics(cfg)
    paper = cfg.paper.get("values") or {}
    means = (summary or {}).get("means", {})
    rows = []
    if paper:
        rows.append(
            (f"{METHODS[cfg.method]}, paper", [_reported(m, paper.get(m)) for m in metrics])
        )
    for ref in cfg.reference:
        rows.append((ref["label"], [_reported(m, ref["values"].get(m)) for m in metrics]))
    ours = [_format(m, means.get(m)) if m in cfg.metrics else EMPTY for m in metrics]
    rows.append((run_label(cfg), ours))
    lines = [
        f"## {cfg.title}",
        "",
        "| | " + " | ".join(_header(cfg, m) for m in metrics) + " |",
        "|---|" + "---|" * len(metrics),
        *(f"| {_cell(label)} | " + " | ".join(cells) + " |" for label, cells in rows),
        "",
    ]
    if summary is None:
        lines.append(f"- this run: not run yet (dry run); its cells are {EMPTY} until a run")
    source = cfg.paper.get("source")
    if paper and source:
        lines.append(f"- paper numbers: {source}")
    else:
        # an empty row, never a guess: the config holds only numbers read in the paper
        lines.append("- paper numbers: none in the config (see the note)")
    if cfg.paper.get("note"):
        lines.append(f"- note: {cfg.paper['note']}")
    if cfg.reference:
        lines.append(f"- reference rows: {REFERENCE_NOTES[cfg.method]}")
    for ref in cfg.reference:
        note = f" Note: {ref['note']}" if ref.get("note") else ""
        lines.append(f"- {ref['label']}: {ref['source']}. Protocol: {ref['protocol']}.{note}")
    if any(m not in cfg.metrics and m not in NOT_COMPUTED for m in metrics):
        lines.append("- *: not among this run's metrics (add it with --metrics)")
    if any(m in NOT_COMPUTED for m in metrics):
        lines.append("- †: not implemented by model.eval.scoring; the reported number only")
    if summary is not None:
        counts = ", ".join(f"{m} {n}" for m, n in summary.get("counts", {}).items())
        lines.append(f"- images: {summary.get('images', 0)}; scored per metric: {counts}")
        lines += [f"- error: {message}" for message in summary.get("errors", {}).values()]
        if summary.get("missing_gt"):
            lines.append(f"- no ground truth for: {', '.join(summary['missing_gt'])}")
    lines += ["", "Steps:", "", "```text", format_steps(steps), "```", ""]
    return "\n".join(lines)
