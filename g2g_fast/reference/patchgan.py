"""CycleGAN's 70x70 PatchGAN (NLayerDiscriminator, 3 layers, instance norm), SPEC §4."""
from __future__ import annotations

import torch.nn as nn

from .ops import adain_ref


class InstanceNorm(nn.Module):
    """nn.InstanceNorm2d(affine=False) through the reference op (no parameters, no state)."""

    def forward(self, x):
        return adain_ref(x)


class PatchDiscriminator(nn.Module):
    """k4 p1 convs: 3->64 s2 lrelu; 64->128 s2 IN lrelu; 128->256 s2 IN lrelu; 256->512 s1 IN lrelu;
    512->1 s1. Conv bias on (CycleGAN keeps it with instance norm); init N(0, 0.02), zero bias.
    Module indices follow CycleGAN's `model.N` so its files load."""

    def __init__(self, nf: int = 64):
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(3, nf, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(nf, 2 * nf, 4, 2, 1), InstanceNorm(), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * nf, 4 * nf, 4, 2, 1), InstanceNorm(), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * nf, 8 * nf, 4, 1, 1), InstanceNorm(), nn.LeakyReLU(0.2),
            nn.Conv2d(8 * nf, 1, 4, 1, 1),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.model(x)
