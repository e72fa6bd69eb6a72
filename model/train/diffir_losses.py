"""DiffIR's training losses beyond L1: the IPR distillation pair and the VGG19 perceptual loss."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.io.checkpoint import load_state_strict, load_weight_file


def ipr_distill_losses(
    ipr_s2: Tensor, ipr_s1: Tensor, temperature: float = 0.15
) -> tuple[Tensor, Tensor]:
    """(l_kd, l_abs) of the original KDLoss between the S2 estimate and the S1 target.

    l_kd = KL(softmax(S1 / T) || softmax(S2 / T)) with batchmean reduction (the original only
    logs it); l_abs = mean |S2 - S1| (the term that is trained). The target is detached.
    """
    target = ipr_s1.detach()
    l_kd = F.kl_div(
        F.log_softmax(ipr_s2 / temperature, dim=1),
        F.softmax(target / temperature, dim=1),
        reduction="batchmean",
    )
    return l_kd, F.l1_loss(ipr_s2, target)


# torchvision vgg19 `features` index of each conv layer (the loss reads features before ReLU)
VGG19_CONV = {
    "conv1_1": 0, "conv1_2": 2, "conv2_1": 5, "conv2_2": 7,
    "conv3_1": 10, "conv3_2": 12, "conv3_3": 14, "conv3_4": 16,
    "conv4_1": 19, "conv4_2": 21, "conv4_3": 23, "conv4_4": 25,
    "conv5_1": 28, "conv5_2": 30, "conv5_3": 32, "conv5_4": 34,
}  # fmt: skip
# DiffIR's (and Real-ESRGAN's) perceptual layer weights
DIFFIR_LAYER_WEIGHTS = {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0,
                        "conv5_4": 1.0}  # fmt: skip
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGPerceptualLoss(nn.Module):
    """sum_k w_k * mean |VGG19_k(x) - VGG19_k(gt)| on ImageNet-normalised [0, 1] images.

    basicsr's PerceptualLoss (criterion l1, use_input_norm, no style term) without its
    download: the VGG19 weights come from a local torchvision file (`vgg19-dcbb9e9d.pth`) or
    stay random (tiny runs). The VGG is frozen and cut after the deepest layer used.

    Args:
        layer_weights: {"conv1_2": 0.1, ...}, names as in `VGG19_CONV`.
        weights_path: torchvision VGG19 state dict file, or None for random weights.
        perceptual_weight: factor of the whole sum.
    """

    def __init__(
        self,
        layer_weights: Mapping[str, float] | None = None,
        weights_path: str | None = None,
        perceptual_weight: float = 1.0,
    ) -> None:
        super().__init__()
        from torchvision.models import vgg19

        self.layer_weights = dict(layer_weights or DIFFIR_LAYER_WEIGHTS)
        unknown = set(self.layer_weights) - set(VGG19_CONV)
        if unknown:
            raise ValueError(f"unknown VGG19 layers {sorted(unknown)}; known: {list(VGG19_CONV)}")
        vgg = vgg19(weights=None)
        if weights_path is not None:
            load_state_strict(vgg, load_weight_file(weights_path), weights_path, "VGG19")
        last = max(VGG19_CONV[k] for k in self.layer_weights)
        self.features = vgg.features[: last + 1].requires_grad_(False).eval()
        self.perceptual_weight = perceptual_weight
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), False)

    def _features(self, x: Tensor) -> dict[int, Tensor]:
        wanted = {VGG19_CONV[k] for k in self.layer_weights}
        out, x = {}, (x - self.mean) / self.std
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in wanted:
                out[i] = x.clone()  # the next ReLU works in place
        return out

    def forward(self, x: Tensor, gt: Tensor) -> Tensor:
        fx, fgt = self._features(x), self._features(gt.detach())
        loss = sum(w * F.l1_loss(fx[VGG19_CONV[k]], fgt[VGG19_CONV[k]])
                   for k, w in self.layer_weights.items())  # fmt: skip
        return loss * self.perceptual_weight
