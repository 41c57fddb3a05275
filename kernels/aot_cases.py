"""The launch sets of the compile gate (`kernels/aot.py`): which adain and reflect_pad launches, at
which shapes, dtypes and memory formats, it compiles. "ci" is the FUNIT generator's adain variants
at its stage shapes, forward and backward, in the two benchmarked formats plus the format mixes and
the INT64 specialisation of each plan kind, and the reflect pads of FUNIT's padded convs at 128 px
(forward and backward, the same two formats, one INT64 case); "full" adds every format, dtype and
variant at every stage shape and the edge shapes (aot.py's docstring has the details).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
# (weight/bias: None, "bc" (per sample, AdaIN) or "c" (affine IN), act, residual)
VARIANTS = {
    "in_relu": (None, "relu", False),       # content encoder convs, decoder upsampling path
    "in_res": (None, "none", True),         # content ResBlocks' second norm + skip add
    "adain_relu": ("bc", "relu", False),    # decoder AdaIN ResBlocks' first norm
    "adain_res": ("bc", "none", True),      # decoder AdaIN ResBlocks' second norm + skip add
    "bench": ("bc", "relu", True),          # the benchmarked epilogue (bench/_shapes.py)
    "affine_lrelu": ("c", "lrelu", False),  # not in FUNIT's G: the remaining flag combination
}
# bench/_shapes.py's FUNIT_B and FUNIT_SHAPES (a test keeps them equal; kernels/ cannot import bench/)
# and FUNIT2FUNIT's training batch (g2g_fast/config.py), whose channels_last stages plan the split path.
FUNIT_B, TRAIN_B = 64, 8
FUNIT_SHAPES = ((64, 128, 128), (128, 64, 64), (256, 32, 32), (512, 16, 16))
# Where the generator uses each variant: IN + relu at every stage, the ResBlocks at the bottleneck.
FUNIT_USE = {"in_relu": FUNIT_SHAPES, "in_res": FUNIT_SHAPES[3:], "adain_relu": FUNIT_SHAPES[3:],
             "adain_res": FUNIT_SHAPES[3:]}
# Past 2^31 elements (INT64 offsets), one per plan kind (CI: in the format that plans it so):
# fused (NCHW), two-pass, split (channels_last, B = 1).
HUGE = {(64, 2048, 128, 128): ("fp32", "nchw"), (64, 256, 512, 512): ("bf16", "cl"),
        (1, 8, 16384, 16384): ("bf16", "cl")}
# reflect_pad: the variant is the pad. FUNIT's padded convs at 128 px, (C, H, W, pad): the 7x7
# convs (the RGB input, the decoder's last conv), the 4x4 downsampling and 3x3 ResBlock convs.
PADS = {"pad1": 1, "pad2": 2, "pad3": 3}
PAD_SHAPES = ((3, 128, 128, 3), (64, 128, 128, 3), (128, 64, 64, 1), (256, 32, 32, 1), (512, 16, 16, 1))
PAD_HUGE = ((64, 256, 512, 512), "bf16", "cl")     # 2^32 elements: the INT64 specialisation
PAD_EDGE = ((2, 5, 13, 11), (3, 63, 7, 9), (64, 512, 4, 4), (8, 2048, 8, 8))
EDGE = ((64, 512, 1, 1), (3, 63, 7, 9), (5, 3, 13, 11), (64, 63, 32, 32), (64, 2048, 8, 8),
        (4, 2048, 4, 4), (8, 64, 256, 256), (64, 64, 256, 256), (2, 32, 512, 512), (1, 64, 512, 512),
        (2, 8, 16, 16), (2, 32, 4, 4))


class Case(NamedTuple):
    """One launcher call: `direction` "fwd" (adain_fwd, reflect_pad_fwd) or "bwd" (adain_bwd,
    reflect_pad_bwd). For op "reflect_pad" the variant names the pad (`PADS`) and shape is x's
    (the backward folds a (B, C, H + 2p, W + 2p) gradient back to it)."""
    variant: str
    shape: tuple          # (B, C, H, W)
    dtype: str            # of x, dy, residual (and of weight/bias unless param_dtype)
    fmt: str              # x's memory format: "nchw" | "cl"
    other_fmt: str        # dy's (bwd) or the residual's (fwd) format: a mix when != fmt
    direction: str
    param_dtype: Optional[str] = None
    op: str = "adain"     # "adain" | "reflect_pad"

    def label(self) -> str:
        """x's format, and the other tensor's when they differ: "cl", "cl+dy:nchw", "nchw+res:cl"."""
        if self.other_fmt == self.fmt:
            return self.fmt
        return f"{self.fmt}+{'dy' if self.direction == 'bwd' else 'res'}:{self.other_fmt}"


def cases(kind: str = "ci") -> list[Case]:
    """The launch set: "ci" (the FUNIT generator in the benchmarked formats, mixes, INT64) or
    "full" (every dtype x format, every variant at every FUNIT shape, the edge shapes)."""
    full = kind == "full"
    # (dtype, x's format): CI compiles the two that bench/_shapes.py benchmarks (the fast backend's
    # bf16 channels_last, the fp32 NCHW of plain models); --full every combination.
    formats = ([(d, f) for d in ("bf16", "fp32", "fp16") for f in FORMATS] if full
               else [("bf16", "cl"), ("fp32", "nchw")])
    out = []

    def add(variant, shape, dtype, fmt, other=None, dirs=("fwd", "bwd"), **kw):
        out.extend(Case(variant, tuple(shape), dtype, fmt, other or fmt, d, **kw) for d in dirs)

    use = {v: FUNIT_SHAPES for v in VARIANTS} if full else FUNIT_USE
    for variant, shapes in use.items():
        for B in (FUNIT_B, TRAIN_B):
            for C, H, W in shapes:
                for dtype, fmt in formats:
                    add(variant, (B, C, H, W), dtype, fmt)
                    # Format mixes (the sub-pixel decoder's conv output and the gradient reaching
                    # it can differ; a skip's residual too): the launchers copy the odd tensor
                    # into x's layout, so these must compile to the kernels above.
                    other = "nchw" if fmt == "cl" else "cl"
                    add(variant, (B, C, H, W), dtype, fmt, other,
                        dirs=("fwd", "bwd") if VARIANTS[variant][2] else ("bwd",))
    for shape, ci_format in HUGE.items():
        for dtype, fmt in formats if full else [ci_format]:
            add("adain_res", shape, dtype, fmt)
            if full:
                add("in_relu", shape, dtype, fmt)
    if full:
        for shape in EDGE:
            for variant in ("in_relu", "bench", "affine_lrelu"):
                for dtype, fmt in formats:
                    add(variant, shape, dtype, fmt)
        for C, H, W in FUNIT_SHAPES:   # fp32 AdaIN parameters with bf16 activations
            for fmt in FORMATS:
                add("adain_res", (FUNIT_B, C, H, W), "bf16", fmt, param_dtype="fp32")
    out.extend(reflect_pad_cases(kind))
    return list(dict.fromkeys(out))


def reflect_pad_cases(kind: str = "ci") -> list[Case]:
    """reflect_pad's launches: "ci" the FUNIT pads at batch 8 in the two benchmarked formats and
    one INT64 case (few distinct specialisations: the tile is a function of C, H*W and the
    format); "full" every format, pads 1..3 at every FUNIT shape (batch 64 and 8), edge shapes."""
    full = kind == "full"
    formats = ([(d, f) for d in DTYPES for f in FORMATS] if full else [("bf16", "cl"), ("fp32", "nchw")])
    out = []

    def add(shape, pad, dtype, fmt):
        out.extend(Case(f"pad{pad}", tuple(shape), dtype, fmt, fmt, d, op="reflect_pad") for d in ("fwd", "bwd"))

    for C, H, W, pad in PAD_SHAPES:
        for B in (FUNIT_B, TRAIN_B) if full else (TRAIN_B,):
            for pad_ in PADS.values() if full else (pad,):
                for dtype, fmt in formats:
                    add((B, C, H, W), pad_, dtype, fmt)
    shape, dtype, fmt = PAD_HUGE
    for dtype, fmt in formats if full else [(dtype, fmt)]:
        add(shape, 1, dtype, fmt)
    if full:
        for shape in PAD_EDGE:
            for pad in PADS.values():
                if pad < min(shape[2:]):
                    for dtype, fmt in formats:
                        add(shape, pad, dtype, fmt)
    return out
