"""Stage-1 SwinIR: equivalence with the original, checkpoint layouts, options, any input size."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import FIXTURES, load_fixture, load_manifest, strip_prefix
from torch import nn

from model.io.checkpoint import WeightFileError
from model.nets.stage1 import restore_stage1
from model.nets.swin_blocks import shifted_window_mask
from model.nets.swinir import (
    SwinIR,
    load_swinir,
    save_swinir,
    swinir_diffbir_config,
)

ATOL = RTOL = 1e-4  # reference README tolerance for fp32 re-implementations


@pytest.fixture(scope="module")
def tiny() -> tuple[SwinIR, dict[str, torch.Tensor], dict]:
    tensors, meta = load_fixture("swinir_tiny")
    model = SwinIR(**meta["config"]).eval()
    model.load_state_dict(strip_prefix(tensors, "swinir."), strict=True)
    return model, tensors, meta


@pytest.mark.parametrize("size", ["64x64", "64x128", "60x124"])
def test_forward_matches_original(tiny, size: str) -> None:
    model, t, _ = tiny
    with torch.no_grad():
        y = model(t[f"in.x_{size}"])
    # 60x124 comes back as 64x128: the original keeps its reflect padding
    assert y.shape == t[f"out.y_{size}"].shape
    torch.testing.assert_close(y, t[f"out.y_{size}"], atol=ATOL, rtol=RTOL)


def test_stage1_pipeline_matches_original(tiny) -> None:
    model, t, _ = tiny
    with torch.no_grad():
        y = restore_stage1(model, t["in.x_72x88"])
    assert y.shape == (1, 3, 72, 88)
    torch.testing.assert_close(y, t["out.y_72x88_pad64"], atol=ATOL, rtol=RTOL)


def test_direct_forward_size_rule(tiny) -> None:
    model, _, meta = tiny
    assert meta["size_behaviour"]["56x60"]["direct_forward"].startswith("raises")
    with torch.no_grad():
        for h, w in [(56, 60), (72, 88)]:
            with pytest.raises(RuntimeError):
                model(torch.rand(1, 3, h, w))
        assert model(torch.rand(1, 3, 128, 64)).shape == (1, 3, 128, 64)


def test_constructed_buffers_equal_original() -> None:
    tensors, meta = load_fixture("swinir_tiny")
    ours = SwinIR(**meta["config"]).state_dict()
    buffers = [k for k in ours if k.endswith(("attn_mask", "relative_position_index"))]
    assert len(buffers) == 6  # 4 index buffers + 2 masks (odd blocks are shifted)
    for key in buffers:
        assert torch.equal(ours[key], tensors[f"swinir.{key}"]), key


def _manifest_dtypes() -> dict[str, torch.dtype]:
    info = json.loads((FIXTURES / "manifest_info.json").read_text())
    exceptions = info["diffbir_swinir_keys.json"]["dtype_exceptions"]
    return {k: getattr(torch, v) for k, v in exceptions.items()}


def test_full_size_layout_matches_manifest() -> None:
    manifest = load_manifest("diffbir_swinir_keys")
    int_keys = _manifest_dtypes()
    with torch.device("meta"):  # unlike the original, ours builds on the meta device
        model = SwinIR(**swinir_diffbir_config())
    state = model.state_dict()
    assert list(state) == list(manifest)  # same keys in the same order
    for key, value in state.items():
        assert list(value.shape) == manifest[key], key
        assert value.dtype == int_keys.get(key, torch.float32), key
    assert len(int_keys) == 48


def test_full_size_strict_load_of_manifest_layout() -> None:
    manifest = load_manifest("diffbir_swinir_keys")
    int_keys = _manifest_dtypes()
    state = {
        k: torch.empty(shape, dtype=int_keys.get(k, torch.float32), device="meta")
        for k, shape in manifest.items()
    }
    with torch.device("meta"):
        model = SwinIR(**swinir_diffbir_config())
    result = model.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.slow  # ~1 s alone, but builds 22M parameters on shared CPUs
def test_full_size_on_cpu() -> None:
    model = SwinIR(**swinir_diffbir_config()).eval()
    manifest = load_manifest("diffbir_swinir_keys")
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest
    stored = model.layers[0].residual_group.blocks[1].attn_mask
    assert torch.equal(stored, shifted_window_mask(64, 64, 8, 4))
    with torch.no_grad():
        assert restore_stage1(model, torch.rand(1, 3, 70, 90)).shape == (1, 3, 70, 90)


def test_load_wrapped_pth(tiny, tmp_path) -> None:
    _, t, meta = tiny
    state = {f"module.{k}": v for k, v in strip_prefix(t, "swinir.").items()}
    path = tmp_path / "swinir.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    model = load_swinir(path, config=meta["config"])
    assert not model.training
    with torch.no_grad():
        y = model(t["in.x_64x64"])
    torch.testing.assert_close(y, t["out.y_64x64"], atol=ATOL, rtol=RTOL)


def test_load_reports_bad_layout(tiny, tmp_path) -> None:
    _, t, meta = tiny
    state = strip_prefix(t, "swinir.")
    del state["conv_hr.weight"]
    state["conv_extra.weight"] = torch.zeros(1)
    state["conv_last.bias"] = torch.zeros(4)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightFileError) as err:
        load_swinir(path, config=meta["config"])
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "1 missing keys (conv_hr.weight)" in message
    assert "1 unexpected keys (conv_extra.weight)" in message
    assert "conv_last.bias (4,) != (3,)" in message


def test_load_missing_file(tmp_path) -> None:
    with pytest.raises(WeightFileError, match="not found"):
        load_swinir(tmp_path / "nope.pth")


def test_safetensors_round_trip(tiny, tmp_path) -> None:
    model, t, _ = tiny
    path = tmp_path / "stage1.safetensors"
    save_swinir(model, path)
    loaded = load_swinir(path)  # config comes from the file's metadata
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded(t["in.x_64x128"]), model(t["in.x_64x128"]))


def _tiny_config(**overrides) -> dict:
    config = dict(
        img_size=8, patch_size=1, in_chans=3, embed_dim=16, depths=[2, 1], num_heads=[2, 1],
        window_size=4, mlp_ratio=2.0,
    )  # fmt: skip
    return {**config, **overrides}


def _is_valid(upsampler: str, unshuffle: bool, sf: int) -> bool:
    if unshuffle and not upsampler:
        return False
    if upsampler == "nearest+conv":
        return sf in (2, 4, 8)
    return not (upsampler == "pixelshuffle" and sf not in (1, 2, 3, 4, 8))


@pytest.mark.parametrize(
    ("upsampler", "resi", "unshuffle", "sf"),
    list(
        itertools.product(
            ["nearest+conv", "pixelshuffle", "pixelshuffledirect", ""],
            ["1conv", "3conv"],
            [False, True],
            [1, 2, 3, 4, 8],
        )
    ),
)
def test_every_option_builds_and_runs(upsampler: str, resi: str, unshuffle: bool, sf: int) -> None:
    config = _tiny_config(
        upsampler=upsampler, resi_connection=resi, sf=sf, unshuffle=unshuffle,
        unshuffle_scale=sf if unshuffle else None,
    )  # fmt: skip
    if not _is_valid(upsampler, unshuffle, sf):
        with pytest.raises(ValueError):
            SwinIR(**config)
        return
    model = SwinIR(**config).eval()
    scale = 1 if unshuffle or not upsampler else sf
    assert model.output_scale == scale
    side = 2 * model.size_multiple
    with torch.no_grad():
        y = model(torch.rand(1, 3, side, side + model.size_multiple))
        assert y.shape == (1, 3, side * scale, (side + model.size_multiple) * scale)
        assert torch.isfinite(y).all()
        z = restore_stage1(model, torch.rand(1, 3, 13, 21))
    assert z.shape == (1, 3, 13 * scale, 21 * scale)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(ape=True, patch_norm=False),
        dict(qk_scale=0.3, qkv_bias=False, img_range=255.0),
        dict(in_chans=1, norm_layer=nn.LayerNorm),
        dict(img_size=(4, 4), window_size=8),  # window shrinks to the feature map, no shift
        dict(hq_key="jpg", lq_key="hint", learning_rate=1e-4, weight_decay=0.0),
    ],
    ids=["ape", "qk_scale", "gray", "small_img_size", "training_keys"],
)
def test_other_options(overrides: dict) -> None:
    config = _tiny_config(upsampler="nearest+conv", sf=8, unshuffle=True, unshuffle_scale=8)
    model = SwinIR(**{**config, **overrides}).eval()
    channels = overrides.get("in_chans", 3)
    with torch.no_grad():
        y = model(torch.rand(1, channels, 64, 64))  # 8x8 features = img_size for `ape`
    assert y.shape == (1, channels, 64, 64) and torch.isfinite(y).all()


def test_training_mode_with_checkpointing_and_dropout() -> None:
    config = _tiny_config(
        upsampler="nearest+conv", sf=8, unshuffle=True, unshuffle_scale=8, use_checkpoint=True,
        drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.2,
    )  # fmt: skip
    model = SwinIR(**config).train()
    loss = model(torch.rand(2, 3, 64, 64)).square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(upsampler="bogus"),
        dict(unshuffle=True, unshuffle_scale=None),
        dict(unshuffle=True, unshuffle_scale=4),
        dict(resi_connection="2conv"),
    ],
)
def test_invalid_options_raise(overrides: dict) -> None:
    config = _tiny_config(**{"upsampler": "nearest+conv", "sf": 8, **overrides})
    with pytest.raises(ValueError):
        SwinIR(**config)


@pytest.mark.parametrize(("h", "w"), [(37, 53), (65, 130), (1, 64)])
def test_restore_stage1_any_size(tiny, h: int, w: int) -> None:
    model, _, _ = tiny
    lq = torch.rand(2, 3, h, w)
    with torch.no_grad():
        y = restore_stage1(model, lq)
        padded = torch.zeros(2, 3, -(-h // 64) * 64, -(-w // 64) * 64)
        padded[..., :h, :w] = lq
        expected = model(padded)[..., :h, :w]
    assert y.shape == lq.shape
    assert torch.equal(y, expected)


def test_restore_stage1_leaves_grad_mode_to_caller(tiny) -> None:
    model, t, _ = tiny
    assert restore_stage1(model, t["in.x_64x64"]).requires_grad
    with torch.inference_mode():
        assert not restore_stage1(model, t["in.x_64x64"]).requires_grad
