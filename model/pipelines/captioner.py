"""Captions for prompts: one short description of each input image, used as the positive
prompt (the original v2.1's `--captioner`).

As in the original, the LQ image is captioned as loaded (RGB, before any resize) and the caption
is joined with `--pos-prompt` as "caption, pos_prompt".

- `blip`: BLIP captioning (transformers), an unconditional caption.
- `llava`: LLaVA-1.5-7B (transformers' port of the original's `liuhaotian/llava-v1.5-7b`) with
  the original's conversation prompt, image padded to a square with the processor's mean
  colour (LLaVA-1.5's "pad" aspect mode) and greedy decoding.
- `ram`: Recognize Anything (RAM++) tags joined with ", ", as the original; needs the
  `recognize-anything` package from GitHub (not on PyPI).

Models are looked up as folders under the weights folder (`weights/<folder>`), else fetched
from the Hugging Face Hub into it; `model=` takes any local folder or hub id of the same kind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from model.io.folder_jobs import Job
from model.io.images import ImageReadError, decode_image
from model.io.weights import MissingWeightsError, resolve_weights
from model.pipelines.distributed import Dist, all_gather

logger = logging.getLogger(__name__)

NONE = "none"
# The original's LLaVA conversation template ("llava_v1") around its question.
LLAVA_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions. USER: <image>\n"
    "Please give me a very short description of this image. ASSISTANT:"
)


class CaptionerError(RuntimeError):
    """A captioner that cannot be loaded (missing package or model)."""


@dataclasses.dataclass(frozen=True)
class CaptionerSpec:
    """A transformers image-to-text model and how the original prompts it.

    Args:
        repo_id: the Hugging Face Hub repository of the released model.
        prompt: text given with the image (None: an unconditional caption).
        pad_to_square: pad with the processor's mean colour first (LLaVA-1.5 "pad" mode).
        max_new_tokens: generation limit (the original's LLaVA: 512).
    """

    repo_id: str
    prompt: str | None = None
    pad_to_square: bool = False
    max_new_tokens: int = 64


TRANSFORMERS_CAPTIONERS = {
    "blip": CaptionerSpec("Salesforce/blip-image-captioning-large"),
    "llava": CaptionerSpec("llava-hf/llava-1.5-7b-hf", LLAVA_PROMPT, True, 512),
}
CAPTIONERS = (NONE, *TRANSFORMERS_CAPTIONERS, "ram")


class Captioner(Protocol):
    """RGB images -> one caption each."""

    name: str

    def __call__(self, images: Sequence[Image.Image]) -> list[str]: ...


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """`image` centred on a square canvas of colour `fill` (LLaVA-1.5's expand-to-square)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


class TransformersCaptioner:
    """A transformers image-text-to-text model (BLIP, LLaVA) run one image at a time."""

    def __init__(
        self, name: str, path: str | Path, spec: CaptionerSpec, device: str, dtype: torch.dtype
    ) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.name, self.spec, self.device = name, spec, torch.device(device)
        self.processor = AutoProcessor.from_pretrained(str(path))
        model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype)
        self.model = model.to(self.device).eval()
        mean = getattr(self.processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        self.fill = tuple(int(round(255 * m)) for m in mean)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        return [self._caption(image.convert("RGB")) for image in images]

    def _caption(self, image: Image.Image) -> str:
        if self.spec.pad_to_square:
            image = pad_to_square(image, self.fill)
        kwargs = {"images": image, "return_tensors": "pt"}
        if self.spec.prompt is not None:
            kwargs["text"] = self.spec.prompt
        inputs = self.processor(**kwargs).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = self.model.generate(
            **inputs, do_sample=False, num_beams=1, max_new_tokens=self.spec.max_new_tokens
        )
        if self.spec.prompt is not None and not self.model.config.is_encoder_decoder:
            out = out[:, inputs["input_ids"].shape[1] :]  # decoder-only: drop the prompt
        return self.processor.batch_decode(out, skip_special_tokens=True)[0].strip()


class RamCaptioner:
    """RAM++ tags (the original's `RAMCaptioner`): "tag, tag, ..."."""

    name = "ram"
    image_size = 384

    def __init__(self, checkpoint: Path, device: str) -> None:
        try:
            from ram import get_transform, inference_ram
            from ram.models import ram_plus
        except ImportError as exc:
            raise CaptionerError(
                "--captioner ram needs the recognize-anything package: "
                "pip install git+https://github.com/xinyu1205/recognize-anything"
            ) from exc
        self.device = torch.device(device)
        self.transform = get_transform(image_size=self.image_size)
        self.infer = inference_ram
        model = ram_plus(pretrained=str(checkpoint), image_size=self.image_size, vit="swin_l")
        self.model = model.eval().to(self.device)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        captions = []
        for image in images:
            x = self.transform(image.convert("RGB")).unsqueeze(0).to(self.device)
            captions.append(self.infer(x, self.model)[0].replace(" | ", ", "))
        return captions


def _model_folder(
    name: str, spec: CaptionerSpec, model: str | Path | None, weights_dir: Path, offline: bool
) -> str | Path:
    """A local folder holding the model: `model`, `weights_dir/<repo name>`, or a download."""
    if model is not None and Path(model).is_dir():
        return Path(model)
    repo_id = str(model) if model is not None else spec.repo_id
    local = weights_dir / repo_id.split("/")[-1]
    if (local / "config.json").is_file():
        return local
    if offline:
        raise MissingWeightsError(
            f"--captioner {name}: no model folder {local} (offline); download {repo_id} there"
        )
    from huggingface_hub import snapshot_download

    logger.info("downloading captioner %s into %s", repo_id, local)
    try:
        return snapshot_download(repo_id, local_dir=str(local))
    except Exception as exc:  # network and hub errors alike: one line for the user
        raise MissingWeightsError(
            f"--captioner {name}: cannot fetch {repo_id} into {local} ({type(exc).__name__}); "
            "put the model folder there or pass --captioner-model"
        ) from exc


def load_captioner(
    name: str,
    model: str | Path | None = None,
    weights_dir: str | Path = "weights",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    offline: bool = False,
    max_new_tokens: int | None = None,
) -> Captioner | None:
    """The captioner `name` (one of CAPTIONERS), or None for "none"; `max_new_tokens`
    overrides the caption length limit of BLIP / LLaVA."""
    if name == NONE:
        return None
    weights_dir = Path(weights_dir)
    if name == "ram":
        checkpoint = Path(model) if model is not None else None
        if checkpoint is None:
            checkpoint = resolve_weights(["ram_plus"], [weights_dir], not offline)["ram_plus"]
        return RamCaptioner(checkpoint, device)
    if name not in TRANSFORMERS_CAPTIONERS:
        raise CaptionerError(f"unknown captioner {name!r}; choose from {', '.join(CAPTIONERS)}")
    spec = TRANSFORMERS_CAPTIONERS[name]
    if max_new_tokens is not None:
        spec = dataclasses.replace(spec, max_new_tokens=max_new_tokens)
    folder = _model_folder(name, spec, model, weights_dir, offline)
    return TransformersCaptioner(name, folder, spec, device, dtype)


def caption_jobs(
    jobs: Sequence[Job], captioner: Captioner, progress: bool = True, dist: Dist | None = None
) -> list[Job]:
    """`jobs` with a caption from `captioner` where they have none.

    A file list's caption is kept. A caption made by the same captioner in an earlier run's
    sidecar is reused (a rerun with `--overwrite` or other options does not caption again).
    An unreadable image gets no caption; the restoration reports it. Under torch.distributed
    (`dist`) each process captions every world_size-th job and all get every caption.
    """
    rank, world = (0, 1) if dist is None else (dist.rank, dist.world_size)
    mine = []
    for job in tqdm(jobs[rank::world], desc=f"captions ({captioner.name})", unit="img",
                    disable=not progress):  # fmt: skip
        caption = job.caption or _cached_caption(job, captioner.name)
        if caption is None:
            try:
                caption = captioner([to_pil(decode_image(job.src).rgb)])[0]
            except ImageReadError:
                caption = ""
        mine.append(caption)
    captions: list[str] = [""] * len(jobs)
    shards = [mine] if dist is None else all_gather(dist, mine)
    for r, shard in enumerate(shards):
        captions[r::world] = shard
    return [dataclasses.replace(job, caption=c) for job, c in zip(jobs, captions, strict=True)]


def _cached_caption(job: Job, name: str) -> str | None:
    try:
        sidecar = json.loads(job.sidecar.read_text())
    except (OSError, ValueError):
        return None
    if sidecar.get("captioner") == name and isinstance(sidecar.get("caption"), str):
        return sidecar["caption"]
    return None


def to_pil(rgb: np.ndarray) -> Image.Image:
    """A float RGB array in [0, 1] as the 8-bit image a captioner sees."""
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))
