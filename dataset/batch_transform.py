"""Real-ESRGAN second-order degradation of a batch, run on the training device.

Two rounds of blur -> random resize -> noise (Gaussian or Poisson, colour or gray) -> JPEG,
then a final sinc filter, with basicsr's primitives. The per-sample kernels come from the
dataset (`dataset.realesrgan.RealESRGANKernels`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from basicsr.data.degradations import generate_gaussian_noise_pt, generate_poisson_noise_pt
from basicsr.utils import DiffJPEG
from basicsr.utils.img_process_util import USMSharp, filter2D

_RESIZE_MODES = ("area", "bilinear", "bicubic")


@dataclass(frozen=True)
class RoundConfig:
    """Settings of one degradation round (after its blur).

    Args:
        resize_prob: probabilities of [up, down, keep].
        resize_range: [min, max] resize factor.
        gaussian_noise_prob: probability of Gaussian noise (else Poisson).
        noise_range: Gaussian std range in 0-255 units.
        poisson_scale_range: Poisson noise scale range.
        gray_noise_prob: per-sample probability that the noise is the same in all channels.
        jpeg_range: JPEG quality range.
    """

    resize_prob: tuple[float, ...]
    resize_range: tuple[float, float]
    gaussian_noise_prob: float
    noise_range: tuple[float, float]
    poisson_scale_range: tuple[float, float]
    gray_noise_prob: float
    jpeg_range: tuple[float, float]


@dataclass(frozen=True)
class RoundDraw:
    """The random choices of one round for a batch of B images.

    Args:
        scale: resize factor of the round (relative to its input size in round 1, to the
            stage-2 size in round 2).
        resize_mode: "area", "bilinear" or "bicubic".
        gaussian: Gaussian noise (True) or Poisson noise (False), for the whole batch.
        strength: (B,) Gaussian std in 0-255 units, or Poisson scale.
        gray: (B,) 1.0 where the noise is the same in all channels.
        noise_seed: seed of the noise pixels.
        jpeg_quality: (B,) JPEG quality.
    """

    scale: float
    resize_mode: str
    gaussian: bool
    strength: torch.Tensor
    gray: torch.Tensor
    noise_seed: int
    jpeg_quality: torch.Tensor


@dataclass(frozen=True)
class SecondOrderParams:
    """All random choices of the second-order degradation of one batch.

    Args:
        round1, round2: per-round draws.
        second_blur: apply `kernel2` in round 2.
        stage2_scale: overall downscaling factor.
        sinc_first: end with [resize back + sinc] -> JPEG (else JPEG -> [resize back + sinc]).
        final_mode: interpolation mode of the resize back to the stage-2 size.
    """

    round1: RoundDraw
    round2: RoundDraw
    second_blur: bool
    stage2_scale: float
    sinc_first: bool
    final_mode: str


def _uniform(g: torch.Generator, low: float, high: float, n: int | None = None) -> torch.Tensor:
    shape = (1,) if n is None else (n,)
    return torch.rand(shape, generator=g, dtype=torch.float64) * (high - low) + low


def _coin(g: torch.Generator, p: float) -> bool:
    return float(_uniform(g, 0.0, 1.0)) < p


def _choice(g: torch.Generator, options: Sequence, weights: Sequence[float] | None = None):
    w = torch.ones(len(options)) if weights is None else torch.tensor(weights, dtype=torch.float)
    return options[int(torch.multinomial(w, 1, generator=g))]


def sample_round(cfg: RoundConfig, batch_size: int, g: torch.Generator) -> RoundDraw:
    """Draw the resize, noise and JPEG choices of one round."""
    direction = _choice(g, ("up", "down", "keep"), cfg.resize_prob)
    scale = 1.0
    if direction == "up":
        scale = float(_uniform(g, 1.0, cfg.resize_range[1]))
    elif direction == "down":
        scale = float(_uniform(g, cfg.resize_range[0], 1.0))
    gaussian = _coin(g, cfg.gaussian_noise_prob)
    low, high = cfg.noise_range if gaussian else cfg.poisson_scale_range
    return RoundDraw(
        scale=scale,
        resize_mode=_choice(g, _RESIZE_MODES),
        gaussian=gaussian,
        strength=_uniform(g, low, high, batch_size).float(),
        gray=(_uniform(g, 0.0, 1.0, batch_size) < cfg.gray_noise_prob).float(),
        noise_seed=int(torch.randint(2**62, (1,), generator=g)),
        jpeg_quality=_uniform(g, cfg.jpeg_range[0], cfg.jpeg_range[1], batch_size).float(),
    )


@contextlib.contextmanager
def _seeded_torch_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run basicsr's noise functions (they use torch's global RNG) under `seed`.

    The caller's RNG state of the CPU and of `device` is restored afterwards.
    """
    if device.type != "cuda":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index]), torch.cuda.device(index):
        torch.random.default_generator.manual_seed(seed)
        torch.cuda.manual_seed(seed)
        yield


