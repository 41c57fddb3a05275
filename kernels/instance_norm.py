"""Fused instance norm / AdaIN (+ activation, + residual add), forward and backward, in Triton.

    y = act(normalize(x) * weight + bias) + residual,   normalize over H x W per (b, c)

Semantics are those of `g2g_fast.reference.ops.adain_ref` (biased variance, eps inside the
square root, fp32 statistics). Layout: a (B, C, H, W) tensor is read as (B, C, P) with P = H*W
through its strides, so NCHW-contiguous (pixel stride 1) and channels_last (pixel stride C)
inputs are both read in place and the output keeps the input's memory format.

Memory traffic (the ledger the benchmarks count):
  forward, fused path   read x (+ residual), write y                      -> 2 (3) x N
  forward, split path   read x twice (stats, then apply), write y          -> 3 (4) x N
  backward, fused path  read x, dy, write dx                               -> 3 x N
  backward, split path  read x, dy twice, write dx                         -> 5 x N
plus O(B*C) statistics. The fused path holds a whole (channel block x H*W) tile in registers;
above that size ("looped") or when B*C programs are too few to fill the GPU ("split"), H*W is cut
into chunks whose partial statistics are merged exactly (Chan et al.'s parallel variance).
Per-(b, c) reductions are done by one program each, in a fixed order: no atomics, deterministic.

Offsets: element offsets are int32 products (cheaper address math) unless some argument can reach
an offset >= 2^31 - 1 (`_utils.needs_int64`: sum of (size - 1) * |stride|); then the launchers set
the INT64 constexpr and every kernel casts its program-id-derived indices (batch, channel block,
split start, pixels) to int64, so each offset product is 64-bit. Same bits either way.

Layers: `_adain_*_kernel` (Triton) -> `adain_fwd` / `adain_bwd` launchers -> `torch.library`
custom ops `g2g_kernels::adain_fwd` / `adain_bwd` (traceable by torch.compile) with autograd
registered on the forward -> `adain_triton` functional. The backward op has no autograd of its
own: a double backward raises instead of being silently wrong (these ops are for G only).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import bchw_view, check_interpreter_loops, interpreting, needs_int64, next_power_of_2

ACTS = {"none": 0, "relu": 1, "lrelu": 2}
MAX_TILE = 16384       # elements of one tile held in registers (16 warps: 32 fp32 per thread)
MAX_SPLITS = 64        # H*W chunks per (b, c) in the split path
# Tests set this to (block_p, splits) to force the looped/split paths on small shapes.
FORCE_PLAN: Optional[tuple[Optional[int], Optional[int]]] = None
# Tests set this to True / False to force the INT64 constexpr (default: chosen by size).
FORCE_INT64: Optional[bool] = None


# --------------------------------------------------------------------------------------------
# Triton kernels. Grid axis 0: (batch, channel block); axis 1: H*W split. Tiles are
# [BLOCK_C, BLOCK_P] (channels x pixels); all statistics in fp32.
# --------------------------------------------------------------------------------------------
@triton.jit
def _act_fwd(z, ACT: tl.constexpr, slope):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * slope)
    return z


@triton.jit
def _act_bwd(z, g, ACT: tl.constexpr, slope):
    # d act / dz, matching PyTorch: relu' = [z > 0], lrelu' = 1 if z > 0 else slope.
    if ACT == 1:
        g = tl.where(z > 0, g, 0.0)
    elif ACT == 2:
        g = tl.where(z > 0, g, g * slope)
    return g


@triton.jit
def _coords(n_cblk, C, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """This program's batch index and channel block (grid axis 0 = batch x channel blocks)."""
    pid = tl.program_id(0)
    if INT64:
        # b and offs_c inherit int64, so b * sxb and offs_c * sxc are 64-bit products.
        pid = pid.to(tl.int64)
    offs_c = (pid % n_cblk) * BLOCK_C + tl.arange(0, BLOCK_C)
    return pid // n_cblk, offs_c, offs_c < C


@triton.jit
def _split_range(chunk, P, INT64: tl.constexpr):
    """This program's pixel range [start, end) (grid axis 1 = H*W splits)."""
    start = tl.program_id(1)
    if INT64:
        # The loop variable takes the bounds' type: int64 pixel indices in the loops below.
        start = start.to(tl.int64)
    start = start * chunk
    return start, tl.minimum(start + chunk, P)


