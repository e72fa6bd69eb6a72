"""DiffIR networks against the original code's fixtures (tests/fixtures/diffir, see its README)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from model.diffir import DiffIRS2, diffir_from_original, load_diffir, restore_padded, save_diffir
from model.diffir.convert import to_original_state
from model.diffir.diffusion import ipr_schedule
from model.diffusion.schedule import LDM_SCHEDULE_BUFFERS as SCHEDULE_BUFFERS
from model.io.checkpoint import WeightFileError
from model.train.diffir_losses import ipr_distill_losses
from tests.conftest import FIXTURES, assert_close_schedule, load_fixture

TENSORS, META = load_fixture("diffir/diffir_tiny")
TOL = {"atol": META["tolerance"]["atol"], "rtol": META["tolerance"]["rtol"]}
CONFIGS = ("x4", "x2")


def _fixture_weights(param_specs: list, seed: int) -> dict[str, torch.Tensor]:
    """The fixture's weight rule (README: one generator per network, fan-in scaled normals)."""
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for key, shape in param_specs:
        z = torch.randn(tuple(shape), generator=g, dtype=torch.float64)
        if len(shape) >= 2:
            w = z / math.sqrt(math.prod(shape[1:]))
        elif key.endswith(("norm1.body.weight", "norm2.body.weight")):
            w = 1.0 + 0.1 * z
        else:
            w = 0.1 * z
        out[key] = w.float()
    return out


def original_state(c: str, net: str) -> dict[str, torch.Tensor]:
    """The original state dict of network `net` ("s1" | "s2"), aliases sharing their tensor."""
    spec = META["configs"][c]["weights"][net]
    w = _fixture_weights(spec["param_specs"], META["configs"][c]["seeds"][f"weights_{net}"])
    state = {}
    for e in spec["state_dict_layout"]:
        key, kind = e["key"], e["kind"]
        if kind == "param":
            state[key] = w[key]
        elif kind == "alias":
            state[key] = w[e["alias_of"]]
        else:
            state[key] = TENSORS[f"sched.{c}.{key.split('.')[-1]}.f32"]
    return state


@pytest.fixture(scope="module", params=CONFIGS)
def nets(request):
    c = request.param
    cfg = META["configs"][c]
    s1 = diffir_from_original(cfg["network_S1"], original_state(c, "s1"))
    s2 = diffir_from_original(cfg["network_g"], {"params_ema": original_state(c, "s2")})
    return c, s1, s2


def _io(c: str):
    return (lambda k: TENSORS[f"in.{c}.{k}"]), (lambda k: TENSORS[f"out.{c}.{k}"])


@torch.no_grad()
def test_eval_paths_match_the_original(nets) -> None:
    c, s1, s2 = nets
    i, o = _io(c)
    torch.testing.assert_close(s1.cpen_s1(i("lq"), i("gt")), o("cpen_s1"), **TOL)
    torch.testing.assert_close(s2.cpen_s2(i("lq")), o("cpen_s2"), **TOL)
    for net, name in ((s1, "restorer_s1"), (s2, "restorer_s2")):
        torch.testing.assert_close(net.restorer(i("lq"), i("ipr")), o(name), **TOL)
        torch.testing.assert_close(net.restorer(i("lq2"), i("ipr2")), o(f"{name}_b"), **TOL)
    torch.testing.assert_close(s1.forward_s1(i("lq"), i("gt")), o("s1_sr"), **TOL)
    steps = s2.sample_ipr(i("lq"), i("noise"))
    torch.testing.assert_close(torch.stack(steps), o("s2_ipr_steps"), **TOL)
    torch.testing.assert_close(s2.forward_s2(i("lq"), noise=i("noise")), o("s2_sr"), **TOL)


@torch.no_grad()
def test_padding_rule_matches_the_original_on_an_odd_size(nets) -> None:
    c, _, s2 = nets
    i, o = _io(c)
    out = restore_padded(lambda x: s2.forward_s2(x, noise=i("noise_odd")), i("lq_odd"), s2.scale)
    torch.testing.assert_close(out, o("s2_sr_odd"), **TOL)


