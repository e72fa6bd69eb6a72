"""Stage-1 validation metrics, including LPIPS from a local weights folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from model.eval.iqa import MetricUnavailable, weights_location
from model.nets.swinir import SwinIR
from model.train.stage1 import Stage1System


def tiny_swinir() -> SwinIR:
    return SwinIR(
        img_size=64, embed_dim=24, depths=[2], num_heads=[2], window_size=8, sf=8,
        upsampler="nearest+conv", unshuffle=True, unshuffle_scale=8,
    )  # fmt: skip


def stand_in_lpips_weights(folder: Path) -> None:
    """Random weights under the file names pyiqa's LPIPS (and its AlexNet) load offline."""
    import pyiqa.archs.lpips_arch as lpips_arch

    (folder / "pyiqa").mkdir(parents=True)
    (folder / "checkpoints").mkdir()
    torch.save(
        torchvision.models.alexnet().state_dict(),
        folder / "checkpoints" / "alexnet-owt-7be5be79.pth",
    )
    with weights_location(folder):  # its AlexNet reads the file written above
        lpips = lpips_arch.LPIPS(pretrained=False)
    torch.save(lpips.state_dict(), folder / "pyiqa" / "LPIPS_v0.1_alex-df73285e.pth")


def test_validation_logs_lpips_when_weights_are_given(tmp_path: Path, monkeypatch) -> None:
    stand_in_lpips_weights(tmp_path)
    system = Stage1System(tiny_swinir(), lpips_weights_dir=str(tmp_path))
    system.setup("fit")
    logged = {}
    monkeypatch.setattr(system, "log_dict", lambda metrics, **_: logged.update(metrics))
    batch = {"lq": torch.rand(2, 3, 64, 64), "hq": torch.rand(2, 3, 64, 64)}
    with torch.no_grad():
        system.validation_step(batch, 1)
    assert set(logged) == {"val/psnr", "val/ssim", "val/psnr_lq", "val/loss", "val/lpips"}
    assert logged["val/lpips"].shape == () and torch.isfinite(logged["val/lpips"])
    assert not any("lpips" in k for k in system.state_dict())


def test_missing_lpips_weights_name_the_file(tmp_path: Path) -> None:
    system = Stage1System(tiny_swinir(), lpips_weights_dir=str(tmp_path))
    with pytest.raises(MetricUnavailable, match="LPIPS_v0.1_alex-df73285e.pth"):
        system.setup("fit")
