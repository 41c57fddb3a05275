"""Loss terms against values computed by hand on tiny inputs."""
import copy

import pytest
import torch

from g2g_fast.reference import losses as L

RESP = torch.tensor([[[0.5, 2.0]], [[-1.0, 0.0]]])  # (B=2, 1, 2)


def test_hinge_terms():
    assert L.hinge_d_real(RESP).item() == pytest.approx((0.5 + 0 + 2 + 1) / 4)   # relu(1 - r)
    assert L.hinge_d_fake(RESP).item() == pytest.approx((1.5 + 3 + 0 + 1) / 4)   # relu(1 + r)
    assert L.hinge_g(RESP).item() == pytest.approx(-(0.5 + 2 - 1 + 0) / 4)


def test_r1_by_hand():
    # D(x) = sum_c x^2, so d mean(D)/dx = 2x / (B*H*W) = x / 2 here; sum(g^2)/B = 7.5 / 2.
    x = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 4.0]]]], requires_grad=True)  # (B=2, C=1, H=1, W=2)
    resp = (x ** 2).sum(dim=1)
    r1 = L.r1_penalty(resp, x)
    assert r1.item() == pytest.approx(3.75)
    # The penalty keeps its graph (double backward): d r1 / dx = 2 * g * dg/dx / B.
    (gx,) = torch.autograd.grad(r1, x)
    torch.testing.assert_close(gx, x.detach() / 4)


def test_feature_matching_by_hand():
    fu = torch.tensor([[[[1.0, 3.0]], [[2.0, 2.0]]]])  # (1, 2, 1, 2): channel means 2, 2
    fv = torch.tensor([[[[0.0, 0.0]], [[1.0, 1.0]]]])  # channel means 0, 1
    assert L.feature_matching(fu, fv).item() == pytest.approx((2 + 1) / 2)


def test_lsgan_by_hand():
    pred = torch.tensor([0.5, 2.0])
    assert L.lsgan(pred, True).item() == pytest.approx((0.25 + 1.0) / 2)
    assert L.lsgan(pred, False).item() == pytest.approx((0.25 + 4.0) / 2)


# --- precision: every term reduces in fp32 under autocast (issue 22) ---------------------------

LOWP = [torch.bfloat16, torch.float16]


def lowp(shape, dtype, offset=0.0, seed=0):
    """Random values on a common offset, in a low-precision dtype (as autocast's convs return them)."""
    g = torch.Generator().manual_seed(seed)
    return (offset + torch.randn(shape, generator=g)).to(dtype)


@pytest.mark.parametrize("dtype", LOWP)
def test_every_loss_is_fp32_under_autocast(dtype):
    """Under CPU autocast each loss, given low-precision activations, returns an fp32 tensor whose
    value is the float64 one of the same inputs to fp32 rounding (a bf16 result carries 8 bits:
    the old `relu(1 - x).mean()` returned bf16, 2e-3 relative)."""
    from types import SimpleNamespace

    from g2g_fast.reference.vgg import VGGPerceptual, perceptual_l1

    a, b = lowp((2, 3, 8, 8), dtype, 3.0, 1), lowp((2, 3, 8, 8), dtype, 3.0, 2)
    feat_u, feat_v = lowp((2, 16, 4, 4), dtype, 5.0, 3), lowp((2, 16, 4, 4), dtype, 5.0, 4)
    codes = {k: lowp((2, 8), dtype, 1.0, i) for i, k in enumerate(("a1", "a2", "am1", "am2", "b1", "b2", "bm1", "bm2"))}
    o, o64 = SimpleNamespace(**codes), SimpleNamespace(**{k: v.double() for k, v in codes.items()})
    torch.manual_seed(0)
    vgg = VGGPerceptual()  # random weights: only the dtypes and the reduction are under test
    vgg64 = copy.deepcopy(vgg).double()
    cases = {  # name -> (under autocast, float64 of the same inputs)
        "hinge_d_real": (lambda: L.hinge_d_real(a - 3), lambda: L.hinge_d_real(a.double() - 3)),
        "hinge_d_fake": (lambda: L.hinge_d_fake(a - 3), lambda: L.hinge_d_fake(a.double() - 3)),
        "hinge_g": (lambda: L.hinge_g(a), lambda: L.hinge_g(a.double())),
        "feature_matching": (lambda: L.feature_matching(feat_u, feat_v),
                             lambda: L.feature_matching(feat_u.double(), feat_v.double())),
        "lsgan_real": (lambda: L.lsgan(a, True), lambda: L.lsgan(a.double(), True)),
        "lsgan_fake": (lambda: L.lsgan(a, False), lambda: L.lsgan(a.double(), False)),
        "l1": (lambda: L.l1(a, b), lambda: L.l1(a.double(), b.double())),
        "mse": (lambda: L.mse(a, b), lambda: L.mse(a.double(), b.double())),
        "code_cycle_content": (lambda: L.code_cycle(o)[0], lambda: L.code_cycle(o64)[0]),
        "code_cycle_class": (lambda: L.code_cycle(o)[1], lambda: L.code_cycle(o64)[1]),
        "perceptual_l1_pixels": (lambda: perceptual_l1(None, a, b), lambda: perceptual_l1(None, a.double(), b.double())),
    }
    for name, (run, exact) in cases.items():
        with torch.autocast("cpu", dtype=dtype):
            got = run()
        want = exact()
        assert got.dtype == torch.float32, f"{name} returned {got.dtype}"
        assert got.item() == pytest.approx(want.item(), rel=1e-5), name
    # VGG: its convs run in `dtype`, so only the reduction's dtype is exact here.
    x1, x2 = a.float() / 4, b.float() / 4
    with torch.autocast("cpu", dtype=dtype):
        assert vgg(x1).dtype == dtype
        got = perceptual_l1(vgg, x1, x2)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(perceptual_l1(vgg64, x1.double(), x2.double()).item(), rel=2e-2)
    # R1: resp from a low-precision conv of an fp32 input, as in the D step.
    x = a.float().requires_grad_(True)
    w = lowp((1, 3, 3, 3), torch.float32, 0.0, 5)
    with torch.autocast("cpu", dtype=dtype):
        resp = torch.nn.functional.conv2d(x, w).squeeze(1)
        assert resp.dtype == dtype
        r1 = L.r1_penalty(resp, x)
    assert r1.dtype == torch.float32


