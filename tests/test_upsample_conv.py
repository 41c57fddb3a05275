"""`kernels.upsample_conv`: the sub-pixel rewrite of nearest-upsample x2 + reflect pad 2 + 5x5 conv
(SPEC §7) against `upsample_conv_ref`: float64 to rounding (forward and every gradient), fp32
allclose, bf16 by the three-way rule, odd and tiny sizes (the four border lines are the delicate
part), both memory formats, the dispatch's fallbacks."""
import pytest
import torch

from g2g_fast.reference.ops import upsample_conv_ref
from kernels import upsample_conv
from kernels.upsample_conv import phase_weights, upsample_conv_subpixel

CL = torch.channels_last
SHAPES = [(1, 2, 2, 2, 3), (2, 3, 3, 5, 4), (2, 5, 7, 4, 3), (1, 4, 16, 9, 6)]  # B, Cin, H, W, Cout


def _inputs(shape, dtype=torch.float64, channels_last=False, seed=0):
    B, C, H, W, Co = shape
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, C, H, W, generator=g) * 1.5 + 0.3).to(dtype)  # shifted, non-unit variance
    w = (torch.randn(Co, C, 5, 5, generator=g) * 0.2).to(dtype)
    b = torch.randn(Co, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    return x, w, b


def _fwd_bwd(fn, x, w, b, seed=1):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    y.backward(g)
    return [y.detach(), x.grad, w.grad, b.grad]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float64_exact(shape, channels_last):
    x, w, b = _inputs(shape, channels_last=channels_last)
    want, got = _fwd_bwd(upsample_conv_ref, x, w, b), _fwd_bwd(upsample_conv_subpixel, x, w, b)
    for name, a, c in zip(("y", "dx", "dweight", "dbias"), got, want):
        assert a.shape == c.shape
        err = (a - c).abs().max().item()
        assert err <= 1e-12 * max(1.0, c.abs().max().item()), f"{name}: {err:.3g}"
    if channels_last:
        assert got[0].is_contiguous(memory_format=CL) and got[1].is_contiguous(memory_format=CL)


def test_borders_are_where_the_plain_phase_form_is_wrong():
    """Without the strip fix, exactly the outermost lines differ: the fix is not decorative."""
    import torch.nn.functional as F
    x, w, b = _inputs((1, 3, 6, 5, 2))
    y = F.pixel_shuffle(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), phase_weights(w),
                                 b.repeat_interleave(4)), 2)
    wrong = ((y - upsample_conv_ref(x, w, b)).abs() > 1e-9).any(dim=(0, 1))
    border = torch.zeros_like(wrong)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    assert torch.equal(wrong, border)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fp32_allclose(channels_last):
    x, w, b = _inputs((2, 6, 9, 7, 5), torch.float32, channels_last)
    for name, a, c in zip(("y", "dx", "dweight", "dbias"), _fwd_bwd(upsample_conv_subpixel, x, w, b),
                          _fwd_bwd(upsample_conv_ref, x, w, b)):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_three_way(dtype):
    """Against the fp32 reference: the rewrite's error at most twice the reference's own error in
    the same precision, plus a small atol."""
    x, w, b = _inputs((2, 8, 6, 5, 4), torch.float32, channels_last=True)
    ref32 = _fwd_bwd(upsample_conv_ref, x, w, b)
    lowp = [t.to(dtype) for t in (x, w, b)]
    ref_lp, fast_lp = _fwd_bwd(upsample_conv_ref, *lowp), _fwd_bwd(upsample_conv_subpixel, *lowp)
    for name, r32, rl, fl in zip(("y", "dx", "dweight", "dbias"), ref32, ref_lp, fast_lp):
        assert fl.dtype == dtype
        err_fast = (fl.float() - r32).abs().max().item()
        err_ref = (rl.float() - r32).abs().max().item()
        assert err_fast <= 2 * err_ref + 1e-2 * max(1.0, r32.abs().max().item()), \
            f"{name}: fast {err_fast:.3g} vs reference {err_ref:.3g}"


def test_double_backward_is_autograds():
    x, w, b = _inputs((1, 2, 3, 3, 2))
    x, w = x.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, w: upsample_conv_subpixel(x, w, b), (x, w))


def test_dispatch():
    x, w, b = _inputs((1, 2, 4, 4, 3), torch.float32)
    assert torch.allclose(upsample_conv(x, w, b), upsample_conv_ref(x, w, b), atol=1e-5)
    assert torch.equal(upsample_conv(x, w, b, impl="ref"), upsample_conv_ref(x, w, b))
    tiny = x[:, :, :1, :1]  # 1x1: the border strips need 2 lines (the reference's reflect pad too)
    with pytest.raises(ValueError, match="impl='subpixel' is not possible: input smaller than 2x2"):
        upsample_conv(tiny, w, b, impl="subpixel")
    w3 = w[:, :, 1:4, 1:4]
    assert torch.equal(upsample_conv(x, w3, b), upsample_conv_ref(x, w3, b))
    with pytest.raises(ValueError, match="impl must be one of"):
        upsample_conv(x, w, b, impl="triton")


def test_train_flag(tmp_path, capsys):
    """`--subpixel-decoder` reaches the fast generator and is recorded; with the reference backend
    it is a one-line usage error."""
    from g2g_fast.train import main, setup
    args = ["--device", "cpu", "--image-size", "32", "--batch-size", "4", "--steps", "1", "--subpixel-decoder",
            "--set", "nf=8", "--set", "nf_mlp=16", "--set", "latent_dim=8", "--out", str(tmp_path)]
    approach, opts, _, stream = setup(args + ["--backend", "fast"])
    stream.close()
    assert approach.gen.dec.subpixel and opts.subpixel_decoder
    assert approach.backend.describe(approach)["decoder_upsample"] == "subpixel"
    assert main(args + ["--backend", "reference"]) == 2
    assert "--subpixel-decoder is an option of the fast backend" in capsys.readouterr().err
