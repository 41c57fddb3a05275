"""Parity of the Triton reflect pad (`kernels.reflect_pad`) with its reference twin, F.pad(mode="reflect").

Forward: a gather, bit-exact in every dtype, and the output has the input's memory format (F.pad's
own strides on the CPU). Backward (the fold, fp32 sums written once): fp32 to summation order,
bf16/fp16 by the three-way rule and within one ulp of the fp32 reference. Double backward
(the discriminator's R1 goes through this op), determinism, INT64, the dispatch and the errors.
On the CPU the kernels run through the Triton interpreter (tests/conftest.py), on small shapes.
The launch plan is a pure function of shape, strides and dtype (no target machine), so the plans
a GPU picks at the FUNIT shapes are checked as data and their tiles run here.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels._utils import TARGETS
from g2g_fast.reference.ops import reflect_pad_ref
from utils import LOWP_ATOL, assert_close, assert_three_way

# The module (`kernels.reflect_pad` is the functional of the same name).
K = importlib.import_module("kernels.reflect_pad")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CL = torch.channels_last
# fp32: the same values summed (at most 9 terms) in another order.
FOLD_TOL = dict(rtol=1e-6, atol=2e-6)
# One unit in the last place, relative: bf16 has 8 significant bits, fp16 11.
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}

CASES = [
    # (shape, pad, forced plan or None)
    ((2, 5, 13, 11), 1, None),
    ((2, 5, 13, 11), 2, None),
    ((2, 5, 13, 11), 3, None),     # odd sizes, B*C = 10
    ((2, 5, 13, 11), 0, None),     # pad 0: a copy
    ((1, 3, 4, 3), 2, None),       # H = 4, W = pad + 1: a column mirrored at both edges (9 terms)
    ((2, 3, 3, 5), 2, None),       # H = pad + 1
    ((3, 7, 2, 9), 1, None),       # H = pad + 1 = 2, B*C = 21
    ((1, 1, 5, 6), 3, None),       # C = 1 (both formats are the same strides)
    ((1, 2, 50, 47), 1, None),     # 2548 output pixels > one 2048-pixel block
    ((2, 5, 13, 11), 3, dict(block_c=2, block_p=16)),   # 3 channel blocks (one partial), 13 pixel blocks
    ((1, 6, 9, 7), 2, dict(block_c=4, block_p=8, warps=1)),
]


def _id(case):
    shape, pad, force = case
    return "x".join(map(str, shape)) + f"-p{pad}" + ("-forced" if force else "")


def rnd(shape, dtype=torch.float32, channels_last=False, seed=0):
    """Shifted, non-unit-variance random values (never zeros), on DEVICE."""
    t = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2.5 + 1.5).to(DEVICE, dtype)
    return t.contiguous(memory_format=CL if channels_last else torch.contiguous_format)


def fwd_bwd(fn, x, pad, dy):
    """-> (y, dx) of y = fn(x, pad) with upstream gradient dy."""
    x = x.detach().clone().requires_grad_(True)
    y = fn(x, pad)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y.detach(), dx


def triton_pad(x, pad):
    return kernels.reflect_pad(x, pad, impl="triton")


@pytest.fixture
def force_plan(monkeypatch):
    def _set(force):
        monkeypatch.setattr(K, "FORCE_PLAN", force)
    return _set


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fp32_forward_and_backward(case, channels_last, force_plan):
    shape, pad, force = case
    force_plan(force)
    x = rnd(shape, channels_last=channels_last)
    B, C, H, W = shape
    dy = rnd((B, C, H + 2 * pad, W + 2 * pad), channels_last=channels_last, seed=1)
    y, dx = fwd_bwd(triton_pad, x, pad, dy)
    y_ref, dx_ref = fwd_bwd(reflect_pad_ref, x, pad, dy)
    assert torch.equal(y, y_ref), "the forward is a gather: bit-exact"
    assert y.stride() == y_ref.stride()   # F.pad keeps the memory format on the CPU
    assert y.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    assert_close(dx, dx_ref, name="dx", **FOLD_TOL)
    assert dx.stride() == dx_ref.stride() == x.stride()


LOWP_CASES = [((2, 5, 13, 11), 3), ((1, 3, 4, 3), 2), ((2, 4, 9, 8), 1)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape,pad", LOWP_CASES, ids=[f"{'x'.join(map(str, s))}-p{p}" for s, p in LOWP_CASES])
def test_low_precision(shape, pad, channels_last, dtype):
    x = rnd(shape, dtype, channels_last)
    B, C, H, W = shape
    dy = rnd((B, C, H + 2 * pad, W + 2 * pad), dtype, channels_last, seed=1)
    y, dx = fwd_bwd(triton_pad, x, pad, dy)
    assert y.dtype == dx.dtype == dtype
    y_lp, dx_lp = fwd_bwd(reflect_pad_ref, x, pad, dy)
    assert torch.equal(y, y_lp) and y.stride() == y_lp.stride()
    _, dx32 = fwd_bwd(reflect_pad_ref, x.float(), pad, dy.float())
    scale = dx32.abs().max().clamp_min(1.0).item()   # sums of up to 9 terms, as adain's gradients
    assert_three_way(dx, dx32, dx_lp, LOWP_ATOL[dtype] * scale, "dx")
    # fp32 sums of the low-precision terms converted once: within one ulp of the fp32 truth (half
    # an ulp on the GPU, which rounds to nearest; the interpreter truncates fp32 -> bf16).
    assert_close(dx, dx32, rtol=ULP[dtype], atol=1e-6, name="dx (one conversion)")
    assert dx.stride() == x.stride()


def test_reference_semantics():
    """reflect_pad_ref is PyTorch's reflect: mirrored about the edge pixel, which is not repeated."""
    x = torch.arange(4 * 5, dtype=torch.float32).reshape(1, 1, 4, 5)
    rows, cols = [2, 1, 0, 1, 2, 3, 2, 1], [2, 1, 0, 1, 2, 3, 4, 3, 2]
    assert torch.equal(reflect_pad_ref(x, 2), x[:, :, rows][:, :, :, cols])
    assert torch.equal(triton_pad(x.to(DEVICE), 2).cpu(), x[:, :, rows][:, :, :, cols])


