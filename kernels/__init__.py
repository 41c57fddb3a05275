"""Fused Triton kernels for g2g-fast (leaf package: torch and triton; the reference twins are
imported lazily from `g2g_fast.reference.ops`).

`adain` and `reflect_pad` are the single dispatch points between the Triton kernels and their
plain-PyTorch references; `backend` lists every reason to fall back, for both.
"""
from __future__ import annotations

import logging

import torch

from ._utils import check_reflect_pad, interpreting, is_supported_layout, triton_available

from .upsample_conv import upsample_conv

if triton_available()[0]:
    # Imported now, before the functional `reflect_pad` below takes the name: the first import of a
    # submodule binds it on the package, which would shadow the function of the same name. Use
    # `from kernels.reflect_pad import ...` or importlib for the module (upsample_conv alike).
    from . import reflect_pad as _reflect_pad_module  # noqa: F401

__all__ = ["adain", "adain_backend", "backend", "reflect_pad", "reflect_pad_backend", "upsample_conv"]

IMPLS = ("auto", "triton", "ref")
_log = logging.getLogger("g2g_fast")
_said: set[str] = set()


def backend(op: str, x: torch.Tensor, impl: str = "auto") -> tuple[str, str]:
    """-> ("triton" | "ref", why) for kernel `op` on x. Every reason to fall back is listed here
    and nowhere else (the same for every op: triton, device, layout, dtype)."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
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
        raise RuntimeError(f"{op}: impl='triton' is not possible: " + "; ".join(reasons))
    return "ref", "; ".join(reasons)


def _choose(op: str, x: torch.Tensor, impl: str) -> str:
    """`backend`, and an info log line once per (op, backend, reason) under impl='auto'."""
    name, why = backend(op, x, impl)
    key = f"{op}:{name}:{why}"
    if impl == "auto" and key not in _said and not torch.compiler.is_compiling():  # once per reason
        _said.add(key)
        _log.info("kernels.%s: using %s (%s)", op, name, why)
    return name


def adain_backend(x: torch.Tensor, impl: str = "auto") -> tuple[str, str]:
    """-> ("triton" | "ref", why) for `adain` on x (see `backend`)."""
    return backend("adain", x, impl)


def reflect_pad_backend(x: torch.Tensor, impl: str = "auto") -> tuple[str, str]:
    """-> ("triton" | "ref", why) for `reflect_pad` on x (see `backend`)."""
    return backend("reflect_pad", x, impl)


def adain(x, weight=None, bias=None, *, act="none", slope=0.2, residual=None, eps=1e-5, impl="auto"):
    """y = act(instance_norm(x) * weight + bias) + residual (FUNIT AdaIN; see
    `g2g_fast.reference.ops.adain_ref` for the exact semantics).

    weight/bias: (B, C) for AdaIN, (C,) for an affine instance norm, or None. act: "none", "relu"
    or "lrelu" (`slope`). residual: optional tensor of x's shape. impl: "auto" (Triton for CUDA
    tensors or under TRITON_INTERPRET=1, else the reference), "triton" or "ref".
    """
    if _choose("adain", x, impl) == "ref":
        from g2g_fast.reference.ops import adain_ref
        return adain_ref(x, weight, bias, act=act, slope=slope, residual=residual, eps=eps)
    from .instance_norm import adain_triton
    return adain_triton(x, weight, bias, act=act, slope=slope, residual=residual, eps=eps)


def reflect_pad(x: torch.Tensor, pad: int, impl: str = "auto") -> torch.Tensor:
    """F.pad(x, (pad,) * 4, mode="reflect") of a (B, C, H, W) tensor, 0 <= pad < H, W (see
    `g2g_fast.reference.ops.reflect_pad_ref` for the exact semantics).

    The Triton op keeps x's memory format (channels_last in, channels_last out; aten's CUDA kernel
    writes NCHW), has a deterministic backward (a gather, no atomics) and a double backward (R1).
    impl: "auto" (Triton for CUDA tensors or under TRITON_INTERPRET=1, else the reference),
    "triton" or "ref". A pad too large for x raises ValueError whichever impl runs.
    """
    pad = check_reflect_pad(x.shape, pad)
    if _choose("reflect_pad", x, impl) == "ref":
        from g2g_fast.reference.ops import reflect_pad_ref
        return reflect_pad_ref(x, pad)
    from .reflect_pad import reflect_pad_triton
    return reflect_pad_triton(x, pad)
