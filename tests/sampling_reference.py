"""The original's sampler fixtures (tests/fixtures/sampling, see its README in
../shared/reference/sampling): cases, tensors and the analytic stand-in network."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from model.diffusion.schedule import Diffusion

SAMPLING = Path(__file__).parent / "fixtures" / "sampling"


@functools.cache
def meta() -> dict[str, Any]:
    return json.loads((SAMPLING / "sampling.json").read_text())


@functools.cache
def tensors() -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in meta()["files"]:
        out.update(load_file(str(SAMPLING / Path(name).name)))
    return out


def case(case_id: str) -> dict[str, Any]:
    return next(c for c in meta()["cases"] if c["id"] == case_id)


def case_tensor(c: dict[str, Any], role: str) -> torch.Tensor:
    return tensors()[c["tensors"][role]]


def case_ids(group: str) -> list[str]:
    return [c["id"] for c in meta()["cases"] if c["group"] == group]


def diffusion_for(schedule: str) -> Diffusion:
    """Our Diffusion preset of a fixture schedule (its ᾱ are checked against the fixture)."""
    diffusion = (
        Diffusion(zero_snr=True, parameterization="v") if schedule.endswith("_v") else Diffusion()
    )
    want = tensors()[f"schedule/{schedule}/alphas_cumprod"].double().numpy()
    assert np.allclose(diffusion.alphas_cumprod, want, rtol=1e-10, atol=0)
    return diffusion


def standin(schedule: str):
    """The stand-in network model(x, t, cond) of the README, for `schedule`."""
    constants = meta()["standin"]["constants"]
    ab_table = tensors()[f"schedule/{schedule}/alphas_cumprod"].double()
    m, r = (torch.tensor(constants[k], dtype=torch.float64).view(1, 4, 1, 1) for k in "MR")
    kappa, lam, g1, g2 = (constants[k] for k in ("kappa", "lambda", "g1", "g2"))
    v = schedule.endswith("_v")

    def model(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        xd, c = x.double(), cond["c_img"].double()
        txt = cond["c_txt"].double().view(-1, 1, 1, 1)
        ab = ab_table[t.cpu()].view(-1, 1, 1, 1).to(xd.device)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        mu = m + kappa * c + lam * txt
        x0_lin = mu + a * r**2 / (ab * r**2 + (1 - ab)) * (xd - a * mu)
        mean = (xd + c).mean(dim=(2, 3), keepdim=True)
        x0 = x0_lin + g1 * (1 - ab) * torch.tanh(x0_lin) + g2 * s * torch.tanh(mean)
        out = (a * xd - x0) / s if v else (xd - a * x0) / s
        return out.to(x.dtype)

    return model


def conditions(c_img: torch.Tensor) -> tuple[dict, dict]:
    """(cond, uncond) as the fixtures build them: c_txt ones / zeros (B, 1)."""
    batch = c_img.shape[0]
    return ({"c_img": c_img, "c_txt": torch.ones(batch, 1)},
            {"c_img": c_img, "c_txt": torch.zeros(batch, 1)})  # fmt: skip


def noise_queue(c: dict[str, Any]) -> list[torch.Tensor]:
    """The recorded draws that affect the result, in call order."""
    if "noise" not in c["tensors"]:
        return []
    draws = case_tensor(c, "noise")
    return [n for n, call in zip(draws, c["noise_calls"], strict=True) if call["affects_result"]]


def assert_matches(got: torch.Tensor, c: dict[str, Any], role: str = "final") -> None:
    want = case_tensor(c, role)
    tol = c["tolerance"][role]
    bound = tol["atol"] + tol["rtol"] * want.abs()
    err = (got.float() - want).abs()
    assert bool((err <= bound).all()), f"{c['id']} {role}: max error {err.max():.3g} > {tol}"


def probe_check() -> float:
    """Max relative error of `standin` against the recorded probe outputs."""
    t = tensors()
    worst = 0.0
    for schedule in ("sd21_eps", "v21_zsnr_v"):
        model = standin(schedule)
        x, c_img, ts = t["probe/standin/x"], t["probe/standin/c_img"], t["probe/standin/t"]
        cond, uncond = conditions(c_img)
        for name, cd in (("cond", cond), ("uncond", uncond)):
            want = t[f"probe/standin/{schedule}_{name}"]
            got = model(x, ts, cd)
            worst = max(worst, float(((got - want).abs() / (want.abs() + 1e-6)).max()))
    return worst
