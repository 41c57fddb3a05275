"""Fused ops as the models use them. `kernels.adain` is the single dispatch point between the
Triton kernel and the plain-PyTorch reference (`g2g_fast.reference.ops`)."""
from kernels import adain, adain_backend

__all__ = ["adain", "adain_backend"]
