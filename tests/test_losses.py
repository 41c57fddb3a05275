"""Loss terms against values computed by hand on tiny inputs."""
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
