"""Nearest upsample x2 + reflect pad 2 + 5x5 conv as four 3x3 "phase" convolutions (SPEC §7).

Output pixel (2i + a, 2j + c) of the 5x5 conv over the upsampled map U (U[y, x] = L[y // 2, x // 2])
only ever reads low-resolution rows i-1, i, i+1 (and the same for columns): for phase a = 0 the
taps dy in {-2, -1} land on row i-1, {0, 1} on row i, {2} on row i+1; for a = 1, {-2} on i-1,
{-1, 0} on i, {1, 2} on i+1. Summing the 5x5 weights over the taps that land together gives one
3x3 kernel per phase (a, c), a linear map of the 5x5 weight (so autograd carries its gradient):

    y = pixel_shuffle(conv3x3(replicate_pad(L, 1), K_phases), 2)

That is exact wherever the reflect padding of U agrees with replicate padding of L, i.e. everywhere
except the outermost output row and column on each side (row 0 reads U[2] = L[1] where the phase
form reads L[-1] = L[0]); those four lines are recomputed by the plain formula on a two-row (or
two-column) strip of L. MACs: 4 x 9 = 36 per 2x2 output block instead of 4 x 25 = 100, so the
decoder's three upsampling convs (~20 of its 25 GF per image) cost 2.8x fewer FLOPs, plus four
thin strips (1/H + 1/W of the original work) and the pixel-shuffle copy.

PyTorch (conv2d / pixel_shuffle / slicing) and `kernels.reflect_pad` for the strips: forward and
every derivative, double backward included, come from autograd (the pad registers its own). Layers:
  phase_weights(weight)          5x5 -> (4 * Cout, Cin, 3, 3), phase-major per output channel
  upsample_conv_subpixel(...)    the rewrite
  upsample_conv(..., impl)       the dispatch: "subpixel" or "ref" (g2g_fast.reference.ops)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IMPLS = ("auto", "subpixel", "ref")

# The 5 taps (dy = -2..2) that land on low-res rows i-1, i, i+1, as (first tap, count), for output
# phase 0 and 1; columns alike.
_TAPS = {0: ((0, 2), (2, 2), (4, 1)), 1: ((0, 1), (1, 2), (3, 2))}


def _fold(weight: torch.Tensor, phase: int, dim: int) -> torch.Tensor:
    """Sum the taps of each group along `dim` (5 -> 3)."""
    return torch.stack([weight.narrow(dim, first, n).sum(dim) for first, n in _TAPS[phase]], dim)


def phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 5, 5) -> (Cout * 4, Cin, 3, 3), output channel co * 4 + a * 2 + c holding phase
    (a, c): the channel order pixel_shuffle(…, 2) expects. A few adds over the weight: cheap next
    to the convolution, and autograd's gradient of it sums the phase gradients back onto the taps."""
    rows = [_fold(weight, a, -2) for a in (0, 1)]
    phases = [_fold(rows[a], c, -1) for a in (0, 1) for c in (0, 1)]
    cout, cin = weight.shape[:2]
    return torch.stack(phases, dim=1).reshape(cout * 4, cin, 3, 3)


def supported(x: torch.Tensor, weight: torch.Tensor) -> tuple[bool, str]:
    """Whether the rewrite applies, and why not."""
    if weight.shape[-2:] != (5, 5):
        return False, f"kernel {tuple(weight.shape[-2:])} (the rewrite is for 5x5)"
    if x.dim() != 4 or x.shape[-2] < 2 or x.shape[-1] < 2:
        return False, "input smaller than 2x2 (the border strips need two rows and columns)"
    return True, "5x5 kernel, input >= 2x2"


def _plain(strip: torch.Tensor, weight, bias) -> torch.Tensor:
    import kernels  # the package's functional (its dispatch): aten's CUDA reflect pad writes NCHW
    up = F.interpolate(strip, scale_factor=2, mode="nearest")
    return F.conv2d(kernels.reflect_pad(up, 2), weight, bias)


def upsample_conv_subpixel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`upsample_conv_ref(x, weight, bias)` for a 5x5 weight, by phase convolutions."""
    ok, why = supported(x, weight)
    if not ok:
        raise ValueError(f"upsample_conv_subpixel: {why}")
    y = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), phase_weights(weight),
                 None if bias is None else bias.repeat_interleave(4))
    y = F.pixel_shuffle(y, 2)
    # The four outermost lines, exactly: each from a two-line strip of x (full length, so the
    # reflect padding along the strip is the real one). In place on pixel_shuffle's fresh output;
    # autograd routes the overwritten elements' gradient to the strips only.
    y[:, :, :1] = _plain(x[:, :, :2], weight, bias)[:, :, :1]
    y[:, :, -1:] = _plain(x[:, :, -2:], weight, bias)[:, :, -1:]
    y[:, :, :, :1] = _plain(x[:, :, :, :2], weight, bias)[:, :, :, :1]
    y[:, :, :, -1:] = _plain(x[:, :, :, -2:], weight, bias)[:, :, :, -1:]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)  # keep the caller's layout
    return y


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  impl: str = "auto") -> torch.Tensor:
    """Nearest upsample x2 + reflect pad + conv (FUNIT's decoder upsampling). impl: "subpixel"
    (the rewrite; "auto" picks it where `supported`) or "ref" (`upsample_conv_ref`)."""
    if impl not in IMPLS:
        raise ValueError(f"upsample_conv: impl must be one of {IMPLS}, got {impl!r}")
    ok, why = supported(x, weight)
    if impl == "subpixel" and not ok:
        raise ValueError(f"upsample_conv: impl='subpixel' is not possible: {why}")
    if impl == "ref" or not ok:
        from g2g_fast.reference.ops import upsample_conv_ref
        return upsample_conv_ref(x, weight, bias)
    return upsample_conv_subpixel(x, weight, bias)
