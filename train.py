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
import warnings
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

from model.io.logs import setup_logging
from model.train.export import ExportWeights
from model.train.instantiate import instantiate

LOGGERS = ("tensorboard", "wandb", "csv")


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
    """Read the YAML config and apply `key=value` overrides."""
    cfg = OmegaConf.load(path)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))


def build_logger(cfg: DictConfig, output_dir: Path) -> Logger:
    """TensorBoard by default; `logger.type` selects wandb or csv."""
    kind = cfg.get("type", "tensorboard")
    name = cfg.get("name", "run")
    if kind == "tensorboard":
        return TensorBoardLogger(save_dir=str(output_dir), name="logs", version=name)
    if kind == "csv":
        return CSVLogger(save_dir=str(output_dir), name="logs", version=name)
    if kind == "wandb":
        return WandbLogger(
            save_dir=str(output_dir), project=cfg.get("project", "diffbir"), name=name
        )
    raise ValueError(f"logger.type must be one of {LOGGERS}, got {kind!r}")


def resolve_resume(resume: str | None, ckpt_dir: Path) -> str | None:
    """Map `--resume last` to the last checkpoint of this run; check explicit paths exist."""
    if resume is None:
        return None
    path = ckpt_dir / "last.ckpt" if resume == "last" else Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint to resume from not found")
    return str(path)


def main(argv: list[str] | None = None) -> int:
    setup_logging(logging.INFO, "%(asctime)s %(name)s: %(message)s")
    # The DataModule's sampler restores the data position itself (Lightning cannot see that).
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    output_dir = Path(args.output_dir or cfg.get("output_dir", "runs/default"))
    ckpt_dir = output_dir / "checkpoints"
    resume_from = resolve_resume(args.resume, ckpt_dir)  # fail before loading any weights
    pl.seed_everything(cfg.get("seed", 231), workers=True)

    system = instantiate(cfg.system)
    datamodule = instantiate(cfg.data)
    ckpt_cfg = cfg.get("checkpoint", {})
    callbacks = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="step{step:08d}",
            auto_insert_metric_name=False,
            every_n_train_steps=ckpt_cfg.get("every_n_train_steps", 1000),
            save_top_k=-1,
            save_last=True,
            # a resumed run (also one moved to another folder) updates last.ckpt instead of
            # writing last-v1.ckpt, which `--resume last` would never pick up
            enable_version_counter=False,
        ),
        LearningRateMonitor(logging_interval="step"),
        ExportWeights(dirpath=output_dir / "weights", prefix=cfg.get("export_prefix", "network")),
    ]
    trainer = pl.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        default_root_dir=str(output_dir),
        logger=build_logger(cfg.get("logger", {}), output_dir),
        callbacks=callbacks,
        use_distributed_sampler=False,  # the DataModule shards by rank itself (resumable order)
    )
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, output_dir / "config.yaml")
    trainer.fit(system, datamodule=datamodule, ckpt_path=resume_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())