def _filter(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    k = kernel.shape[-1]
    if min(img.shape[-2:]) <= k // 2:
        raise ValueError(
            f"image of size {tuple(img.shape[-2:])} is too small for a {k}x{k} kernel after "
            "resizing; use a larger out_size or a narrower resize_range"
        )
    # basicsr's filter2D reshapes with .view
    return filter2D(img.contiguous(), kernel.to(img))


def _resize(img: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    return F.interpolate(img, size=(max(1, size[0]), max(1, size[1])), mode=mode)


def stage2_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """Size of the stage-2 (most downscaled) image."""
    return max(1, int(h / scale)), max(1, int(w / scale))


def _add_noise(img: torch.Tensor, draw: RoundDraw) -> torch.Tensor:
    strength, gray = draw.strength.to(img), draw.gray.to(img)
    with _seeded_torch_rng(draw.noise_seed, img.device):
        if draw.gaussian:
            noise = generate_gaussian_noise_pt(img, strength, gray)
        else:
            noise = generate_poisson_noise_pt(img, strength, gray)
    return torch.clamp(img + noise, 0.0, 1.0)


class RealESRGANBatchTransform:
    """Second-order Real-ESRGAN degradation of a batch, run on the training device.

    Input batch: `hq` (B, 3, H, W) in [0, 1], `kernel1`, `kernel2`, `sinc_kernel` (B, K, K),
    `txt` (list of B str) and, in deterministic mode, `index` (B,). Output: a new dict
    `{"hq", "lq", "txt"}` with `lq` (B, 3, H, W) in [0, 1] on 8-bit levels, resized back to the
    HQ size (DiffBIR restores at the output size). Other input keys are dropped, because the
    training pair queue mixes samples across batches.

    Random draws come from a private generator seeded with `seed` (plus the distributed rank), so
    a run is reproducible from its seed. In `deterministic` mode (validation) the generator is
    re-seeded from `seed` and the batch's first `index`, and the queue is off: the same batch
    always gets the same LQ. `state_dict` / `load_state_dict` save and restore the generator and
    the pair queue (the DataModule puts them in every checkpoint, per rank), so a resumed run
    degrades exactly as an uninterrupted one; the queue takes queue_size x 2 x 3 x H x W x 4
    bytes of every checkpoint per process (1.6 GB at 512 x 512 with 256 pairs).

    Arguments ending in 2 configure the second round; defaults are DiffBIR's general settings.

    Args:
        use_sharpener: USM-sharpen the HQ target (and degrade the sharpened image).
        resize_hq: blur the target by resizing it down to the stage-2 size and back.
        queue_size: size of the training pair pool (0: off); a multiple of the batch size.
        stage2_scale: overall downscaling factor, or [min, max] to draw it per batch.
        second_blur_prob: probability of the second blur.
        seed: base seed of the private generator.
        deterministic: validation mode (see above).
    """

    def __init__(
        self,
        use_sharpener: bool = False,
        resize_hq: bool = False,
        queue_size: int = 256,
        resize_prob: Sequence[float] = (0.2, 0.7, 0.1),
        resize_range: Sequence[float] = (0.15, 1.5),
        gaussian_noise_prob: float = 0.5,
        noise_range: Sequence[float] = (1.0, 30.0),
        poisson_scale_range: Sequence[float] = (0.05, 3.0),
        gray_noise_prob: float = 0.4,
        jpeg_range: Sequence[float] = (30, 95),
        stage2_scale: float | Sequence[float] = 4,
        second_blur_prob: float = 0.8,
        resize_prob2: Sequence[float] = (0.3, 0.4, 0.3),
        resize_range2: Sequence[float] = (0.3, 1.2),
        gaussian_noise_prob2: float = 0.5,
        noise_range2: Sequence[float] = (1.0, 25.0),
        poisson_scale_range2: Sequence[float] = (0.05, 2.5),
        gray_noise_prob2: float = 0.4,
        jpeg_range2: Sequence[float] = (30, 95),
        seed: int = 0,
        deterministic: bool = False,
    ) -> None:
        self.round1 = RoundConfig(
            resize_prob=tuple(resize_prob),
            resize_range=tuple(resize_range),
            gaussian_noise_prob=gaussian_noise_prob,
            noise_range=tuple(noise_range),
            poisson_scale_range=tuple(poisson_scale_range),
            gray_noise_prob=gray_noise_prob,
            jpeg_range=tuple(jpeg_range),
        )
        self.round2 = RoundConfig(
            resize_prob=tuple(resize_prob2),
            resize_range=tuple(resize_range2),
            gaussian_noise_prob=gaussian_noise_prob2,
            noise_range=tuple(noise_range2),
            poisson_scale_range=tuple(poisson_scale_range2),
            gray_noise_prob=gray_noise_prob2,
            jpeg_range=tuple(jpeg_range2),
        )
        for cfg in (self.round1, self.round2):
            if not 1 <= cfg.jpeg_range[0] <= cfg.jpeg_range[1] < 100:
                # DiffJPEG's quantisation factor is 0 at quality 100 (division by zero)
                raise ValueError(f"JPEG quality range must lie in [1, 100), got {cfg.jpeg_range}")
        if isinstance(stage2_scale, Sequence) and len(stage2_scale) != 2:
            raise ValueError(f"stage2_scale must be a number or [min, max], got {stage2_scale}")
        self.stage2_scale = stage2_scale
        self.second_blur_prob = second_blur_prob
        self.resize_hq = resize_hq
        self.sharpener = USMSharp() if use_sharpener else None
        self.jpeger = DiffJPEG(differentiable=False)
        self.queue_size = 0 if deterministic else queue_size
        self.seed = seed
        self.deterministic = deterministic
        self.generator: torch.Generator | None = None
        self._queue: dict[str, torch.Tensor] | None = None
        self._queue_txt: list[str] = []
        self._queue_ptr = 0

    def _generator_for(self, batch: dict) -> torch.Generator:
        if self.deterministic:
            if "index" not in batch:
                raise KeyError("deterministic RealESRGANBatchTransform needs an 'index' key")
            first = int(torch.as_tensor(batch["index"]).reshape(-1)[0])
            return torch.Generator().manual_seed(self.seed * 1_000_003 + first)
        if self.generator is None:
            # one stream per process, so DDP ranks do not draw identical degradations
            dist = torch.distributed
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            self.generator = torch.Generator().manual_seed(self.seed + rank)
        return self.generator

    def state_dict(self) -> dict[str, Any]:
        """The generator state and the pair queue (on the CPU); empty before the first batch."""
        queue = None if self._queue is None else {k: v.cpu() for k, v in self._queue.items()}
        return {
            "generator": None if self.generator is None else self.generator.get_state(),
            "queue": queue,
            "queue_txt": list(self._queue_txt),
            "queue_ptr": self._queue_ptr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the generator and the pair queue of `state_dict`."""
        if state["generator"] is not None:
            self.generator = torch.Generator()
            self.generator.set_state(state["generator"])
        self._queue = state["queue"]
        self._queue_txt = list(state["queue_txt"])
        self._queue_ptr = state["queue_ptr"]

    def sample_params(self, batch_size: int, g: torch.Generator) -> SecondOrderParams:
        """Draw every random choice of one batch from generator `g`."""
        round1 = sample_round(self.round1, batch_size, g)
        second_blur = _coin(g, self.second_blur_prob)
        if isinstance(self.stage2_scale, Sequence):
            stage2_scale = float(_uniform(g, *self.stage2_scale))
        else:
            stage2_scale = float(self.stage2_scale)
        round2 = sample_round(self.round2, batch_size, g)
        return SecondOrderParams(
            round1=round1,
            round2=round2,
            second_blur=second_blur,
            stage2_scale=stage2_scale,
            sinc_first=_coin(g, 0.5),
            final_mode=_choice(g, _RESIZE_MODES),
        )

    def _jpeg(self, img: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
        # clamp first: DiffJPEG produces strong artefacts on out-of-range values; clone the
        # quality because DiffJPEG overwrites it in place with its quantisation factor
        return self.jpeger.to(img.device)(
            torch.clamp(img, 0.0, 1.0), quality=quality.to(img).clone()
        )

    def degrade(
        self,
        hq: torch.Tensor,
        batch: dict,
        params: SecondOrderParams,
        resize_back: bool = True,
    ) -> torch.Tensor:
        """LQ of `hq` with fixed `params` and the `kernel1`, `kernel2`, `sinc_kernel` of `batch`.

        Returns (B, 3, H, W) on 8-bit levels; with `resize_back=False`, the LQ at the stage-2
        size `stage2_size(H, W, params.stage2_scale)` instead (what an x4 SR test set stores).
        """
        h, w = hq.shape[-2:]
        h2, w2 = stage2_size(h, w, params.stage2_scale)
        r1, r2 = params.round1, params.round2
        # round 1: blur -> resize -> noise -> JPEG
        out = _filter(hq, batch["kernel1"])
        out = _resize(out, (int(h * r1.scale), int(w * r1.scale)), r1.resize_mode)
        out = self._jpeg(_add_noise(out, r1), r1.jpeg_quality)
        # round 2: blur -> resize -> noise -> {JPEG, resize back + sinc} in random order
        if params.second_blur:
            out = _filter(out, batch["kernel2"])
        out = _resize(out, (int(h2 * r2.scale), int(w2 * r2.scale)), r2.resize_mode)
        out = _add_noise(out, r2)
        # Real-ESRGAN found that other orders (sinc + JPEG + resize) give twisted lines
        if params.sinc_first:
            out = _filter(_resize(out, (h2, w2), params.final_mode), batch["sinc_kernel"])
            out = self._jpeg(out, r2.jpeg_quality)
        else:
            out = self._jpeg(out, r2.jpeg_quality)
            out = _filter(_resize(out, (h2, w2), params.final_mode), batch["sinc_kernel"])
        if resize_back and (h2, w2) != (h, w):
            # DiffBIR restores at the output size: the LQ goes back to the HQ size
            out = F.interpolate(out, size=(h, w), mode="bicubic")
        return torch.clamp((out * 255.0).round(), 0, 255) / 255.0

    def _dequeue_and_enqueue(
        self, hq: torch.Tensor, lq: torch.Tensor, txt: list[str], g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Swap the batch with random pairs of a pool, for more diverse degradations per batch."""
        b = hq.shape[0]
        if self._queue is None:
            if self.queue_size % b != 0:
                raise ValueError(
                    f"queue_size {self.queue_size} is not a multiple of batch size {b}"
                )
            self._queue = {
                "hq": hq.new_zeros((self.queue_size, *hq.shape[1:])),
                "lq": lq.new_zeros((self.queue_size, *lq.shape[1:])),
            }
            self._queue_txt = [""] * self.queue_size
        if self._queue["hq"].device != hq.device:  # restored from a checkpoint (CPU)
            self._queue = {k: v.to(hq.device) for k, v in self._queue.items()}
        q = self._queue
        if self._queue_ptr < self.queue_size:  # still filling: store and pass through
            q["hq"][self._queue_ptr : self._queue_ptr + b] = hq
            q["lq"][self._queue_ptr : self._queue_ptr + b] = lq
            self._queue_txt[self._queue_ptr : self._queue_ptr + b] = list(txt)
            self._queue_ptr += b
            return hq, lq, list(txt)
        perm = torch.randperm(self.queue_size, generator=g)
        q["hq"], q["lq"] = q["hq"][perm.to(hq.device)], q["lq"][perm.to(hq.device)]
        self._queue_txt = [self._queue_txt[i] for i in perm.tolist()]
        out_hq, out_lq, out_txt = q["hq"][:b].clone(), q["lq"][:b].clone(), self._queue_txt[:b]
        q["hq"][:b], q["lq"][:b] = hq, lq
        self._queue_txt[:b] = list(txt)
        return out_hq, out_lq, out_txt

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        """Degrade `batch["hq"]` into `lq`; returns `{"hq", "lq", "txt"}`."""
        g = self._generator_for(batch)
        hq = batch["hq"].contiguous()  # basicsr's filter2D reshapes with .view
        if self.sharpener is not None:
            hq = self.sharpener.to(hq)(hq)
        params = self.sample_params(hq.shape[0], g)
        lq = self.degrade(hq, batch, params)
        size2 = stage2_size(*hq.shape[-2:], params.stage2_scale)
        if self.resize_hq and size2 != tuple(hq.shape[-2:]):
            small = F.interpolate(hq, size=size2, mode="bicubic", antialias=True)
            hq = F.interpolate(small, size=hq.shape[-2:], mode="bicubic", antialias=True)
        txt = list(batch["txt"])
        if self.queue_size > 0:
            hq, lq, txt = self._dequeue_and_enqueue(hq, lq, txt, g)
        return {"hq": hq.contiguous(), "lq": lq.contiguous(), "txt": txt}


class SRBatchTransform(RealESRGANBatchTransform):
    """`RealESRGANBatchTransform` whose `lq` is (B, 3, H / s, W / s) with s = `stage2_scale`.

    DiffIR (like Real-ESRGAN) restores from the LQ at its own size, so the final resize back
    to the HQ size is skipped; everything else, including the pair queue, is unchanged.
    """

    def degrade(
        self,
        hq: torch.Tensor,
        batch: dict,
        params: SecondOrderParams,
        resize_back: bool = False,
    ) -> torch.Tensor:
        return super().degrade(hq, batch, params, resize_back=resize_back)
