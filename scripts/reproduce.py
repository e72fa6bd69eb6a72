"""Reproduce one benchmark table of the DiffBIR or DiffIR paper: test set -> restoration ->
metrics -> table.

A config under configs/reproduce/ (read and checked by `model.eval.reproduce`) names the test
set, the method (DiffBIR, or `method: diffir`: DiffIRS2-GAN.pth from --weights-dir unless the
config names a `checkpoint`), the DiffBIR task and version, the sampling settings
(`inference`: `PipelineOptions` fields), the evaluation settings (`evaluate`: `EvalConfig`
fields), the metrics, the paper's numbers with their source and other measurements
(`reference`, each with its source and protocol). The steps, each a library call (see --dry-run):

1. make the test set under OUT/testset with `dataset.testsets` (synthetic configs; reused when
   its meta.json records the same settings and source),
2. restore it into OUT/restored with the pipeline of `model.pipelines.loading` (DiffIR:
   `model.diffir.pipeline`) and the folder runner that inference.py uses (finished images are
   skipped on a rerun),
3. score OUT/restored into OUT/eval with `model.eval.scoring` (metrics.csv, summary.json,
   summary.md),
4. write OUT/table.md: the paper's row (when the config has its numbers) and each reference row
   next to this run's, then the steps and their settings.

    python -m scripts.reproduce --config configs/reproduce/bsr_synthetic_div2k.yaml \\
        --data data/DIV2K_valid_HR --out results/bsr_synthetic_div2k
    python -m scripts.reproduce --config ... --data ... --out ... --dry-run   # table + steps
    python -m scripts.reproduce ... --set inference.steps=20 --set version=v2.1   # overrides

`--dry-run` prints the table with this run's cells empty ("—") and the steps, and writes
nothing. `--set KEY=VALUE` changes any config entry (dotted path, YAML value) before the run.
Under torchrun (`torchrun --nproc-per-node 4 -m scripts.reproduce ...`) rank 0 makes the test
set, every process restores and scores its share, and rank 0 writes the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from dataset.testsets import TestsetConfig, existing_testset, make_testset
from model.diffir.pipeline import DEFAULT_WEIGHTS as DIFFIR_WEIGHTS
from model.diffir.pipeline import DiffIRPipeline
from model.eval.reproduce import (
    ConfigError,
    ReproduceConfig,
    Step,
    check_keys,
    eval_config,
    load_config,
    render_table,
)
from model.eval.scoring import EvalConfig, evaluate_folder
from model.io.checkpoint import WeightFileError
from model.io.claims import Claims
from model.io.folder_jobs import (
    OutputSettings,
    check_writable,
    collect_inputs,
    make_jobs,
    triage,
)
from model.io.logs import setup_logging
from model.io.weights import DEFAULT_WEIGHTS_DIR, REGISTRY, MissingWeightsError
from model.pipelines.distributed import Dist, all_gather, device_for, from_env, run_id, shutdown
from model.pipelines.folder_run import Counts, FolderRunner, finish, run_record
from model.pipelines.loading import load_pretrained_task
from model.pipelines.restorer import Pipeline

log = logging.getLogger(__name__)

TESTSET_KEYS = [f.name for f in dataclasses.fields(TestsetConfig) if f.name not in ("gt", "out")]


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Command-line settings that are not part of a config.

    Args:
        data: GT source folder (synthetic), or the folder holding the test set's images.
        out: output folder (testset/, restored/, eval/, table.md).
        weights_dir: released weights folder (downloads go here).
        model_config: architecture YAML (tiny weights), or None.
        device: "auto", "cuda", "mps" or "cpu" (restoration and metrics).
        precision: "fp32", "fp16" or "bf16".
        offline: never download weights.
        overwrite: restore images again even when their outputs exist.
        limit: only the first N test images (sorted; synthetic: N source images), or None.
        metric_weights_dir: pyiqa weights folder, or None.
    """

    data: Path
    out: Path
    weights_dir: Path = DEFAULT_WEIGHTS_DIR
    model_config: Path | None = None
    device: str = "auto"
    precision: str = "fp32"
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


# --------------------------------------------------------------------------- plan


def testset_config(cfg: ReproduceConfig, opts: RunOptions) -> TestsetConfig | None:
    """The synthetic test set of `cfg` (from `opts.data` into OUT/testset), or None."""
    if cfg.data["kind"] != "synthetic":
        return None
    settings = {k: v for k, v in cfg.data.items() if k not in ("kind", "source")}
    check_keys(settings, TESTSET_KEYS, f"{cfg.path}: data", "test-set setting")
    if opts.limit is not None:
        settings["limit"] = opts.limit
    try:
        return TestsetConfig(gt=opts.data, out=opts.testset, **settings)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cfg.path}: data: {e}") from e


