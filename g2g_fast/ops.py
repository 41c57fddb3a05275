"""Fused ops as the models use them. `kernels.adain` and `kernels.reflect_pad` are the single
dispatch points between the Triton kernels and the plain-PyTorch references
(`g2g_fast.reference.ops`); `kernels.upsample_conv` the one between the sub-pixel rewrite of the
decoder's upsampling and its reference."""
from kernels import adain, adain_backend, reflect_pad, reflect_pad_backend, upsample_conv

__all__ = ["adain", "adain_backend", "reflect_pad", "reflect_pad_backend", "upsample_conv"]
