"""The reference training backend: how an approach builds its networks, optimisers and EMA
update in plain PyTorch (`g2g_fast.backends.FastBackend` is the fast one)."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn

from .funit import Generator
from .funit_dis import Discriminator
from .naive import NaiveModel
from .patchgan import PatchDiscriminator


class ReferenceBackend:
    """How an approach builds its networks (generator, discriminator, PatchGAN, naive model),
    optimisers and EMA update: plain PyTorch, fp32 layouts, PyTorch's default optimiser
    implementations. `g2g_fast.backends.FastBackend` swaps in the fast networks (fused norms and
    pads), channels_last, fused optimisers and a foreach EMA."""

    name = "reference"
    memory_format = torch.contiguous_format

    def networks(self):
        """The network classes this backend builds: Generator, Discriminator (FUNIT's),
        PatchDiscriminator, NaiveModel (here the reference's; the fast backend's are
        `g2g_fast.models`', same constructors and keys)."""
        return SimpleNamespace(Generator=Generator, Discriminator=Discriminator,
                               PatchDiscriminator=PatchDiscriminator, NaiveModel=NaiveModel)

    def generator(self, **kwargs) -> nn.Module:
        return self.networks().Generator(**kwargs)

    def discriminator(self, *args) -> nn.Module:
        return self.networks().Discriminator(*args)

    def patch_discriminator(self, *args) -> nn.Module:
        return self.networks().PatchDiscriminator(*args)

    def naive_model(self, *args) -> nn.Module:
        return self.networks().NaiveModel(*args)

    def rmsprop(self, params, **kwargs):
        return torch.optim.RMSprop(params, **kwargs)

    def adam(self, params, **kwargs):
        return torch.optim.Adam(params, **kwargs)

    def ema_update(self, ema: nn.Module, model: nn.Module, beta: float) -> None:
        ema_update(ema, model, beta)

    def describe(self, approach) -> dict:
        """What ran, for metrics and benchmark metadata."""
        return {"backend": self.name, "kernels": "reference",
                "optimizer": type(approach.opt_g).__name__, "precision": approach.precision}


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """p_ema = beta * p_ema + (1 - beta) * p over parameters; buffers are copied."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1.0 - beta)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)
