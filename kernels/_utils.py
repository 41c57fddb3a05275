"""Shared helpers of the Triton kernels: availability, block heuristics, layout views."""
from __future__ import annotations

import os

import torch


_TRITON: list[tuple[bool, str]] = []  # probed once (a plain cache: torch.compile traces through it)


def triton_available() -> tuple[bool, str]:
    """(usable, reason). Triton is optional: without it every op runs its reference twin."""
    if not _TRITON:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _TRITON.append((True, "triton importable"))
        except Exception as e:  # ImportError, or a broken install
            _TRITON.append((False, f"triton is not importable ({type(e).__name__}: {e})"))
    return _TRITON[0]


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_power_of_2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def bchw_view(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides (batch, channel, pixel) of a 4-D tensor whose H x W plane is one flat index.

    Valid for NCHW-contiguous (pixel stride 1) and channels_last (pixel stride C) tensors,
    the two layouts the kernels accept; anything else must be made contiguous by the caller.
    """
    B, C, H, W = t.shape
    sb, sc, sh, sw = t.stride()
    if H * W > 1 and W > 1 and sh != sw * W:
        raise ValueError(f"H and W must be jointly flat (strides {tuple(t.stride())})")
    if H * W > 1 and W == 1:
        sw = sh
    return sb, sc, sw


def is_supported_layout(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
