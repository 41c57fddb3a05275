"""Parity of the fused Triton instance norm / AdaIN (`kernels.adain`) with its reference twin.

On the CPU the kernels run through the Triton interpreter (TRITON_INTERPRET=1, tests/conftest.py)
on small shapes; the full FUNIT shapes run on CUDA only.
"""
import pytest
import torch

import kernels
from conftest import requires_cuda
from g2g_fast.reference.ops import adain_ref
from kernels import instance_norm as K
from kernels._utils import check_interpreter_loops
from utils import FP32_TOL, LOWP_ATOL, assert_close, assert_three_way

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# name -> (weight kind, bias kind, act, slope, residual): every weight/bias/residual/act variant.
VARIANTS = {
    "in": (None, None, "none", 0.2, False),            # plain instance norm
    "in_relu": (None, None, "relu", 0.2, False),       # content encoder / upsampling path
    "in_res": (None, None, "none", 0.2, True),         # IN ResBlock conv2 + skip
    "adain_relu": ("bc", "bc", "relu", 0.2, False),    # AdaIN ResBlock conv1
    "adain_res": ("bc", "bc", "none", 0.2, True),      # AdaIN ResBlock conv2 + skip
    "affine_lrelu": ("c", "c", "lrelu", 0.1, False),   # affine IN (C,) params
    "weight_only_res": ("bc", None, "relu", 0.2, True),
}
# plan() keyword arguments forced (K.FORCE_PLAN): every path on shapes the interpreter affords.
PATHS = {
    "auto": None,
    "looped": dict(kind="split", block_p=64, splits=1),   # one chunk: stats kernel + apply kernel
    "split": dict(kind="split", block_p=32, splits=3),    # H*W in 3 chunks, partials merged
    "twopass": dict(kind="twopass", block_p=64, programs=3),  # 3 persistent programs, rows in turn
}


def skip_if_loops_unsupported():
    """Skip (with the fix in the reason) where the interpreter cannot run looped kernels."""
    try:
        check_interpreter_loops()
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture
def force_plan(monkeypatch):
    def _set(path):
        if path != "auto":
            skip_if_loops_unsupported()
        monkeypatch.setattr(K, "FORCE_PLAN", PATHS[path])
    return _set


def make_inputs(shape, variant, dtype=torch.float32, channels_last=False, seed=0):
    """Random shifted, non-unit-variance inputs (never zeros), on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    B, C = shape[:2]
    wk, bk, act, slope, has_res = VARIANTS[variant]

    def rnd(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g) * scale + shift).to(DEVICE, dtype)

    x = rnd(*shape, scale=2.5, shift=1.5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    kind = {"bc": (B, C), "c": (C,)}
    w = rnd(*kind[wk], scale=0.5, shift=1.0) if wk else None
    b = rnd(*kind[bk], scale=0.5, shift=0.2) if bk else None
    r = rnd(*shape) if has_res else None
    return dict(x=x, weight=w, bias=b, residual=r, act=act, slope=slope)


def run(fn, inp, grad_out=None, seed=1):
    """Forward + every gradient -> (y, {name: grad})."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items() if isinstance(v, torch.Tensor)}
    kwargs = {k: leaves.get(k, v) for k, v in inp.items() if k != "x"}
    y = fn(leaves["x"], **kwargs)
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype)
    grads = torch.autograd.grad(y, list(leaves.values()), grad_out)
    return y, dict(zip(leaves, grads)), grad_out


def triton_adain(x, **kw):
    return kernels.adain(x, impl="triton", **kw)


def ref32(inp):
    """The reference on the inputs upcast to fp32 (the truth for every dtype)."""
    return {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}


CASES = [
    # (shape, variant, channels_last, path)
    ((2, 3, 1, 1), "adain_res", False, "auto"),     # H = W = 1: zero variance
    ((2, 3, 1, 1), "in_relu", True, "auto"),
    ((2, 5, 7, 9), "in", False, "auto"),            # odd sizes
    ((2, 5, 7, 9), "affine_lrelu", True, "auto"),
    ((1, 63, 6, 5), "adain_relu", False, "auto"),   # 63 channels
    ((1, 63, 6, 5), "adain_res", True, "auto"),
    ((3, 16, 8, 8), "weight_only_res", True, "auto"),
    ((3, 16, 8, 8), "in_res", False, "auto"),
    ((2, 4, 40, 37), "adain_res", False, "looped"),  # H*W = 1480 > one block (64)
    ((2, 4, 40, 37), "in_relu", True, "looped"),
    ((2, 4, 40, 37), "adain_relu", False, "split"),  # H*W split over 3 programs
    ((2, 4, 40, 37), "affine_lrelu", True, "split"),
    ((1, 40, 12, 11), "weight_only_res", True, "split"),
    ((2, 3, 1, 1), "adain_res", False, "split"),
    ((2, 4, 40, 37), "adain_res", True, "twopass"),   # 8 rows over 3 programs, 24 tiles each
    ((2, 4, 40, 37), "affine_lrelu", False, "twopass"),
    ((3, 5, 9, 7), "weight_only_res", True, "twopass"),  # odd: rows of 2 programs differ in count
    ((2, 3, 1, 1), "in_relu", True, "twopass"),
    ((1, 2048, 3, 2), "adain_res", True, "auto"),    # C = 2048, both layouts
    ((1, 2048, 3, 2), "affine_lrelu", False, "auto"),
]


