"""Reproduce one benchmark table of the DiffBIR paper: test set -> restoration -> metrics -> table.

A config under configs/reproduce/ names the test set (a synthetic protocol of
`scripts/make_testset.py`, or a public folder with or without ground truth), the DiffBIR
version and sampling settings (`inference.py` flags), the metrics (`scripts/evaluate.py`) and
the paper's numbers with their source. The steps, each an ordinary command (see --dry-run):

1. make the test set under OUT/testset (synthetic configs; reused when it is already there),
2. restore it into OUT/restored with inference.py (finished images are skipped on a rerun),
3. score OUT/restored into OUT/eval (metrics.csv, summary.json, summary.md),
4. write OUT/table.md: the paper's row next to this run's.

    python -m scripts.reproduce --config configs/reproduce/bsr_synthetic_div2k.yaml \\
        --data data/DIV2K_valid_HR --out results/bsr_synthetic_div2k
    python -m scripts.reproduce --config ... --data ... --out ... --dry-run   # print the steps
    python -m scripts.reproduce ... --set inference.steps=20 --set version=v2.1   # overrides

`--set KEY=VALUE` changes any config entry (dotted path, YAML value) before the run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from omegaconf import OmegaConf

from scripts import evaluate, make_testset

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DATA_KINDS = ("synthetic", "paired", "lq_only")
# inference.py / evaluate.py flags that reproduce.py sets itself: not allowed in a config
INFERENCE_RESERVED = frozenset(
    {"input", "output", "task", "version", "weights-dir", "model-config", "device", "precision",
     "offline", "no-progress", "overwrite"}
)  # fmt: skip
EVALUATE_RESERVED = frozenset({"results", "gt", "metrics", "out", "device", "metric-weights-dir"})
VALUE_FORMAT = {"psnr": ".2f", "musiq": ".2f", "fid": ".2f"}  # others: 4 decimals


class ConfigError(ValueError):
    """A config or command line that cannot be run (exit code 2)."""


@dataclass(frozen=True)
class RunOptions:
    """Command-line settings that are not part of a config.

    Args:
        data: GT source folder (synthetic), or the folder holding the test set's images.
        out: output folder (testset/, restored/, eval/, table.md).
        weights_dir: released weights folder for inference.py (None: its default).
        model_config: architecture YAML for inference.py (tiny weights), or None.
        device: "auto", "cuda", "mps" or "cpu" (inference and metrics).
        precision: inference.py --precision ("fp32", "fp16", "bf16"), or None for its default.
        offline: never download weights.
        overwrite: restore images again even when their outputs exist.
        limit: only the first N test images (sorted), or None for all.
        metric_weights_dir: pyiqa weights folder for evaluate.py, or None.
    """

    data: Path
    out: Path
    weights_dir: Path | None = None
    model_config: Path | None = None
    device: str = "auto"
    precision: str | None = None
    offline: bool = False
    overwrite: bool = False
    limit: int | None = None
    metric_weights_dir: Path | None = None

    @property
    def testset(self) -> Path:
        return self.out / "testset"

    @property
    def restored(self) -> Path:
        return self.out / "restored"

    @property
    def eval_dir(self) -> Path:
        return self.out / "eval"


@dataclass(frozen=True)
class Step:
    """One command of the sequence: its name, how a shell runs it, and its arguments."""

    name: str
    program: str
    argv: list[str]

    def shell(self) -> str:
        return " ".join([self.program, *(shlex.quote(a) for a in self.argv)])


# --------------------------------------------------------------------------- config


def load_inference_cli() -> ModuleType:
    """The repository's inference.py as a module (it is a top-level script, not a package)."""
    path = ROOT / "inference.py"
    module = sys.modules.get("inference")
    if module is not None and Path(getattr(module, "__file__", "")).resolve() == path:
        return module
    # its dataclasses look their module up in sys.modules while the file executes
    name = "inference" if module is None else "_diffbir_inference_cli"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: cannot load inference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def parser_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long flags of a parser (without "--") and their actions."""
    return {
        s[2:]: action
        for action in parser._actions
        for s in action.option_strings
        if s.startswith("--")
    }


def load_config(path: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a reproduce config, apply `KEY=VALUE` overrides and check it."""
    if not path.is_file():
        raise ConfigError(f"{path}: config not found")
    try:
        merged = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_container(merged, resolve=True)
    except Exception as e:  # omegaconf/yaml errors have many types; report one line
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: a reproduce config must be a mapping")
    check_config(cfg, path)
    return cfg


