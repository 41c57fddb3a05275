"""Training backends: how an approach builds its generator, optimisers and EMA update.

`reference` (g2g_fast.reference.steps.ReferenceBackend): plain PyTorch, the truth.
`fast`: the fast networks (`g2g_fast.models`: fused norms and reflect pads in G and both
discriminators, the naive generator's AdaIN), channels_last weights and activations,
fused/foreach optimisers (NVIDIA apex's FusedAdam when importable on CUDA; never a dependency)
and the EMA as foreach ops. Same state_dict keys and the same math, so parity is a load + compare.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .reference.steps import ReferenceBackend

log = logging.getLogger("g2g_fast")


def _apex_fused_adam():
    try:
        from apex.optimizers import FusedAdam  # NVIDIA apex, built from source by the user
    except Exception:
        return None
    return FusedAdam


class FastBackend(ReferenceBackend):
    """`subpixel`: the decoder's upsample + 5x5 convs by the exact phase rewrite
    (`kernels.upsample_conv`); off until measured faster on a GPU (bench/gpu_report.py's
    fast-subpixel row)."""

    name = "fast"
    memory_format = torch.channels_last

    def __init__(self, subpixel: bool = False):
        self.subpixel = subpixel

    def networks(self):
        from . import models  # the same modules with their norms and pads through kernels' ops
        return models

    def generator(self, **kwargs) -> nn.Module:
        return self.networks().Generator(**kwargs, subpixel=self.subpixel)

    def rmsprop(self, params, **kwargs):
        # PyTorch has no fused RMSprop; foreach runs one kernel per op over all tensors.
        return torch.optim.RMSprop(params, foreach=True, **kwargs)

    def adam(self, params, **kwargs):
        params = list(params)
        if params and all(p.is_cuda for p in params):
            fused = _apex_fused_adam()
            if fused is not None:
                return fused(params, adam_w_mode=False, **kwargs)
        return torch.optim.Adam(params, fused=True, **kwargs)

    @torch.no_grad()
    def ema_update(self, ema: nn.Module, model: nn.Module, beta: float) -> None:
        # One foreach lerp over all parameters: p_ema += (1 - beta) * (p - p_ema).
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - beta)
        ema_buffers, buffers = list(ema.buffers()), list(model.buffers())
        if ema_buffers:
            torch._foreach_copy_(ema_buffers, buffers)

    def describe(self, approach) -> dict:
        from kernels import adain_backend
        probe = torch.empty(1, 1, 2, 2, device=approach.device)
        kernels = "adain:" + adain_backend(probe)[0]  # reflect_pad dispatches by the same rules
        return {"backend": self.name, "kernels": kernels,
                "optimizer": type(approach.opt_g).__module__ + "." + type(approach.opt_g).__name__,
                "precision": approach.precision, "memory_format": "channels_last",
                "decoder_upsample": "subpixel" if self.subpixel else "nearest+conv5"}


BACKENDS = {"reference": ReferenceBackend, "fast": FastBackend}


def force_impl(approach, impl: str) -> bool:
    """Set `impl` ("auto" | "triton" | "ref") on every module of the approach's networks that has
    one (the fast networks' fused norms and pads: G, its EMA copy, D); False when none has (the
    reference networks). Tests and the CPU benchmarks force "ref" where the Triton interpreter
    would be too slow and the kernels are not what is measured."""
    found = False
    for net in (approach.gen, approach.dis, approach.gen_ema):
        for m in (net.modules() if net is not None else ()):
            if hasattr(m, "impl"):
                m.impl, found = impl, True
    return found
