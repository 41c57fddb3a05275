"""The compile gate's first stage (`kernels/aot.py`): record every launch of the launchers in
`OPS` on meta tensors, with each Triton kernel of their module replaced by a recorder and the
plans those of the target GPU (FORCE_TARGET). Nothing is compiled here."""
from __future__ import annotations

import importlib
import math
from typing import NamedTuple

import torch

from ._utils import TARGETS
from .aot_cases import DTYPES, FORMATS, PADS, VARIANTS, Case

ARCHS = {90: "h100", 80: "a100"}       # compute capability x 10 -> planning Target

# --------------------------------------------------------------------------------------------
# Recording: the launchers on meta tensors, kernels replaced by recorders.
# --------------------------------------------------------------------------------------------
class Launch(NamedTuple):
    case: Case
    arch: int
    kernel: str           # attribute name in `module`
    module: str
    grid: tuple
    args: tuple
    kwargs: dict
    plan: dict            # the plan's row fields: plan (kind), block, splits, programs


class _Recorder:
    def __init__(self, name, sink):
        self.name, self.sink = name, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.name, grid, args, kwargs))


def _meta(case: Case):
    """-> (activation maker by format, weight, bias, act, has_residual), all on the meta device."""
    B, C, H, W = case.shape
    dt = DTYPES[case.dtype]
    pdt = DTYPES[case.param_dtype or case.dtype]

    def make(fmt):
        return torch.empty(case.shape, dtype=dt, device="meta").contiguous(memory_format=FORMATS[fmt])
    affine, act, residual = VARIANTS[case.variant]
    if affine == "bc":  # slices of the MLP output [bias | weight] (Decoder.split_adain_params)
        params = torch.empty(B, 2 * C, dtype=pdt, device="meta")
        weight, bias = params[:, C:], params[:, :C]
    elif affine == "c":
        weight, bias = torch.empty(C, dtype=pdt, device="meta"), torch.empty(C, dtype=pdt, device="meta")
    else:
        weight = bias = None
    return make, weight, bias, act, residual


def _call_adain(K, case: Case) -> None:
    """One `adain_fwd` / `adain_bwd` call on meta tensors."""
    make, weight, bias, act, residual = _meta(case)
    x = make(case.fmt)
    B, C = case.shape[:2]
    if case.direction == "fwd":
        K.adain_fwd(x, weight, bias, make(case.other_fmt) if residual else None, act, 0.2, 1e-5)
    else:
        stats = torch.empty(B, C, dtype=torch.float32, device="meta")
        K.adain_bwd(make(case.other_fmt), x, weight, bias, stats, stats, act, 0.2)


def _call_reflect_pad(K, case: Case) -> None:
    """One `reflect_pad_fwd` (on x) / `reflect_pad_bwd` (on dy, x's shape padded) call on meta tensors."""
    pad = PADS[case.variant]
    B, C, H, W = case.shape
    shape = case.shape if case.direction == "fwd" else (B, C, H + 2 * pad, W + 2 * pad)
    t = torch.empty(shape, dtype=DTYPES[case.dtype], device="meta").contiguous(memory_format=FORMATS[case.fmt])
    launcher = K.reflect_pad_fwd if case.direction == "fwd" else K.reflect_pad_bwd
    launcher(t, pad, case.fmt == "cl")


def _adain_fields(pl, grid) -> dict:
    return dict(plan=pl.kind, block=f"{pl.block_c}x{pl.block_p}", splits=pl.splits, programs=pl.programs)


def _reflect_pad_fields(pl, grid) -> dict:
    return dict(plan="tile", block=f"{pl.block_c}x{pl.block_p}", splits=1, programs=math.prod(grid))


# case.op -> (module whose kernels are recorded, its launcher call, the plan's row fields). Each
# launcher looks its kernels and `plan` up as module attributes at call time, so swapping them
# for recorders records every launch.
OPS = {"adain": ("kernels.instance_norm", _call_adain, _adain_fields),
       "reflect_pad": ("kernels.reflect_pad", _call_reflect_pad, _reflect_pad_fields)}


def jit_functions(K) -> dict:
    from triton.runtime.jit import JITFunction
    return {n: v for n, v in vars(K).items() if isinstance(v, JITFunction)}


def record(case: Case, arch: int) -> list[Launch]:
    """The kernel launches of one launcher call, planned for `arch` (no memory is touched)."""
    module, call, fields = OPS[case.op]
    K = importlib.import_module(module)
    kernels = jit_functions(K)
    if not kernels:
        raise RuntimeError(f"{module} has no JITFunction (TRITON_INTERPRET=1?): "
                           "run the compile gate with TRITON_INTERPRET=0")
    sink, plans = [], []
    real_plan = K.plan

    def plan(*a, **kw):
        plans.append(real_plan(*a, **kw))
        return plans[-1]
    # The plans of that GPU (FORCE_TARGET): adain's depend on it, reflect_pad's only leave the interpreter's.
    saved = (getattr(K, "FORCE_TARGET", None), K.plan)
    try:
        for n in kernels:
            setattr(K, n, _Recorder(n, sink))
        if hasattr(K, "FORCE_TARGET"):
            K.FORCE_TARGET = TARGETS[ARCHS[arch]]
        K.plan = plan
        call(K, case)
    finally:
        for n, fn in kernels.items():
            setattr(K, n, fn)
        if hasattr(K, "FORCE_TARGET"):
            K.FORCE_TARGET = saved[0]
        K.plan = saved[1]
    return [Launch(case, arch, n, K.__name__, tuple(g), a, kw, fields(plans[-1], g)) for n, g, a, kw in sink]
