"""The decoder's nearest-upsample x2 + reflect pad 2 + 5x5 conv: `kernels.upsample_conv`
(impl "subpixel", four 3x3 phase convolutions) against the reference formulation ("ref",
`g2g_fast.reference.ops.upsample_conv_ref`), fwd and fwd+bwd.

On CUDA the three FUNIT decoder stages at batch 64 in bf16 channels_last (512 -> 256 channels at
16² -> 32², 256 -> 128 at 32² -> 64², 128 -> 64 at 64² -> 128²); on the CPU the same channel
ratios at batch 2 with a quarter of the channels, fp32. extra_info: ms (median), the reference
formulation's FLOPs (2 * 25 * Cin * Cout per output pixel; the same count for both providers, so
"effective TFLOP/s" compares them directly), effective TFLOP/s and, for the GPU, MFU against the
bf16 matmul peak measured once per session.
"""
import pytest
import torch

import _train as T
from conftest import sync
from g2g_fast.reference.ops import upsample_conv_ref
from kernels import upsample_conv

STAGES = [(512, 16), (256, 32), (128, 64)]  # (Cin, low-res side); Cout = Cin / 2


def _case(device, cin, side):
    cuda = device.type == "cuda"
    B, cin = (64, cin) if cuda else (2, cin // 4)
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(B, cin, side, side, generator=g) * 1.3 + 0.2).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(cin // 2, cin, 5, 5, generator=g) * 0.05).to(device, dtype).requires_grad_()
    b = torch.randn(cin // 2, generator=g).to(device, dtype).requires_grad_()
    w = w.contiguous(memory_format=torch.channels_last)
    flops = 2 * 25 * cin * (cin // 2) * (2 * side) ** 2 * B
    return x, w.detach().requires_grad_(), b, flops


@pytest.mark.parametrize("stage", STAGES, ids=[f"c{c}-{s}x{s}" for c, s in STAGES])
@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("impl", ["ref", "subpixel"])
def test_upsample_conv(benchmark, device, impl, mode, stage):
    x, w, b, flops = _case(device, *stage)
    fn = upsample_conv_ref if impl == "ref" else (lambda x, w, b: upsample_conv(x, w, b, impl="subpixel"))
    grad = torch.randn_like(fn(x, w, b))
    benchmark.group = f"upsample_conv {stage[0]}@{stage[1]} {mode}"

    def run():
        y = fn(x, w, b)
        if mode == "full":
            y.backward(grad)
        sync()

    run()
    benchmark.pedantic(run, rounds=10 if device.type == "cuda" else 3, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark.stats, "stats", None)
    seconds = stats.median if stats is not None else None
    work = flops * (3 if mode == "full" else 1)  # backward: data + weight gradients, 2x the forward
    peak = T.matmul_peak_tflops(device) if device.type == "cuda" else None
    benchmark.extra_info.update(
        impl=impl, mode=mode, device=str(device), shape=list(x.shape), dtype=str(x.dtype),
        ms=seconds and 1e3 * seconds, ref_flops=work,
        effective_tflops_per_s=seconds and work / seconds / 1e12,
        mfu=T.mfu(work, seconds, peak) if seconds and peak else None)
