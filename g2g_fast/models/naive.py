"""The naive approach's networks with the fast path's two changes (SPEC §5, §7): the generator's
AdaIN layers through `kernels.adain` (the fused Triton kernel on CUDA), and its first feature
map in channels_last. Same modules, keys and initialisation order as
`g2g_fast.reference.naive.NaiveModel`; the BatchNorm encoders are the reference's (cuDNN's
batch norm reads channels_last as it is)."""
from __future__ import annotations

import torch

from g2g_fast.ops import adain
from g2g_fast.reference import naive as ref

from .impl import Switchable

__all__ = ["NaiveModel"]


class LordGenerator(ref.LordGenerator):
    impl = "auto"  # "auto" | "triton" | "ref", as g2g_fast.models.funit.Generator

    def norm(self, x, weight, bias):
        return adain(x, weight, bias, impl=self.impl)

    def grid(self, x):
        # LORD's FC output is a (B, C*h*w) vector in NCHW order (the parameters fix that order):
        # one conversion here, at 1/16 of the image size, keeps the convolutions after it in the
        # network's channels_last (a no-op for an NCHW network).
        if self.adain_convs[0].weight.is_contiguous(memory_format=torch.channels_last):
            return x.contiguous(memory_format=torch.channels_last)
        return x


class NaiveModel(Switchable, ref.NaiveModel):
    generator_class = LordGenerator
