"""Shared helpers of the Triton kernels: availability, block heuristics, layout views."""
from __future__ import annotations

import operator
import os
import re
from dataclasses import dataclass
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


def check_reflect_pad(shape, pad, what: str = "reflect_pad") -> int:
    """-> pad as an int; ValueError unless shape is (B, C, H, W) with 0 <= pad < H and pad < W."""
    try:
        pad = operator.index(pad)
    except TypeError:
        raise ValueError(f"{what}: pad must be an int, got {pad!r}") from None
    if len(shape) != 4:
        raise ValueError(f"{what}: expected a (B, C, H, W) tensor, got shape {tuple(shape)}")
    H, W = shape[-2:]
    if pad < 0 or pad >= H or pad >= W:
        raise ValueError(
            f"{what}: reflect padding needs 0 <= pad < H and pad < W (it repeats no edge pixel, as "
            f"F.pad(mode='reflect')), got pad={pad} for an input of shape {tuple(shape)}")
    return pad


def is_supported_layout(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------
# Targets: what a launch plan depends on, explicit so that the CPU tests can run the exact plans
# a GPU would pick (through the interpreter) and the compile gate can compile them for sm_90/80.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """The machine a launch is planned for.

    sms:         streaming multiprocessors; a launch wants at least this many programs.
    l2_bytes:    L2 cache size; bounds the working set of the two-pass plan, whose second read
                 must come from L2 to stay at the fused memory ledger.
    arch:        compute capability x 10 (90 Hopper, 80 Ampere) for `triton.compile`; 0 = none.
    interpreter: plans for the Triton interpreter (CPU), where a bigger pixel block is cheaper.
    max_tile:    elements of one fused tile held in registers: 16 warps x 32 lanes x 32 fp32
                 values (128 registers per thread at 16 warps, the per-thread cap of a 64K file).
    """
    name: str
    sms: int
    l2_bytes: int
    arch: int = 0
    interpreter: bool = False
    max_tile: int = 16384


TARGETS = {
    # H100 SXM and H200 are the same GH100 die: 132 SMs, 50 MB of L2.
    "h100": Target("h100", sms=132, l2_bytes=50 << 20, arch=90),
    "h200": Target("h200", sms=132, l2_bytes=50 << 20, arch=90),
    "a100": Target("a100", sms=108, l2_bytes=40 << 20, arch=80),
    # Any small SM count takes the same branches on the small shapes the CPU tests can afford.
    "interpreter": Target("interpreter", sms=4, l2_bytes=4 << 20, interpreter=True),
}


def target_of(device: torch.device) -> Target:
    """The Target of a device: read from the CUDA device, or the interpreter's on the CPU."""
    if device.type != "cuda":
        return TARGETS["interpreter"]
    p = torch.cuda.get_device_properties(device)
    return Target(p.name, sms=p.multi_processor_count,
                  l2_bytes=getattr(p, "L2_cache_size", 0) or (40 << 20), arch=p.major * 10 + p.minor)


def inner_dim(t: torch.Tensor) -> Optional[str]:
    """Which index of a (B, C, H, W) tensor is contiguous in memory: "c" (channels_last),
    "p" (NCHW: pixels) or None (neither, e.g. a zero-stride broadcast, or a 1-element axis)."""
    B, C, H, W = t.shape
    if C > 1 and t.stride(1) == 1:
        return "c"
    if H * W > 1 and t.stride(3 if W > 1 else 2) == 1:
        return "p"
    return None


def match_layout(t: Optional[torch.Tensor], ref: torch.Tensor) -> Optional[torch.Tensor]:
    """t in ref's memory format when their contiguous dims differ (one copy), else t itself.

    A kernel reading one tensor along pixels and another along channels needs a register
    layout conversion through shared memory, which spills at 16 warps in fp32 (see the compile
    gate); one explicit copy of the odd tensor is cheaper and is counted in the ledger.
    """
    if t is None:
        return t
    a, b = inner_dim(t), inner_dim(ref)
    if a is None or b is None or a == b:
        return t
    fmt = torch.channels_last if b == "c" else torch.contiguous_format
    return t.contiguous(memory_format=fmt)
