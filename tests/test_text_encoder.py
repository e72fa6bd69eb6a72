"""The OpenCLIP text tower against the original FrozenOpenCLIPEmbedder (fixture clip_tiny)."""

from __future__ import annotations

import pytest
import torch

from model.convert.text_encoder import text_state_from_original, text_state_to_original
from model.nets.text_encoder import FrozenOpenCLIPText, build_text_encoder
from tests.conftest import load_fixture, load_manifest, strip_prefix

TOL = {"atol": 1e-4, "rtol": 1e-4}
START, END = 49406, 49407


@pytest.fixture(scope="module")
def fixture() -> tuple[dict[str, torch.Tensor], dict]:
    return load_fixture("clip_tiny")


@pytest.fixture(scope="module")
def original_state(fixture) -> dict[str, torch.Tensor]:
    # token_embedding is stored as float16 holding exactly the float32 values used.
    return {k: v.float() for k, v in strip_prefix(fixture[0], "clip.model.").items()}


def _encoder(meta: dict, state: dict[str, torch.Tensor], layer: str) -> FrozenOpenCLIPText:
    cfg = meta["config"]
    encoder = build_text_encoder(cfg["embed_dim"], cfg["text_cfg"], layer, cfg["vision_cfg"])
    encoder.load_state_dict(text_state_from_original(state), strict=True)
    return encoder.eval()


def test_tokens_match_fixture(fixture) -> None:
    tensors, meta = fixture
    tokens = FrozenOpenCLIPText(width=8, heads=1, layers=1, embed_dim=8).tokenize(meta["prompts"])
    assert tokens.dtype == torch.int64 and tokens.shape == (5, 77)
    assert torch.equal(tokens, tensors["in.tokens"])
    for row, ids in zip(tokens, meta["token_ids"], strict=True):
        assert row[: len(ids)].tolist() == ids
        assert not row[len(ids) :].any()  # zero padding
    assert tokens[0, :3].tolist() == [START, END, 0]
    assert tokens[4, -1].item() == END  # over-long prompt cut, last position forced to the end


def test_penultimate_matches_fixture(fixture, original_state) -> None:
    tensors, meta = fixture
    encoder = _encoder(meta, original_state, "penultimate")
    with torch.no_grad():
        context = encoder(meta["prompts"])
    assert context.shape == (5, 77, 64)
    torch.testing.assert_close(context, tensors["out.penultimate"], **TOL)


def test_last_matches_fixture(fixture, original_state) -> None:
    tensors, meta = fixture
    encoder = _encoder(meta, original_state, "last")
    with torch.no_grad():
        context = encoder.encode_tokens(tensors["in.tokens"])
    torch.testing.assert_close(context, tensors["out.last"], **TOL)
    assert not torch.allclose(context, tensors["out.penultimate"], **TOL)


def test_parameters_are_frozen(fixture, original_state) -> None:
    encoder = _encoder(fixture[1], original_state, "penultimate")
    assert not any(p.requires_grad for p in encoder.parameters())


def test_round_trip_is_exact(original_state) -> None:
    back = text_state_to_original(text_state_from_original(original_state))
    assert list(back) == list(original_state)
    assert all(torch.equal(back[k], v) for k, v in original_state.items())


def test_sd21_layout_matches_manifest() -> None:
    prefix = "cond_stage_model.model."
    manifest = load_manifest("sd21_ldm_keys")
    expected = {k[len(prefix) :]: v for k, v in manifest.items() if k.startswith(prefix)}
    assert len(expected) == sum(k.startswith("cond_stage_model.") for k in manifest) == 294
    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}
    with torch.device("meta"):
        encoder = build_text_encoder(1024, text_cfg, "penultimate")
    ours = {k: list(v.shape) for k, v in text_state_to_original(encoder.state_dict()).items()}
    assert ours == expected


def test_unknown_key_is_named(original_state) -> None:
    state = {**original_state, "visual.proj": torch.zeros(1)}
    with pytest.raises(KeyError, match=r"visual\.proj"):
        text_state_from_original(state)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="layer"):
        FrozenOpenCLIPText(width=8, heads=1, layers=1, embed_dim=8, layer="pooled")
    with pytest.raises(ValueError, match="unknown"):
        build_text_encoder(8, {"width": 8, "heads": 1, "layers": 1, "ls_init_value": 0.1})
    with pytest.raises(ValueError, match="shape"):
        FrozenOpenCLIPText(width=8, heads=1, layers=1, embed_dim=8).encode_tokens(
            torch.zeros(1, 10, dtype=torch.long)
        )