def restore_limit(testset: TestsetConfig | None, opts: RunOptions) -> int | None:
    """--limit as the restoration applies it: a synthetic set is limited when it is made."""
    return None if testset is not None else opts.limit


def image_folders(cfg: ReproduceConfig, opts: RunOptions) -> tuple[Path, Path | None]:
    """(LQ folder, GT folder or None) that restoration and scoring read."""
    if cfg.data["kind"] == "synthetic":
        return opts.testset / "lq", opts.testset / "gt"
    gt = opts.data / cfg.data["gt"] if cfg.data["kind"] == "paired" else None
    return opts.data / cfg.data["lq"], gt


def plan(
    cfg: ReproduceConfig, opts: RunOptions, testset: TestsetConfig | None, scoring: EvalConfig
) -> list[Step]:
    """The steps of a run with the settings each runs with."""
    steps = []
    if testset is not None:
        where = {"gt": testset.gt, "out": testset.out}
        steps.append(Step("make_testset", "reused when its meta.json matches",
                          {**where, **testset.settings()}))  # fmt: skip
    restore = {
        "input": image_folders(cfg, opts)[0], "output": opts.restored, "task": cfg.task,
        "version": cfg.version, "device": opts.device, "precision": opts.precision,
        "weights_dir": opts.weights_dir, "model_config": opts.model_config,
        "offline": opts.offline, "overwrite": opts.overwrite,
        "limit": restore_limit(testset, opts), **cfg.option_settings(),
    }  # fmt: skip
    if cfg.method == "diffir":  # one network: no version, precision or architecture YAML
        for key in ("version", "precision", "model_config"):
            del restore[key]
        restore = {"method": "diffir", "weights": diffir_weights(cfg, opts), **restore}
    steps.append(Step("restore", "finished images are skipped", restore))
    score = {f.name: getattr(scoring, f.name) for f in dataclasses.fields(scoring)}
    steps.append(Step("evaluate", "", {**score, "out": opts.eval_dir}))
    steps.append(
        Step("table", "paper and reference rows next to this run's", {"out": opts.out / "table.md"})
    )
    return steps


def diffir_weights(cfg: ReproduceConfig, opts: RunOptions) -> Path:
    """DiffIR's weights: the config's `checkpoint` (relative: under --weights-dir), else
    DiffIRS2-GAN.pth in --weights-dir."""
    return opts.weights_dir / (cfg.checkpoint or REGISTRY[DIFFIR_WEIGHTS].filename)


# --------------------------------------------------------------------------- run


def load_pipeline(cfg: ReproduceConfig, opts: RunOptions, dist: Dist) -> Pipeline:
    """The restoration pipeline of `cfg` on this process's device."""
    device = device_for(opts.device, dist)
    if cfg.method == "diffir":
        weights = diffir_weights(cfg, opts)
        if cfg.checkpoint is not None and not weights.is_file():
            raise ConfigError(f"{cfg.path}: checkpoint {weights}: file not found")
        folder_or_file = weights if cfg.checkpoint else opts.weights_dir
        return DiffIRPipeline.from_pretrained(folder_or_file, device, offline=opts.offline)
    return load_pretrained_task(
        cfg.version, cfg.task, weights_dir=opts.weights_dir, device=device,
        dtype=opts.precision, model_config=opts.model_config, offline=opts.offline,
    )  # fmt: skip


