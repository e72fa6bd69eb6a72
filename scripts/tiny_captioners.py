"""Tiny randomly initialised BLIP and LLaVA captioners built from configs (no download).

They are saved with their processors under the folder names `--captioner blip|llava` looks
for in a weights folder, so `--weights-dir OUT --captioner llava` runs offline; their captions
are random words.

    python -m scripts.tiny_captioners --out data/tiny_weights
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from model.pipelines.captioner import LLAVA_PROMPT, TRANSFORMERS_CAPTIONERS

IMAGE_SIZE, PATCH = 32, 8
WORDS = [f"w{i}" for i in range(40)] + sorted(set(LLAVA_PROMPT.split()) - {"<image>"})


def folder_name(captioner: str) -> str:
    """The folder `model.pipelines.captioner` looks for under a weights folder."""
    return TRANSFORMERS_CAPTIONERS[captioner].repo_id.split("/")[-1]


def _vision_config(config_cls):
    return config_cls(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH,
    )  # fmt: skip


def write_tiny_blip(out: Path) -> Path:
    """A tiny BLIP captioner (BERT word-piece tokenizer over a small vocabulary)."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    out.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    vocab = {w: i for i, w in enumerate(words)}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=False, bos_token="[DEC]")
    text = BlipTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, encoder_hidden_size=32, bos_token_id=5, sep_token_id=3,
        pad_token_id=0, max_position_embeddings=64,
    )  # fmt: skip
    config = BlipConfig(
        text_config=text.to_dict(), vision_config=_vision_config(BlipVisionConfig).to_dict()
    )
    BlipForConditionalGeneration(config).eval().save_pretrained(out)
    images = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    BlipProcessor(images, tokenizer).save_pretrained(out)
    return out


def write_tiny_llava(out: Path) -> Path:
    """A tiny LLaVA captioner (CLIP vision tower, Llama language model, word-level tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    out.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", *WORDS, "<image>"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("<image>", "isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=_vision_config(CLIPVisionConfig).to_dict(), text_config=text.to_dict(),
        image_token_id=vocab["<image>"], vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )  # fmt: skip
    LlavaForConditionalGeneration(config).eval().save_pretrained(out)
    images = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        images, tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token of the vision tower
    )  # fmt: skip
    processor.save_pretrained(out)
    return out


def write_tiny_captioners(out: Path, seed: int = 0) -> dict[str, Path]:
    """Both tiny captioners under `out`; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return {
        "blip": write_tiny_blip(out / folder_name("blip")),
        "llava": write_tiny_llava(out / folder_name("llava")),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="weights folder to write into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in write_tiny_captioners(args.out, args.seed).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
