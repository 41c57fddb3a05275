"""Loss terms (SPEC §2-§5). Each is a plain function of tensors; weights live in the configs.

Every term upcasts its input to fp32 before reducing (`upcast`): under bf16/fp16 autocast a mean
returned in bf16 keeps 8 bits, and feature matching subtracts two means that differ by little (real
and fake features 0.1% apart on an offset: the bf16 difference had the wrong sign or was 0 in 82% of
the channels, the fp32 one in none; tests/test_losses.py). fp32 and float64 inputs are unchanged.

Channels_last images and features are reduced over their (B, H*W, C) view (`_rows`): the same
values, and the gradient the backward writes comes out channels_last (on the NCHW-shaped tensor
it is an expanded scalar divided into an NCHW tensor, on every device: issue 22). NCHW tensors
(the reference) are reduced as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import pixel_rows


def upcast(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32; fp32 and float64 unchanged (the same tensor)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def hinge_d_real(resp: torch.Tensor) -> torch.Tensor:
    """D on real images: mean(relu(1 - D_y(x)))."""
    return F.relu(1.0 - upcast(resp)).mean()


def hinge_d_fake(resp: torch.Tensor) -> torch.Tensor:
    """D on generated images: mean(relu(1 + D_y(x)))."""
    return F.relu(1.0 + upcast(resp)).mean()


def hinge_g(resp: torch.Tensor) -> torch.Tensor:
    """G adversarial: -mean(D_y(x))."""
    return -upcast(resp).mean()


def r1_penalty(resp: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """FUNIT's R1: g = d mean(D_y(x)) / dx (graph kept for the double backward); sum(g^2) / B.

    Note the mean over the whole map: like FUNIT, the penalty scales with 1/B^3 per sample. Under
    fp16 the training step computes it in fp32 (`Approach.r1_autocast`).
    """
    (g,) = torch.autograd.grad(upcast(resp).mean(), x, create_graph=True)
    return upcast(g).pow(2).sum() / x.shape[0]


def _rows(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as (B, H*W, C) pixel rows when the first is channels_last (`pixel_rows`; a view
    for each channels_last one), else unchanged."""
    if pixel_rows(ts[0]) is None:
        return ts
    return tuple(t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[1]) for t in ts)


def _hw_mean(feat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C): the mean over pixels, in fp32."""
    rows = pixel_rows(feat)
    return upcast(rows).mean(1) if rows is not None else upcast(feat).mean(dim=(2, 3))


def feature_matching(feat_u: torch.Tensor, feat_v: torch.Tensor) -> torch.Tensor:
    """FM(u, v) = mean |avg_hw D_f(u) - avg_hw D_f(v)| over the batch and the feature channels."""
    return (_hw_mean(feat_u) - _hw_mean(feat_v)).abs().mean()


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference, in fp32."""
    a, b = _rows(a, b)
    return F.l1_loss(upcast(a), upcast(b))


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference, in fp32."""
    a, b = _rows(a, b)
    return F.mse_loss(upcast(a), upcast(b))


def lsgan(pred: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN: MSE of the patch predictions to 1 (real) or 0 (fake)."""
    pred = upcast(pred)
    return F.mse_loss(pred, torch.full_like(pred, 1.0 if real else 0.0))


def code_cycle(o) -> tuple[torch.Tensor, torch.Tensor]:
    """Code-cycle terms on G2G outputs (naive eq. 2-3, CycleFUNIT):
    content: MSE(E_A(x1), E_A(m1)) + MSE(E_A(x2), E_A(m2))  (m_i carries x_i's content)
    class:   MSE(E_B(x1), E_B(m2)) + MSE(E_B(x2), E_B(m1))  (m2 carries x1's class)
    The original CycleFUNIT code compared E_A(x_i) with the wrong mix; this is the fixed pairing.
    """
    content = mse(o.a1, o.am1) + mse(o.a2, o.am2)
    klass = mse(o.b1, o.bm2) + mse(o.b2, o.bm1)
    return content, klass
