"""Fused ops as the models use them. `kernels.adain` is the single dispatch point between the
Triton kernel and the plain-PyTorch reference (`g2g_fast.reference.ops`); `kernels.upsample_conv`
the one between the sub-pixel rewrite of the decoder's upsampling and its reference."""
from kernels import adain, adain_backend, upsample_conv

__all__ = ["adain", "adain_backend", "upsample_conv"]
