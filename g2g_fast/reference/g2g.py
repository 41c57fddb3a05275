"""The G2G cross-training wiring (SPEC §1), for any model with
`encode_content(x)` (E_A), `encode_class(x)` (E_B) and `decode(content, class_code)` (G).

Disassembly: m1 = G(E_A(x1), E_B(x2)), m2 = G(E_A(x2), E_B(x1)).
Reassembly:  r1 = G(E_A(m1), E_B(m2)) ~ x1, r2 = G(E_A(m2), E_B(m1)) ~ x2.
Short:       s1 = G(E_A(x1), E_B(x1)),  s2 = G(E_A(x2), E_B(x2)).

Each stage calls each encoder once on [x1; x2] (resp. [m1; m2]) and the decoder once on all of
the stage's outputs. For FUNIT's networks (per-sample ops only) this equals calling them image
by image; for the naive approach's BatchNorm encoders it *defines* the batch statistics: those of
the stage's images, so every implementation (reference or fast) computes the same thing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops import memory_format_of


def make_pairs(x: torch.Tensor, y: torch.Tensor, pairing: str = "halves"):
    """Split a batch into pairs -> (x1, y1, x2, y2).

    "halves": pair j = (x[j], x[j + B/2]) (the original code); "chain": pair i = (x[i], x[i+1]),
    i = 0..B-2 (the paper's sums).
    """
    B = x.shape[0]
    if B < 2 or B % 2:
        raise ValueError(f"G2G needs an even batch of at least 2 images, got {B}")
    if pairing == "halves":
        h = B // 2
        return x[:h], y[:h], x[h:], y[h:]
    if pairing == "chain":
        return x[:-1], y[:-1], x[1:], y[1:]
    raise ValueError(f"pairing must be 'halves' or 'chain', got {pairing!r}")


@dataclass
class G2GOutputs:
    x1: torch.Tensor
    x2: torch.Tensor
    a1: torch.Tensor    # E_A(x1): content codes of the originals
    a2: torch.Tensor
    b1: torch.Tensor    # E_B(x1): class codes of the originals
    b2: torch.Tensor
    m1: torch.Tensor    # content of x1, class of x2
    m2: torch.Tensor    # content of x2, class of x1
    s1: torch.Tensor | None = None   # short reconstructions (when requested)
    s2: torch.Tensor | None = None
    am1: torch.Tensor | None = None  # E_A(m1), ... codes of the mixes (reassembly only)
    am2: torch.Tensor | None = None
    bm1: torch.Tensor | None = None
    bm2: torch.Tensor | None = None
    r1: torch.Tensor | None = None   # two-stage reconstructions
    r2: torch.Tensor | None = None


class _SplitBatch(torch.autograd.Function):
    """`x.split(n)` along the batch, with a backward that keeps x's memory format.

    Slicing (`out[:n]`) gives one `slice_backward` per slice, each a fresh zero tensor in NCHW
    (aten's slice_backward allocates with `at::zeros`, on every device) plus an add; `split`'s
    own backward is one `cat` of the gradients, NCHW again when one of them is undefined. Here
    the gradient is one `cat`, undefined parts filled with zeros in x's layout, so a
    channels_last network's gradients stay channels_last (issue 22). Same values exactly.
    """

    @staticmethod
    def forward(ctx, x, n):
        ctx.set_materialize_grads(False)
        ctx.meta = x.shape, x.dtype, x.device, memory_format_of(x)
        return tuple(x.split(n))

    @staticmethod
    def backward(ctx, *grads):
        shape, dtype, device, fmt = ctx.meta
        n = shape[0] // len(grads)
        parts = [g if g is not None else
                 torch.empty((n, *shape[1:]), dtype=dtype, device=device, memory_format=fmt).zero_()
                 for g in grads]
        return torch.cat(parts), None


def split_batch(x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
    """x cut into `parts` equal batch chunks (views), gradients in x's layout (_SplitBatch)."""
    if x.shape[0] % parts:
        raise ValueError(f"split_batch: batch {x.shape[0]} is not divisible by {parts}")
    n = x.shape[0] // parts
    if not x.requires_grad:
        return tuple(x.split(n))
    return _SplitBatch.apply(x, n)


def mean_class_code(codes: torch.Tensor) -> torch.Tensor:
    """(N, K, D) class codes, K images per class -> (N, D): the K-shot class code, their mean, in fp32
    under low precision (a statistic). The one definition training (`class_shots`), `evaluate
    --k-shot`, `translate` and the Python API use."""
    dtype = torch.float32 if codes.dtype in (torch.bfloat16, torch.float16) else codes.dtype
    return codes.mean(1, dtype=dtype)


def shot_class_codes(model, shots: torch.Tensor, k: int) -> torch.Tensor:
    """K-shot class codes in training: `shots` (N * K, 3, H, W), image j's K images at rows
    j*K ... j*K + K-1 (the loaders' order) -> (N, D). One batched E_B call over all N * K images."""
    if k < 1 or shots.shape[0] % k:
        raise ValueError(f"{shots.shape[0]} shot images do not split into groups of K = {k}")
    codes = model.encode_class(shots)
    return mean_class_code(codes.view(shots.shape[0] // k, k, *codes.shape[1:]))


def _encode(model, x1, x2):
    """Both encoders once over [x1; x2]; returns (content1, content2, class1, class2)."""
    x = torch.cat([x1, x2])
    a, b = model.encode_content(x), model.encode_class(x)
    return (*split_batch(a, 2), *split_batch(b, 2))


def disassemble(model, x1, x2, short: bool = False, class_codes=None) -> G2GOutputs:
    """Stage 1: encode both images, decode the two mixes (and the short reconstructions).

    `class_codes` (b1, b2): used instead of E_B(x1), E_B(x2) (K-shot evaluation: each the mean
    of the class codes of K images of that image's class)."""
    if class_codes is None:
        a1, a2, b1, b2 = _encode(model, x1, x2)
    else:
        a = model.encode_content(torch.cat([x1, x2]))
        (a1, a2), (b1, b2) = split_batch(a, 2), class_codes
    contents, classes = [a1, a2], [b2, b1]            # m1 = G(a1, b2), m2 = G(a2, b1)
    if short:
        contents, classes = contents + [a1, a2], classes + [b1, b2]   # s1 = G(a1, b1), s2 = G(a2, b2)
    out = model.decode(torch.cat(contents), torch.cat(classes))
    parts = split_batch(out, 4 if short else 2)
    o = G2GOutputs(x1=x1, x2=x2, a1=a1, a2=a2, b1=b1, b2=b2, m1=parts[0], m2=parts[1])
    if short:
        o.s1, o.s2 = parts[2], parts[3]
    return o


def g2g_forward(model, x1, x2, short: bool = False, class_codes=None) -> G2GOutputs:
    """Both stages: disassembly (mixes, optional short reconstructions), then reassembly.
    `class_codes`: see `disassemble` (stage 2 always encodes the mixes themselves)."""
    o = disassemble(model, x1, x2, short=short, class_codes=class_codes)
    o.am1, o.am2, o.bm1, o.bm2 = _encode(model, o.m1, o.m2)
    # r1 takes m1's content (x1's) and m2's class (x1's); r2 the other way round.
    r = model.decode(torch.cat([o.am1, o.am2]), torch.cat([o.bm2, o.bm1]))
    o.r1, o.r2 = split_batch(r, 2)
    return o
