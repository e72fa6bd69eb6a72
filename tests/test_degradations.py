"""Degradations: reproducible under a seed, sampled parameters within their ranges."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dataset.batch_transform import RealESRGANBatchTransform
from dataset.degradations import (
    KERNEL_KINDS,
    CodeformerDegradation,
    build_kernel,
    check_kernel_list,
    jpeg_compress,
    sample_kernel_params,
)
from dataset.realesrgan import BlurKernelSampler, RealESRGANKernels


def _hq(size: int = 48, seed: int = 0) -> np.ndarray:
    """A smooth test image with some texture, float32 (size, size, 3) in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 0.5 + 0.4 * np.sin(8 * x * y)], axis=2)
    noise = np.random.default_rng(seed).uniform(-0.05, 0.05, base.shape)
    return np.clip(base + noise, 0, 1).astype(np.float32)


@pytest.mark.parametrize("kind", KERNEL_KINDS)
def test_kernel_params_within_ranges(kind):
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = sample_kernel_params(rng, [kind], [1.0], (0.2, 3.0), (0.5, 4.0), (1.0, 2.0))
        assert p.kind == kind
        assert 0.2 <= p.sigma_x <= 3.0 and 0.2 <= p.sigma_y <= 3.0
        assert -math.pi <= p.theta <= math.pi
        if not kind.endswith("aniso"):
            assert p.sigma_x == p.sigma_y and p.theta == 0.0
        if kind.startswith("generalized"):
            assert 0.5 <= p.beta <= 4.0
        elif kind.startswith("plateau"):
            assert 1.0 <= p.beta <= 2.0
        else:
            assert p.beta == 1.0
        k = build_kernel(p, 21)
        assert k.shape == (21, 21) and k.dtype == np.float32
        assert abs(k.sum() - 1) < 1e-5 and k.min() >= 0


def test_kernel_kind_follows_probabilities():
    rng = np.random.default_rng(0)
    kinds = [
        sample_kernel_params(rng, ["iso", "aniso"], [0.8, 0.2], (1, 2)).kind for _ in range(2000)
    ]
    assert 0.75 < kinds.count("iso") / len(kinds) < 0.85


def test_check_kernel_list_rejects_bad_config():
    with pytest.raises(ValueError, match="unknown kernel kinds"):
        check_kernel_list(["skew"], [1.0])
    with pytest.raises(ValueError, match="does not match"):
        check_kernel_list(["iso", "aniso"], [1.0])


def test_codeformer_params_within_ranges():
    deg = CodeformerDegradation(
        blur_sigma=(0.1, 10), downsample_range=(0.8, 8), noise_range=(0, 20), jpeg_range=(60, 100)
    )
    rng = np.random.default_rng(1)
    for _ in range(300):
        p = deg.sample_params(rng)
        assert p.kernel.kind in ("iso", "aniso")
        assert 0.1 <= p.kernel.sigma_x <= 10 and 0.1 <= p.kernel.sigma_y <= 10
        assert 0.8 <= p.scale <= 8
        assert 0 <= p.noise_sigma <= 20
        assert isinstance(p.jpeg_quality, int) and 60 <= p.jpeg_quality <= 100


