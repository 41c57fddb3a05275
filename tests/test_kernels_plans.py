"""The GPU's own launch plans, chosen and run on the CPU (issue 14, parts 2, 4 and 5).

`kernels.instance_norm.plan` takes the target machine explicitly (`kernels._utils.Target`: SM
count, L2 size, register budget, interpreter or not), so:
  - the plans an H100/H200/A100 picks at the FUNIT shapes are checked here as plain data (kind,
    tile, program count, the two-pass working set against L2, the memory ledger they give);
  - each distinct GPU plan is then *run* through the interpreter with the same kind and tile
    (BLOCK_C, BLOCK_P: the kernel's constexprs, hence the same specialisation as on the GPU) at a
    smaller batch, against the reference; no plan is one that only a GPU ever executes.
What the GPU compiler makes of these plans (registers, spills) is tests/test_kernels_compile.py.
"""
import pytest
import torch

from g2g_fast.reference.ops import adain_ref
from kernels import instance_norm as K
from kernels._utils import TARGETS, inner_dim, match_layout
from test_instance_norm import make_inputs, ref32, run, skip_if_loops_unsupported, triton_adain
from utils import FP32_TOL, LOWP_ATOL, assert_close, assert_three_way

FUNIT_B = 64
FUNIT_SHAPES = ((64, 128, 128), (128, 64, 64), (256, 32, 32), (512, 16, 16))
FORMATS = {"bf16-cl": (torch.bfloat16, torch.channels_last), "fp32-nchw": (torch.float32, torch.contiguous_format),
           "fp32-cl": (torch.float32, torch.channels_last)}
GPUS = ("h100", "h200", "a100")


def meta(B, C, H, W, fmt):
    dtype, mf = FORMATS[fmt]
    return torch.empty(B, C, H, W, device="meta", dtype=dtype).contiguous(memory_format=mf)


def fwd_bwd_plans(x, target):
    """(forward plan, backward plan): the backward re-reads x and dy (of x's dtype)."""
    e = x.element_size()
    return K.plan(x, target, e), K.plan(x, target, 2 * e, backward=True)


def ledger(pl, residual: bool, mode: str) -> int:
    """Passes over N of a plan (K's module docstring): the fused ledger is 3 (fwd + residual), 3 (bwd)."""
    if mode == "fwd":
        return (3 if pl.kind == "split" else 2) + residual
    return 5 if pl.kind == "split" else 3


@pytest.mark.parametrize("gpu", GPUS)
def test_gpu_plans_at_the_funit_shapes_are_at_the_fused_ledger(gpu):
    """Every FUNIT layer, both benchmarked formats (and fp32 channels_last): fused or two-pass,
    never split (batch 64 gives enough rows), so the traffic is the fused ledger; a two-pass plan
    keeps one row per SM in flight within 3/4 of L2, so its second read can hit L2."""
    t = TARGETS[gpu]
    for C, H, W in FUNIT_SHAPES:
        for fmt in FORMATS:
            x = meta(FUNIT_B, C, H, W, fmt)
            for pl, reread in zip(fwd_bwd_plans(x, t), (1, 2)):
                where = f"{gpu} {fmt} {C}x{H}x{W} {pl}"
                assert pl.kind in ("fused", "twopass"), where
                assert ledger(pl, True, "fwd") == 3 and ledger(pl, True, "bwd") == 3, where
                assert pl.block_c * pl.block_p <= t.max_tile, where
                if pl.kind == "twopass":
                    row_bytes = pl.block_c * H * W * reread * x.element_size()
                    assert pl.programs >= t.sms and t.sms * row_bytes <= t.l2_bytes * 3 // 4, where
                    assert pl.block_p <= 1024 and pl.block_c * pl.block_p <= K.LOOP_TILE, where
                if inner_dim(x) == "c":   # rows of >= 8 contiguous bytes (a full sector when fused)
                    assert pl.block_c * x.element_size() >= (32 if pl.kind == "fused" else 8), where