def _require(cfg: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = cfg.get(key)
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: `{key}` missing or not a {getattr(kind, '__name__', kind)}")
    return value


def check_config(cfg: dict[str, Any], path: Path) -> None:
    """Raise ConfigError naming `path` and the first problem of `cfg`."""
    where = str(path)
    for key in ("name", "title", "task", "version"):
        _require(cfg, key, str, where)
    data = _require(cfg, "data", dict, where)
    kind = data.get("kind")
    if kind not in DATA_KINDS:
        raise ConfigError(f"{where}: data.kind must be one of {DATA_KINDS}, got {kind!r}")
    if kind == "synthetic":
        if data.get("protocol") not in make_testset.PROTOCOLS:
            raise ConfigError(f"{where}: data.protocol must be one of {make_testset.PROTOCOLS}")
        if data.get("crop", "center") not in make_testset.CROPS:
            raise ConfigError(f"{where}: data.crop must be one of {make_testset.CROPS}")
    else:
        _require(data, "lq", str, f"{where}: data")
        if kind == "paired":
            _require(data, "gt", str, f"{where}: data")
    metrics = _require(cfg, "metrics", list, where)
    unknown = [m for m in metrics if m not in evaluate.ALL_METRICS]
    if not metrics or unknown:
        raise ConfigError(f"{where}: unknown metrics {unknown}; choose from {evaluate.ALL_METRICS}")
    if kind == "lq_only" and any(m in (*evaluate.FULL_REFERENCE, "fid") for m in metrics):
        raise ConfigError(f"{where}: data without ground truth allows no-reference metrics only")
    paper = _require(cfg, "paper", dict, where)
    values = paper.get("values") or {}
    if not isinstance(values, dict) or any(
        m not in evaluate.ALL_METRICS or not isinstance(v, int | float) for m, v in values.items()
    ):
        raise ConfigError(f"{where}: paper.values must map metric names to numbers")
    for section in ("inference", "evaluate"):
        if not isinstance(cfg.get(section, {}), dict):
            raise ConfigError(f"{where}: `{section}` must be a mapping of flags to values")


def flag_args(
    values: Mapping[str, Any],
    flags: Mapping[str, argparse.Action],
    reserved: frozenset[str],
    where: str,
) -> list[str]:
    """`--flag value` arguments from a {flag: value} mapping; True/False switch bare flags."""
    argv: list[str] = []
    for key, value in values.items():
        if key in reserved or key not in flags:
            why = "is set by reproduce.py" if key in reserved else "is not a flag"
            raise ConfigError(f"{where}: `{key}` {why}")
        if flags[key].nargs == 0:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: `{key}` is a switch; give true or false")
            argv += [f"--{key}"] if value else []
        elif value is not None:
            if isinstance(value, dict | list):
                raise ConfigError(f"{where}: `{key}` needs a single value")
            argv += [f"--{key}", str(value)]
    return argv


# --------------------------------------------------------------------------- plan


def image_folders(cfg: Mapping[str, Any], opts: RunOptions) -> tuple[Path, Path | None]:
    """(LQ folder, GT folder or None) that inference and evaluation read."""
    data = cfg["data"]
    if data["kind"] == "synthetic":
        return opts.testset / "lq", opts.testset / "gt"
    gt = opts.data / data["gt"] if data["kind"] == "paired" else None
    return opts.data / data["lq"], gt


def uses_input_list(cfg: Mapping[str, Any], opts: RunOptions) -> bool:
    """True when inference reads OUT/inputs.txt: --limit on a set make_testset did not make."""
    return opts.limit is not None and cfg["data"]["kind"] != "synthetic"


def testset_settings(cfg: Mapping[str, Any], opts: RunOptions) -> dict[str, Any]:
    """The settings make_testset records in meta.json for this config."""
    data = cfg["data"]
    limit = opts.limit if opts.limit is not None else data.get("limit")
    return {
        "protocol": data["protocol"],
        "seed": int(data.get("seed", 0)),
        "crop": data.get("crop", make_testset.DEFAULT_CROP[data["protocol"]]),
        "crop_size": int(data.get("crop_size", 512)),
        "crops_per_image": int(data.get("crops_per_image", 1)),
        "limit": limit,
    }


def _testset_step(cfg: Mapping[str, Any], opts: RunOptions) -> Step:
    s = testset_settings(cfg, opts)
    argv = ["--protocol", s["protocol"], "--gt", str(opts.data), "--out", str(opts.testset)]
    argv += ["--seed", str(s["seed"]), "--crop", s["crop"], "--crop-size", str(s["crop_size"])]
    argv += ["--crops-per-image", str(s["crops_per_image"])]
    argv += [] if s["limit"] is None else ["--limit", str(s["limit"])]
    return Step("make_testset", "python -m scripts.make_testset", argv)


def _inference_step(cfg: Mapping[str, Any], opts: RunOptions, inference_cli: ModuleType) -> Step:
    # with --limit, a folder of given images is read through a list of its first N files
    lq = opts.out / "inputs.txt" if uses_input_list(cfg, opts) else image_folders(cfg, opts)[0]
    flags = parser_flags(inference_cli.build_parser())
    for key in ("task", "version"):
        if cfg[key] not in (flags[key].choices or ()):
            raise ConfigError(f"{cfg['name']}: {key} {cfg[key]!r} not in {flags[key].choices}")
    argv = ["--input", str(lq), "--output", str(opts.restored)]
    argv += ["--task", cfg["task"], "--version", cfg["version"], "--device", opts.device]
    for flag, value in (("weights-dir", opts.weights_dir), ("model-config", opts.model_config),
                        ("precision", opts.precision)):  # fmt: skip
        argv += [] if value is None else [f"--{flag}", str(value)]
    argv += ["--no-progress"] + ["--offline"] * opts.offline + ["--overwrite"] * opts.overwrite
    where = f"{cfg['name']}: inference"
    argv += flag_args(cfg.get("inference", {}), flags, INFERENCE_RESERVED, where)
    return Step("inference", "python inference.py", argv)


def _evaluate_step(cfg: Mapping[str, Any], opts: RunOptions) -> Step:
    gt = image_folders(cfg, opts)[1]
    argv = ["--results", str(opts.restored), "--metrics", ",".join(cfg["metrics"])]
    argv += ["--out", str(opts.eval_dir), "--device", opts.device]
    argv += [] if gt is None else ["--gt", str(gt)]
    if opts.metric_weights_dir is not None:
        argv += ["--metric-weights-dir", str(opts.metric_weights_dir)]
    flags = parser_flags(evaluate.build_parser())
    argv += flag_args(cfg.get("evaluate", {}), flags, EVALUATE_RESERVED, f"{cfg['name']}: evaluate")
    return Step("evaluate", "python -m scripts.evaluate", argv)


def plan(cfg: Mapping[str, Any], opts: RunOptions, inference_cli: ModuleType) -> list[Step]:
    """The command sequence of `cfg`; every config flag is checked against its CLI's parser."""
    steps = [_testset_step(cfg, opts)] if cfg["data"]["kind"] == "synthetic" else []
    return [*steps, _inference_step(cfg, opts, inference_cli), _evaluate_step(cfg, opts)]


# --------------------------------------------------------------------------- table


def _format(metric: str, value: Any) -> str:
    if isinstance(value, str):  # inf/nan come back from summary.json as strings
        return value
    return f"{value:{VALUE_FORMAT.get(metric, '.4f')}}" if value is not None else "–"


def run_label(cfg: Mapping[str, Any]) -> str:
    """'this run (v2; sampler spaced, steps 50, ...)' from the config's key settings."""
    inference = cfg.get("inference", {})
    keys = ("upscale", "sampler", "steps", "cfg-scale", "seed")
    settings = ", ".join(f"{k} {inference[k]}" for k in keys if k in inference)
    return (
        f"this run ({cfg['version']}; {settings})" if settings else f"this run ({cfg['version']})"
    )


def render_table(cfg: Mapping[str, Any], summary: Mapping[str, Any], steps: list[Step]) -> str:
    """Markdown: the paper's row and this run's, then where the numbers come from."""
    metrics = cfg["metrics"]
    paper = cfg["paper"]
    values = paper.get("values") or {}
    means = summary.get("means", {})
    arrow = {m: "↓" if m in evaluate.LOWER_IS_BETTER else "↑" for m in metrics}
    lines = [
        f"## {cfg['title']}",
        "",
        "| | " + " | ".join(f"{m.upper()}{arrow[m]}" for m in metrics) + " |",
        "|---|" + "---|" * len(metrics),
        "| DiffBIR, paper | " + " | ".join(str(values.get(m, "–")) for m in metrics) + " |",
        f"| {run_label(cfg)} | " + " | ".join(_format(m, means.get(m)) for m in metrics) + " |",
        "",
    ]
    source = paper.get("source")
    if values and source:
        lines.append(f"- paper numbers: {source}")
    else:
        # an empty row, never a guess: the config holds only numbers read in the paper
        lines.append("- paper numbers: none in the config (see the note)")
    if paper.get("note"):
        lines.append(f"- note: {paper['note']}")
    counts = ", ".join(f"{m} {n}" for m, n in summary.get("counts", {}).items())
    lines.append(f"- images: {summary.get('images', 0)}; scored per metric: {counts}")
    lines += [f"- error: {message}" for message in summary.get("errors", {}).values()]
    if summary.get("missing_gt"):
        lines.append(f"- no ground truth for: {', '.join(summary['missing_gt'])}")
    lines += ["", "Commands:", "", "```bash", *(step.shell() for step in steps), "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- run


def _call(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run a CLI's main in-process; argparse's SystemExit becomes its code."""
    try:
        return int(main(argv) or 0)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2


def testset_ready(cfg: Mapping[str, Any], opts: RunOptions) -> bool:
    """True when OUT/testset already holds this test set; ConfigError when it holds another."""
    meta_path = opts.testset / "meta.json"
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    expected = testset_settings(cfg, opts)
    if meta.get("settings") != expected or meta.get("gt_source") != str(opts.data):
        raise ConfigError(
            f"{opts.testset}: holds a test set made with other settings or data "
            f"({meta.get('settings')}, from {meta.get('gt_source')}); choose a new --out"
        )
    return True


def write_input_list(lq: Path, opts: RunOptions) -> None:
    """OUT/inputs.txt: the first `opts.limit` images of `lq` (for inference.py --input)."""
    files = evaluate.list_images(lq)[: opts.limit]
    opts.out.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{p.resolve()}\n" for p in files)
    (opts.out / "inputs.txt").write_text(text, encoding="utf-8")


def run(
    cfg: Mapping[str, Any], opts: RunOptions, steps: list[Step], inference_cli: ModuleType
) -> int:
    """Run the steps and write OUT/table.md; 0 ok, 1 partly failed, 2 could not finish."""
    status = 0
    runners = {"make_testset": make_testset.main, "inference": inference_cli.main,
               "evaluate": evaluate.main}  # fmt: skip
    for step in steps:
        if step.name == "make_testset" and testset_ready(cfg, opts):
            log.info("%s: test set already made; reused", opts.testset)
            continue
        if step.name == "inference" and uses_input_list(cfg, opts):
            write_input_list(image_folders(cfg, opts)[0], opts)
        log.info("%s: %s", step.name, step.shell())
        code = _call(runners[step.name], step.argv)
        lq = opts.testset / "lq"
        # make_testset exits with 1 when it skipped a source image; fatal only if none is left
        if code == 2 or (step.name == "make_testset" and code and not any(lq.glob("**/*.png"))):
            log.error("%s failed (exit code %d); stopping", step.name, code)
            return 2
        status = max(status, min(code, 1))
    summary = json.loads((opts.eval_dir / "summary.json").read_text(encoding="utf-8"))
    table = render_table(cfg, summary, steps)
    (opts.out / "table.md").write_text(table, encoding="utf-8")
    print(table)
    return status


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")[0]
    p = argparse.ArgumentParser(description=doc, prog="python -m scripts.reproduce")
    p.add_argument("--config", type=Path, required=True, help="a YAML of configs/reproduce/")
    data_help = "GT source folder (synthetic configs) or the test set's folder"
    p.add_argument("--data", type=Path, required=True, help=data_help)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--weights-dir", type=Path, help="released weights folder (inference.py)")
    p.add_argument("--model-config", type=Path, help="architecture YAML (tiny weights)")
    p.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), default="auto",
                   help="device of inference and metrics")  # fmt: skip
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="network precision (default fp32, the original CLI's 'full')")  # fmt: skip
    p.add_argument("--offline", action="store_true", help="never download weights")
    p.add_argument("--overwrite", action="store_true", help="restore finished images again")
    p.add_argument("--limit", type=int, help="only the first N test images (sorted)")
    p.add_argument("--metrics", help="comma-separated metrics instead of the config's")
    p.add_argument("--metric-weights-dir", type=Path, help="pyiqa weights folder (evaluate.py)")
    set_help = "override a config entry, e.g. inference.steps=20 (repeatable)"
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Reproduce one table; returns 0, 1 when some images or metrics failed, 2 on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    overrides = list(args.set)
    if args.metrics:
        overrides.append(f"metrics=[{args.metrics}]")
    opts = RunOptions(
        data=args.data,
        out=args.out,
        weights_dir=args.weights_dir,
        model_config=args.model_config,
        device=args.device,
        precision=args.precision,
        offline=args.offline,
        overwrite=args.overwrite,
        limit=args.limit,
        metric_weights_dir=args.metric_weights_dir,
    )
    try:
        cfg = load_config(args.config, overrides)
        inference_cli = load_inference_cli()
        steps = plan(cfg, opts, inference_cli)
        if args.dry_run:
            print("\n".join(step.shell() for step in steps))
            print(f"# then: write {opts.out / 'table.md'} (paper row next to this run's)")
            return 0
        if not args.data.is_dir():
            raise ConfigError(f"--data {args.data}: not a folder")
        lq = image_folders(cfg, opts)[0]
        if cfg["data"]["kind"] != "synthetic" and not lq.is_dir():
            raise ConfigError(f"{lq}: LQ folder of {cfg['name']} not found (data.lq)")
        return run(cfg, opts, steps, inference_cli)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
