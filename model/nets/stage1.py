"""Stage-1 cleaners by name: DiffBIR's SwinIR, BSRNet and SCUNet-PSNR behind one interface.

- `swinir`: DiffBIR's modified SwinIR (`model.nets.swinir`; `general_swinir_v1.ckpt`,
  `face_swinir_v1.ckpt`, `realesrgan_s4_swinir_100k.pth`). v1 all tasks, v2 face, v2.1. ×1.
- `bsrnet`: KAIR's RRDBNet trained with BSRGAN degradations (`BSRNet.pth`). v2 sr. ×4.
- `scunet`: SCUNet-PSNR (`scunet_color_real_psnr.pth`). v2 denoise. ×1.

BSRNet and SCUNet are built by `spandrel` (0.4.2, MIT) from the released KAIR key layouts;
their hyperparameters are read from the weights. Outputs are nominally in [0, 1] and, as in the
original, not clamped.

Where the original pipeline resizes (XPixelGroup/DiffBIR `diffbir/pipeline.py`
`BSRNetPipeline`, `SCUNetPipeline`, `SwinIRPipeline` and `diffbir/inference/*_loop.py`); all
resizes are bicubic with antialiasing unless noted, "raise to 512" means
`model.ops.sizing.resize_short_side_to(x, 512)`:

- `bsrnet` (`runs_before_upscale=True`, `runs_after_raise=False`): the LQ is *not* resized
  first. BSRNet runs at the LQ size and returns ×4. The requested size is
  (int(h·upscale), int(w·upscale)); if its short side is under 512 the ×4 output is raised to
  512 instead, otherwise it is resized to the requested size. Tiles are in LQ pixels.
- `scunet` (`runs_before_upscale=False`, `runs_after_raise=False`): the LQ is first resized by
  the upscale factor (PIL bicubic on the 8-bit image, to int(w·upscale) × int(h·upscale));
  SCUNet runs at that size (replicate-padded bottom/right to ×64 inside the network, cropped
  back); then the output is raised to 512.
- `swinir` (`runs_before_upscale=False`, `runs_after_raise=True`): the LQ is first resized by
  the upscale factor as for SCUNet. Untiled: raised to 512 *before* the network, zero-padded to
  ×64, run, cropped. Tiled: the network runs on tiles (tile size a multiple of 64) and the
  output is raised to 512 after. This pipeline raises before the network in both cases.

The final image is resized back to the requested size (BSRNet) or to the size of the resized LQ
(SCUNet, SwinIR). For all three, tiling is switched off when the input is smaller than one
tile in either side, which `Stage1Model` does too.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from model.io.checkpoint import (
    StateDict,
    WeightFileError,
    check_state_keys,
    load_state_strict,
    load_weight_file,
)
from model.nets.swinir import SwinIR, load_swinir
from model.ops.sizing import (
    crop_to,
    pad_to_multiple,
    resize,
    resize_short_side_to,
    short_side_size,
)
from model.ops.tiling import tiled_forward

logger = logging.getLogger(__name__)

SPANDREL_HINT = "install it with `pip install spandrel==0.4.2`"


class _PadCrop(nn.Module):
    """Runs `net` on any input size: pads bottom/right to `multiple` with `mode`, crops back.

    Exposes `size_multiple = 1` (any size runs directly) and `output_scale`, the attributes
    `restore_stage1` reads, so that tiles are padded one by one as in the original.
    """

    size_multiple = 1

    def __init__(self, net: nn.Module, multiple: int, mode: str, scale: int) -> None:
        super().__init__()
        self.net, self.multiple, self.mode, self.output_scale = net, multiple, mode, scale

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        padded, _ = pad_to_multiple(x, self.multiple, mode=self.mode)
        return crop_to(self.net(padded), h * self.output_scale, w * self.output_scale)


class Stage1Model(nn.Module):
    """A stage-1 cleaner plus the facts the pipeline needs to place it (see module docstring).

    Args:
        name: registry name (`swinir`, `bsrnet`, `scunet`).
        network: the module run by `restore_stage1`; it has `size_multiple` and `output_scale`.
        scale: output size / input size (4 for BSRNet, 1 for SCUNet and SwinIR).
        size_multiple: the network works on sides that are multiples of this (64 for SwinIR and
            SCUNet, 1 for BSRNet); other sizes are padded inside `forward`, so tile sizes that
            are multiples of it avoid padding work.
        pad_mode: how inputs are padded to `size_multiple` ("constant" zeros or "replicate").
        runs_before_upscale: True when the cleaner takes the LQ at its own size and the
            pipeline resizes its output (BSRNet); False when the LQ is first resized by the
            upscale factor and the cleaner runs at the output size (SCUNet, SwinIR).
        runs_after_raise: True when an input with a short side under the pipeline's minimum
            is raised to it before the cleaner runs (SwinIR); False when the cleaner's output
            is raised instead (BSRNet, SCUNet).

    Call `model(lq, tile_size=None, tile_stride=None, progress=False)` with `lq` (B, 3, H, W)
    in [0, 1], any H, W; returns (B, 3, H·scale, W·scale), not clamped. Tiles are squares of
    `tile_size` input pixels with step `tile_stride` (default half a tile), blended; tiling is
    skipped when H or W is smaller than a tile, as in the original.
    """

    def __init__(
        self,
        name: str,
        network: nn.Module,
        scale: int,
        size_multiple: int,
        pad_mode: str,
        runs_before_upscale: bool,
        runs_after_raise: bool = False,
    ) -> None:
        super().__init__()
        self.name, self.network = name, network
        self.scale, self.size_multiple, self.pad_mode = scale, size_multiple, pad_mode
        self.runs_before_upscale = runs_before_upscale
        self.runs_after_raise = runs_after_raise

    def forward(
        self,
        lq: Tensor,
        tile_size: int | None = None,
        tile_stride: int | None = None,
        progress: bool = False,
    ) -> Tensor:
        if tile_size is not None and min(lq.shape[-2:]) < tile_size:
            tile_size = None
        return restore_stage1(self.network, lq, tile_size, tile_stride, progress)

    def at_processing_size(
        self,
        lq: Tensor,
        out_size: tuple[int, int],
        min_short_side: int,
        tile_size: int | None = None,
        tile_stride: int | None = None,
        progress: bool = False,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        upscale_resize: Callable[[Tensor, tuple[int, int]], Tensor] = resize,
    ) -> Tensor:
        """The stage-1 image at the processing size: `out_size` (the requested output size)
        with its short side raised to `min_short_side`, placed as the module docstring says.

        `autocast` wraps the network call (the resizes stay in fp32); `upscale_resize` resizes
        the LQ to `out_size` (`model.ops.sizing.RESIZES`); returns fp32, not clamped.
        """

        def run(x: Tensor) -> Tensor:
            with autocast():
                return self(x, tile_size, tile_stride, progress).float()

        if self.runs_before_upscale:
            x = run(lq)
            if min(out_size) < min_short_side:
                return resize(x, short_side_size(*out_size, min_short_side))
            return resize(x, out_size)
        x = upscale_resize(lq, out_size)
        if self.runs_after_raise:
            return run(resize_short_side_to(x, min_short_side))
        return resize_short_side_to(run(x), min_short_side)


def _seq_len(state: StateDict, prefix: str) -> int:
    """Number of entries of an `nn.Sequential` stored under `prefix.<i>.`."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = [int(m.group(1)) for k in state if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def _require_spandrel(name: str) -> None:
    try:
        import spandrel  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"the stage-1 model {name!r} needs spandrel; {SPANDREL_HINT}") from exc


