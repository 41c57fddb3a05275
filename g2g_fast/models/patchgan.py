"""CycleGAN's PatchGAN with each instance norm + LeakyReLU as one fused `kernels.adain` pass
(same keys and initialisation as `g2g_fast.reference.patchgan.PatchDiscriminator`). No R1 in
CycleFUNIT, so D needs no double backward through the fused op."""
from __future__ import annotations

import torch.nn as nn

from g2g_fast.ops import adain
from g2g_fast.reference import patchgan as ref

from .impl import Switchable

__all__ = ["PatchDiscriminator"]


class InstanceNormLReLU(nn.Module):
    """instance norm (no affine) -> LeakyReLU(0.2), fused."""

    def __init__(self, impl: str = "auto"):
        super().__init__()
        self.impl = impl

    def forward(self, x):
        return adain(x, act="lrelu", slope=0.2, impl=self.impl)


class PatchDiscriminator(Switchable, ref.PatchDiscriminator):
    def __init__(self, nf: int = 64, impl: str = "auto"):
        super().__init__(nf)
        for i, layer in enumerate(self.model):
            if isinstance(layer, ref.InstanceNorm):  # the LeakyReLU after it is fused into it
                self.model[i], self.model[i + 1] = InstanceNormLReLU(), nn.Identity()
        self.impl = impl
