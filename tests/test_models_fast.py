"""Fast FUNIT generator vs the reference: same state dict, same numbers, and really fused.

Tiny shapes: on a CPU the Triton kernels run through the interpreter (conftest), which is slow.
"""
import copy
import functools
import inspect

import pytest
import torch

import g2g_fast.models.funit as fast_funit
from g2g_fast.models import Generator
from g2g_fast.reference import funit as ref_funit
from g2g_fast.reference.ops import adain_ref

ARCH = dict(nf=8, nf_mlp=16, latent_dim=8)
CL = torch.channels_last


def _pair(impl, channels_last=False, subpixel=False):
    ref = ref_funit.Generator(**ARCH)
    fast = Generator(**ARCH, impl=impl, subpixel=subpixel)
    fast.load_state_dict(ref.state_dict(), strict=True)
    if channels_last:
        ref, fast = ref.to(memory_format=CL), fast.to(memory_format=CL)
    return ref, fast


def _images(seed, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 32, 32, generator=g) * 0.7 + 0.1  # shifted, non-unit variance
    return x.to(memory_format=CL) if channels_last else x


def _run(gen, xs, ys, dtype):
    """encode_content, encode_class, decode (with grads of a random-weighted sum) and forward."""
    x, y = xs.to(dtype).clone().requires_grad_(), ys.to(dtype).clone().requires_grad_()
    content, code = gen.encode_content(x), gen.encode_class(y)
    out = gen.decode(content, code)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out * w.to(dtype)).sum().backward()
    with torch.no_grad():
        fwd = gen(x.detach(), y.detach())
    res = dict(content=content, code=code, decode=out, forward=fwd, grad_x=x.grad, grad_y=y.grad)
    res.update({f"grad {n}": p.grad for n, p in gen.named_parameters()})
    return {k: v.detach() for k, v in res.items()}


def _excess(fast, ref32, ref64, scale):
    """Three-way rule against float64, per tensor: |fast - f64| (L2 norm) may be at most twice
    |ref32 - f64|, plus a floor of 1e-6 * scale per element. A plain fast-vs-ref32 allclose cannot
    work here: after ~15 norms ref32 is itself ~2e-5 (outputs) / ~1e-3 (weight grads) off the
    exact value. The norm, not the worst element: over weight seeds 0-7 x 3 paths the norm ratio
    stayed <= 1.86, while the worst single element reached 2.2x ref32's worst (seed 4, triton,
    2 elements of grad mlp.model.0.fc.weight, the layer whose gradient sums every AdaIN's). A
    wrong formula is off by orders of magnitude more either way. -> (excess, bound)."""
    err_ref = (ref32.double() - ref64).abs().max().item()
    assert err_ref <= 1e-4 * scale, f"fp32 reference far from float64 ({err_ref:.3g}): not the same model"
    bound = 2 * (ref32.double() - ref64).norm().item() + 1e-6 * scale * ref64.numel() ** 0.5
    return (fast.double() - ref64).norm().item() - bound, bound


def _scales(ref64):
    """max(1, max|f64|) per layer ("grad dec.model.2.conv" covers its weight and bias; outputs
    are their own layer): a conv bias in front of an IN has an exact gradient of 0 that fp32
    returns as noise, so it is judged on its layer's scale."""
    layer = {}
    for k, v in ref64.items():
        name = k.rsplit(".", 1)[0]
        layer[name] = max(layer.get(name, 1.0), v.abs().max().item())
    return {k: layer[k.rsplit(".", 1)[0]] for k in ref64}


def assert_three_way_parity(ref, fast, xs, ys):
    """fast vs ref run in float32 and in float64 (`_excess` per tensor: outputs, input grads and
    every parameter's grad) -> fast's tensors. Also used by test_coco and test_dec_norm."""
    ref32, got = _run(ref, xs, ys, torch.float32), _run(fast, xs, ys, torch.float32)
    with pytest.MonkeyPatch.context() as mp:  # a true float64 reference: no fp32 upcast in the norms
        mp.setattr(ref_funit, "adain_ref", functools.partial(adain_ref, upcast=False))
        ref64 = _run(copy.deepcopy(ref).double(), xs, ys, torch.float64)
    assert got.keys() == ref32.keys() and all(v is not None for v in got.values())
    scale = _scales(ref64)
    excess = {k: _excess(got[k], ref32[k], ref64[k], scale[k]) for k in got}
    worst = max(excess, key=lambda k: excess[k][0] / excess[k][1])
    over, bound = excess[worst]
    assert over <= 0, (f"{worst} (worst of {len(excess)}): |fast - f64| = {over + bound:.3g} over the bound "
                       f"{bound:.3g} (2 x |ref32 - f64| + floor)")
    return got