@triton.jit
def _pixels(p0, BLOCK_P: tl.constexpr, INT64: tl.constexpr):
    """Pixel indices p0 .. p0 + BLOCK_P - 1 of one tile, int64 when offsets may pass 2^31."""
    offs_p = p0 + tl.arange(0, BLOCK_P)
    if INT64:
        # A no-op on the GPU when p0 is already int64; in the interpreter p0 is a Python int.
        offs_p = offs_p.to(tl.int64)
    return offs_p


@triton.jit
def _load_affine(W, Bi, b, offs_c, mask_c, swb, swc, sbb, sbc, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Per-(b, c) weight and bias as fp32 [BLOCK_C] vectors (stride 0 over b for (C,) params)."""
    w = tl.full(offs_c.shape, 1.0, tl.float32)
    bb = tl.zeros(offs_c.shape, tl.float32)
    if HAS_W:
        w = tl.load(W + b * swb + offs_c * swc, mask=mask_c, other=1.0).to(tl.float32)
    if HAS_B:
        bb = tl.load(Bi + b * sbb + offs_c * sbc, mask=mask_c, other=0.0).to(tl.float32)
    return w, bb


@triton.jit
def _adain_fwd_fused_kernel(
    X, W, Bi, R, Y, MEAN, RSTD,
    C, P, n_cblk,
    sxb, sxc, sxp, syb, syc, syp, srb, src, srp, swb, swc, sbb, sbc,
    eps, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr,
):
    b, offs_c, mask_c = _coords(n_cblk, C, BLOCK_C, INT64)
    offs_p = _pixels(0, BLOCK_P, INT64)
    mask = mask_c[:, None] & (offs_p[None, :] < P)
    # One read of the whole tile; two-pass mean/variance in registers (no E[x^2] - E[x]^2).
    x = tl.load(X + b * sxb + offs_c[:, None] * sxc + offs_p[None, :] * sxp, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / P
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / P + eps)
    w, bb = _load_affine(W, Bi, b, offs_c, mask_c, swb, swc, sbb, sbc, HAS_W, HAS_B)
    y = _act_fwd(xc * (rstd * w)[:, None] + bb[:, None], ACT, slope)
    if HAS_R:
        y += tl.load(R + b * srb + offs_c[:, None] * src + offs_p[None, :] * srp, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + b * syb + offs_c[:, None] * syc + offs_p[None, :] * syp, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + b * C + offs_c, mean, mask=mask_c)
    tl.store(RSTD + b * C + offs_c, rstd, mask=mask_c)


@triton.jit
def _adain_stats_kernel(
    X, PMEAN, PM2,
    C, P, n_cblk, chunk, n_split,
    sxb, sxc, sxp,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr,
):
    """Partial (mean, M2) of each (b, c) over this split's pixel range, merged chunk by chunk."""
    s = tl.program_id(1)
    b, offs_c, mask_c = _coords(n_cblk, C, BLOCK_C, INT64)
    start, end = _split_range(chunk, P, INT64)
    n_a = 0.0
    mean_a = tl.zeros([BLOCK_C], tl.float32)
    m2_a = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(start, end, BLOCK_P):
        offs_p = _pixels(p0, BLOCK_P, INT64)
        mask = mask_c[:, None] & (offs_p[None, :] < end)
        x = tl.load(X + b * sxb + offs_c[:, None] * sxc + offs_p[None, :] * sxp, mask=mask, other=0.0).to(tl.float32)
        n_b = tl.minimum(end - p0, BLOCK_P).to(tl.float32)
        mean_b = tl.sum(x, axis=1) / n_b
        d = tl.where(mask, x - mean_b[:, None], 0.0)
        m2_b = tl.sum(d * d, axis=1)
        # Chan et al.: exact merge of two (count, mean, M2) summaries.
        n = n_a + n_b
        delta = mean_b - mean_a
        mean_a += delta * (n_b / n)
        m2_a += m2_b + delta * delta * (n_a * n_b / n)
        n_a = n
    idx = (b * C + offs_c) * n_split + s
    tl.store(PMEAN + idx, mean_a, mask=mask_c)
    tl.store(PM2 + idx, m2_a, mask=mask_c)


@triton.jit
def _merge_stats(PMEAN, PM2, b, offs_c, mask_c, C, P, chunk, n_split, eps, SPLIT_P2: tl.constexpr):
    """Combine the n_split partial summaries of each channel -> (mean, rstd), fixed order."""
    offs_s = tl.arange(0, SPLIT_P2)
    mask = mask_c[:, None] & (offs_s[None, :] < n_split)
    idx = (b * C + offs_c[:, None]) * n_split + offs_s[None, :]
    pmean = tl.load(PMEAN + idx, mask=mask, other=0.0)
    pm2 = tl.load(PM2 + idx, mask=mask, other=0.0)
    cnt = tl.minimum(tl.maximum(P - offs_s * chunk, 0), chunk).to(tl.float32)
    cnt = tl.where(offs_s < n_split, cnt, 0.0)
    mean = tl.sum(pmean * cnt[None, :], axis=1) / P
    dev = tl.where(mask, pmean - mean[:, None], 0.0)
    m2 = tl.sum(pm2, axis=1) + tl.sum(dev * dev * cnt[None, :], axis=1)
    return mean, 1.0 / tl.sqrt(m2 / P + eps)


@triton.jit
def _adain_fwd_apply_kernel(
    X, W, Bi, R, Y, MEAN, RSTD, PMEAN, PM2,
    C, P, n_cblk, chunk, n_split,
    sxb, sxc, sxp, syb, syc, syp, srb, src, srp, swb, swc, sbb, sbc,
    eps, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, SPLIT_P2: tl.constexpr, INT64: tl.constexpr,
):
    s = tl.program_id(1)
    b, offs_c, mask_c = _coords(n_cblk, C, BLOCK_C, INT64)
    mean, rstd = _merge_stats(PMEAN, PM2, b, offs_c, mask_c, C, P, chunk, n_split, eps, SPLIT_P2)
    if s == 0:
        tl.store(MEAN + b * C + offs_c, mean, mask=mask_c)
        tl.store(RSTD + b * C + offs_c, rstd, mask=mask_c)
    w, bb = _load_affine(W, Bi, b, offs_c, mask_c, swb, swc, sbb, sbc, HAS_W, HAS_B)
    # (x - mean) * scale + b, not x * scale + (b - mean * scale): with zero variance rstd is
    # 1/sqrt(eps) ~ 316 and the folded shift would lose b's low bits.
    scale = rstd * w
    start, end = _split_range(chunk, P, INT64)
    for p0 in range(start, end, BLOCK_P):
        offs_p = _pixels(p0, BLOCK_P, INT64)
        mask = mask_c[:, None] & (offs_p[None, :] < end)
        x = tl.load(X + b * sxb + offs_c[:, None] * sxc + offs_p[None, :] * sxp, mask=mask, other=0.0).to(tl.float32)
        y = _act_fwd((x - mean[:, None]) * scale[:, None] + bb[:, None], ACT, slope)
        if HAS_R:
            y += tl.load(R + b * srb + offs_c[:, None] * src + offs_p[None, :] * srp, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + b * syb + offs_c[:, None] * syc + offs_p[None, :] * syp, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile(X, DY, b, offs_c, offs_p, mask, mean, rstd, w, bb,
              sxb, sxc, sxp, sdb, sdc, sdp, ACT: tl.constexpr, slope):
    """-> (xhat, dz) of a tile: dz = dL/d(xhat * w + b), through the activation."""
    x = tl.load(X + b * sxb + offs_c[:, None] * sxc + offs_p[None, :] * sxp, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + b * sdb + offs_c[:, None] * sdc + offs_p[None, :] * sdp, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    dz = _act_bwd(xhat * w[:, None] + bb[:, None], dy, ACT, slope)
    return xhat, tl.where(mask, dz, 0.0)


@triton.jit
def _adain_bwd_fused_kernel(
    X, DY, W, Bi, MEAN, RSTD, DX, DW, DB,
    C, P, n_cblk,
    sxb, sxc, sxp, sdb, sdc, sdp, sgb, sgc, sgp, swb, swc, sbb, sbc,
    slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr,
):
    b, offs_c, mask_c = _coords(n_cblk, C, BLOCK_C, INT64)
    offs_p = _pixels(0, BLOCK_P, INT64)
    mask = mask_c[:, None] & (offs_p[None, :] < P)
    mean = tl.load(MEAN + b * C + offs_c, mask=mask_c, other=0.0)
    rstd = tl.load(RSTD + b * C + offs_c, mask=mask_c, other=0.0)
    w, bb = _load_affine(W, Bi, b, offs_c, mask_c, swb, swc, sbb, sbc, HAS_W, HAS_B)
    xhat, dz = _bwd_tile(X, DY, b, offs_c, offs_p, mask, mean, rstd, w, bb,
                         sxb, sxc, sxp, sdb, sdc, sdp, ACT, slope)
    g_sum = tl.sum(dz, axis=1)           # dbias
    gx_sum = tl.sum(dz * xhat, axis=1)   # dweight
    # dx = rstd * w * (dz - mean(dz) - xhat * mean(dz * xhat))
    dx = (rstd * w)[:, None] * (dz - (g_sum / P)[:, None] - xhat * (gx_sum / P)[:, None])
    tl.store(DX + b * sgb + offs_c[:, None] * sgc + offs_p[None, :] * sgp, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW + b * C + offs_c, gx_sum, mask=mask_c)
    tl.store(DB + b * C + offs_c, g_sum, mask=mask_c)


@triton.jit
def _adain_bwd_reduce_kernel(
    X, DY, W, Bi, MEAN, RSTD, PG, PGX,
    C, P, n_cblk, chunk, n_split,
    sxb, sxc, sxp, sdb, sdc, sdp, swb, swc, sbb, sbc,
    slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr,
):
    """Partial sums of dz and dz * xhat over this split's pixel range."""
    s = tl.program_id(1)
    b, offs_c, mask_c = _coords(n_cblk, C, BLOCK_C, INT64)
    mean = tl.load(MEAN + b * C + offs_c, mask=mask_c, other=0.0)
    rstd = tl.load(RSTD + b * C + offs_c, mask=mask_c, other=0.0)
    w, bb = _load_affine(W, Bi, b, offs_c, mask_c, swb, swc, sbb, sbc, HAS_W, HAS_B)
    g_acc = tl.zeros([BLOCK_C], tl.float32)
    gx_acc = tl.zeros([BLOCK_C], tl.float32)
    start, end = _split_range(chunk, P, INT64)
    for p0 in range(start, end, BLOCK_P):
        offs_p = _pixels(p0, BLOCK_P, INT64)
        mask = mask_c[:, None] & (offs_p[None, :] < end)
        xhat, dz = _bwd_tile(X, DY, b, offs_c, offs_p, mask, mean, rstd, w, bb,
                             sxb, sxc, sxp, sdb, sdc, sdp, ACT, slope)
        g_acc += tl.sum(dz, axis=1)
        gx_acc += tl.sum(dz * xhat, axis=1)
    idx = (b * C + offs_c) * n_split + s
    tl.store(PG + idx, g_acc, mask=mask_c)
    tl.store(PGX + idx, gx_acc, mask=mask_c)


@triton.jit
def _adain_bwd_apply_kernel(
    X, DY, W, Bi, MEAN, RSTD, PG, PGX, DX, DW, DB,
    C, P, n_cblk, chunk, n_split,
    sxb, sxc, sxp, sdb, sdc, sdp, sgb, sgc, sgp, swb, swc, sbb, sbc,
    slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, SPLIT_P2: tl.constexpr, INT64: tl.constexpr,
):
    s = tl.program_id(1)
    b, offs_c, mask_c = _coords(n_cblk, C, BLOCK_C, INT64)
    offs_s = tl.arange(0, SPLIT_P2)
    smask = mask_c[:, None] & (offs_s[None, :] < n_split)
    sidx = (b * C + offs_c[:, None]) * n_split + offs_s[None, :]
    g_sum = tl.sum(tl.load(PG + sidx, mask=smask, other=0.0), axis=1)
    gx_sum = tl.sum(tl.load(PGX + sidx, mask=smask, other=0.0), axis=1)
    if s == 0:
        tl.store(DW + b * C + offs_c, gx_sum, mask=mask_c)
        tl.store(DB + b * C + offs_c, g_sum, mask=mask_c)
    mean = tl.load(MEAN + b * C + offs_c, mask=mask_c, other=0.0)
    rstd = tl.load(RSTD + b * C + offs_c, mask=mask_c, other=0.0)
    w, bb = _load_affine(W, Bi, b, offs_c, mask_c, swb, swc, sbb, sbc, HAS_W, HAS_B)
    start, end = _split_range(chunk, P, INT64)
    for p0 in range(start, end, BLOCK_P):
        offs_p = _pixels(p0, BLOCK_P, INT64)
        mask = mask_c[:, None] & (offs_p[None, :] < end)
        xhat, dz = _bwd_tile(X, DY, b, offs_c, offs_p, mask, mean, rstd, w, bb,
                             sxb, sxc, sxp, sdb, sdc, sdp, ACT, slope)
        dx = (rstd * w)[:, None] * (dz - (g_sum / P)[:, None] - xhat * (gx_sum / P)[:, None])
        tl.store(DX + b * sgb + offs_c[:, None] * sgc + offs_p[None, :] * sgp, dx.to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers: shapes, allocation, block choice, grid.
# --------------------------------------------------------------------------------------------
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: any small number exercises the same code


def _affine_strides(t: Optional[torch.Tensor], B: int, C: int, name: str) -> tuple[int, int]:
    """(batch stride, channel stride) for a (B, C) or (C,) parameter; (0, 0) when absent."""
    if t is None:
        return 0, 0
    if t.dim() == 2 and tuple(t.shape) == (B, C):
        return t.stride(0), t.stride(1)
    if t.dim() == 1 and t.shape[0] == C:
        return 0, t.stride(0)
    raise ValueError(f"adain: {name} must have shape ({B}, {C}) or ({C},), got {tuple(t.shape)}")


def plan(x: torch.Tensor, block_p: Optional[int] = None, splits: Optional[int] = None):
    """Block sizes and H*W split for x -> (BLOCK_C, BLOCK_P, n_split, chunk, fused).

    `block_p` / `splits` force a tiling (tests use them to exercise every path on small shapes).
    """
    if block_p is None and splits is None and FORCE_PLAN is not None:
        block_p, splits = FORCE_PLAN
    B, C, H, W = x.shape
    P = H * W
    channels_inner = x.stride(1) == 1 and C > 1 and P > 1   # channels_last: channels contiguous
    if channels_inner:
        BLOCK_C = min(next_power_of_2(C), 32)   # >= 64 contiguous bytes per row of the tile
    else:
        BLOCK_C = 1 if P >= 256 else min(next_power_of_2(C), max(1, 256 // next_power_of_2(P)))
    full_p = next_power_of_2(P)
    if block_p is None and splits is None and BLOCK_C * full_p <= MAX_TILE:
        # The whole row fits: one read, one write. (Split only if B*C gives too few programs.)
        programs = B * triton.cdiv(C, BLOCK_C)
        if programs >= _num_sms(x.device) or full_p <= 1024:
            return BLOCK_C, full_p, 1, P, True
    BLOCK_P = block_p or max(1, min(full_p, MAX_TILE // BLOCK_C, 1024 if not interpreting() else 4096))
    if splits is None:
        # Enough programs to fill every SM about twice, but chunks of at least 4 blocks.
        programs = B * triton.cdiv(C, BLOCK_C)
        want = triton.cdiv(2 * _num_sms(x.device), programs)
        splits = max(1, min(MAX_SPLITS, want, triton.cdiv(P, 4 * BLOCK_P)))
    splits = max(1, min(int(splits), P))
    chunk = triton.cdiv(triton.cdiv(P, splits), BLOCK_P) * BLOCK_P
    splits = triton.cdiv(P, chunk)
    return BLOCK_C, BLOCK_P, splits, chunk, False


def _int64(*tensors: Optional[torch.Tensor]) -> bool:
    """The INT64 constexpr of a launch: 64-bit offsets only when some tensor needs them."""
    return needs_int64(*tensors) if FORCE_INT64 is None else FORCE_INT64


def _warps(tile: int) -> int:
    return 1 if tile <= 256 else 4 if tile <= 2048 else 8 if tile <= 4096 else 16


def adain_fwd(x, weight, bias, residual, act: str, slope: float, eps: float,
              block_p: Optional[int] = None, splits: Optional[int] = None):
    """-> (y, mean, rstd); mean/rstd are fp32 (B, C) for the backward."""
    B, C, H, W = x.shape
    P = H * W
    y = torch.empty_like(x)  # same memory format as x
    mean = torch.empty((B, C), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    sx, sy = bchw_view(x), bchw_view(y)
    sr = bchw_view(residual) if residual is not None else (0, 0, 0)
    sw, sb = _affine_strides(weight, B, C, "weight"), _affine_strides(bias, B, C, "bias")
    BLOCK_C, BLOCK_P, n_split, chunk, fused = plan(x, block_p, splits)
    n_cblk = triton.cdiv(C, BLOCK_C)
    dummy = mean  # stands in for absent tensors (never read: the HAS_* flags are constexpr)
    int64 = _int64(x, y, residual, weight, bias, mean)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_R=residual is not None,
                 ACT=ACTS[act], BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, INT64=int64)
    args_w = (weight if weight is not None else dummy, bias if bias is not None else dummy,
              residual if residual is not None else dummy)
    if fused:
        _adain_fwd_fused_kernel[(B * n_cblk,)](
            x, *args_w, y, mean, rstd, C, P, n_cblk, *sx, *sy, *sr, *sw, *sb, eps, slope,
            num_warps=_warps(BLOCK_C * BLOCK_P), **flags)
        return y, mean, rstd
    check_interpreter_loops()
    pmean = torch.empty((B, C, n_split), device=x.device, dtype=torch.float32)
    pm2 = torch.empty_like(pmean)
    flags["INT64"] = int64 or _int64(pmean)
    grid = (B * n_cblk, n_split)
    warps = _warps(BLOCK_C * BLOCK_P)
    _adain_stats_kernel[grid](x, pmean, pm2, C, P, n_cblk, chunk, n_split, *sx,
                              BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, INT64=flags["INT64"], num_warps=warps)
    _adain_fwd_apply_kernel[grid](
        x, *args_w, y, mean, rstd, pmean, pm2, C, P, n_cblk, chunk, n_split,
        *sx, *sy, *sr, *sw, *sb, eps, slope, SPLIT_P2=next_power_of_2(n_split),
        num_warps=warps, **flags)
    return y, mean, rstd


def adain_bwd(dy, x, weight, bias, mean, rstd, act: str, slope: float,
              block_p: Optional[int] = None, splits: Optional[int] = None):
    """-> (dx, dweight_bc, dbias_bc): per-(b, c) fp32 sums; the caller reduces (C,) params over b."""
    B, C, H, W = x.shape
    P = H * W
    if dy.dim() != 4 or tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"adain backward: grad shape {tuple(dy.shape)} != input shape {tuple(x.shape)}")
    try:
        sd = bchw_view(dy)
    except ValueError:  # an exotic gradient layout from upstream: one explicit copy
        dy = dy.contiguous()
        sd = bchw_view(dy)
    dx = torch.empty_like(x)
    dw = torch.empty((B, C), device=x.device, dtype=torch.float32)
    db = torch.empty_like(dw)
    sx, sg = bchw_view(x), bchw_view(dx)
    sw, sb = _affine_strides(weight, B, C, "weight"), _affine_strides(bias, B, C, "bias")
    BLOCK_C, BLOCK_P, n_split, chunk, fused = plan(x, block_p, splits)
    n_cblk = triton.cdiv(C, BLOCK_C)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=ACTS[act],
                 BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, INT64=_int64(x, dy, dx, weight, bias, mean))
    wb = (weight if weight is not None else mean, bias if bias is not None else mean)
    warps = _warps(BLOCK_C * BLOCK_P)
    if fused:
        _adain_bwd_fused_kernel[(B * n_cblk,)](
            x, dy, *wb, mean, rstd, dx, dw, db, C, P, n_cblk, *sx, *sd, *sg, *sw, *sb, slope,
            num_warps=warps, **flags)
        return dx, dw, db
    check_interpreter_loops()
    pg = torch.empty((B, C, n_split), device=x.device, dtype=torch.float32)
    pgx = torch.empty_like(pg)
    flags["INT64"] = flags["INT64"] or _int64(pg)
    grid = (B * n_cblk, n_split)
    _adain_bwd_reduce_kernel[grid](x, dy, *wb, mean, rstd, pg, pgx, C, P, n_cblk, chunk, n_split,
                                   *sx, *sd, *sw, *sb, slope, num_warps=warps, **flags)
    _adain_bwd_apply_kernel[grid](x, dy, *wb, mean, rstd, pg, pgx, dx, dw, db, C, P, n_cblk, chunk,
                                  n_split, *sx, *sd, *sg, *sw, *sb, slope,
                                  SPLIT_P2=next_power_of_2(n_split), num_warps=warps, **flags)
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
