"""Fused instance norm / AdaIN (+ activation, + residual add), forward and backward, in Triton.

    y = act(normalize(x) * weight + bias) + residual,   normalize over H x W per (b, c)

Semantics are those of `g2g_fast.reference.ops.adain_ref` (biased variance, eps inside the
square root, fp32 statistics). Layout: a (B, C, H, W) tensor is read as (B, C, P) with P = H*W
through its strides, so NCHW-contiguous (pixel stride 1) and channels_last (pixel stride C)
inputs are both read in place and the output keeps the input's memory format.

Memory traffic (the ledger the benchmarks count; N = elements of x):
  forward, fused     read x (+ residual), write y                           -> 2 (3) x N
  forward, two-pass  read x, read it again from L2, (+ residual), write y   -> 2 (3) x N
  forward, split     read x twice (stats kernel, apply kernel), write y     -> 3 (4) x N
  backward, fused    read x, dy, write dx                                   -> 3 x N
  backward, two-pass read x, dy, again from L2, write dx                    -> 3 x N
  backward, split    read x, dy twice, write dx                             -> 5 x N
plus O(B*C) statistics, plus 2 x N for a residual or gradient whose layout differs from x's
(copied once into x's layout: a kernel reading two layouts converts through shared memory and
spills). The paths (`plan`, which takes the target machine explicitly):
  fused     one program per (batch, channel block) row holding the whole row in registers;
  two-pass  rows too long for registers: a persistent grid of programs, each takes rows in turn
            and reads a row twice (statistics, then apply). The rows in flight (at least one per
            SM) are kept within 3/4 of the L2, so the second read hits L2: for channels_last a
            row is a 32-byte sector of channels, narrowed to as little as 8 bytes where needed
            (bench/gpu_report.py measures these choices against the split path);
  split     too few rows to fill the GPU: H*W is cut into chunks whose partial statistics are
            merged exactly (Chan et al.'s parallel variance) by a second kernel.
Per-(b, c) reductions are done by one program each, in a fixed order: no atomics, deterministic.

Offsets: element offsets are int32 products (cheaper address math) unless some argument can reach
an offset >= 2^31 - 1 (`_utils.needs_int64`: sum of (size - 1) * |stride|); then the launchers set
the INT64 constexpr and every kernel casts its program-id-derived indices (batch, channel block,
split start, pixels) to int64, so each offset product is 64-bit. Same bits either way.

Layers: `_adain_*_kernel` (Triton, in `instance_norm_kernels.py`) -> `adain_fwd` / `adain_bwd` launchers -> `torch.library`
custom ops `g2g_kernels::adain_fwd` / `adain_bwd` (traceable by torch.compile) with autograd
registered on the forward -> `adain_triton` functional. The backward op has no autograd of its
own: a double backward raises instead of being silently wrong (these ops are for G only).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton

from ._utils import (Target, bchw_view, check_interpreter_loops, inner_dim, match_layout, needs_int64,
                     next_power_of_2, target_of)
# Imported as this module's attributes: the launchers look them up here, where kernels/aot.py swaps
# them for recorders.
from .instance_norm_kernels import (
    _adain_fwd_fused_kernel, _adain_stats_kernel, _adain_fwd_apply_kernel, _adain_fwd_twopass_kernel,
    _adain_bwd_fused_kernel, _adain_bwd_reduce_kernel, _adain_bwd_apply_kernel,
    _adain_bwd_twopass_kernel)

ACTS = {"none": 0, "relu": 1, "lrelu": 2}
MAX_SPLITS = 64        # H*W chunks per (b, c) in the split path
LOOP_TILE = 4096       # elements of one tile in a loop (split, two-pass): 8 warps, or 16 in the
                       # two-pass kernels (one program per SM needs the warps; and at 8 warps
                       # sm_80's ptxas spills the two-pass backward); a 16384 split tile spilled
                       # at 16 warps (tests/test_kernels_compile.py)
# Tests and benchmarks set these: FORCE_PLAN to plan()'s keyword arguments (e.g.
# dict(kind="split", block_p=32, splits=3)) to force a path on small shapes, FORCE_TARGET to
# plan for another machine (e.g. _utils.TARGETS["h100"]: a GPU's plans through the interpreter).
FORCE_PLAN: Optional[dict] = None
FORCE_TARGET: Optional[Target] = None
# Tests set this to True / False to force the INT64 constexpr (default: chosen by size).
FORCE_INT64: Optional[bool] = None


# --------------------------------------------------------------------------------------------
# Launchers: shapes, allocation, block choice, grid.
# --------------------------------------------------------------------------------------------
def _affine_strides(t: Optional[torch.Tensor], B: int, C: int, name: str) -> tuple[int, int]:
    """(batch stride, channel stride) for a (B, C) or (C,) parameter; (0, 0) when absent."""
    if t is None:
        return 0, 0
    if t.dim() == 2 and tuple(t.shape) == (B, C):
        return t.stride(0), t.stride(1)
    if t.dim() == 1 and t.shape[0] == C:
        return 0, t.stride(0)
    raise ValueError(f"adain: {name} must have shape ({B}, {C}) or ({C},), got {tuple(t.shape)}")


class Plan(NamedTuple):
    """How one launch is tiled. kind: "fused" (a whole row in registers), "split" (H*W cut
    into `splits` chunks of `chunk` pixels, two kernels) or "twopass" (`programs` persistent
    programs, each row read twice, the second time from L2)."""
    kind: str
    block_c: int
    block_p: int
    splits: int
    chunk: int
    programs: int


def plan(x: torch.Tensor, target: Target, reread_bytes: Optional[int] = None, backward: bool = False, *,
         kind: Optional[str] = None, block_c: Optional[int] = None, block_p: Optional[int] = None,
         splits: Optional[int] = None, programs: Optional[int] = None) -> Plan:
    """The tiling of a launch on x for `target` (a pure function of shape, strides and target).

    reread_bytes: bytes per element that the two-pass plan reads twice (forward: x; backward:
    x and dy); it sizes the working set. The keyword arguments force a plan (tests, benchmarks).

    Rules: a row (b, channel block) that fits `target.max_tile` (half of it in the backward,
    which holds x, dy, xhat and dz: at the full tile ptxas used all 128 registers of 16 warps
    and spilled at odd channel counts, see the compile gate) is fused, unless B x C gives
    fewer programs than SMs and the row is long (then cutting H*W fills the GPU). Otherwise, with
    at least one row per SM, two-pass: persistent programs, at least one per SM and more while
    the rows in flight fit in 3/4 of the L2, so the second read of each row hits L2 and the
    traffic is the fused ledger (2N / 3N forward, 3N backward); channels_last rows are narrowed
    from one sector of channels to as little as 8 bytes for one row per SM to fit. With fewer
    rows than SMs, split.
    A Target is explicit so that the CPU tests run a GPU's exact plans through the interpreter.
    Channels_last rows are at least one 32-byte sector of channels wide (coalesced reads).
    """
    if FORCE_PLAN is not None and kind is None and block_p is None and splits is None:
        return plan(x, target, reread_bytes, backward, **FORCE_PLAN)
    B, C, H, W = x.shape
    P = H * W
    full_p = next_power_of_2(P)
    channels_inner = inner_dim(x) == "c"
    fused_tile = target.max_tile // 2 if backward else target.max_tile
    sector_c = min(next_power_of_2(C), max(1, 32 // x.element_size()))
    if block_c is not None:
        BLOCK_C = block_c
    elif channels_inner:
        # Widest of 32 channels (>= 64 contiguous bytes) down to one sector that fits a tile.
        BLOCK_C = min(next_power_of_2(C), 32)
        while BLOCK_C > sector_c and BLOCK_C * full_p > fused_tile:
            BLOCK_C //= 2
    else:
        BLOCK_C = 1 if P >= 256 else min(next_power_of_2(C), max(1, 256 // full_p))
    rows = B * triton.cdiv(C, BLOCK_C)
    if kind is None and BLOCK_C * full_p <= fused_tile and (rows >= target.sms or full_p <= 1024):
        kind = "fused"
    if kind == "fused":
        return Plan("fused", BLOCK_C, full_p, 1, P, rows)
    max_block_p = 4096 if target.interpreter else 1024   # the interpreter pays per tile, not per element
    if kind is None:
        kind = "twopass" if rows >= target.sms else "split"
    if kind == "twopass":
        budget = target.l2_bytes * 3 // 4     # of L2 for the rows in flight; the rest for others
        reread = reread_bytes or x.element_size()
        if block_c is None:
            BLOCK_C = 1
            if channels_inner:
                # A sector of channels, narrowed (to 8 bytes at least) until one row per SM fits.
                BLOCK_C, min_c = sector_c, min(sector_c, max(1, 8 // x.element_size()))
                while BLOCK_C > min_c and target.sms * BLOCK_C * P * reread > budget:
                    BLOCK_C //= 2
            rows = B * triton.cdiv(C, BLOCK_C)
        BLOCK_P = block_p or max(1, min(full_p, LOOP_TILE // BLOCK_C, max_block_p))
        if programs is None:
            programs = max(target.sms, budget // (BLOCK_C * P * reread))
        return Plan("twopass", BLOCK_C, BLOCK_P, 1, P, max(1, min(int(programs), rows)))
    if kind != "split":
        raise ValueError(f"adain: unknown plan kind {kind!r}")
    BLOCK_P = block_p or max(1, min(full_p, LOOP_TILE // BLOCK_C, max_block_p))
    if splits is None:
        # Enough programs to fill every SM about twice, but chunks of at least 4 blocks.
        want = triton.cdiv(2 * target.sms, rows)
        splits = max(1, min(MAX_SPLITS, want, triton.cdiv(P, 4 * BLOCK_P)))
    splits = max(1, min(int(splits), P))
    chunk = triton.cdiv(triton.cdiv(P, splits), BLOCK_P) * BLOCK_P
    return Plan("split", BLOCK_C, BLOCK_P, triton.cdiv(P, chunk), chunk, rows)


def _target(x: torch.Tensor) -> Target:
    return FORCE_TARGET if FORCE_TARGET is not None else target_of(x.device)


def _int64(*tensors: Optional[torch.Tensor]) -> bool:
    """The INT64 constexpr of a launch: 64-bit offsets only when some tensor needs them."""
    return needs_int64(*tensors) if FORCE_INT64 is None else FORCE_INT64


def _warps(pl: Plan, backward: bool = False) -> int:
    tile = pl.block_c * pl.block_p
    if pl.kind == "twopass" and tile > 2048:
        return 16
    if backward and pl.kind == "fused" and 1024 < tile <= 2048 and pl.block_c <= 8:
        # Not register pressure but ptxas 13's allocator (triton 3.9): an 8 x 256 backward tile
        # spilled 8 bytes at 4 warps with 72 of 128 registers used (sm_90), a 32 x 64 one at 8
        # warps with 40 (sm_80); each compiles clean at the other count (the compile gate).
        return 8
    return 1 if tile <= 256 else 4 if tile <= 2048 else 8 if tile <= 4096 else 16


def adain_fwd(x, weight, bias, residual, act: str, slope: float, eps: float):
    """-> (y, mean, rstd); mean/rstd are fp32 (B, C) for the backward."""
    B, C, H, W = x.shape
    P = H * W
    residual = match_layout(residual, x)   # one layout per launch (see match_layout)
    y = torch.empty_like(x)  # same memory format as x
    mean = torch.empty((B, C), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    sx, sy = bchw_view(x), bchw_view(y)
    sr = bchw_view(residual) if residual is not None else (0, 0, 0)
    sw, sb = _affine_strides(weight, B, C, "weight"), _affine_strides(bias, B, C, "bias")
    pl = plan(x, _target(x), x.element_size())
    n_cblk = triton.cdiv(C, pl.block_c)
    dummy = mean  # stands in for absent tensors (never read: the HAS_* flags are constexpr)
    int64 = _int64(x, y, residual, weight, bias, mean)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_R=residual is not None,
                 ACT=ACTS[act], BLOCK_C=pl.block_c, BLOCK_P=pl.block_p, INT64=int64,
                 num_warps=_warps(pl))
    args_w = (weight if weight is not None else dummy, bias if bias is not None else dummy,
              residual if residual is not None else dummy)
    if pl.kind == "fused":
        _adain_fwd_fused_kernel[(pl.programs,)](
            x, *args_w, y, mean, rstd, C, P, n_cblk, *sx, *sy, *sr, *sw, *sb, eps, slope, **flags)
        return y, mean, rstd
    check_interpreter_loops()
    if pl.kind == "twopass":
        _adain_fwd_twopass_kernel[(pl.programs,)](
            x, *args_w, y, mean, rstd, C, P, n_cblk, B * n_cblk, *sx, *sy, *sr, *sw, *sb, eps, slope,
            **flags)
        return y, mean, rstd
    pmean = torch.empty((B, C, pl.splits), device=x.device, dtype=torch.float32)
    pm2 = torch.empty_like(pmean)
    flags["INT64"] = int64 or _int64(pmean)
    grid = (B * n_cblk, pl.splits)
    _adain_stats_kernel[grid](x, pmean, pm2, C, P, n_cblk, pl.chunk, pl.splits, *sx,
                              BLOCK_C=pl.block_c, BLOCK_P=pl.block_p, INT64=flags["INT64"],
                              num_warps=flags["num_warps"])
    _adain_fwd_apply_kernel[grid](
        x, *args_w, y, mean, rstd, pmean, pm2, C, P, n_cblk, pl.chunk, pl.splits,
        *sx, *sy, *sr, *sw, *sb, eps, slope, SPLIT_P2=next_power_of_2(pl.splits), **flags)
    return y, mean, rstd


def adain_bwd(dy, x, weight, bias, mean, rstd, act: str, slope: float):
    """-> (dx, dweight_bc, dbias_bc): per-(b, c) fp32 sums; the caller reduces (C,) params over b."""
    B, C, H, W = x.shape
    P = H * W
    if dy.dim() != 4 or tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"adain backward: grad shape {tuple(dy.shape)} != input shape {tuple(x.shape)}")
    try:
        bchw_view(dy)
    except ValueError:  # an exotic gradient layout from upstream: one explicit copy
        dy = dy.contiguous()
    dy = match_layout(dy, x)   # e.g. an NCHW gradient from the sub-pixel decoder, x channels_last
    sd = bchw_view(dy)
    dx = torch.empty_like(x)
    dw = torch.empty((B, C), device=x.device, dtype=torch.float32)
    db = torch.empty_like(dw)
    sx, sg = bchw_view(x), bchw_view(dx)
    sw, sb = _affine_strides(weight, B, C, "weight"), _affine_strides(bias, B, C, "bias")
    pl = plan(x, _target(x), x.element_size() + dy.element_size(), backward=True)
    n_cblk = triton.cdiv(C, pl.block_c)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=ACTS[act],
                 BLOCK_C=pl.block_c, BLOCK_P=pl.block_p, INT64=_int64(x, dy, dx, weight, bias, mean),
                 num_warps=_warps(pl, backward=True))
    wb = (weight if weight is not None else mean, bias if bias is not None else mean)
    strides = (*sx, *sd, *sg, *sw, *sb)
    if pl.kind == "fused":
        _adain_bwd_fused_kernel[(pl.programs,)](
            x, dy, *wb, mean, rstd, dx, dw, db, C, P, n_cblk, *strides, slope, **flags)
        return dx, dw, db
    check_interpreter_loops()
    if pl.kind == "twopass":
        _adain_bwd_twopass_kernel[(pl.programs,)](
            x, dy, *wb, mean, rstd, dx, dw, db, C, P, n_cblk, B * n_cblk, *strides, slope, **flags)
        return dx, dw, db
    pg = torch.empty((B, C, pl.splits), device=x.device, dtype=torch.float32)
    pgx = torch.empty_like(pg)
    flags["INT64"] = flags["INT64"] or _int64(pg)
    grid = (B * n_cblk, pl.splits)
    _adain_bwd_reduce_kernel[grid](x, dy, *wb, mean, rstd, pg, pgx, C, P, n_cblk, pl.chunk, pl.splits,
                                   *sx, *sd, *sw, *sb, slope, **flags)
    _adain_bwd_apply_kernel[grid](x, dy, *wb, mean, rstd, pg, pgx, dx, dw, db, C, P, n_cblk, pl.chunk,
                                  pl.splits, *strides, slope, SPLIT_P2=next_power_of_2(pl.splits),
                                  **flags)
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# torch.library custom ops (torch.compile traces them as opaque calls) + autograd.
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("g2g_kernels::adain_fwd", mutates_args=())
def _adain_fwd_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                  residual: Optional[torch.Tensor], act: str, slope: float,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return adain_fwd(x, weight, bias, residual, act, slope, eps)


@_adain_fwd_op.register_fake
def _(x, weight, bias, residual, act, slope, eps):
    stats = x.new_empty(x.shape[:2], dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("g2g_kernels::adain_bwd", mutates_args=())
def _adain_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, act: str,
                  slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return adain_bwd(dy, x, weight, bias, mean, rstd, act, slope)


@_adain_bwd_op.register_fake
def _(dy, x, weight, bias, mean, rstd, act, slope):
    return torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean)


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, act, slope, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.act, ctx.slope, ctx.has_residual = act, slope, residual is not None
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = _adain_bwd_op(dy, x, weight, bias, mean, rstd, ctx.act, ctx.slope)
    dweight = dbias = None
    if weight is not None and ctx.needs_input_grad[1]:
        dweight = (dw if weight.dim() == 2 else dw.sum(0)).to(weight.dtype)
    if bias is not None and ctx.needs_input_grad[2]:
        dbias = (db if bias.dim() == 2 else db.sum(0)).to(bias.dtype)
    dres = dy if ctx.has_residual else None   # d(y)/d(residual) = identity
    return dx, dweight, dbias, dres, None, None, None


_adain_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def adain_triton(x, weight=None, bias=None, *, act="none", slope=0.2, residual=None, eps=1e-5):
    """The Triton implementation of `kernels.adain` (no dispatch; see `kernels.adain`)."""
    if act not in ACTS:
        raise ValueError(f"adain: act must be one of {tuple(ACTS)}, got {act!r}")
    if x.dim() != 4:
        raise ValueError(f"adain: expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if residual is not None and tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"adain: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    y, _, _ = _adain_fwd_op(x, weight, bias, residual, act, float(slope), float(eps))
    return y