def test_plan_examples_h100():
    """The H100 plans of the layers issue 14 measured, as numbers (a change here is deliberate)."""
    h100 = TARGETS["h100"]
    plans = {(C, fmt): fwd_bwd_plans(meta(FUNIT_B, C, H, W, fmt), h100) for C, H, W in FUNIT_SHAPES
             for fmt in ("bf16-cl", "fp32-nchw")}
    # bf16 channels_last: two-pass at 128^2 (8 / 4 channel rows: 16 / 8 bytes) and 64^2 (a sector),
    # fused at 32^2 (a 16 x 1024 tile, formerly split) and 16^2.
    assert plans[64, "bf16-cl"] == (K.Plan("twopass", 8, 512, 1, 16384, 150), K.Plan("twopass", 4, 1024, 1, 16384, 150))
    assert plans[128, "bf16-cl"] == (K.Plan("twopass", 16, 256, 1, 4096, 300), K.Plan("twopass", 16, 256, 1, 4096, 150))
    assert plans[256, "bf16-cl"][0] == K.Plan("fused", 16, 1024, 1, 1024, 64 * 16)
    assert plans[512, "bf16-cl"][0] == K.Plan("fused", 32, 256, 1, 256, 64 * 16)
    for C, H, W in FUNIT_SHAPES:   # NCHW: one row per (b, c), always fused at these sizes
        assert plans[C, "fp32-nchw"][0] == K.Plan("fused", 1, H * W, 1, H * W, 64 * C)
    # The backward fuses half the tile (it holds x, dy, xhat, dz): 16 x 1024 and 1 x 16384 rows
    # take the two-pass path there, still at the fused ledger.
    assert plans[256, "bf16-cl"][1] == K.Plan("twopass", 16, 256, 1, 1024, 600)
    assert plans[64, "fp32-nchw"][1].kind == "twopass" and plans[128, "fp32-nchw"][1].kind == "fused"
    assert plans[512, "bf16-cl"][1] == K.Plan("fused", 32, 256, 1, 256, 64 * 16)
    # Few rows of a long plane: H*W is split to fill 132 SMs (BLOCK_P 1024 on a GPU, 4096 in
    # the interpreter's own plan).
    x = meta(1, 2, 256, 256, "fp32-nchw")
    assert K.plan(x, h100, 4) == K.Plan("split", 1, 1024, 16, 4096, 2)
    assert K.plan(x, TARGETS["interpreter"], 4) == K.Plan("split", 1, 4096, 4, 16384, 2)
    # Many rows of a long plane (256^2 images): two-pass, not the 3-pass looped split of before.
    assert K.plan(meta(64, 64, 256, 256, "fp32-nchw"), h100, 4).kind == "twopass"


def _gpu_plan_cases():
    """Each distinct (kind, BLOCK_C, BLOCK_P) an H100 runs at the FUNIT shapes, with one FUNIT
    layer that uses it."""
    seen = {}
    for C, H, W in FUNIT_SHAPES:
        for fmt in FORMATS:
            for pl in fwd_bwd_plans(meta(FUNIT_B, C, H, W, fmt), TARGETS["h100"]):
                seen.setdefault((pl.kind, pl.block_c, pl.block_p, fmt), (C, H, W))
    return [pytest.param(k, s, id=f"{k[3]}-{k[0]}-{k[1]}x{k[2]}-{s[0]}x{s[1]}x{s[2]}") for k, s in seen.items()]