def test_codeformer_reproducible_shapes_and_range():
    deg = CodeformerDegradation(blur_kernel_size=21)
    hq = _hq()
    a = deg(hq, np.random.default_rng(7))
    b = deg(hq, np.random.default_rng(7))
    c = deg(hq, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == hq.shape and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1
    assert np.abs(a - hq).mean() > 1e-3  # actually degraded


def test_codeformer_without_noise_and_jpeg_is_blur_and_resize_only():
    deg = CodeformerDegradation(
        blur_kernel_size=21,
        blur_sigma=(0.1, 0.1),
        downsample_range=(1, 1),
        noise_range=None,
        jpeg_range=None,
    )
    params = deg.sample_params(np.random.default_rng(0))
    assert params.noise_sigma is None and params.jpeg_quality is None
    hq = _hq()
    # sigma 0.1 is a near-delta kernel and scale 1 keeps the size: the image is unchanged
    np.testing.assert_allclose(deg(hq, np.random.default_rng(0)), hq, atol=1e-4)


def test_jpeg_compress_keeps_channel_order():
    img = np.zeros((16, 16, 3), np.float32)
    img[..., 0] = 0.9  # pure red must stay red (a BGR/RGB mix-up would make it blue)
    out = jpeg_compress(img, 90)
    assert out[..., 0].mean() > 0.8 and out[..., 2].mean() < 0.1


def test_blur_kernel_sampler_sizes_and_padding():
    sampler = BlurKernelSampler(21, ["iso", "aniso"], [0.5, 0.5], (0.2, 3), (0.5, 4), (1, 2), 0.5)
    rng = np.random.default_rng(0)
    sizes = set()
    for _ in range(100):
        k = sampler(rng)
        assert k.shape == (21, 21) and abs(k.sum() - 1) < 1e-4
        rows = np.flatnonzero(np.abs(k).sum(axis=1) > 0)
        support = rows[-1] - rows[0] + 1
        assert support % 2 == 1 and 7 <= support <= 21
        assert rows[0] + rows[-1] == 20  # centred
        sizes.add(int(support))
    assert len(sizes) > 3


def test_realesrgan_kernels_reproducible_and_final_sinc():
    kernels = RealESRGANKernels()
    a, b = kernels(np.random.default_rng(3)), kernels(np.random.default_rng(3))
    assert set(a) == {"kernel1", "kernel2", "sinc_kernel"}
    for key in a:
        assert a[key].shape == (21, 21) and a[key].dtype == torch.float32
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    pulse = RealESRGANKernels(final_sinc_prob=0.0)(np.random.default_rng(0))["sinc_kernel"]
    assert pulse[10, 10] == 1 and pulse.sum() == 1
    sinc = RealESRGANKernels(final_sinc_prob=1.0)(np.random.default_rng(0))["sinc_kernel"]
    assert sinc[10, 10] < 1 and abs(float(sinc.sum()) - 1) < 1e-4


def _batch(b: int = 4, size: int = 64, seed: int = 0) -> dict:
    kernels = RealESRGANKernels()
    rng = np.random.default_rng(seed)
    samples = [kernels(rng) for _ in range(b)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    batch["hq"] = torch.from_numpy(np.stack([_hq(size, i) for i in range(b)])).permute(0, 3, 1, 2)
    batch["txt"] = [f"caption {i}" for i in range(b)]
    batch["index"] = torch.arange(b) + 10 * seed
    return batch


# ranges that keep 64-pixel crops larger than the 21x21 kernels at every step
_SMALL = {"resize_range": (0.5, 1.5), "resize_range2": (0.5, 1.2), "stage2_scale": 2}


def test_batch_transform_shapes_levels_and_seed():
    batch = _batch()
    out_a = RealESRGANBatchTransform(queue_size=0, seed=5, **_SMALL)(batch)
    out_b = RealESRGANBatchTransform(queue_size=0, seed=5, **_SMALL)(batch)
    out_c = RealESRGANBatchTransform(queue_size=0, seed=6, **_SMALL)(batch)
    assert set(out_a) == {"hq", "lq", "txt"}
    assert out_a["lq"].shape == batch["hq"].shape and out_a["lq"].dtype == torch.float32
    lq = out_a["lq"]
    assert lq.min() >= 0 and lq.max() <= 1
    torch.testing.assert_close(lq * 255, (lq * 255).round(), rtol=0, atol=1e-4)  # 8-bit levels
    torch.testing.assert_close(out_a["lq"], out_b["lq"], rtol=0, atol=0)
    assert not torch.equal(out_a["lq"], out_c["lq"])
    torch.testing.assert_close(out_a["hq"], batch["hq"])


def test_batch_transform_params_within_ranges():
    t = RealESRGANBatchTransform(stage2_scale=(2, 4))
    g = torch.Generator().manual_seed(0)
    kept = 0
    for _ in range(300):
        p = t.sample_params(4, g)
        assert 2 <= p.stage2_scale <= 4 and p.final_mode in ("area", "bilinear", "bicubic")
        for draw, cfg in ((p.round1, t.round1), (p.round2, t.round2)):
            assert cfg.resize_range[0] <= draw.scale <= cfg.resize_range[1]
            assert draw.resize_mode in ("area", "bilinear", "bicubic")
            low, high = cfg.noise_range if draw.gaussian else cfg.poisson_scale_range
            assert draw.strength.shape == (4,)
            assert bool(((low <= draw.strength) & (draw.strength <= high)).all())
            assert set(draw.gray.tolist()) <= {0.0, 1.0}
            q = draw.jpeg_quality
            assert bool(((cfg.jpeg_range[0] <= q) & (q <= cfg.jpeg_range[1])).all())
        kept += p.round1.scale == 1.0
    assert 0.05 < kept / 300 < 0.16  # resize_prob "keep" is 0.1


def test_batch_transform_degrade_is_a_function_of_params():
    t = RealESRGANBatchTransform(queue_size=0, **_SMALL)
    batch = _batch()
    params = t.sample_params(4, torch.Generator().manual_seed(0))
    quality = params.round1.jpeg_quality.clone()
    a = t.degrade(batch["hq"].contiguous(), batch, params)
    b = t.degrade(batch["hq"].contiguous(), batch, params)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(params.round1.jpeg_quality, quality)  # not overwritten


def test_batch_transform_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    RealESRGANBatchTransform(queue_size=0, **_SMALL)(_batch())
    assert torch.equal(torch.get_rng_state(), state)


def test_batch_transform_identity_settings_keep_image():
    batch = _batch()
    # smooth content: DiffJPEG subsamples chroma, which would blur pixel noise even at q99
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    batch["hq"] = torch.stack([x, y, (x + y) / 2]).expand(4, 3, 64, 64).contiguous()
    for key in ("kernel1", "kernel2", "sinc_kernel"):
        batch[key] = torch.zeros_like(batch[key])
        batch[key][:, 10, 10] = 1
    identity = RealESRGANBatchTransform(
        queue_size=0,
        resize_prob=(0, 0, 1),
        resize_prob2=(0, 0, 1),
        gaussian_noise_prob=1,
        gaussian_noise_prob2=1,
        noise_range=(0, 0),
        noise_range2=(0, 0),
        jpeg_range=(99, 99),
        jpeg_range2=(99, 99),
        stage2_scale=1,
    )
    out = identity(batch)
    assert (out["lq"] - batch["hq"]).abs().mean() < 0.01


def test_batch_transform_deterministic_mode_depends_on_index_only():
    val = RealESRGANBatchTransform(deterministic=True, seed=1, **_SMALL)
    a, b = val(_batch(seed=0)), val(_batch(seed=0))
    torch.testing.assert_close(a["lq"], b["lq"], rtol=0, atol=0)
    assert not torch.equal(a["lq"], val(_batch(seed=1))["lq"])


def test_batch_transform_queue_keeps_pairs_together():
    transform = RealESRGANBatchTransform(queue_size=8, seed=0, **_SMALL)
    seen = set()
    for step in range(6):
        batch = _batch(seed=step)
        batch["hq"] = batch["index"].float().view(-1, 1, 1, 1).expand(-1, 3, 64, 64) / 255
        batch["txt"] = [str(int(i)) for i in batch["index"]]
        out = transform(batch)
        if step < 2:  # the pool is filling: batches pass through
            assert out["txt"] == batch["txt"]
        for hq, txt in zip(out["hq"], out["txt"], strict=True):
            assert round(float(hq.mean()) * 255) == int(txt)
            seen.add(txt)
    assert len(seen) > 8


def test_batch_transform_rejects_jpeg_quality_100():
    with pytest.raises(ValueError, match="JPEG quality"):
        RealESRGANBatchTransform(jpeg_range2=(30, 100))


def test_batch_transform_rejects_too_small_images():
    with pytest.raises(ValueError, match="too small"):
        RealESRGANBatchTransform(queue_size=0, resize_range=(0.1, 0.1), resize_prob=(0, 1, 0))(
            _batch(size=32)
        )


def test_batch_transform_sharpener_and_resize_hq_change_target():
    batch = _batch()
    out = RealESRGANBatchTransform(queue_size=0, use_sharpener=True, resize_hq=True, **_SMALL)(
        batch
    )
    assert out["hq"].shape == batch["hq"].shape
    assert not torch.allclose(out["hq"], batch["hq"])


@pytest.mark.gpu
def test_batch_transform_on_cuda_is_seeded_and_keeps_cuda_rng():
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in _batch().items()}
    state = torch.cuda.get_rng_state()
    a = RealESRGANBatchTransform(queue_size=0, seed=3, **_SMALL)(batch)["lq"]
    b = RealESRGANBatchTransform(queue_size=0, seed=3, **_SMALL)(batch)["lq"]
    assert a.is_cuda and torch.equal(a, b)
    assert torch.equal(torch.cuda.get_rng_state(), state)
