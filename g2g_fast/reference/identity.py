"""Frozen VGGFace2 ResNet-50 identity encoder (SPEC.md §4), in the public `resnet50_ft` layout.

`IdentityEncoder` reproduces the architecture and state-dict key layout of the public `resnet50_ft`
PyTorch port of VGGFace2, so its weight file loads with `strict=True`:

- Caffe-style ResNet-50 without conv biases. Stem: `conv1_7x7_s2` (7x7, s2, p3) + `conv1_7x7_s2_bn`,
  ReLU, max-pool 3x3 s2 p0 with `ceil_mode=True`.
- Stages conv2..conv5 with 3, 4, 6, 3 bottleneck blocks: `conv{s}_{b}_1x1_reduce`, `conv{s}_{b}_3x3`
  (p1), `conv{s}_{b}_1x1_increase`, each followed by `<name>_bn` (BatchNorm, eps 1e-5); block 1 of
  each stage adds a projection `conv{s}_1_1x1_proj` + `_bn`. The stride 2 of stages 3-5 sits in
  block 1's `1x1_reduce` and `1x1_proj` convs (Caffe style, not in the 3x3 as in torchvision).
- `pool5_7x7_s1` (AvgPool 7, stride 1) and `classifier = Conv2d(2048, 8631, 1)`: 320 state-dict
  entries in all, counting BatchNorm's `num_batches_tracked`.

All modules are direct attributes, so the keys are flat (`conv2_1_1x1_reduce.weight`, ...).
`IdentityEncoder.from_file` loads a weight file strictly, then drops the classifier (only the 2048-d
pool5 output is used), freezes every parameter and keeps the module in eval mode for good (BatchNorm
uses its running statistics). `forward` takes images in [-1, 1] of any size, resizes them to 224x224
(bilinear), maps them to [0, 255] minus the mean RGB [131.0912, 103.8827, 91.4953] and returns the
flattened pool5 features (B, 2048). Gradients flow to the input, since the generator is trained
through this encoder.

"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .weights import Frozen, load_checked, read_state_dict

MEAN_RGB = (131.0912, 103.8827, 91.4953)
INPUT_SIZE = 224
NUM_IDENTITIES = 8631
# (stage, number of blocks, bottleneck width, output width, stride of block 1)
STAGES = ((2, 3, 64, 256, 1), (3, 4, 128, 512, 2), (4, 6, 256, 1024, 2), (5, 3, 512, 2048, 2))


class IdentityEncoder(Frozen):
    """VGGFace2 ResNet-50 (`resnet50_ft` layout); images in [-1, 1] -> pool5 features (B, 2048)."""

    out_dim = 2048

    def __init__(self) -> None:
        super().__init__()
        self._add_conv_bn("conv1_7x7_s2", 3, 64, 7, stride=2, padding=3)
        self.pool1 = nn.MaxPool2d(3, stride=2, padding=0, ceil_mode=True)
        # Block prefixes in execution order, with whether the block has a projection shortcut.
        self._blocks: list[tuple[str, bool]] = []
        in_ch = 64
        for stage, n_blocks, width, out_ch, stride in STAGES:
            for b in range(1, n_blocks + 1):
                prefix = f"conv{stage}_{b}"
                s = stride if b == 1 else 1
                self._add_conv_bn(f"{prefix}_1x1_reduce", in_ch, width, 1, stride=s)
                self._add_conv_bn(f"{prefix}_3x3", width, width, 3, padding=1)
                self._add_conv_bn(f"{prefix}_1x1_increase", width, out_ch, 1)
                if b == 1:
                    self._add_conv_bn(f"{prefix}_1x1_proj", in_ch, out_ch, 1, stride=s)
                self._blocks.append((prefix, b == 1))
                in_ch = out_ch
        self.pool5_7x7_s1 = nn.AvgPool2d(7, stride=1)
        # Only present so that the official file loads strictly; `from_file` removes it.
        self.classifier = nn.Conv2d(2048, NUM_IDENTITIES, 1)
        # Explicit device: this constant is not in the file, so it must not land on the meta device.
        mean = torch.tensor(MEAN_RGB, device="cpu").view(1, 3, 1, 1)
        self.register_buffer("mean_rgb", mean, persistent=False)
        self.freeze()

    def _add_conv_bn(self, name: str, cin: int, cout: int, k: int, stride: int = 1,
                     padding: int = 0) -> None:
        setattr(self, name, nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False))
        setattr(self, f"{name}_bn", nn.BatchNorm2d(cout, eps=1e-5))

    def _conv_bn(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"{name}_bn")(getattr(self, name)(x))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> IdentityEncoder:
        """Load a `resnet50_ft` weight file strictly, then drop the classifier (frozen, eval)."""
        # Built on the meta device: randomly initialising 42M weights that the file overwrites
        # would cost more than reading the file.
        with torch.device("meta"):
            enc = cls()
        label = f"identity_weights {os.fspath(path)}"
        load_checked(enc, read_state_dict(path, "resnet50_ft weight file", flag="identity_weights"), label, "resnet50_ft (VGGFace2 ResNet-50)", assign=True)
        enc.classifier = nn.Identity()
        return enc

    @classmethod
    def architecture(cls) -> IdentityEncoder:
        """The network of `from_file` with uninitialised weights, for a checkpoint that holds them
        (CycleFUNIT's identity class encoder is part of G) to be loaded into next; built on the
        meta device, as `from_file` does, instead of randomly initialising 25M weights."""
        with torch.device("meta"):
            enc = cls()
        enc.classifier = nn.Identity()
        enc = enc.to_empty(device="cpu")
        # Not in any state dict, so not filled by the load: set again (to_empty left it garbage).
        enc.mean_rgb = torch.tensor(MEAN_RGB, device="cpu").view(1, 3, 1, 1)
        return enc

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images of any size -> 224x224, [0, 255] minus the VGGFace2 mean RGB."""
        if tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                              align_corners=False, antialias=False)
        return (x + 1) * 127.5 - self.mean_rgb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self._conv_bn("conv1_7x7_s2", self.preprocess(x)))
        x = self.pool1(x)
        for prefix, has_proj in self._blocks:
            y = F.relu(self._conv_bn(f"{prefix}_1x1_reduce", x))
            y = F.relu(self._conv_bn(f"{prefix}_3x3", y))
            y = self._conv_bn(f"{prefix}_1x1_increase", y)
            shortcut = self._conv_bn(f"{prefix}_1x1_proj", x) if has_proj else x
            x = F.relu(y + shortcut)
        # The classifier is never applied: the identity code is the pool5 output.
        return self.pool5_7x7_s1(x).flatten(1)