def test_training_path_losses_and_gradient_match_the_original(nets) -> None:
    c, s1, s2 = nets
    i, o = _io(c)
    ipr_s1 = s1.cpen_s1(i("lq"), i("gt"))
    noise = i("train_noise").clone().requires_grad_(True)
    steps = s2.train_ipr(i("lq"), ipr_s1, noise)
    sr = s2.restorer(i("lq"), steps[-1])
    torch.testing.assert_close(torch.stack(steps).detach(), o("train_ipr_steps"), **TOL)
    torch.testing.assert_close(sr.detach(), o("train_sr"), **TOL)
    l_pix = F.l1_loss(sr, i("gt"))
    l_kd, l_abs = ipr_distill_losses(steps[-1], ipr_s1, META["configs"][c]["kd_temperature"])
    for name, value in (("l_pix", l_pix), ("l_kd", l_kd), ("l_abs", l_abs),
                        ("l_total", l_pix + l_abs)):  # fmt: skip
        torch.testing.assert_close(value.detach().reshape(1), o(f"train_{name}"), **TOL)
    (grad,) = torch.autograd.grad(l_abs * ipr_s1.numel(), noise)
    torch.testing.assert_close(grad, o("train_grad_noise_l_abs_sum"), **TOL)


@pytest.mark.parametrize("c", CONFIGS)
def test_schedule_matches_the_original(c: str) -> None:
    cfg = META["configs"][c]["network_g"]
    ours = ipr_schedule(cfg["timesteps"], cfg["linear_start"], cfg["linear_end"])
    assert set(ours) == set(SCHEDULE_BUFFERS)
    for name in SCHEDULE_BUFFERS:
        assert_close_schedule(ours[name], TENSORS[f"sched.{c}.{name}.f64"])
        assert_close_schedule(ours[name].float(), TENSORS[f"sched.{c}.{name}.f32"])


def test_round_trip_through_our_safetensors_loses_nothing(nets, tmp_path) -> None:
    c, s1, s2 = nets
    for net, which in ((s1, "s1"), (s2, "s2")):
        path = tmp_path / f"{which}.safetensors"
        save_diffir(net, path)
        back = to_original_state(load_diffir(path).state_dict(), net.config["type"])
        original = original_state(c, which)
        assert back.keys() == original.keys()
        assert all(torch.equal(back[k], v) for k, v in original.items())


def test_loading_is_strict() -> None:
    cfg = META["configs"]["x4"]["network_g"]
    state = original_state("x4", "s2")
    missing = {k: v for k, v in state.items() if k != "diffusion.betas"}
    with pytest.raises(WeightFileError, match="missing keys.*schedule.betas"):
        diffir_from_original(cfg, missing)
    twin = dict(state, **{"diffusion.model.resmlp.0.bias": torch.zeros(256)})
    with pytest.raises(WeightFileError, match="differs from its twin"):
        diffir_from_original(cfg, twin)
    with pytest.raises(WeightFileError, match="shape mismatch"):
        diffir_from_original({**cfg, "n_denoise_res": 1, "dim": 8}, state)


@pytest.mark.parametrize(("name", "scale"), [("DiffIRS1", 4), ("DiffIRS2", 4), ("DiffIRS2", 2)])
def test_released_full_size_key_sets_load_strictly(name: str, scale: int) -> None:
    manifest = json.loads((FIXTURES / "diffir" / "diffir_keys.json").read_text())
    model = manifest["models"][name]
    cfg = dict(model["network_g"])  # the x4 YAMLs have no `scale` (class default 4)
    shapes = {k: shape for k, shape, *_ in model["keys"]}
    if scale != 4:
        other = manifest["other_scales"][f"x{scale}"]
        cfg = other["network_S1" if name == "DiffIRS1" else "network_g"]
        shapes.update(other[f"{name}_shape_differences"])
    tensors = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    for key, _, _, kind, *alias in model["keys"]:
        if kind == "alias":
            tensors[key] = tensors[alias[0]]
    with torch.device("meta"):
        net = diffir_from_original(
            cfg, {"params_ema": {f"module.{k}": v for k, v in tensors.items()}}
        )
    assert isinstance(net, DiffIRS2) == (name == "DiffIRS2")
    back = to_original_state(net.state_dict(), name)
    assert {k: list(v.shape) for k, v in back.items()} == {k: list(s) for k, s in shapes.items()}


def test_original_pth_checkpoint_loads_its_ema_weights(tmp_path) -> None:
    cfg = META["configs"]["x4"]["network_S1"]
    ema = original_state("x4", "s1")
    path = tmp_path / "DiffIRS1.pth"
    torch.save({"params": {k: torch.zeros_like(v) for k, v in ema.items()},
                "params_ema": {f"module.{k}": v for k, v in ema.items()}}, path)  # fmt: skip
    net = load_diffir(path, cfg)
    assert all(
        torch.equal(v, ema[k]) for k, v in to_original_state(net.state_dict(), "DiffIRS1").items()
    )
    with pytest.raises(WeightFileError, match="needs its network config"):
        load_diffir(path)