def restore(cfg: ReproduceConfig, opts: RunOptions, limit: int | None, dist: Dist) -> int:
    """Restore the first `limit` LQ images (None: all) into OUT/restored, finished ones skipped,
    shared by the processes of `dist`; returns 0, or 1 when some failed."""
    settings = OutputSettings(opts.restored)
    model_config = None if opts.model_config is None else str(opts.model_config)
    parameters = {"method": cfg.method, "version": cfg.version, "task": cfg.task,
                  "precision": opts.precision, "model_config": model_config,
                  "options": dataclasses.asdict(cfg.options)}  # fmt: skip
    if cfg.method == "diffir":
        parameters["weights"] = str(diffir_weights(cfg, opts))
    pipeline = None
    try:
        files, root, captions = collect_inputs(str(image_folders(cfg, opts)[0]), opts.restored)
        jobs = make_jobs(files[:limit], root, settings, captions)
        check_writable(opts.restored, "--out")
        todo, skipped, skipped_other = triage(jobs, parameters, opts.overwrite)
        if todo:
            pipeline = load_pipeline(cfg, opts, dist)
    except (MissingWeightsError, WeightFileError, ValueError, OSError) as e:
        raise ConfigError(f"restore: {e}") from e
    claims, counts = Claims(run_id(dist), dist.rank, dist.world_size), Counts()
    if pipeline is not None:
        arguments = {"config": str(cfg.path), **vars(opts)}
        record = run_record(pipeline, cfg.options, cfg.version, cfg.task, arguments, parameters,
                            model_config)  # fmt: skip
        runner = FolderRunner(pipeline, cfg.options, record, settings, claims,
                              overwrite=opts.overwrite, progress=False)  # fmt: skip
        counts = runner.run(todo)
    summary = finish(dist, claims, counts, jobs, skipped, skipped_other)
    if dist.is_main:
        for line in summary.lines(opts.restored):
            log.info("restore: %s", line.strip())
    return summary.exit_code


def _testset(testset: TestsetConfig) -> dict:
    """The test set's meta.json, made first unless an existing one records the same settings."""
    try:
        meta = existing_testset(testset)
    except ValueError as e:
        raise ConfigError(f"{e}; choose a new --out") from e
    if meta is None:
        meta = make_testset(testset)
    else:
        log.info("%s: test set already made; reused", testset.out)
    if not meta["images"]:
        raise ConfigError(f"{testset.out}: no test images could be made from {testset.gt}")
    return meta


def run(
    cfg: ReproduceConfig,
    opts: RunOptions,
    testset: TestsetConfig | None,
    scoring: EvalConfig,
    steps: list[Step],
    dist: Dist,
) -> int:
    """Run the steps and write OUT/table.md; 0 ok, 1 partly failed, 2 could not finish. Rank 0
    makes the test set (the others wait for it) and writes the table."""
    status = 0
    if testset is not None:
        meta = all_gather(dist, _testset(testset) if dist.is_main else None)[0]
        status = 1 if meta["skipped"] else 0
    status = max(status, restore(cfg, opts, restore_limit(testset, opts), dist))
    scoring = dataclasses.replace(scoring, device=device_for(scoring.device, dist))
    report, summary, _ = evaluate_folder(scoring, opts.eval_dir, dist)
    status = max(status, 1 if report.errors or not report.items else 0)
    if dist.is_main:
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
    p.add_argument("--weights-dir", type=Path, default=DEFAULT_WEIGHTS_DIR,
                   help="released weights folder (downloads go here)")  # fmt: skip
    p.add_argument("--model-config", type=Path, help="architecture YAML (tiny weights)")
    p.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), default="auto",
                   help="device of restoration and metrics")  # fmt: skip
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="network precision (default fp32, the original CLI's 'full')")  # fmt: skip
    p.add_argument("--offline", action="store_true", help="never download weights")
    p.add_argument("--overwrite", action="store_true", help="restore finished images again")
    p.add_argument("--limit", type=int, help="only the first N test images (sorted)")
    p.add_argument("--metrics", help="comma-separated metrics instead of the config's")
    p.add_argument("--metric-weights-dir", type=Path, help="pyiqa weights folder")
    set_help = "override a config entry, e.g. inference.steps=20 (repeatable)"
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    dry_help = "print the table (this run's cells empty) and the steps, and stop"
    p.add_argument("--dry-run", action="store_true", help=dry_help)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Reproduce one table; returns 0, 1 when some images or metrics failed, 2 on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
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
        if cfg.method == "diffir" and opts.precision != "fp32":
            raise ConfigError(f"--precision {opts.precision}: DiffIR runs in fp32 only")
        testset = testset_config(cfg, opts)
        lq, gt = image_folders(cfg, opts)
        scoring = eval_config(cfg, opts.restored, gt, opts.device, opts.metric_weights_dir)
        steps = plan(cfg, opts, testset, scoring)
        if args.dry_run:
            print(render_table(cfg, None, steps))
            return 0
        if not args.data.is_dir():
            raise ConfigError(f"--data {args.data}: not a folder")
        if testset is None and not lq.is_dir():
            raise ConfigError(f"{lq}: LQ folder of {cfg.name} not found (data.lq)")
        dist = from_env()
        try:
            return run(cfg, opts, testset, scoring, steps, dist)
        finally:
            shutdown(dist)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
