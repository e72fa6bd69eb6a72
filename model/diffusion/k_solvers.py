"""The eleven EDM solvers of the original v2.1 sampler (k-diffusion's, as DiffBIR vendors them).

Every solver is one visible loop over a decreasing sigma grid ending in 0, on the
variance-exploding state x = z_0 + σ·ε:

    solver(denoise, x, sigmas, noise, callback, **hparams) -> x at σ = 0

`denoise(x, σ)` returns the x̂_0 estimate; `noise(σ, σ_next)` returns unit-normal noise for
the step between two sigmas (Brownian increments for the SDE solvers); `callback(i, x)` runs
after step i. Sigmas are Python floats (float64 coefficients). Draws multiplied by zero in the
original (s_churn = 0) are not made.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from torch import Tensor

Denoise = Callable[[Tensor, float], Tensor]
Noise = Callable[[float, float], Tensor]
StepDone = Callable[[int, Tensor], None]


def to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """The ODE derivative dx/dσ = (x − x̂_0)/σ."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_down, σ_up) of an ancestral step from σ to σ_next."""
    if not eta:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def _churn(sigma: float, steps: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    if s_churn > 0 and s_tmin <= sigma <= s_tmax:
        return min(s_churn / steps, math.sqrt(2) - 1)
    return 0.0


def _churned(x: Tensor, sigma: float, gamma: float, noise: Noise, s_noise: float):
    """x raised to σ̂ = σ(1 + γ) with fresh noise (only when γ > 0, as the original)."""
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + noise(sigma, sigma_hat) * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
    return x, sigma_hat


def _t(sigma: float) -> float:
    return -math.log(sigma) if sigma > 0 else math.inf


def _sigma(t: float) -> float:
    return math.exp(-t)


def euler(
    denoise, x, sigmas, noise, callback, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0
):
    """Euler (Karras et al. 2022, Alg. 2 with churn)."""
    for i in range(len(sigmas) - 1):
        gamma = _churn(sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax)
        x, sigma_hat = _churned(x, sigmas[i], gamma, noise, s_noise)
        d = to_d(x, sigma_hat, denoise(x, sigma_hat))
        x = x + d * (sigmas[i + 1] - sigma_hat)
        callback(i, x)
    return x


def euler_ancestral(denoise, x, sigmas, noise, callback, eta=1.0, s_noise=1.0):
    """Euler with ancestral noise."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * up
        callback(i, x)
    return x


def heun(
    denoise, x, sigmas, noise, callback, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0
):
    """Heun's second-order method (Karras et al. 2022, Alg. 2); Euler on the last step."""
    for i in range(len(sigmas) - 1):
        gamma = _churn(sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax)
        x, sigma_hat = _churned(x, sigmas[i], gamma, noise, s_noise)
        d = to_d(x, sigma_hat, denoise(x, sigma_hat))
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], denoise(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
        callback(i, x)
    return x


def dpm_2(
    denoise, x, sigmas, noise, callback, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0
):
    """DPM-Solver-2 (midpoint in log σ); Euler on the last step."""
    for i in range(len(sigmas) - 1):
        gamma = _churn(sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax)
        x, sigma_hat = _churned(x, sigmas[i], gamma, noise, s_noise)
        d = to_d(x, sigma_hat, denoise(x, sigma_hat))
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = math.exp((math.log(sigma_hat) + math.log(sigmas[i + 1])) / 2)
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = to_d(x_2, sigma_mid, denoise(x_2, sigma_mid))
            x = x + d_2 * (sigmas[i + 1] - sigma_hat)
        callback(i, x)
    return x


def dpm_2_ancestral(denoise, x, sigmas, noise, callback, eta=1.0, s_noise=1.0):
    """DPM-Solver-2 with ancestral noise."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], denoised)
        if down == 0:
            x = x + d * (down - sigmas[i])
        else:
            sigma_mid = math.exp((math.log(sigmas[i]) + math.log(down)) / 2)
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, denoise(x_2, sigma_mid))
            x = x + d_2 * (down - sigmas[i])
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * up
        callback(i, x)
    return x


def _lms_coeff(order: int, sigmas: Sequence[float], i: int, j: int) -> float:
    """∫_{σ_i}^{σ_{i+1}} of the Lagrange basis polynomial j over σ_i, …, σ_{i−order+1}."""
    nodes = [sigmas[i - k] for k in range(order)]
    poly = np.poly1d([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            poly *= np.poly1d([1.0, -node]) / (nodes[j] - node)
    integral = poly.integ()
    return float(integral(sigmas[i + 1]) - integral(sigmas[i]))


def lms(denoise, x, sigmas, noise, callback, order=4):
    """Linear multistep in σ (k-diffusion's LMS; order 1 is Euler)."""
    ds: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        ds.append(to_d(x, sigmas[i], denoise(x, sigmas[i])))
        ds = ds[-order:]
        cur = min(i + 1, order)
        coeffs = [_lms_coeff(cur, sigmas, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=False))
        callback(i, x)
    return x


def dpmpp_2s_ancestral(denoise, x, sigmas, noise, callback, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) with ancestral noise."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (down - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(down)
            h = t_next - t
            s = t + h / 2
            x_2 = (_sigma(s) / _sigma(t)) * x - math.expm1(-h / 2) * denoised
            denoised_2 = denoise(x_2, _sigma(s))
            x = (_sigma(t_next) / _sigma(t)) * x - math.expm1(-h) * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * up
        callback(i, x)
    return x


def dpmpp_sde(denoise, x, sigmas, noise, callback, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ (stochastic, two stages per step)."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            fac = 1 / (2 * r)
            down, up = ancestral_step(_sigma(t), _sigma(s), eta)
            s_ = _t(down)
            x_2 = (_sigma(s_) / _sigma(t)) * x - math.expm1(t - s_) * denoised
            x_2 = x_2 + noise(_sigma(t), _sigma(s)) * s_noise * up
            denoised_2 = denoise(x_2, _sigma(s))
            down, up = ancestral_step(_sigma(t), _sigma(t_next), eta)
            t_next_ = _t(down)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (_sigma(t_next_) / _sigma(t)) * x - math.expm1(t - t_next_) * denoised_d
            x = x + noise(_sigma(t), _sigma(t_next)) * s_noise * up
        callback(i, x)
    return x


def dpmpp_2m(denoise, x, sigmas, noise, callback):
    """DPM-Solver++(2M)."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        ratio = sigmas[i + 1] / sigmas[i]
        if old_denoised is None or sigmas[i + 1] == 0:
            x = ratio * x - math.expm1(-h) * denoised
        else:
            r = (t - _t(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = ratio * x - math.expm1(-h) * denoised_d
        old_denoised = denoised
        callback(i, x)
    return x


def dpmpp_2m_sde(denoise, x, sigmas, noise, callback, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE, midpoint variant."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)
            x = sigmas[i + 1] / sigmas[i] * math.exp(-eta_h) * x + phi * denoised
            if old_denoised is not None:
                x = x + 0.5 * phi * (h / h_last) * (denoised - old_denoised)
            if eta:
                scale = sigmas[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
                x = x + noise(sigmas[i], sigmas[i + 1]) * scale
        old_denoised, h_last = denoised, h
        callback(i, x)
    return x


def dpmpp_3m_sde(denoise, x, sigmas, noise, callback, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE."""
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                scale = sigmas[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
                x = x + noise(sigmas[i], sigmas[i + 1]) * scale
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        callback(i, x)
    return x


SOLVERS: dict[str, Callable[..., Tensor]] = {
    "euler": euler,
    "euler_a": euler_ancestral,
    "heun": heun,
    "dpm_2": dpm_2,
    "dpm_2_a": dpm_2_ancestral,
    "lms": lms,
    "dpm++_2s_a": dpmpp_2s_ancestral,
    "dpm++_sde": dpmpp_sde,
    "dpm++_2m": dpmpp_2m,
    "dpm++_2m_sde": dpmpp_2m_sde,
    "dpm++_3m_sde": dpmpp_3m_sde,
}
"""Solver by the original's name (without its "edm_" prefix)."""
# Hyperparameters each solver takes from the original CLI's defaults (the rest keep theirs).
SOLVER_HPARAMS: dict[str, tuple[str, ...]] = {
    "euler": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    "heun": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    "dpm_2": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    "euler_a": ("eta", "s_noise"),
    "dpm_2_a": ("eta", "s_noise"),
    "dpm++_2s_a": ("eta", "s_noise"),
    "dpm++_sde": ("eta", "s_noise"),
    "dpm++_2m_sde": ("eta", "s_noise"),
    "dpm++_3m_sde": ("eta", "s_noise"),
    "lms": ("order",),
    "dpm++_2m": (),
}