def _no_config(config: Mapping[str, Any] | None, path: str | Path, name: str) -> None:
    if config is not None:
        raise ValueError(
            f"{path}: {name} reads its hyperparameters from the weights; pass no config"
        )


def _bsrnet_keys(state: StateDict) -> list[str]:
    """Keys of KAIR's RRDBNet (BSRNet.pth layout) with as many blocks and upconvs as `state`."""
    blocks = [
        f"RRDB_trunk.{i}.RDB{r}.conv{c}"
        for i in range(_seq_len(state, "RRDB_trunk"))
        for r in (1, 2, 3)
        for c in range(1, 6)
    ]
    ups = [f"upconv{i}" for i in (1, 2) if f"upconv{i}.weight" in state]
    convs = ["conv_first", *blocks, "trunk_conv", *ups, "HRconv", "conv_last"]
    return [f"{c}.{p}" for c in convs for p in ("weight", "bias")]


def load_bsrnet(path: str | Path, config: Mapping[str, Any] | None = None) -> Stage1Model:
    """BSRNet (KAIR RRDBNet, `BSRNet.pth` layout) as a stage-1 model; ×4 (or ×2) output."""
    _no_config(config, path, "bsrnet")
    _require_spandrel("bsrnet")
    from spandrel.architectures.ESRGAN import ESRGANArch

    state = load_weight_file(path)
    if "conv_first.weight" not in state or "RRDB_trunk.0.RDB1.conv1.weight" not in state:
        raise WeightFileError(
            f"{path}: not a BSRNet (KAIR RRDBNet) state dict: "
            "no conv_first.weight / RRDB_trunk.0.RDB1.conv1.weight"
        )
    check_state_keys(state, _bsrnet_keys(state), path, "BSRNet (KAIR RRDBNet)")
    try:  # spandrel renames to its layout and loads strictly; shapes are checked there
        descriptor = ESRGANArch().load(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[-1].strip()
        raise WeightFileError(f"{path}: cannot build BSRNet from these weights ({reason})") from exc
    scale = descriptor.scale
    network = _PadCrop(descriptor.model, multiple=1, mode="constant", scale=scale)
    logger.info("loaded BSRNet (x%d) weights from %s", scale, path)
    return Stage1Model("bsrnet", network, scale, 1, "constant", runs_before_upscale=True).eval()


def load_scunet(path: str | Path, config: Mapping[str, Any] | None = None) -> Stage1Model:
    """SCUNet (`scunet_color_real_psnr.pth` layout) as a stage-1 model; same-size output.

    The original DiffBIR SCUNet replicate-pads to ×64 inside its forward; spandrel's copy
    reflect-pads, so the padding is done here (spandrel's then has nothing left to pad).
    """
    _no_config(config, path, "scunet")
    _require_spandrel("scunet")
    from spandrel.architectures.SCUNet import SCUNet

    state = load_weight_file(path)
    if "m_head.0.weight" not in state or "m_tail.0.weight" not in state:
        raise WeightFileError(
            f"{path}: not a SCUNet state dict: no m_head.0.weight / m_tail.0.weight"
        )
    dim, in_nc = state["m_head.0.weight"].shape[:2]
    # Each down stage ends with a strided conv, each up stage starts with a transposed conv.
    stages = ("m_down1", "m_down2", "m_down3", "m_body", "m_up3", "m_up2", "m_up1")
    blocks = [_seq_len(state, s) - (s != "m_body") for s in stages]
    if min(blocks) < 0:
        raise WeightFileError(f"{path}: not a SCUNet state dict: stage sizes {blocks}")
    net = SCUNet(in_nc=int(in_nc), config=blocks, dim=int(dim))
    load_state_strict(net, state, path, "SCUNet")
    logger.info("loaded SCUNet (dim %d, blocks %s) weights from %s", dim, blocks, path)
    network = _PadCrop(net, multiple=64, mode="replicate", scale=1)
    return Stage1Model("scunet", network, 1, 64, "replicate", runs_before_upscale=False).eval()


def load_swinir_stage1(path: str | Path, config: Mapping[str, Any] | None = None) -> Stage1Model:
    """DiffBIR's SwinIR (`load_swinir`: config, else the one in a safetensors file, else the
    DiffBIR preset) as a stage-1 model."""
    net = load_swinir(path, config)
    model = Stage1Model(
        "swinir",
        net,
        net.output_scale,
        net.size_multiple,
        "constant",
        runs_before_upscale=False,
        runs_after_raise=True,
    )
    return model.eval()


Stage1Loader = Callable[[str | Path, Mapping[str, Any] | None], Stage1Model]

STAGE1_MODELS: dict[str, Stage1Loader] = {
    "swinir": load_swinir_stage1,
    "bsrnet": load_bsrnet,
    "scunet": load_scunet,
}


def load_stage1_model(
    name: str, path: str | Path, config: Mapping[str, Any] | None = None
) -> Stage1Model:
    """Load the stage-1 cleaner `name` (a key of `STAGE1_MODELS`) from the weight file `path`.

    `config` is SwinIR's constructor arguments (BSRNet and SCUNet take none). Returns the model
    on the CPU in eval mode; move it with `.to(device)`.
    """
    if name not in STAGE1_MODELS:
        raise ValueError(
            f"{path}: unknown stage-1 model {name!r} (choose from {', '.join(STAGE1_MODELS)})"
        )
    return STAGE1_MODELS[name](path, config)


def restore_stage1(
    model: SwinIR,
    lq: Tensor,
    tile_size: int | None = None,
    tile_stride: int | None = None,
    progress: bool = False,
) -> Tensor:
    """Restore `lq` (B, 3, H, W) in [0, 1] with the stage-1 SwinIR; any H, W.

    The image is zero-padded bottom/right to `model.size_multiple` (64 for DiffBIR: window 8 ×
    unshuffle 8), run whole or in tiles of `tile_size` with step `tile_stride` (default half a
    tile; `tile_size` a multiple of 64), and cropped back. Returns (B, 3, H·s, W·s) with
    s = `model.output_scale` (1 for DiffBIR), not clamped. Gradient mode is the caller's choice.
    """
    h, w = lq.shape[-2:]
    multiple, scale = model.size_multiple, model.output_scale
    padded, _ = pad_to_multiple(lq, multiple)
    if tile_size is None:
        out = model(padded)
    else:
        if tile_stride is None:
            tile_stride = tile_size // 2
        out = tiled_forward(
            model, padded, tile_size, tile_stride, scale=scale, multiple=multiple,
            progress=progress, desc="stage 1 tiles",
        )  # fmt: skip
    return crop_to(out, h * scale, w * scale)