def test_feature_matching_keeps_small_differences_under_bf16():
    """Real and fake features 0.1% apart on a common offset of 4 (bf16 spacing there: 2^-5):
    the channel means of the two differ by ~0.004, below half a bf16 step. FM in fp32 returns
    the float64 value of the same bf16 features, and its gradient (what trains G) has the sign of
    the true difference in every channel. Measured with the old bf16 means
    `(u.mean((2, 3)) - v.mean((2, 3))).abs().mean()` (checked below, so this test would fail
    on it): the difference had the wrong sign or was 0 in 82% of the channels, and the loss
    was 3% off."""
    g = torch.Generator().manual_seed(0)
    v = 4.0 + torch.randn(4, 256, 8, 8, generator=g)
    u = v * 1.001
    ub, vb = u.bfloat16().requires_grad_(True), v.bfloat16()
    truth = u.double().mean((2, 3)) - v.double().mean((2, 3))  # the unrounded features' difference
    exact = (ub.detach().double().mean((2, 3)) - vb.double().mean((2, 3))).abs().mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fm = L.feature_matching(ub, vb)
        old = ub.detach().mean(dim=(2, 3)) - vb.mean(dim=(2, 3))
    assert fm.dtype == torch.float32
    assert fm.item() == pytest.approx(exact.item(), rel=1e-5)
    (grad,) = torch.autograd.grad(fm, ub)
    wrong = (grad.double().sum((2, 3)) * truth <= 0).double().mean().item()
    assert wrong == 0, f"FM's gradient has the wrong sign (or is 0) in {wrong:.1%} of the channels"
    # The same inputs defeat the old bf16 means (so the check above is not vacuous).
    old_wrong = (old.double() * truth <= 0).double().mean().item()
    assert old_wrong > 0.5 and abs(old.abs().mean().item() - exact.item()) > 0.02 * exact.item()


def test_hinge_mean_of_a_large_map_is_fp32_exact():
    """Many patch responses on an offset: a bf16 mean keeps ~3 significant digits (the old
    `relu(1 - x).mean()` here: 3.984 for 3.981, 8.5e-4 relative); fp32 is exact to 1e-6."""
    resp = lowp((8, 16, 16), torch.bfloat16, -3.0, 7)
    exact = torch.relu(1 - resp.double()).mean().item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = L.hinge_d_real(resp)
        old = torch.relu(1.0 - resp).mean()
    assert got.item() == pytest.approx(exact, rel=1e-6)
    assert old.dtype == torch.bfloat16 and abs(old.item() - exact) > 1e-4 * exact
