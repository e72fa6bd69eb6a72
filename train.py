"""Train stage 1 (restoration network) or stage 2 (LAControlNet) from a YAML config.

    python train.py --config configs/train/stage1.yaml
    python train.py --config configs/tiny/stage1.yaml trainer.max_steps=20   # dotted overrides
    python train.py --config configs/train/stage1.yaml --resume last          # continue a run

The config has `system` (a LightningModule with its network, built recursively),
`data` (a LightningDataModule with its datasets), `trainer` (pl.Trainer arguments),
`logger`, `checkpoint`, `export_prefix`, `seed` and `output_dir`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pytorch_lightning as pl
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.callbacks import LearningRateMonitor

from model.io.logs import setup_logging
from model.train.checkpointing import ResumeError, StepCheckpoint, checkpoint_step, resolve_resume
from model.train.config_keys import ConfigKeyError, check_config
from model.train.console import ConsoleProgress, quiet_lightning
from model.train.export import ExportWeights
from model.train.instantiate import TargetError, instantiate
from model.train.loggers import build_logger
from model.train.seeding import RandomStreams

log = logging.getLogger("train")


class UsageError(Exception):
    """A problem found before training starts (exit code 2)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML training config")
    parser.add_argument(
        "--resume",
        default=None,
        help="Lightning checkpoint to resume from, or 'last' for <output_dir>/checkpoints/last.ckpt",
    )
    parser.add_argument("--output-dir", default=None, help="override the config's output_dir")
    parser.add_argument(
        "overrides", nargs="*", help="dotted config overrides, e.g. trainer.max_steps=100"
    )
    return parser.parse_intermixed_args(argv)


def load_config(path: str, overrides: list[str]) -> DictConfig:
    """Read the YAML config, check the override keys (`ConfigKeyError`) and apply them."""
    if not Path(path).is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        cfg = OmegaConf.load(path)
        check_config(OmegaConf.to_container(cfg), overrides)
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise UsageError(f"--config {path}: {str(e).splitlines()[0]}") from e


def finished(resume_from: Path, cfg: DictConfig) -> bool:
    """True (and says so) when the checkpoint already reached `trainer.max_steps`."""
    step, max_steps = checkpoint_step(resume_from), cfg.trainer.get("max_steps", -1)
    if max_steps is None or not 0 <= max_steps <= step:
        return False
    log.info(
        "%s is at step %d: the run is finished (trainer.max_steps=%d); to train further, "
        "resume with trainer.max_steps=<N> for some N > %d",
        resume_from,
        step,
        max_steps,
        step,
    )
    return True


def main(argv: list[str] | None = None) -> int:
    setup_logging(logging.INFO, "%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    quiet_lightning(resuming=args.resume is not None)
    try:
        cfg = load_config(args.config, args.overrides)
        output_dir = Path(args.output_dir or cfg.get("output_dir", "runs/default"))
        ckpt_dir = output_dir / "checkpoints"
        resume_from = resolve_resume(args.resume, ckpt_dir)  # fail before loading any weights
        if resume_from is not None and finished(resume_from, cfg):
            return 0
    except (UsageError, ConfigKeyError, ResumeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seed = cfg.get("seed", 231)
    pl.seed_everything(seed, workers=True, verbose=False)  # the same initial weights on every rank

    try:
        system = instantiate(cfg.system)
        datamodule = instantiate(cfg.data)
        trainer_args = instantiate(cfg.trainer)  # a strategy may be a {target, params} mapping
    except TargetError as e:
        print(f"error: --config {args.config}: {e}", file=sys.stderr)
        return 2
    progress_bar = trainer_args.pop("enable_progress_bar", True)
    callbacks = [
        StepCheckpoint(ckpt_dir, cfg.get("checkpoint", {}).get("every_n_train_steps", 1000)),
        LearningRateMonitor(logging_interval="step"),
        ExportWeights(dirpath=output_dir / "weights", prefix=cfg.get("export_prefix", "network")),
        RandomStreams(seed),
        ConsoleProgress(bar=progress_bar),
    ]
    trainer = pl.Trainer(
        **trainer_args,
        default_root_dir=str(output_dir),
        logger=build_logger(cfg.get("logger", {}), output_dir, resuming=resume_from is not None),
        callbacks=callbacks,
        enable_progress_bar=False,  # ConsoleProgress counts steps, not epochs
        use_distributed_sampler=False,  # the DataModule shards by rank itself (resumable order)
    )
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, output_dir / "config.yaml")
    try:
        trainer.fit(system, datamodule=datamodule, ckpt_path=resume_from)
    except ResumeError as e:
        print(f"error: --resume {resume_from}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