@pytest.mark.parametrize("shape,variant,channels_last,path", CASES)
def test_fp32_forward_and_every_gradient(shape, variant, channels_last, path, force_plan):
    force_plan(path)
    inp = make_inputs(shape, variant, channels_last=channels_last)
    y, grads, go = run(triton_adain, inp)
    y_ref, grads_ref, _ = run(adain_ref, inp, go)
    assert_close(y, y_ref, name="y", **FP32_TOL)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for k in grads_ref:
        assert grads[k].shape == grads_ref[k].shape
        assert_close(grads[k], grads_ref[k], name=f"d{k}", rtol=1e-4, atol=1e-4)


LOWP_CASES = [
    ((2, 5, 7, 9), "adain_res", False, "auto"),
    ((2, 5, 7, 9), "adain_relu", True, "auto"),
    ((1, 63, 6, 5), "in_relu", True, "auto"),
    ((2, 4, 40, 37), "affine_lrelu", False, "split"),
    ((2, 4, 40, 37), "weight_only_res", True, "looped"),
    ((2, 20, 40, 37), "adain_res", True, "twopass"),   # bf16: 16-channel sector rows, 2 blocks
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape,variant,channels_last,path", LOWP_CASES)
def test_low_precision_three_way(shape, variant, channels_last, path, dtype, force_plan):
    force_plan(path)
    inp = make_inputs(shape, variant, dtype=dtype, channels_last=channels_last)
    y, grads, go = run(triton_adain, inp)
    assert y.dtype == dtype
    y32, grads32, _ = run(adain_ref, ref32(inp), go.float())
    ylp, gradslp, _ = run(lambda x, **kw: adain_ref(x, upcast=False, **kw), inp, go)
    atol = LOWP_ATOL[dtype]
    assert_three_way(y, y32, ylp, atol, "y")
    for k in grads32:
        assert grads[k].dtype == dtype
        scale = grads32[k].abs().max().clamp_min(1.0)  # weight/bias grads are sums over H*W
        assert_three_way(grads[k], grads32[k], gradslp[k], atol * scale.item(), f"d{k}")


def test_large_plane_looped_path():
    """H*W = 65,536 (256 x 256): far above the fused tile, through the default plan."""
    skip_if_loops_unsupported()
    inp = make_inputs((1, 2, 256, 256), "adain_res")
    y, grads, go = run(triton_adain, inp)
    y_ref, grads_ref, _ = run(adain_ref, inp, go)
    assert_close(y, y_ref, name="y", **FP32_TOL)
    for k in grads_ref:
        assert_close(grads[k], grads_ref[k], name=f"d{k}", rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("path", ["auto", "split", "twopass"])
def test_bitwise_deterministic(path, force_plan):
    force_plan(path)
    inp = make_inputs((2, 6, 20, 13), "adain_res", channels_last=True)
    y1, g1, go = run(triton_adain, inp)
    y2, g2, _ = run(triton_adain, inp, go)
    assert torch.equal(y1, y2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


def test_gradient_of_any_layout_is_read_in_place():
    """Upstream gradients arrive in arbitrary layouts (here a zero-stride expand from .sum())."""
    inp = make_inputs((2, 3, 5, 4), "adain_relu", channels_last=True)
    x = inp["x"].detach().requires_grad_(True)
    kernels.adain(x, inp["weight"], inp["bias"], act="relu", impl="triton").sum().backward()
    x_ref = inp["x"].detach().requires_grad_(True)
    adain_ref(x_ref, inp["weight"], inp["bias"], act="relu").sum().backward()
    assert_close(x.grad, x_ref.grad, name="dx", **FP32_TOL)


def test_double_backward_raises():
    """These ops are G-only; a double backward (R1) must fail loudly, never be silently wrong."""
    inp = make_inputs((2, 3, 4, 4), "adain_relu")
    x = inp["x"].detach().requires_grad_(True)
    y = kernels.adain(x, inp["weight"], inp["bias"], act="relu", impl="triton")
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@pytest.mark.parametrize("path,channels_last", [("auto", False), ("looped", True), ("split", False), ("split", True),
                                                ("twopass", True)])
def test_int64_variant_is_bitwise_the_int32_one(path, channels_last, force_plan, monkeypatch):
    """The INT64 constexpr changes only the index type: forced on small shapes (where both are
    exact) it gives the int32 kernels' bits. Past 2^31: tests/test_kernels_int64.py."""
    force_plan(path)
    inp = make_inputs((2, 5, 12, 11), "adain_res", channels_last=channels_last)
    monkeypatch.setattr(K, "FORCE_INT64", False)
    y32, g32, go = run(triton_adain, inp)
    monkeypatch.setattr(K, "FORCE_INT64", True)
    y64, g64, _ = run(triton_adain, inp, go)
    assert torch.equal(y32, y64)
    for k in g32:
        assert torch.equal(g32[k], g64[k]), k


def test_old_interpreter_with_new_numpy_is_refused(monkeypatch):
    """triton < 3.7's interpreter cannot run loops with numpy >= 2.4: a one-line error naming the
    fix, instead of a TypeError from inside the interpreter. Fused (loop-free) launches still run."""
    import numpy
    import triton
    from kernels import _utils
    monkeypatch.setattr(_utils, "interpreting", lambda: True)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    with pytest.raises(RuntimeError, match=r"numpy<2.4 or triton>=3.7"):
        _utils.check_interpreter_loops()
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    _utils.check_interpreter_loops()
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    monkeypatch.setattr(triton, "__version__", "3.7.0")
    _utils.check_interpreter_loops()
    if DEVICE == "cpu":   # the launcher calls it before any looped kernel
        monkeypatch.setattr(triton, "__version__", "3.6.0")
        monkeypatch.setattr(K, "FORCE_PLAN", PATHS["split"])
        with pytest.raises(RuntimeError, match="cannot run looped kernels"):
            triton_adain(torch.randn(1, 2, 4, 4))


def test_dispatch_and_its_reasons():
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    assert kernels.adain_backend(x, "ref") == ("ref", "impl='ref' requested")
    assert kernels.adain_backend(x, "auto")[0] == "triton"  # CUDA, or the interpreter in tests
    odd = torch.randn(2, 3, 5, 4, device=DEVICE).transpose(2, 3)  # H, W swapped: neither layout
    backend, why = kernels.adain_backend(odd, "auto")
    assert backend == "ref" and "channels_last" in why
    with pytest.raises(RuntimeError, match="impl='triton' is not possible"):
        kernels.adain(odd, impl="triton")
    torch.testing.assert_close(kernels.adain(odd), adain_ref(odd))  # auto falls back, same result
    with pytest.raises(ValueError, match="impl"):
        kernels.adain(x, impl="cuda")
    with pytest.raises(ValueError, match="weight"):
        kernels.adain(x, torch.randn(3, 2, device=DEVICE), impl="triton")


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces a function calling the op: the Triton custom op
    (as an opaque call, aot_eager backend so CPU CI needs no compiler) and the reference."""
    inp = make_inputs((2, 4, 6, 6), "adain_res")

    def block(x, w, b, r, impl):
        return kernels.adain(x, w, b, act="none", residual=r, impl=impl) * 2.0

    args = (inp["x"], inp["weight"], inp["bias"], inp["residual"])
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    for impl in ("triton", "ref", "auto"):
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True, backend=backend)
        x = args[0].detach().requires_grad_(True)
        y = compiled(x, *args[1:], impl)
        y.sum().backward()
        x_ref = args[0].detach().requires_grad_(True)
        (adain_ref(x_ref, *args[1:3], residual=args[3]) * 2.0).sum().backward()
        assert_close(y, adain_ref(*args[:3], residual=args[3]) * 2.0, name=f"compiled {impl}", **FP32_TOL)
        assert_close(x.grad, x_ref.grad, name=f"compiled {impl} dx", **FP32_TOL)


FUNIT_SHAPES = [(64, 64, 128, 128), (64, 128, 64, 64), (64, 256, 32, 32), (64, 512, 16, 16)]


@requires_cuda
@pytest.mark.parametrize("shape", FUNIT_SHAPES, ids=lambda s: f"{s[1]}x{s[2]}")
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32-nchw", "bf16-cl"])
def test_funit_shapes_on_cuda(shape, dtype, channels_last):
    for variant in ("in_relu", "adain_res"):
        inp = make_inputs(shape, variant, dtype=dtype, channels_last=channels_last)
        y, grads, go = run(triton_adain, inp)
        y32, grads32, _ = run(adain_ref, ref32(inp), go.float())
        if dtype == torch.float32:
            assert_close(y, y32, name="y", rtol=1e-4, atol=1e-4)
            for k in grads32:
                assert_close(grads[k], grads32[k], name=f"d{k}", rtol=1e-3, atol=1e-3)
        else:
            ylp, gradslp, _ = run(lambda x, **kw: adain_ref(x, upcast=False, **kw), inp, go)
            assert_three_way(y, y32, ylp, LOWP_ATOL[dtype], "y")
            for k in grads32:
                scale = grads32[k].abs().max().clamp_min(1.0).item()
                assert_three_way(grads[k], grads32[k], gradslp[k], LOWP_ATOL[dtype] * scale, f"d{k}")
