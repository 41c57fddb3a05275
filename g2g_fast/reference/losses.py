"""Loss terms (SPEC §2-§5). Each is a plain function of tensors; weights live in the configs."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def hinge_d_real(resp: torch.Tensor) -> torch.Tensor:
    """D on real images: mean(relu(1 - D_y(x)))."""
    return F.relu(1.0 - resp).mean()


def hinge_d_fake(resp: torch.Tensor) -> torch.Tensor:
    """D on generated images: mean(relu(1 + D_y(x)))."""
    return F.relu(1.0 + resp).mean()


def hinge_g(resp: torch.Tensor) -> torch.Tensor:
    """G adversarial: -mean(D_y(x))."""
    return -resp.mean()


def r1_penalty(resp: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """FUNIT's R1: g = d mean(D_y(x)) / dx (graph kept for the double backward); sum(g^2) / B.

    Note the mean over the whole map: like FUNIT, the penalty scales with 1/B^3 per sample.
    """
    (g,) = torch.autograd.grad(resp.mean(), x, create_graph=True)
    return g.pow(2).sum() / x.shape[0]


def feature_matching(feat_u: torch.Tensor, feat_v: torch.Tensor) -> torch.Tensor:
    """FM(u, v) = mean |avg_hw D_f(u) - avg_hw D_f(v)| over the batch and the feature channels."""
    return (feat_u.mean(dim=(2, 3)) - feat_v.mean(dim=(2, 3))).abs().mean()


def lsgan(pred: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN: MSE of the patch predictions to 1 (real) or 0 (fake)."""
    return F.mse_loss(pred, torch.full_like(pred, 1.0 if real else 0.0))


def code_cycle(o) -> tuple[torch.Tensor, torch.Tensor]:
    """Code-cycle terms on G2G outputs (naive eq. 2-3, CycleFUNIT):
    content: MSE(E_A(x1), E_A(m1)) + MSE(E_A(x2), E_A(m2))  (m_i carries x_i's content)
    class:   MSE(E_B(x1), E_B(m2)) + MSE(E_B(x2), E_B(m1))  (m2 carries x1's class)
    The original CycleFUNIT code compared E_A(x_i) with the wrong mix; this is the fixed pairing.
    """
    content = F.mse_loss(o.a1, o.am1) + F.mse_loss(o.a2, o.am2)
    klass = F.mse_loss(o.b1, o.bm2) + F.mse_loss(o.b2, o.bm1)
    return content, klass
