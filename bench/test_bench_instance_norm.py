"""Fused AdaIN (`kernels.adain`) against PyTorch eager and torch.compile, in GB/s.

Parametrised provider x mode x FUNIT shape (B=64) x format:
  providers  "triton"   kernels.adain(impl="triton")
             "torch"    PyTorch eager: F.instance_norm + (B, C) affine broadcast + ReLU + skip add
             "compile"  torch.compile of the reference `g2g_fast.reference.ops.adain_ref`
  modes      fwd, bwd (only the backward is timed: forward once, retain_graph), full (fwd + bwd)
  formats    bf16-channels_last, fp32-nchw

One representative configuration, FUNIT's AdaIN ResBlock epilogue:
y = relu(instance_norm(x) * weight + bias) + residual with (B, C) weight and bias, every input a
leaf that needs a gradient. GB/s in extra_info comes from the explicit byte ledger in
`bench/_shapes.py` (fwd = read x + read residual + write y + B*C params; bwd = read x + read dy +
write dx + B*C params and their grads; dresidual aliases dy: 0 bytes; full = the sum) divided by
the median round time; `frac_of_copy_bw` divides that by the device copy bandwidth measured once
per session (1 GiB y.copy_(x), bytes = 2 x size). Each round zeroes a 256 MiB buffer first (in
pytest-benchmark's untimed setup) so no round reads the previous round's data from L2.

CUDA only: at these shapes the Triton interpreter would take hours, so without a GPU the module
is skipped. `python bench/gpu_report.py` measures the same table with CUDA events in one run.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("AdaIN GB/s benchmark needs a CUDA GPU (the Triton interpreter is far too slow at "
                "FUNIT shapes); none available", allow_module_level=True)

from _shapes import (FORMATS, FUNIT_B, FUNIT_SHAPES, MODES, PROVIDERS, copy_bandwidth_gbps,  # noqa: E402
                     grad_like, l2_flush_buffer, ledger_bytes, make_inputs, make_provider, make_step,
                     shape_id)

DEVICE = torch.device("cuda")
_compiled = {}


@pytest.fixture(scope="session")
def copy_gbps():
    return copy_bandwidth_gbps(DEVICE, nbytes=2**30)


@pytest.fixture(scope="session")
def flush_buffer():
    return l2_flush_buffer(DEVICE)


def _provider(name):
    if name not in _compiled:  # one torch.compile wrapper per session, one graph per shape
        _compiled[name] = make_provider(name, impl="triton")
    return _compiled[name]


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", FUNIT_SHAPES, ids=[shape_id(*s) for s in FUNIT_SHAPES])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_adain(benchmark, copy_gbps, flush_buffer, provider, mode, shape, fmt):
    C, H, W = shape
    dtype, memory_format = FORMATS[fmt]
    benchmark.group = f"adain {fmt} {shape_id(*shape)} {mode}"
    inp = make_inputs(FUNIT_B, C, H, W, dtype, memory_format, DEVICE)
    step = make_step(_provider(provider), inp, mode, grad_like(inp["x"]))

    def timed():
        step()
        torch.cuda.synchronize()

    def flush():  # untimed: evict the previous round's data from L2
        flush_buffer.zero_()

    timed()  # JIT / torch.compile outside the timing
    benchmark.pedantic(timed, setup=flush, rounds=20, warmup_rounds=3, iterations=1)
    nbytes = ledger_bytes(mode, FUNIT_B, C, H, W, dtype)
    seconds = benchmark.stats.stats.median
    gbps = nbytes / seconds / 1e9
    benchmark.extra_info.update(
        provider=provider, mode=mode, shape=f"{FUNIT_B}x{shape_id(*shape)}", format=fmt,
        config="(B,C) weight+bias, relu, residual", bytes=nbytes, gbps=round(gbps, 1),
        copy_gbps=round(copy_gbps, 1), frac_of_copy_bw=round(gbps / copy_gbps, 3),
        timing="median round incl. torch.cuda.synchronize", device=torch.cuda.get_device_name(),
    )
    del inp, step
