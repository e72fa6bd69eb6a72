"""Stage-1 registry: each cleaner loads its original key layout and maps [0, 1] images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES, load_fixture, strip_prefix
from torch import nn

from model.io.checkpoint import WeightFileError, save_safetensors
from model.nets.stage1 import STAGE1_MODELS, Stage1Model, load_stage1_model

pytest.importorskip("spandrel")


class _RDB(nn.Module):
    """KAIR ResidualDenseBlock_5C, written from the original's structure."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        for i in range(5):
            setattr(self, f"conv{i + 1}", nn.Conv2d(nf + i * gc, gc if i < 4 else nf, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for i in range(1, 5):
            feats.append(F.leaky_relu(getattr(self, f"conv{i}")(torch.cat(feats, 1)), 0.2))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class _RRDB(nn.Module):
    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.RDB1, self.RDB2, self.RDB3 = (_RDB(nf, gc) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.RDB3(self.RDB2(self.RDB1(x))) * 0.2 + x


class KairRRDBNet(nn.Module):
    """Reference RRDBNet with BSRNet.pth's key names (conv_first, RRDB_trunk, ..., conv_last)."""

    def __init__(self, nf: int = 64, nb: int = 23, gc: int = 32) -> None:
        super().__init__()
        self.conv_first = nn.Conv2d(3, nf, 3, 1, 1)
        self.RRDB_trunk = nn.Sequential(*(_RRDB(nf, gc) for _ in range(nb)))
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.upconv1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.upconv2 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.HRconv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fea = self.conv_first(x)
        fea = fea + self.trunk_conv(self.RRDB_trunk(fea))
        for up in (self.upconv1, self.upconv2):
            fea = F.leaky_relu(up(F.interpolate(fea, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.HRconv(fea), 0.2))


def scunet_layout(config: list[int], dim: int = 64, in_nc: int = 3) -> dict[str, tuple]:
    """Key → shape of the original SCUNet state dict (head_dim 32, window 8)."""
    layout: dict[str, tuple] = {"m_head.0.weight": (dim, in_nc, 3, 3)}

    def blocks(prefix: str, c: int, start: int, n: int) -> None:
        for i in range(start, start + n):
            p, t = f"{prefix}.{i}.", f"{prefix}.{i}.trans_block."
            layout.update({
                t + "ln1.weight": (c,), t + "ln1.bias": (c,),
                t + "msa.relative_position_params": (c // 32, 15, 15),
                t + "msa.embedding_layer.weight": (3 * c, c),
                t + "msa.embedding_layer.bias": (3 * c,),
                t + "msa.linear.weight": (c, c), t + "msa.linear.bias": (c,),
                t + "ln2.weight": (c,), t + "ln2.bias": (c,),
                t + "mlp.0.weight": (4 * c, c), t + "mlp.0.bias": (4 * c,),
                t + "mlp.2.weight": (c, 4 * c), t + "mlp.2.bias": (c,),
                p + "conv1_1.weight": (2 * c, 2 * c, 1, 1), p + "conv1_1.bias": (2 * c,),
                p + "conv1_2.weight": (2 * c, 2 * c, 1, 1), p + "conv1_2.bias": (2 * c,),
                p + "conv_block.0.weight": (c, c, 3, 3), p + "conv_block.2.weight": (c, c, 3, 3),
            })  # fmt: skip

    for level, name in enumerate(("m_down1", "m_down2", "m_down3")):
        width = dim * 2**level  # channels entering this stage; its blocks split them in two
        blocks(name, width // 2, 0, config[level])
        layout[f"{name}.{config[level]}.weight"] = (2 * width, width, 2, 2)
    blocks("m_body", 4 * dim, 0, config[3])
    for level, name in zip((2, 1, 0), ("m_up3", "m_up2", "m_up1"), strict=True):
        width = dim * 2**level
        layout[f"{name}.0.weight"] = (2 * width, width, 2, 2)  # ConvTranspose2d: (in, out, k, k)
        blocks(name, width // 2, 1, config[6 - level])
    layout["m_tail.0.weight"] = (in_nc, dim, 3, 3)
    return layout


def random_state(layout: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """Fixture-style random weights: N(0,1)/sqrt(fan_in), norm scales near 1, small biases."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        x = torch.randn(shape, generator=g)
        if len(shape) >= 2:
            state[key] = x / (torch.tensor(shape[1:]).prod().float().sqrt())
        else:
            state[key] = 1 + 0.1 * x if "ln" in key and key.endswith("weight") else 0.1 * x
    return state


def save_pth(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


@pytest.fixture()
def bsrnet_file(tmp_path: Path) -> tuple[Path, KairRRDBNet]:
    ref = KairRRDBNet(nf=8, nb=2).eval()
    return save_pth(ref.state_dict(), tmp_path / "BSRNet.pth"), ref


TINY_SCUNET = [2, 0, 0, 0, 0, 0, 1]


@pytest.fixture()
def scunet_file(tmp_path: Path) -> Path:
    return save_pth(random_state(scunet_layout(TINY_SCUNET)), tmp_path / "scunet.pth")


def test_registry_names() -> None:
    assert sorted(STAGE1_MODELS) == ["bsrnet", "scunet", "swinir"]


def test_bsrnet_matches_reference(bsrnet_file: tuple[Path, KairRRDBNet]) -> None:
    path, ref = bsrnet_file
    model = load_stage1_model("bsrnet", path)
    assert isinstance(model, Stage1Model)
    assert (model.scale, model.size_multiple, model.runs_before_upscale) == (4, 1, True)
    assert model.runs_after_raise is False
    assert not model.training
    lq = torch.rand(2, 3, 13, 17)
    with torch.no_grad():
        out, expected = model(lq), ref(lq)
    assert out.shape == (2, 3, 52, 68)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bsrnet_tiling(bsrnet_file: tuple[Path, KairRRDBNet]) -> None:
    model = load_stage1_model("bsrnet", bsrnet_file[0])
    lq = torch.rand(1, 3, 20, 24)
    with torch.no_grad():
        whole = model(lq)
        tiled = model(lq, tile_size=12, tile_stride=6)
        small = model(lq, tile_size=22)  # 20 < 22: the original runs the whole image
    assert tiled.shape == whole.shape == (1, 3, 80, 96)
    assert torch.equal(small, whole)
    assert not torch.equal(tiled, whole)
    # Tile centres see their full receptive field only approximately; the blend stays close.
    assert (tiled - whole).abs().mean() < 0.1 * whole.abs().mean()


def test_bsrnet_full_layout(tmp_path: Path) -> None:
    with torch.device("meta"):
        layout = {k: v.shape for k, v in KairRRDBNet().state_dict().items()}
    path = save_pth({k: torch.zeros(s) for k, s in layout.items()}, tmp_path / "BSRNet.pth")
    model = load_stage1_model("bsrnet", path)
    assert model.scale == 4
    assert sum(p.numel() for p in model.parameters()) == sum(s.numel() for s in layout.values())


def test_scunet_pads_like_the_original(scunet_file: Path) -> None:
    model = load_stage1_model("scunet", scunet_file)
    assert (model.scale, model.size_multiple, model.pad_mode) == (1, 64, "replicate")
    assert model.runs_before_upscale is False and model.runs_after_raise is False
    lq = torch.rand(1, 3, 70, 90)
    net = model.network.net  # the bare SCUNet, whose own padding is a no-op at ×64
    with torch.no_grad():
        out = model(lq)
        expected = net(F.pad(lq, (0, 38, 0, 58), mode="replicate"))[..., :70, :90]
        reflect = net(F.pad(lq, (0, 38, 0, 58), mode="reflect"))[..., :70, :90]
    assert out.shape == (1, 3, 70, 90) and out.isfinite().all()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert (out - reflect).abs().max() > 1e-3  # spandrel's default padding would differ


def test_scunet_loads_its_weights_exactly(scunet_file: Path) -> None:
    state = torch.load(scunet_file, weights_only=True)
    loaded = load_stage1_model("scunet", scunet_file).network.net.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_scunet_full_layout(tmp_path: Path) -> None:
    layout = scunet_layout([4] * 7)
    path = save_pth({k: torch.zeros(s) for k, s in layout.items()}, tmp_path / "scunet.pth")
    model = load_stage1_model("scunet", path)
    assert len(model.network.net.state_dict()) == len(layout) == 540


def test_swinir_matches_fixture(tmp_path: Path) -> None:
    tensors, meta = load_fixture("swinir_tiny")
    path = save_pth(strip_prefix(tensors, "swinir."), tmp_path / "swinir.pth")
    model = load_stage1_model("swinir", path, meta["config"])
    assert (model.scale, model.size_multiple, model.runs_before_upscale) == (1, 64, False)
    assert model.runs_after_raise is True  # the pipeline raises its input to 512 first
    with torch.no_grad():
        out = model(tensors["in.x_72x88"])
    torch.testing.assert_close(out, tensors["out.y_72x88_pad64"], atol=1e-4, rtol=1e-4)


def test_swinir_reads_safetensors_config(tmp_path: Path) -> None:
    tensors, meta = load_fixture("swinir_tiny")
    path = tmp_path / "swinir.safetensors"
    save_safetensors(strip_prefix(tensors, "swinir."), path, meta["config"])
    model = load_stage1_model("swinir", path)
    with torch.no_grad():
        out = model(tensors["in.x_64x128"])
    torch.testing.assert_close(out, tensors["out.y_64x128"], atol=1e-4, rtol=1e-4)


def test_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"w\.pth: unknown stage-1 model 'esrgan'.*bsrnet"):
        load_stage1_model("esrgan", tmp_path / "w.pth")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightFileError, match="BSRNet.pth: weight file not found"):
        load_stage1_model("bsrnet", tmp_path / "BSRNet.pth")


def test_wrong_files(
    bsrnet_file: tuple[Path, KairRRDBNet], scunet_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(WeightFileError, match=r"scunet\.pth: not a BSRNet"):
        load_stage1_model("bsrnet", scunet_file)
    with pytest.raises(WeightFileError, match=r"BSRNet\.pth: not a SCUNet"):
        load_stage1_model("scunet", bsrnet_file[0])
    with pytest.raises(WeightFileError, match=r"BSRNet\.pth: not a SwinIR"):
        load_stage1_model(
            "swinir",
            bsrnet_file[0],
            json.loads((FIXTURES / "swinir_tiny.json").read_text())["config"],
        )


def test_bsrnet_key_and_shape_errors(bsrnet_file: tuple[Path, KairRRDBNet], tmp_path: Path) -> None:
    state = bsrnet_file[1].state_dict()
    extra = save_pth({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(WeightFileError, match=r"extra\.pth: .*1 unexpected keys \(extra\.weight\)"):
        load_stage1_model("bsrnet", extra)
    missing = save_pth({k: v for k, v in state.items() if k != "HRconv.bias"}, tmp_path / "m.pth")
    with pytest.raises(WeightFileError, match=r"m\.pth: .*1 missing keys \(HRconv\.bias\)"):
        load_stage1_model("bsrnet", missing)
    narrow = save_pth(KairRRDBNet(nf=8, nb=1, gc=16).state_dict(), tmp_path / "gc16.pth")
    with pytest.raises(WeightFileError, match=r"gc16\.pth: cannot build BSRNet"):
        load_stage1_model("bsrnet", narrow)


def test_scunet_shape_error(tmp_path: Path) -> None:
    layout = scunet_layout(TINY_SCUNET)
    layout["m_tail.0.weight"] = (3, 32, 3, 3)
    path = save_pth(random_state(layout), tmp_path / "bad.pth")
    with pytest.raises(WeightFileError, match=r"bad\.pth: not a SCUNet .*m_tail\.0\.weight"):
        load_stage1_model("scunet", path)


def test_config_rejected_for_inferred_models(bsrnet_file: tuple[Path, KairRRDBNet]) -> None:
    with pytest.raises(ValueError, match="BSRNet.pth: bsrnet reads its hyperparameters"):
        load_stage1_model("bsrnet", bsrnet_file[0], {"nb": 23})
