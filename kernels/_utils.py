"""Shared helpers of the Triton kernels: availability, block heuristics, layout views."""
from __future__ import annotations

import os
import re
from typing import Optional

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


def _major_minor(version: str) -> tuple[int, int]:
    """"3.6.0" / "2.4.0rc1" -> (3, 6) / (2, 4)."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def check_interpreter_loops() -> None:
    """Refuse, with the fix, the one known broken combination for kernels with runtime loops.

    Triton < 3.7's interpreter turns a loop bound into a Python int with `int(array)` on a
    1-element array, which NumPy >= 2.4 rejects ("only 0-dimensional arrays can be converted
    to Python scalars"); 3.7 squeezes first. Compiled (GPU) kernels are unaffected.
    """
    if not interpreting():
        return
    import numpy
    import triton
    if _major_minor(triton.__version__) < (3, 7) and _major_minor(numpy.__version__) >= (2, 4):
        raise RuntimeError(
            f"the Triton interpreter of triton {triton.__version__} cannot run looped kernels with "
            f"numpy {numpy.__version__}: install numpy<2.4 or triton>=3.7 (or run on a GPU)")


INT32_MAX = 2**31 - 1


def max_offset(t: torch.Tensor) -> int:
    """Largest element offset from t's first element: sum over dims of (size - 1) * |stride|."""
    return sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) if t.numel() else 0


def needs_int64(*tensors: Optional[torch.Tensor]) -> bool:
    """True when some kernel offset may not fit int32, so the kernels' INT64 variant must run.

    Offsets are computed in int32 by default (cheaper address math on the GPU); an offset
    past 2^31 - 1 would wrap to a wrong address. Works on meta tensors (no data is touched).
    """
    return any(t is not None and max_offset(t) >= INT32_MAX for t in tensors)


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
