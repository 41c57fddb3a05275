"""Reflect pad (`kernels.reflect_pad`) against PyTorch's F.pad(mode="reflect"), in GB/s.

Parametrised provider x mode x FUNIT padded-conv shape x format:
  providers  "triton"  kernels.reflect_pad(impl="triton")
             "torch"   F.pad(x, (p,) * 4, mode="reflect") (`g2g_fast.reference.ops.reflect_pad_ref`)
  modes      fwd, bwd (only the backward is timed: forward once, retain_graph), full (fwd + bwd)
  formats    bf16-channels_last, fp32-nchw (bench/_shapes.py's FORMATS)

Byte ledger (kernels/reflect_pad.py's; N_in = B*C*H*W, N_out = B*C*(H+2p)*(W+2p) elements):
fwd = read N_in + write N_out, bwd = read N_out + write N_in, full = the sum; the same count for
both providers (aten's CUDA kernel moves more for channels_last: an NCHW copy of x and of dy), so
GB/s compares their times directly. `frac_of_copy_bw` divides by the device copy bandwidth
measured once per session; each round zeroes a 256 MiB buffer first (untimed) so no round reads
the previous round's data from L2.

On CUDA: batch FUNIT_B = 64 at FUNIT's padded convs at 128 px (the 7x7 convs pad 3, the 4x4
downsampling and 3x3 ResBlock convs pad 1). On the CPU: one tiny case per pad with the torch
provider; the triton provider runs only under TRITON_INTERPRET=1 (the interpreter: a smoke run, not
a measurement) and is skipped otherwise.
"""
import pytest
import torch

from _shapes import FORMATS, FUNIT_B, MODES, copy_bandwidth_gbps, l2_flush_buffer, sync
from g2g_fast.reference.ops import reflect_pad_ref
from kernels._utils import interpreting

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
PROVIDERS = ("triton", "torch")
# (C, H, W, pad): kernels/aot_cases.py's PAD_SHAPES (the compile gate compiles them).
PAD_SHAPES = ((3, 128, 128, 3), (64, 128, 128, 3), (128, 64, 64, 1), (256, 32, 32, 1), (512, 16, 16, 1))
CPU_SHAPES = ((3, 16, 16, 3), (8, 12, 12, 1))
SHAPES, BATCH = (PAD_SHAPES, FUNIT_B) if CUDA else (CPU_SHAPES, 2)


def shape_id(C, H, W, pad):
    return f"{C}x{H}x{W}-p{pad}"


def ledger_bytes(mode: str, B: int, C: int, H: int, W: int, pad: int, dtype: torch.dtype) -> int:
    """Bytes the op must move in `mode` (see the module docstring)."""
    size = torch.finfo(dtype).bits // 8
    n_in, n_out = B * C * H * W * size, B * C * (H + 2 * pad) * (W + 2 * pad) * size
    return {"fwd": n_in + n_out, "bwd": n_out + n_in, "full": 2 * (n_in + n_out)}[mode]


def make_provider(name: str):
    if name == "triton":
        import kernels
        return lambda x, pad: kernels.reflect_pad(x, pad, impl="triton")
    return reflect_pad_ref


def make_step(fn, x, pad, mode, dy):
    """-> a no-argument callable running `mode` once (as bench/_shapes.make_step: autograd.grad,
    no gradient accumulation timed)."""
    if mode == "fwd":
        return lambda: fn(x, pad)
    if mode == "bwd":
        y = fn(x, pad)
        return lambda: torch.autograd.grad(y, x, dy, retain_graph=True)
    return lambda: torch.autograd.grad(fn(x, pad), x, dy)


@pytest.fixture(scope="session")
def copy_gbps():
    return copy_bandwidth_gbps(DEVICE, nbytes=2**30 if CUDA else 2**24, reps=20 if CUDA else 3)


@pytest.fixture(scope="session")
def flush_buffer():
    return l2_flush_buffer(DEVICE)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(*s) for s in SHAPES])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_reflect_pad(benchmark, copy_gbps, flush_buffer, provider, mode, shape, fmt):
    if provider == "triton" and not CUDA and not interpreting():
        pytest.skip("the triton provider needs CUDA (or TRITON_INTERPRET=1 for a smoke run)")
    C, H, W, pad = shape
    dtype, memory_format = FORMATS[fmt]
    benchmark.group = f"reflect_pad {fmt} {shape_id(*shape)} {mode}"
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = (torch.randn(BATCH, C, H, W, generator=g, device=DEVICE) * 2.0 + 0.5).to(dtype)
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    # The same upstream gradient for both providers, in x's format (a channels_last net sends NHWC dy).
    dy = torch.randn(BATCH, C, H + 2 * pad, W + 2 * pad, generator=g, device=DEVICE).to(dtype)
    step = make_step(make_provider(provider), x, pad, mode, dy.contiguous(memory_format=memory_format))

    def timed():
        step()
        sync(DEVICE)

    def flush():  # untimed: evict the previous round's data from L2
        if flush_buffer is not None:
            flush_buffer.zero_()

    timed()  # JIT outside the timing
    benchmark.pedantic(timed, setup=flush, rounds=20 if CUDA else 3, warmup_rounds=3 if CUDA else 1, iterations=1)
    nbytes = ledger_bytes(mode, BATCH, C, H, W, pad, dtype)
    stats = getattr(benchmark.stats, "stats", None)   # None under --benchmark-disable
    seconds = stats.median if stats is not None else None
    gbps = nbytes / seconds / 1e9 if seconds else None
    benchmark.extra_info.update(
        provider=provider, mode=mode, shape=f"{BATCH}x{shape_id(*shape)}", format=fmt, bytes=nbytes,
        gbps=gbps and round(gbps, 1), copy_gbps=round(copy_gbps, 1),
        frac_of_copy_bw=gbps and round(gbps / copy_gbps, 3),
        timing="median round incl. torch.cuda.synchronize" if CUDA else "median round (CPU)",
        device=torch.cuda.get_device_name() if CUDA else "cpu",
    )
