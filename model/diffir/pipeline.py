"""DiffIR restoration as a pipeline: LQ tensors in, restored tensors out (any size, tiled).

pipe = DiffIRPipeline.from_pretrained("weights")            # DiffIRS2-GAN.pth there
sr = pipe(lq, seed=231)                                      # (B, 3, 4H, 4W) in [0, 1]
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from model.diffir.convert import load_diffir
from model.diffir.dirformer import IPR_DIM
from model.diffir.models import DiffIRS2
from model.diffir.padding import pad_window
from model.diffusion.noise import randn_rows
from model.io.weights import resolve_weights
from model.ops.device import resolve_device
from model.ops.sizing import crop_to, pad_to_multiple, resize
from model.ops.tiling import tiled_forward

log = logging.getLogger(__name__)

# network_g of the released RealSR models (DiffIRS2.pth, DiffIRS2-GAN.pth, x4)
RELEASED_X4 = {
    "type": "DiffIRS2", "n_encoder_res": 9, "dim": 64, "num_blocks": [13, 1, 1, 1],
    "num_refinement_blocks": 13, "heads": [1, 2, 4, 8], "ffn_expansion_factor": 2.2,
    "bias": False, "LayerNorm_type": "BiasFree", "n_denoise_res": 1, "linear_start": 0.1,
    "linear_end": 0.99, "timesteps": 4,
}  # fmt: skip
DEFAULT_WEIGHTS = "diffir_s2_gan"


class DiffIRPipeline:
    """A DiffIRS2 with the original's test-time padding, per-image seeds and optional tiles.

    The IPR is estimated once from the whole (padded) LQ; tiles only split the DIRformer, so
    every tile is restored under the same prior.

    Args:
        network: the stage-2 network.
        weight_paths: weight files by role, recorded in sidecars.
    """

    def __init__(self, network: DiffIRS2, weight_paths: dict[str, Path] | None = None) -> None:
        if not isinstance(network, DiffIRS2):
            raise TypeError(
                f"DiffIRPipeline needs a DiffIRS2 network, got {type(network).__name__}"
            )
        self.network = network.eval()
        self.weight_paths = dict(weight_paths or {})
        self.precision = "fp32"

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def scale(self) -> int:
        return self.network.scale

    @classmethod
    def from_pretrained(
        cls,
        weights: str | Path = "weights",
        device: str = "auto",
        scale: int = 4,
        offline: bool = False,
    ) -> DiffIRPipeline:
        """Load our safetensors export or an original `.pth` file, or a folder holding
        DiffIRS2-GAN.pth (fetched there unless `offline`; it must be downloaded by hand).

        Args:
            weights: file or folder.
            device: "auto", "cuda", "mps" or "cpu".
            scale: upscaling factor of an original `.pth` (its config is the released one).
            offline: never try to download.
        """
        path = Path(weights)
        if path.is_dir():
            path = resolve_weights([DEFAULT_WEIGHTS], [path], download=not offline)[DEFAULT_WEIGHTS]
        network = load_diffir(path, cfg={**RELEASED_X4, "scale": scale})
        log.info("loaded DiffIR x%d from %s", network.scale, path)
        return cls(network.to(resolve_device(device)), {"diffir": path})

    @torch.no_grad()
    def __call__(
        self,
        lq: Tensor,
        seed: int = 231,
        upscale: float | None = None,
        tile_size: int | None = None,
        tile_stride: int | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Restore (B, 3, H, W) LQ in [0, 1] to (B, 3, H·s, W·s), clamped to [0, 1].

        Args:
            lq: the batch (any H, W; reflect-padded to the pad window and cropped back).
            seed: x_T of every image is drawn from its own generator seeded with this.
            upscale: output size / input size; None or the network's scale: no resize.
            tile_size, tile_stride: DIRformer tiles in LQ pixels (rounded down to the pad
                window; None: whole image).
            progress: show a tile progress bar.
        """
        net, window = self.network, pad_window(self.scale)
        x = lq.to(self.device, torch.float32)
        padded, (h, w) = pad_to_multiple(x, window, mode="reflect")
        generators = [torch.Generator(self.device).manual_seed(seed) for _ in range(len(x))]
        noise = randn_rows(x.new_empty(len(x), IPR_DIM), generators)
        ipr = net.sample_ipr(padded, noise)[-1]
        if tile_size is None:
            out = net.restorer(padded, ipr)
        else:
            tile = max(window, tile_size // window * window)
            stride = min(tile, tile_stride or tile // 2)
            out = tiled_forward(lambda t: net.restorer(t, ipr), padded, tile, stride,
                                scale=self.scale, multiple=window, progress=progress,
                                desc="DiffIR tiles")  # fmt: skip
        out = crop_to(out, h * self.scale, w * self.scale)
        if upscale is not None and upscale != self.scale:
            out = resize(out, (int(h * upscale), int(w * upscale)))
        return out.clamp(0, 1)
