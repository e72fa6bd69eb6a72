"""Colour correction: wavelet low/high-frequency swap and AdaIN (model.ops.color_fix)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sampling_reference import assert_matches, case, case_tensor

from model.ops.color_fix import (
    adaptive_instance_normalization,
    color_fix,
    mean_std,
    wavelet_blur,
    wavelet_decomposition,
    wavelet_reconstruction,
)


def test_wavelet_and_adain_match_the_original() -> None:
    """The original's wavelet_reconstruction (5 levels, dilations 1..16) and v1's AdaIN on a
    37×53 pair (tests/fixtures/sampling, case colorfix/2x3x37x53); atol/rtol 1e-4."""
    fixture = case("colorfix/2x3x37x53")
    content, style = case_tensor(fixture, "content"), case_tensor(fixture, "style")
    assert_matches(wavelet_reconstruction(content, style), fixture, "wavelet")
    assert_matches(color_fix(content, style, "wavelet"), fixture, "wavelet")
    assert_matches(adaptive_instance_normalization(content, style), fixture, "adain")
    assert_matches(color_fix(content, style, "adain"), fixture, "adain")


def _image(seed: int, shape: tuple[int, ...] = (2, 3, 40, 56)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_wavelet_on_identical_inputs_returns_the_input() -> None:
    x = _image(0)
    torch.testing.assert_close(wavelet_reconstruction(x, x), x, atol=1e-6, rtol=0)
    high, low = wavelet_decomposition(x)
    torch.testing.assert_close(high + low, x, atol=1e-6, rtol=0)


def test_wavelet_takes_the_low_frequencies_of_the_reference() -> None:
    # A constant colour cast lives entirely in the low band: the fix removes it exactly.
    reference = _image(1)
    shifted = reference + torch.tensor([0.2, -0.1, 0.05]).view(1, 3, 1, 1)
    torch.testing.assert_close(
        wavelet_reconstruction(shifted, reference), reference, atol=1e-5, rtol=0
    )
    # and the high band comes from the content: blur-free detail differs from the reference's
    content = _image(2)
    out = wavelet_reconstruction(content, reference)
    torch.testing.assert_close(
        out - wavelet_decomposition(reference)[1], wavelet_decomposition(content)[0]
    )


def test_wavelet_blur_matches_a_dilated_binomial_filter() -> None:
    x = _image(3, (1, 2, 20, 24))
    radius = 4
    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel2d = torch.outer(kernel, kernel).expand(2, 1, 3, 3)
    padded = F.pad(x, (radius,) * 4, mode="replicate")
    expected = F.conv2d(padded, kernel2d, groups=2, dilation=radius)
    torch.testing.assert_close(wavelet_blur(x, radius), expected)
    # pixel (10, 12) by hand: 3×3 taps 4 pixels apart
    taps = x[0, 0, 6:15:4, 8:17:4]
    assert torch.isclose(wavelet_blur(x, radius)[0, 0, 10, 12], (taps * kernel2d[0, 0]).sum())


def test_adain_matches_mean_and_std_of_the_reference() -> None:
    content, style = _image(4), _image(5) * 0.3 + 0.4
    out = adaptive_instance_normalization(content, style)
    out_mean, out_std = mean_std(out, eps=0)
    style_mean, style_std = mean_std(style, eps=0)
    torch.testing.assert_close(out_mean, style_mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_std, style_std, atol=1e-3, rtol=1e-3)
    # the original's formula, eps 1e-5 on the unbiased variance
    c = content.flatten(2)
    s = style.flatten(2)
    expected = (c - c.mean(2, keepdim=True)) / (c.var(2, keepdim=True) + 1e-5).sqrt()
    expected = expected * (s.var(2, keepdim=True) + 1e-5).sqrt() + s.mean(2, keepdim=True)
    torch.testing.assert_close(out, expected.view_as(content))


def test_color_fix_dispatch() -> None:
    image, reference = _image(6), _image(7)
    assert color_fix(image, reference, "none") is image
    torch.testing.assert_close(
        color_fix(image, reference, "wavelet"), wavelet_reconstruction(image, reference)
    )
    torch.testing.assert_close(
        color_fix(image, reference, "adain"), adaptive_instance_normalization(image, reference)
    )
    with pytest.raises(ValueError, match="unknown colour fix"):
        color_fix(image, reference, "histogram")
    with pytest.raises(ValueError, match="equal shapes"):
        color_fix(image, reference[..., :-1], "wavelet")
