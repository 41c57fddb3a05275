"""Fused Triton kernels for g2g-fast (leaf package: torch and triton; the reference twins are
imported lazily from `g2g_fast.reference.ops`).

`adain` is the single dispatch point between the Triton kernel and its plain-PyTorch reference.
"""
from __future__ import annotations

import logging

import torch

from ._utils import interpreting, is_supported_layout, triton_available

from .upsample_conv import upsample_conv

__all__ = ["adain", "adain_backend", "upsample_conv"]

IMPLS = ("auto", "triton", "ref")
_log = logging.getLogger("g2g_fast")
_said: set[str] = set()


def adain_backend(x: torch.Tensor, impl: str = "auto") -> tuple[str, str]:
    """-> ("triton" | "ref", why). Every reason to fall back is listed here and nowhere else."""
    if impl not in IMPLS:
        raise ValueError(f"adain: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "ref":
        return "ref", "impl='ref' requested"
    ok, why = triton_available()
    reasons = []
    if not ok:
        reasons.append(why)
    if not (x.is_cuda or (interpreting() and x.device.type == "cpu")):
        reasons.append(f"{x.device.type} tensor (Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1)")
    if x.dim() == 4 and not is_supported_layout(x):
        reasons.append("input is neither NCHW-contiguous nor channels_last")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"dtype {x.dtype} (supported: fp32, bf16, fp16)")
    if not reasons:
        return "triton", "CUDA tensor" if x.is_cuda else "TRITON_INTERPRET=1"
    if impl == "triton":
        raise RuntimeError("adain: impl='triton' is not possible: " + "; ".join(reasons))
    return "ref", "; ".join(reasons)


def adain(x, weight=None, bias=None, *, act="none", slope=0.2, residual=None, eps=1e-5, impl="auto"):
    """y = act(instance_norm(x) * weight + bias) + residual (FUNIT AdaIN; see
    `g2g_fast.reference.ops.adain_ref` for the exact semantics).

    weight/bias: (B, C) for AdaIN, (C,) for an affine instance norm, or None. act: "none", "relu"
    or "lrelu" (`slope`). residual: optional tensor of x's shape. impl: "auto" (Triton for CUDA
    tensors or under TRITON_INTERPRET=1, else the reference), "triton" or "ref".
    """
    backend, why = adain_backend(x, impl)
    key = f"{backend}:{why}"
    if impl == "auto" and key not in _said and not torch.compiler.is_compiling():  # once per reason
        _said.add(key)
        _log.info("kernels.adain: using %s (%s)", backend, why)
    if backend == "ref":
        from g2g_fast.reference.ops import adain_ref
        return adain_ref(x, weight, bias, act=act, slope=slope, residual=residual, eps=eps)
    from .instance_norm import adain_triton
    return adain_triton(x, weight, bias, act=act, slope=slope, residual=residual, eps=eps)
