"""The Triton kernels of the fused instance norm / AdaIN: `kernels/instance_norm.py` has their
semantics, the memory ledger of each path, the launch plans and the launchers that call them.

Grid axis 0: (batch, channel block); axis 1: H*W split (split path). Tiles are [BLOCK_C, BLOCK_P]
(channels x pixels); every statistic in fp32. Pixel offsets are int32 unless the INT64 constexpr is
set (see instance_norm.py's "Offsets"). The `@triton.jit` helpers are shared: the split and
two-pass kernels are the same loops arranged differently.
"""
import triton
import triton.language as tl

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
def _coords(item, n_cblk, C, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """Batch index and channel block of one work item (item = batch x channel blocks)."""
    if INT64:
        # b and offs_c inherit int64, so b * sxb and offs_c * sxc are 64-bit products. (tl.cast:
        # the interpreter hands a loop variable over as a Python int, which has no .to.)
        item = tl.cast(item, tl.int64)
    offs_c = (item % n_cblk) * BLOCK_C + tl.arange(0, BLOCK_C)
    return item // n_cblk, offs_c, offs_c < C


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
    b, offs_c, mask_c = _coords(tl.program_id(0), n_cblk, C, BLOCK_C, INT64)
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


# ---- loops over a pixel range [start, end) of one (b, channel block): the split and two-pass
# ---- kernels are these loops arranged differently.
@triton.jit
def _stats_loop(X, b, offs_c, mask_c, sxb, sxc, sxp, start, end,
                BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr):
    """(mean, M2) of each channel over [start, end), merged tile by tile."""
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
    return mean_a, m2_a


@triton.jit
def _fwd_apply_loop(X, R, Y, b, offs_c, mask_c, mean, scale, bb, start, end,
                    sxb, sxc, sxp, syb, syc, syp, srb, src, srp, slope,
                    HAS_R: tl.constexpr, ACT: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr):
    # (x - mean) * scale + b, not x * scale + (b - mean * scale): with zero variance rstd is
    # 1/sqrt(eps) ~ 316 and the folded shift would lose b's low bits.
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
def _bwd_reduce_loop(X, DY, b, offs_c, mask_c, mean, rstd, w, bb, start, end,
                     sxb, sxc, sxp, sdb, sdc, sdp, slope,
                     ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr):
    """Sums of dz (-> dbias) and dz * xhat (-> dweight) of each channel over [start, end)."""
    g_acc = tl.zeros([BLOCK_C], tl.float32)
    gx_acc = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(start, end, BLOCK_P):
        offs_p = _pixels(p0, BLOCK_P, INT64)
        mask = mask_c[:, None] & (offs_p[None, :] < end)
        xhat, dz = _bwd_tile(X, DY, b, offs_c, offs_p, mask, mean, rstd, w, bb,
                             sxb, sxc, sxp, sdb, sdc, sdp, ACT, slope)
        g_acc += tl.sum(dz, axis=1)
        gx_acc += tl.sum(dz * xhat, axis=1)
    return g_acc, gx_acc


@triton.jit
def _bwd_apply_loop(X, DY, DX, b, offs_c, mask_c, mean, rstd, w, bb, g_sum, gx_sum, P, start, end,
                    sxb, sxc, sxp, sdb, sdc, sdp, sgb, sgc, sgp, slope,
                    ACT: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr):
    # dx = rstd * w * (dz - mean(dz) - xhat * mean(dz * xhat))
    for p0 in range(start, end, BLOCK_P):
        offs_p = _pixels(p0, BLOCK_P, INT64)
        mask = mask_c[:, None] & (offs_p[None, :] < end)
        xhat, dz = _bwd_tile(X, DY, b, offs_c, offs_p, mask, mean, rstd, w, bb,
                             sxb, sxc, sxp, sdb, sdc, sdp, ACT, slope)
        dx = (rstd * w)[:, None] * (dz - (g_sum / P)[:, None] - xhat * (gx_sum / P)[:, None])
        tl.store(DX + b * sgb + offs_c[:, None] * sgc + offs_p[None, :] * sgp, dx.to(DX.dtype.element_ty), mask=mask)


# ---- split path: kernel 1 reduces each H*W chunk, kernel 2 merges the partials and applies.
@triton.jit
def _adain_stats_kernel(
    X, PMEAN, PM2,
    C, P, n_cblk, chunk, n_split,
    sxb, sxc, sxp,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr,
):
    """Partial (mean, M2) of each (b, c) over this split's pixel range."""
    b, offs_c, mask_c = _coords(tl.program_id(0), n_cblk, C, BLOCK_C, INT64)
    start, end = _split_range(chunk, P, INT64)
    mean, m2 = _stats_loop(X, b, offs_c, mask_c, sxb, sxc, sxp, start, end, BLOCK_C, BLOCK_P, INT64)
    idx = (b * C + offs_c) * n_split + tl.program_id(1)
    tl.store(PMEAN + idx, mean, mask=mask_c)
    tl.store(PM2 + idx, m2, mask=mask_c)


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
    b, offs_c, mask_c = _coords(tl.program_id(0), n_cblk, C, BLOCK_C, INT64)
    mean, rstd = _merge_stats(PMEAN, PM2, b, offs_c, mask_c, C, P, chunk, n_split, eps, SPLIT_P2)
    if tl.program_id(1) == 0:
        tl.store(MEAN + b * C + offs_c, mean, mask=mask_c)
        tl.store(RSTD + b * C + offs_c, rstd, mask=mask_c)
    w, bb = _load_affine(W, Bi, b, offs_c, mask_c, swb, swc, sbb, sbc, HAS_W, HAS_B)
    start, end = _split_range(chunk, P, INT64)
    _fwd_apply_loop(X, R, Y, b, offs_c, mask_c, mean, rstd * w, bb, start, end,
                    sxb, sxc, sxp, syb, syc, syp, srb, src, srp, slope, HAS_R, ACT, BLOCK_P, INT64)


# ---- two-pass path: a persistent grid; each program takes whole (b, channel block) rows in
# ---- turn, reads a row once for its statistics and again (from L2) to apply them.
@triton.jit
def _adain_fwd_twopass_kernel(
    X, W, Bi, R, Y, MEAN, RSTD,
    C, P, n_cblk, n_items,
    sxb, sxc, sxp, syb, syc, syp, srb, src, srp, swb, swc, sbb, sbc,
    eps, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr,
):
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        b, offs_c, mask_c = _coords(item, n_cblk, C, BLOCK_C, INT64)
        mean, m2 = _stats_loop(X, b, offs_c, mask_c, sxb, sxc, sxp, 0, P, BLOCK_C, BLOCK_P, INT64)
        rstd = 1.0 / tl.sqrt(m2 / P + eps)
        tl.store(MEAN + b * C + offs_c, mean, mask=mask_c)
        tl.store(RSTD + b * C + offs_c, rstd, mask=mask_c)
        w, bb = _load_affine(W, Bi, b, offs_c, mask_c, swb, swc, sbb, sbc, HAS_W, HAS_B)
        _fwd_apply_loop(X, R, Y, b, offs_c, mask_c, mean, rstd * w, bb, 0, P,
                        sxb, sxc, sxp, syb, syc, syp, srb, src, srp, slope, HAS_R, ACT, BLOCK_P, INT64)


@triton.jit
def _adain_bwd_fused_kernel(
    X, DY, W, Bi, MEAN, RSTD, DX, DW, DB,
    C, P, n_cblk,
    sxb, sxc, sxp, sdb, sdc, sdp, sgb, sgc, sgp, swb, swc, sbb, sbc,
    slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr,
):
    b, offs_c, mask_c = _coords(tl.program_id(0), n_cblk, C, BLOCK_C, INT64)
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
    b, offs_c, mask_c = _coords(tl.program_id(0), n_cblk, C, BLOCK_C, INT64)
    mean = tl.load(MEAN + b * C + offs_c, mask=mask_c, other=0.0)
    rstd = tl.load(RSTD + b * C + offs_c, mask=mask_c, other=0.0)
    w, bb = _load_affine(W, Bi, b, offs_c, mask_c, swb, swc, sbb, sbc, HAS_W, HAS_B)
    start, end = _split_range(chunk, P, INT64)
    g_acc, gx_acc = _bwd_reduce_loop(X, DY, b, offs_c, mask_c, mean, rstd, w, bb, start, end,
                                     sxb, sxc, sxp, sdb, sdc, sdp, slope, ACT, BLOCK_C, BLOCK_P, INT64)
    idx = (b * C + offs_c) * n_split + tl.program_id(1)
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
    b, offs_c, mask_c = _coords(tl.program_id(0), n_cblk, C, BLOCK_C, INT64)
    offs_s = tl.arange(0, SPLIT_P2)
    smask = mask_c[:, None] & (offs_s[None, :] < n_split)
    sidx = (b * C + offs_c[:, None]) * n_split + offs_s[None, :]
    g_sum = tl.sum(tl.load(PG + sidx, mask=smask, other=0.0), axis=1)
    gx_sum = tl.sum(tl.load(PGX + sidx, mask=smask, other=0.0), axis=1)
    if tl.program_id(1) == 0:
        tl.store(DW + b * C + offs_c, gx_sum, mask=mask_c)
        tl.store(DB + b * C + offs_c, g_sum, mask=mask_c)
    mean = tl.load(MEAN + b * C + offs_c, mask=mask_c, other=0.0)
    rstd = tl.load(RSTD + b * C + offs_c, mask=mask_c, other=0.0)
    w, bb = _load_affine(W, Bi, b, offs_c, mask_c, swb, swc, sbb, sbc, HAS_W, HAS_B)
    start, end = _split_range(chunk, P, INT64)
    _bwd_apply_loop(X, DY, DX, b, offs_c, mask_c, mean, rstd, w, bb, g_sum, gx_sum, P, start, end,
                    sxb, sxc, sxp, sdb, sdc, sdp, sgb, sgc, sgp, slope, ACT, BLOCK_P, INT64)


@triton.jit
def _adain_bwd_twopass_kernel(
    X, DY, W, Bi, MEAN, RSTD, DX, DW, DB,
    C, P, n_cblk, n_items,
    sxb, sxc, sxp, sdb, sdc, sdp, sgb, sgc, sgp, swb, swc, sbb, sbc,
    slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr,
):
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        b, offs_c, mask_c = _coords(item, n_cblk, C, BLOCK_C, INT64)
        mean = tl.load(MEAN + b * C + offs_c, mask=mask_c, other=0.0)
        rstd = tl.load(RSTD + b * C + offs_c, mask=mask_c, other=0.0)
        w, bb = _load_affine(W, Bi, b, offs_c, mask_c, swb, swc, sbb, sbc, HAS_W, HAS_B)
        g_sum, gx_sum = _bwd_reduce_loop(X, DY, b, offs_c, mask_c, mean, rstd, w, bb, 0, P,
                                         sxb, sxc, sxp, sdb, sdc, sdp, slope, ACT, BLOCK_C, BLOCK_P, INT64)
        tl.store(DW + b * C + offs_c, gx_sum, mask=mask_c)
        tl.store(DB + b * C + offs_c, g_sum, mask=mask_c)
        _bwd_apply_loop(X, DY, DX, b, offs_c, mask_c, mean, rstd, w, bb, g_sum, gx_sum, P, 0, P,
                        sxb, sxc, sxp, sdb, sdc, sdp, sgb, sgc, sgp, slope, ACT, BLOCK_P, INT64)
