"""train.py's mistakes before training: one line naming the problem, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D
from pytorch_lightning.strategies import FSDPStrategy

import train
from model.train.instantiate import instantiate

CONFIG = "configs/tiny/stage1.yaml"


def error_of(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_missing_config_file_is_named(capsys, tmp_path: Path) -> None:
    err = error_of(capsys, ["--config", str(tmp_path / "nope.yaml")])
    assert err == f"error: --config {tmp_path / 'nope.yaml'}: no such file"


def test_resume_last_without_a_checkpoint_names_the_path(capsys, tmp_path: Path) -> None:
    err = error_of(capsys, ["--config", CONFIG, "--output-dir", str(tmp_path), "--resume", "last"])
    assert str(tmp_path / "checkpoints" / "last.ckpt") in err and "without --resume" in err


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("trainer.max_stepz=5", "trainer.max_steps"),
        ("system.params.learning_rat=1e-3", "system.params.learning_rate"),
        (
            "data.params.train_dataset.params.out_sise=32",
            "data.params.train_dataset.params.out_size",
        ),
        ("checkpoint.every_n_train_step=5", "checkpoint.every_n_train_steps"),
        ("sed=3", "seed"),
    ],
)
def test_a_mistyped_override_names_the_closest_key(capsys, override, suggestion) -> None:
    err = error_of(capsys, ["--config", CONFIG, override])
    key = override.split("=")[0]
    assert err == f"error: {key}: unknown config key; did you mean {suggestion}?"


def test_valid_new_keys_are_accepted() -> None:
    cfg = train.load_config(CONFIG, ["trainer.num_sanity_val_steps=0",
                                     "system.params.decay_steps=10", "logger.project=x"])  # fmt: skip
    assert cfg.trainer.num_sanity_val_steps == 0 and cfg.system.params.decay_steps == 10


def test_a_refused_target_is_one_line(capsys) -> None:
    err = error_of(capsys, ["--config", CONFIG, "system.target=os.system"])
    assert "os.system" in err and "not allowed" in err


def test_fsdp_for_stage2_is_a_config_choice() -> None:
    strategy = "trainer.strategy={target: model.train.strategies.fsdp_stage2, params: {}}"
    cfg = train.load_config("configs/train/stage2.yaml", [strategy])
    built = instantiate(cfg.trainer)["strategy"]
    assert isinstance(built, FSDPStrategy) and built.kwargs["use_orig_params"]
    assert CrossAttnDownBlock2D in built.kwargs["auto_wrap_policy"]._module_classes


def test_an_unreadable_checkpoint_is_one_line(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    err = error_of(capsys, ["--config", CONFIG, "--resume", str(bad)])
    assert err.startswith(f"error: --resume {bad}: not a readable checkpoint (")