def test_same_signature_tree_and_state_dict():
    ref_sig = inspect.signature(ref_funit.Generator.__init__).parameters
    fast_sig = inspect.signature(Generator.__init__).parameters
    assert list(fast_sig) == list(ref_sig) + ["impl", "subpixel"] and fast_sig["impl"].default == "auto"
    assert fast_sig["subpixel"].default is False
    assert all(fast_sig[k].default == v.default for k, v in ref_sig.items())

    torch.manual_seed(3)
    ref = ref_funit.Generator(**ARCH)
    torch.manual_seed(3)
    fast = Generator(**ARCH)
    assert [n for n, _ in fast.named_modules()] == [n for n, _ in ref.named_modules()]
    rsd, fsd = ref.state_dict(), fast.state_dict()
    assert list(fsd) == list(rsd)
    # Same construction/init order: one seed gives the same weights.
    for k in rsd:
        assert torch.equal(fsd[k], rsd[k]), k
    # Loads both ways, strictly.
    other = Generator(**ARCH)
    other.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(other.state_dict(), strict=True)
    # A replacement class encoder is kept as given, and the MLP input follows its out_dim.
    enc = ref_funit.ClassEncoder(3, 4, 5)
    custom = Generator(**ARCH, class_encoder=enc, impl="ref")
    assert custom.enc_class_model is enc and custom.mlp.model[0].fc.in_features == 5
    assert list(custom.state_dict()) == list(ref_funit.Generator(**ARCH, class_encoder=enc).state_dict())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("impl,subpixel", [("triton", False), ("ref", False), ("ref", True)],
                         ids=["triton", "ref", "ref-subpixel"])
def test_fp32_parity_outputs_and_grads(impl, subpixel, channels_last):
    ref, fast = _pair(impl, channels_last, subpixel)
    xs, ys = _images(1, channels_last), _images(2, channels_last)
    got = assert_three_way_parity(ref, fast, xs, ys)
    if channels_last:
        for k in ("content", "decode", "forward"):
            assert got[k].is_contiguous(memory_format=CL), f"{k} lost channels_last"


def test_norms_go_through_the_fused_op(monkeypatch):
    calls = []
    real = fast_funit.adain

    def spy(x, weight=None, bias=None, **kw):
        res = kw.get("residual")
        assert res is None or res.shape == x.shape
        calls.append((kw.get("act", "none"), weight is not None, res is not None, kw.get("impl")))
        return real(x, weight, bias, **kw)

    def no_ref_norm(*a, **k):
        raise AssertionError("a norm ran through the reference block")

    monkeypatch.setattr(fast_funit, "adain", spy)
    monkeypatch.setattr(ref_funit, "adain_ref", no_ref_norm)
    gen = Generator(**ARCH, impl="triton")
    gen.impl = "ref"  # must reach every block (and keeps this test fast)
    gen(_images(1), _images(2))
    # (act, adain weight given, residual fused, impl)
    down = [("relu", False, False, "ref")] * 4  # 7x7 conv + three stride-2 convs
    in_res = [("relu", False, False, "ref"), ("none", False, True, "ref")] * 2
    ada_res = [("relu", True, False, "ref"), ("none", True, True, "ref")] * 2
    up = [("relu", False, False, "ref")] * 3
    assert calls == down + in_res + ada_res + up


def test_subpixel_decoder_uses_the_rewrite(monkeypatch):
    """gen.dec.subpixel routes each upsample + 5x5 conv through kernels.upsample_conv (and the
    nn.Upsample modules are skipped); off, the reference path runs."""
    calls = []
    real = fast_funit.upsample_conv
    monkeypatch.setattr(fast_funit, "upsample_conv",
                        lambda x, w, b, **kw: calls.append((tuple(x.shape), kw["impl"])) or real(x, w, b, **kw))
    gen = Generator(**ARCH, impl="ref", subpixel=True)
    out = gen(_images(1), _images(2))
    assert out.shape == (2, 3, 32, 32)
    assert calls == [((2, 64, 4, 4), "subpixel"), ((2, 32, 8, 8), "subpixel"), ((2, 16, 16, 16), "subpixel")]
    gen.dec.subpixel = False
    calls.clear()
    assert torch.allclose(gen(_images(1), _images(2)), out, atol=1e-5) and calls == []


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_bf16_autocast_three_way(channels_last):
    ref, fast = _pair("triton", channels_last)
    x, y = _images(1, channels_last), _images(2, channels_last)
    with torch.no_grad():
        ref32 = ref(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref16, fast16 = ref(x, y), fast(x, y)
    assert fast16.dtype == ref16.dtype == torch.bfloat16
    if channels_last:
        assert fast16.is_contiguous(memory_format=CL)
    err_fast = (fast16.float() - ref32).abs().max().item()
    err_ref = (ref16.float() - ref32).abs().max().item()
    print(f"bf16 max error vs fp32 reference: fast {err_fast:.3g}, reference {err_ref:.3g}")
    assert err_fast <= 2 * err_ref + 1e-2, f"bf16 fast err {err_fast:.3g} vs ref err {err_ref:.3g}"