def _pad_and_square(pad_fn, x, pad, v, u):
    """-> (g, x.grad) for g = d/dx sum(pad(x)^2 * v) (create_graph) and x.grad = d/dx sum(g * u)."""
    x = x.detach().clone().requires_grad_(True)
    y = pad_fn(x, pad)
    (g,) = torch.autograd.grad((y * y * v).sum(), x, create_graph=True)
    (g * u).sum().backward()
    return g.detach(), x.grad


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape,pad", [((2, 3, 7, 6), 2), ((1, 2, 3, 4), 2)], ids=["7x6-p2", "3x4-p2"])
def test_double_backward(shape, pad, channels_last):
    """The backward of the fold is the pad (and of the pad the fold): second derivatives match F.pad's."""
    B, C, H, W = shape
    x = rnd(shape, channels_last=channels_last)
    v = rnd((B, C, H + 2 * pad, W + 2 * pad), channels_last=channels_last, seed=1)
    u = rnd(shape, channels_last=channels_last, seed=2)
    g, gg = _pad_and_square(triton_pad, x, pad, v, u)
    g_ref, gg_ref = _pad_and_square(reflect_pad_ref, x, pad, v, u)
    assert_close(g, g_ref, name="dx", rtol=1e-5, atol=1e-5)
    assert_close(gg, gg_ref, name="d2x", rtol=1e-5, atol=1e-5)
    assert gg.stride() == x.stride()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_r1_through_a_padded_discriminator(channels_last):
    """R1 = |d D(x) / dx|^2 of two padded convs, then its gradient to x and the weights."""
    g = torch.Generator().manual_seed(3)
    w1 = (torch.randn(4, 3, 3, 3, generator=g) * 0.3).to(DEVICE)
    w2 = (torch.randn(2, 4, 3, 3, generator=g) * 0.3).to(DEVICE)
    x0 = rnd((2, 3, 6, 5), channels_last=channels_last)

    def r1(pad_fn):
        x, a, b = (t.detach().clone().requires_grad_(True) for t in (x0, w1, w2))
        h = F.leaky_relu(F.conv2d(pad_fn(x, 1), a), 0.2)
        out = F.conv2d(pad_fn(h, 1), b)
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
        return x.grad, a.grad, b.grad

    for name, got, want in zip(("x", "w1", "w2"), r1(triton_pad), r1(reflect_pad_ref)):
        assert_close(got, want, name=f"dR1/d{name}", rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_backward_is_bitwise_deterministic(channels_last):
    x = rnd((2, 5, 9, 8), channels_last=channels_last)
    dy = rnd((2, 5, 15, 14), channels_last=channels_last, seed=1)
    _, dx1 = fwd_bwd(triton_pad, x, 3, dy)
    _, dx2 = fwd_bwd(triton_pad, x, 3, dy)
    assert torch.equal(dx1, dx2)


def test_gradients_of_any_layout():
    """A zero-stride gradient (from .sum()) is read in place; one in the other layout is copied
    once; either way dx has x's memory format."""
    x = rnd((2, 3, 5, 4), channels_last=True).requires_grad_(True)
    triton_pad(x, 2).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    reflect_pad_ref(x_ref, 2).sum().backward()
    assert torch.equal(x.grad, x_ref.grad) and x.grad.stride() == x.stride()
    dy = rnd((2, 3, 9, 8), seed=1)   # NCHW, x channels_last
    _, dx = fwd_bwd(triton_pad, x, 2, dy)
    _, dx_ref = fwd_bwd(reflect_pad_ref, x, 2, dy)
    assert_close(dx, dx_ref, name="dx", **FOLD_TOL)
    assert dx.stride() == x.stride()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_int64_variant_is_bitwise_the_int32_one(channels_last, monkeypatch):
    """The INT64 constexpr changes only the index type (forced on a small shape). Offsets past
    2^31 are compiled by the gate (tests/test_kernels_compile.py), not run here."""
    x = rnd((2, 5, 9, 8), channels_last=channels_last)
    dy = rnd((2, 5, 13, 12), channels_last=channels_last, seed=1)
    monkeypatch.setattr(K, "FORCE_INT64", False)
    y32, dx32 = fwd_bwd(triton_pad, x, 2, dy)
    monkeypatch.setattr(K, "FORCE_INT64", True)
    y64, dx64 = fwd_bwd(triton_pad, x, 2, dy)
    assert torch.equal(y32, y64) and torch.equal(dx32, dx64)


@pytest.mark.parametrize("impl", ["triton", "ref", "auto"])
def test_errors(impl):
    x = torch.randn(1, 2, 3, 5, device=DEVICE)
    with pytest.raises(ValueError, match=r"pad < H and pad < W.*pad=3 for an input of shape \(1, 2, 3, 5\)"):
        kernels.reflect_pad(x, 3, impl=impl)
    with pytest.raises(ValueError, match=r"pad=3 for an input of shape \(1, 2, 5, 3\)"):
        kernels.reflect_pad(x.transpose(2, 3).contiguous(), 3, impl=impl)   # pad < H, but W = 3
    with pytest.raises(ValueError, match="pad=-1"):
        kernels.reflect_pad(x, -1, impl=impl)
    with pytest.raises(ValueError, match="pad must be an int"):
        kernels.reflect_pad(x, 1.0, impl=impl)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        kernels.reflect_pad(x[0], 1, impl=impl)


def test_backward_op_checks_its_gradient():
    with pytest.raises(ValueError, match="reflect_pad backward"):
        K.reflect_pad_bwd(torch.randn(1, 2, 6, 6, device=DEVICE), 3, False)   # H = 0
    with pytest.raises(ValueError, match="reflect_pad backward"):
        K.reflect_pad_bwd(torch.randn(2, 6, 6, device=DEVICE), 1, False)


def test_dispatch_shares_adain_reasons():
    """One list of fall-back reasons (`kernels.backend`) for both ops: the same decision and why."""
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    odd = x.transpose(2, 3)   # neither NCHW-contiguous nor channels_last
    for t in (x, x.contiguous(memory_format=CL), odd, x.double()):
        for impl in ("auto", "ref"):
            assert kernels.reflect_pad_backend(t, impl) == kernels.adain_backend(t, impl)
    assert kernels.reflect_pad_backend(x)[0] == "triton"   # CUDA, or the interpreter in tests
    assert kernels.reflect_pad_backend(odd)[0] == "ref"
    with pytest.raises(RuntimeError, match="reflect_pad: impl='triton' is not possible"):
        kernels.reflect_pad(odd, 1, impl="triton")
    assert torch.equal(kernels.reflect_pad(odd, 1), reflect_pad_ref(odd, 1))   # auto falls back
    with pytest.raises(ValueError, match="reflect_pad: impl"):
        kernels.reflect_pad(x, 1, impl="cuda")
    from g2g_fast import ops
    assert ops.reflect_pad is kernels.reflect_pad


def test_custom_ops_opcheck():
    """torch.library.opcheck: schema, fake tensors (strides included) and autograd registration."""
    for cl in (False, True):
        x = rnd((2, 3, 5, 4), channels_last=cl).requires_grad_(True)
        torch.library.opcheck(K._reflect_pad_fwd_op, (x, 2, cl))
        dy = rnd((2, 3, 9, 8), channels_last=cl, seed=1).requires_grad_(True)
        torch.library.opcheck(K._reflect_pad_bwd_op, (dy, 2, cl))


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the custom op (aot_eager: no compiler on CPU CI)."""
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    x0 = rnd((2, 3, 6, 5), channels_last=True)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: kernels.reflect_pad(x, 2, impl="triton") * 2.0, fullgraph=True, backend=backend)
    x = x0.detach().requires_grad_(True)
    y = compiled(x)
    y.pow(2).sum().backward()
    x_ref = x0.detach().requires_grad_(True)
    y_ref = reflect_pad_ref(x_ref, 2) * 2.0
    y_ref.pow(2).sum().backward()
    assert torch.equal(y, y_ref) and y.stride() == y_ref.stride()
    assert_close(x.grad, x_ref.grad, name="compiled dx", **FOLD_TOL)


# --------------------------------------------------------------------------------------------
# Launch plans: a pure function of shape, strides and dtype, so a GPU's are checked as data.
# --------------------------------------------------------------------------------------------
# FUNIT's padded convs at 128 px, (C, H, W, pad): kernels/aot_cases.py compiles the same.
FUNIT_PADS = ((3, 128, 128, 3), (64, 128, 128, 3), (128, 64, 64, 1), (256, 32, 32, 1), (512, 16, 16, 1))
FORMATS = {"bf16-cl": (torch.bfloat16, CL), "fp32-nchw": (torch.float32, torch.contiguous_format)}


def _funit_plans():
    """{(format, C, H, W, pad, direction): Plan} at batch 8; the launch's output is y (fwd), dx (bwd)."""
    out = {}
    for fmt, (dtype, mf) in FORMATS.items():
        for C, H, W, pad in FUNIT_PADS:
            for direction, (h, w) in (("fwd", (H + 2 * pad, W + 2 * pad)), ("bwd", (H, W))):
                t = torch.empty(8, C, h, w, dtype=dtype, device="meta").contiguous(memory_format=mf)
                out[fmt, C, H, W, pad, direction] = K.plan(t, TARGETS["h100"])
    return out


def test_funit_plans():
    plans = _funit_plans()
    for key, pl in plans.items():
        fmt, C = key[0], key[1]
        assert pl.block_c * pl.block_p <= K.TILE, key
        if fmt == "bf16-cl":   # a 128-byte line of channels per pixel (all of them when C = 3)
            assert pl.block_c == min(64, 4 if C == 3 else C), key
    # The numbers (a change here is deliberate): channels_last bf16 64 x 32, NCHW pixels first.
    assert plans["bf16-cl", 64, 128, 128, 3, "fwd"] == K.Plan(64, 32, 8)
    assert plans["bf16-cl", 3, 128, 128, 3, "bwd"] == K.Plan(4, 512, 8)
    assert plans["fp32-nchw", 64, 128, 128, 3, "bwd"] == K.Plan(1, 2048, 8)
    assert plans["fp32-nchw", 512, 16, 16, 1, "fwd"] == K.Plan(4, 512, 8)    # 18^2 = 324 pixels a plane
    assert plans["fp32-nchw", 512, 16, 16, 1, "bwd"] == K.Plan(8, 256, 8)


@pytest.mark.parametrize("plan", sorted({(k[0], pl) for k, pl in _funit_plans().items()}),
                         ids=lambda p: f"{p[0]}-{p[1].block_c}x{p[1].block_p}")
def test_funit_plan_tiles_run_in_the_interpreter(plan, force_plan):
    """Each FUNIT tile (BLOCK_C, BLOCK_P: the kernels' constexprs) on a small plane with 1.5
    channel blocks, forward and backward against the reference."""
    fmt, pl = plan
    dtype, mf = FORMATS[fmt]
    force_plan(pl._asdict())
    C = pl.block_c + max(1, pl.block_c // 2)
    x = rnd((1, C, 9, 7), dtype, mf == CL)
    dy = rnd((1, C, 13, 11), dtype, mf == CL, seed=1)
    y, dx = fwd_bwd(triton_pad, x, 2, dy)
    y_ref, dx_ref = fwd_bwd(reflect_pad_ref, x, 2, dy)
    assert torch.equal(y, y_ref)
    _, dx32 = fwd_bwd(reflect_pad_ref, x.float(), 2, dy.float())
    if dtype == torch.float32:
        assert_close(dx, dx32, name="dx", **FOLD_TOL)
    else:
        assert_three_way(dx, dx32, dx_ref, LOWP_ATOL[dtype] * dx32.abs().max().clamp_min(1.0).item(), "dx")
