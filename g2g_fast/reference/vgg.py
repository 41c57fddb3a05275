"""Frozen VGG16 relu2_2 perceptual features and CycleFUNIT's perceptual L1 loss P (SPEC.md §4).

`VGGPerceptual.features` matches torchvision's `vgg16().features[:9]` (conv1_1, relu, conv1_2, relu,
max-pool, conv2_1, relu, conv2_2, relu), so its keys are `features.{0,2,5,7}.{weight,bias}`.
`VGGPerceptual.from_file` reads a full torchvision `vgg16` state dict and loads only those eight
tensors, strictly. `forward` maps images from [-1, 1] to [0, 1], ImageNet-normalises them and
returns the relu2_2 map (B, 128, H/2, W/2). Parameters are frozen and the module stays in eval mode.

`perceptual_l1(vgg, a, b)` is the L1 distance between relu2_2 features, or plain pixel L1 when no
VGG weights were supplied (`vgg is None`; the caller reports that fallback).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .losses import l1
from .weights import Frozen, load_checked, read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGPerceptual(Frozen):
    """VGG16 up to relu2_2; images in [-1, 1] -> features (B, 128, H/2, W/2)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
            nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
        )
        # Explicit device: these constants are not in the file, so they must not land on the meta
        # device that `from_file` builds on.
        for name, value in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
            self.register_buffer(name, torch.tensor(value, device="cpu").view(1, 3, 1, 1),
                                 persistent=False)
        self.freeze()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> VGGPerceptual:
        """Load the relu2_2 part of a torchvision `vgg16` state dict (the rest is ignored)."""
        with torch.device("meta"):  # no random init: every weight comes from the file
            vgg = cls()
        label = f"vgg_weights {os.fspath(path)}"
        full = read_state_dict(path, "torchvision vgg16 weight file", flag="vgg_weights")
        # Keep only the keys this truncated network has; any of them absent is reported as missing.
        wanted = {k: full[k] for k in vgg.state_dict() if k in full}
        load_checked(vgg, wanted, label, "torchvision vgg16", assign=True)
        return vgg

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> [0, 1] -> ImageNet-normalised, as torchvision's VGG16 expects."""
        return ((x + 1) / 2 - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))


def perceptual_l1(vgg: VGGPerceptual | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between VGG16 relu2_2 features of `a` and `b`; pixel L1 when `vgg` is None."""
    if vgg is None:
        return l1(a, b)
    return l1(vgg(a), vgg(b))