@pytest.mark.parametrize("key,shape", _gpu_plan_cases())
def test_h100_plan_runs_in_the_interpreter(key, shape, monkeypatch):
    """The H100 plan's kernel specialisation (kind and tile) on the FUNIT layer's own H x W, at
    batch 1 and 2.5 channel blocks (a partial block; 3 programs, so a two-pass program takes
    several rows), forward and every gradient against the reference."""
    kind, block_c, block_p, fmt = key
    if kind != "fused":
        skip_if_loops_unsupported()
    dtype, mf = FORMATS[fmt]
    force = dict(kind=kind, block_c=block_c, block_p=block_p)
    if kind == "twopass":
        force["programs"] = 3
    monkeypatch.setattr(K, "FORCE_TARGET", TARGETS["h100"])
    monkeypatch.setattr(K, "FORCE_PLAN", force)
    _, H, W = shape
    C = 2 * block_c + max(1, block_c // 2)
    inp = make_inputs((1, C, H, W), "adain_res", dtype=dtype, channels_last=mf == torch.channels_last)
    pl = K.plan(inp["x"], TARGETS["h100"])
    assert (pl.kind, pl.block_c, pl.block_p) == (kind, block_c, block_p)
    y, grads, go = run(triton_adain, inp)
    y32, grads32, _ = run(adain_ref, ref32(inp), go.float())
    if dtype == torch.float32:
        assert_close(y, y32, name="y", **FP32_TOL)
        for k in grads32:
            assert_close(grads[k], grads32[k], name=f"d{k}", rtol=1e-4, atol=1e-3)
        return
    ylp, gradslp, _ = run(lambda x, **kw: adain_ref(x, upcast=False, **kw), inp, go)
    assert_three_way(y, y32, ylp, LOWP_ATOL[dtype], "y")
    for k in grads32:
        scale = grads32[k].abs().max().clamp_min(1.0).item()
        assert_three_way(grads[k], grads32[k], gradslp[k], LOWP_ATOL[dtype] * scale, f"d{k}")


def test_h100_split_plan_runs_in_the_interpreter(monkeypatch):
    """The plan an H100 itself picks for two rows of a 256^2 plane (16 chunks of 4 blocks of 1024),
    unforced: the exact launch a GPU makes."""
    skip_if_loops_unsupported()
    monkeypatch.setattr(K, "FORCE_TARGET", TARGETS["h100"])
    inp = make_inputs((1, 2, 256, 256), "adain_relu")
    assert K.plan(inp["x"], TARGETS["h100"], 4) == K.Plan("split", 1, 1024, 16, 4096, 2)
    y, grads, go = run(triton_adain, inp)
    y_ref, grads_ref, _ = run(adain_ref, inp, go)
    assert_close(y, y_ref, name="y", **FP32_TOL)
    for k in grads_ref:
        assert_close(grads[k], grads_ref[k], name=f"d{k}", rtol=1e-4, atol=1e-3)


def test_twopass_is_the_default_for_many_long_rows():
    """The interpreter's own plan (4 SMs) takes two-pass for 4 rows of 19,200 pixels, so the
    default path is covered without forcing anything."""
    skip_if_loops_unsupported()
    inp = make_inputs((1, 4, 160, 120), "adain_res")
    assert K.plan(inp["x"], TARGETS["interpreter"], 4).kind == "twopass"
    y, grads, go = run(triton_adain, inp)
    y_ref, grads_ref, _ = run(adain_ref, inp, go)
    assert_close(y, y_ref, name="y", **FP32_TOL)
    for k in grads_ref:
        assert_close(grads[k], grads_ref[k], name=f"d{k}", rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("x_cl", [True, False], ids=["x_channels_last", "x_nchw"])
def test_mixed_layouts_are_converted_once_and_exact(x_cl, monkeypatch):
    """A gradient or residual in the other layout (the sub-pixel decoder sends NCHW gradients into
    channels_last activations) is copied once into x's layout: the results are bitwise those of
    same-layout inputs, and the kernels see one layout per launch (which the compile gate covers)."""
    inp = make_inputs((2, 6, 9, 7), "adain_res", channels_last=x_cl)
    same = torch.channels_last if x_cl else torch.contiguous_format
    other = torch.contiguous_format if x_cl else torch.channels_last
    inp["residual"] = inp["residual"].contiguous(memory_format=same)
    odd = dict(inp, residual=inp["residual"].contiguous(memory_format=other))
    assert inner_dim(odd["residual"]) != inner_dim(inp["x"])
    assert inner_dim(match_layout(odd["residual"], inp["x"])) == inner_dim(inp["x"])
    go = torch.randn(inp["x"].shape, generator=torch.Generator().manual_seed(3))
    y1, g1, _ = run(triton_adain, inp, go.contiguous(memory_format=same))
    y2, g2, _ = run(triton_adain, odd, go.contiguous(memory_format=other))
    assert torch.equal(y1, y2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k
    # Read in place, no copy: a zero-stride gradient (from .sum()) and a same-layout residual.
    assert match_layout(inp["residual"], inp["x"]) is inp["residual"]
    assert match_layout(torch.ones(()).expand(2, 6, 9, 7), inp["x"]).stride() == (0, 0, 0, 0)
