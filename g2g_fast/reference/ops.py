"""Plain-PyTorch twins of the fused ops. These define the semantics the Triton kernels must match.

`adain_ref` is the FUNIT instance norm / AdaIN used throughout the generator:

    y = act(normalize(x) * weight + bias) + residual

- `normalize` is instance normalisation over H x W with the *biased* variance and eps inside the
  square root: (x - mean_hw) / sqrt(var_hw + eps). Instance statistics are used in train *and*
  eval mode (FUNIT's AdaIN goes through a batch-norm in training mode on a (1, B*C, H, W) view,
  and its running buffers are never read).
- `weight` / `bias`: (B, C) for AdaIN (per sample and channel), (C,) for an affine instance norm,
  or None (no affine, nn.InstanceNorm2d's default).
- `act` in {"none", "relu", "lrelu"} (`slope` for lrelu), applied after the affine.
- `residual`: optional tensor of x's shape added last (the ResBlock skip).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "relu", "lrelu")


def _affine_view(t: torch.Tensor | None, x: torch.Tensor, name: str) -> torch.Tensor | None:
    """(B, C) or (C,) -> broadcastable (B|1, C, 1, 1); checks the shape against x."""
    if t is None:
        return None
    B, C = x.shape[:2]
    if t.shape == (B, C):
        return t[:, :, None, None]
    if t.shape == (C,):
        return t[None, :, None, None]
    raise ValueError(f"adain: {name} must have shape ({B}, {C}) or ({C},), got {tuple(t.shape)}")


def adain_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    act: str = "none",
    slope: float = 0.2,
    residual: torch.Tensor | None = None,
    eps: float = 1e-5,
    upcast: bool = True,
) -> torch.Tensor:
    """Reference instance norm / AdaIN (+ activation, + residual). See the module docstring.

    With `upcast=True` (default) everything is computed in fp32 and the result cast back to x's
    dtype, which is what the fused kernel does; `upcast=False` runs in x's own dtype and is only
    used by tests to measure the error of a low-precision reference.
    """
    if x.dim() != 4:
        raise ValueError(f"adain: expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if act not in ACTIVATIONS:
        raise ValueError(f"adain: act must be one of {ACTIVATIONS}, got {act!r}")
    out_dtype = x.dtype
    compute = torch.float32 if upcast else x.dtype

    def cast(t):
        return None if t is None else t.to(compute)

    xc = x.to(compute)
    w = _affine_view(cast(weight), x, "weight")
    b = _affine_view(cast(bias), x, "bias")
    # torch.var_mean is a two-pass/Welford reduction, never E[x^2] - E[x]^2 (cancellation).
    var, mean = torch.var_mean(xc, dim=(2, 3), keepdim=True, correction=0)
    y = (xc - mean) * torch.rsqrt(var + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    if act == "relu":
        y = F.relu(y)
    elif act == "lrelu":
        y = F.leaky_relu(y, slope)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(
                f"adain: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
        y = y + residual.to(compute)
    # Keep the caller's memory format (channels_last stays channels_last).
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format
    return y.to(out_dtype).contiguous(memory_format=fmt)


def upsample_conv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """FUNIT's decoder upsampling: nearest upsample x2, reflect pad k//2, k x k conv (stride 1).

    The twin of `kernels.upsample_conv` (the exact sub-pixel rewrite, SPEC §7)."""
    pad = weight.shape[-1] // 2
    up = F.interpolate(x, scale_factor=2, mode="nearest")
    return F.conv2d(F.pad(up, (pad,) * 4, mode="reflect"), weight, bias)


def reflect_pad_ref(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect padding by `pad` on all four sides of a (B, C, H, W) tensor (FUNIT's padded convs):
    F.pad(x, (pad,) * 4, mode="reflect"), the twin of `kernels.reflect_pad`.

    y[b, c, i, j] = x[b, c, r(i - pad, H), r(j - pad, W)] with r(i, n) = -i for i < 0 and
    2 (n - 1) - i for i >= n: mirrored about the edge pixel, which is not repeated (row -1 is row 1,
    not row 0), so pad < H and pad < W. Output shape (B, C, H + 2 pad, W + 2 pad), x's dtype and
    memory format (on the CPU; aten's CUDA kernel writes NCHW). A gather, so exact in any dtype: no
    `upcast` option. Its backward sums the output gradient over the (up to 9) positions that read
    each input pixel.
    """
    return F.pad(x, (pad,) * 4, mode="reflect")


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor stored so (and not also NCHW-contiguous), else contiguous."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def pixel_rows(x: torch.Tensor) -> torch.Tensor | None:
    """A channels_last (B, C, H, W) tensor as the (B, H*W, C) view of its memory; None otherwise.

    Reductions over pixels and indexing along channels done on this view give the same values,
    and their backward allocates its gradient in this view's order, i.e. channels_last: on the
    4-D NCHW-shaped tensor the gradient of a mean (an expanded scalar, divided) or of a gather
    (a fresh zero tensor) comes out NCHW, on every device (issue 22)."""
    if memory_format_of(x) == torch.channels_last:
        B, C, H, W = x.shape
        return x.permute(0, 2, 3, 1).reshape(B, H * W, C)
    return None
