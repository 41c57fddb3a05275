"""What the AdaIN benchmark (`test_bench_instance_norm.py`) and `gpu_report.py` share: the FUNIT
shapes, the two benchmarked formats, the benchmarked configuration, input builders, the three
providers, the fwd/bwd/full step builders, the byte ledger and the copy-bandwidth probe.

The benchmarked configuration is FUNIT's AdaIN ResBlock epilogue, the richest fused case:

    y = relu(instance_norm(x) * weight + bias) + residual,   weight, bias: (B, C)

Byte ledger (minimal traffic of the op, the same for every provider; N = B*C*H*W elements of the
activation dtype, p = B*C elements of the parameter dtype; fp32 statistics are not counted):
  fwd   read x, read residual, write y; read weight, bias                    3*N + 2*p
  bwd   read x, read dy, write dx; read weight, bias, write dweight, dbias   3*N + 4*p
        (dresidual is dy itself, an alias: 0 bytes)
  full  fwd + bwd                                                            6*N + 6*p
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

FUNIT_B = 64
# (C, H, W) of the FUNIT instance-norm stages at 128^2 (content encoder, decoder upsampling path).
FUNIT_SHAPES = ((64, 128, 128), (128, 64, 64), (256, 32, 32), (512, 16, 16))
SMOKE_B = 2
SMOKE_SHAPES = ((8, 16, 16), (32, 4, 4))
FORMATS = {
    "bf16-channels_last": (torch.bfloat16, torch.channels_last),
    "fp32-nchw": (torch.float32, torch.contiguous_format),
}
PROVIDERS = ("triton", "torch", "compile")
MODES = ("fwd", "bwd", "full")
ACT = "relu"  # the benchmarked configuration: (B, C) weight + bias, ReLU, residual


def shape_id(C: int, H: int, W: int) -> str:
    return f"{C}x{H}x{W}"


def ledger_bytes(mode: str, B: int, C: int, H: int, W: int, dtype: torch.dtype,
                 param_dtype: torch.dtype | None = None) -> int:
    """Bytes the op must move in `mode` (see the module docstring)."""
    n = B * C * H * W * torch.finfo(dtype).bits // 8
    p = B * C * torch.finfo(param_dtype or dtype).bits // 8
    fwd, bwd = 3 * n + 2 * p, 3 * n + 4 * p
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def make_inputs(B, C, H, W, dtype, memory_format, device, *, residual=True, seed=0):
    """x shifted and with non-unit variance, (B, C) AdaIN weight and bias, a residual; all leaves
    with requires_grad, x and residual in `memory_format`."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

    def act_tensor(t):
        return t.to(dtype).contiguous(memory_format=memory_format).requires_grad_()

    out = dict(
        x=act_tensor(randn(B, C, H, W) * 2.0 + 0.5),
        weight=(1.0 + 0.5 * randn(B, C)).to(dtype).requires_grad_(),
        bias=(0.5 * randn(B, C)).to(dtype).requires_grad_(),
        residual=act_tensor(randn(B, C, H, W)) if residual else None,
    )
    return out


def grad_like(x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """An upstream gradient with x's dtype and memory format (a channels_last net sends NHWC dy)."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    dy = torch.randn(x.shape, generator=g, device=x.device, dtype=torch.float32).to(x.dtype)
    fmt = torch.channels_last if (x.dim() == 4 and not x.is_contiguous()
                                  and x.is_contiguous(memory_format=torch.channels_last)) else torch.contiguous_format
    return dy.contiguous(memory_format=fmt)


# ------------------------------------------------------------------------------------------
# Providers: f(x, weight, bias, residual) -> y, all computing the benchmarked configuration.
# ------------------------------------------------------------------------------------------
def eager_adain_resblock(x, weight, bias, residual):
    """PyTorch eager, as a FUNIT AdaIN ResBlock writes it: F.instance_norm, (B, C) affine by
    broadcasting, ReLU, skip add (four kernels plus instance_norm's layout copies)."""
    y = F.instance_norm(x, eps=1e-5)
    y = y * weight[:, :, None, None] + bias[:, :, None, None]
    return F.relu(y) + residual


def _ref_resblock(x, weight, bias, residual):
    from g2g_fast.reference.ops import adain_ref
    return adain_ref(x, weight, bias, act=ACT, residual=residual)


def make_provider(name: str, *, impl: str = "triton", compile_backend: str = "inductor"):
    """-> f(x, weight, bias, residual). `impl` picks kernels.adain's backend for "triton";
    "compile" is torch.compile of the reference `adain_ref` (dynamic=False: one graph per shape)."""
    if name == "triton":
        import kernels

        def triton_adain(x, weight, bias, residual):
            return kernels.adain(x, weight, bias, act=ACT, residual=residual, impl=impl)
        return triton_adain
    if name == "torch":
        return eager_adain_resblock
    if name == "compile":
        import torch._dynamo.config as dynamo_config
        # 4 shapes x 2 formats x grad modes exceed the default limit of 8 graphs per function.
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, max(getattr(dynamo_config, knob), 64))
        return torch.compile(_ref_resblock, dynamic=False, backend=compile_backend)
    raise ValueError(f"unknown provider {name!r}; choose one of {PROVIDERS}")


def make_step(fn, inp: dict, mode: str, dy: torch.Tensor):
    """-> a no-argument callable running `mode` once. bwd runs the forward here, once, and the
    timed call is only the backward (retain_graph); autograd.grad, not .backward(), so no
    gradient accumulation kernel is timed."""
    args = (inp["x"], inp["weight"], inp["bias"], inp["residual"])
    leaves = [t for t in args if t is not None and t.requires_grad]
    if mode == "fwd":
        return lambda: fn(*args)
    if mode == "bwd":
        y = fn(*args)
        return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)
    if mode == "full":
        return lambda: torch.autograd.grad(fn(*args), leaves, dy)
    raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")


# ------------------------------------------------------------------------------------------
# Timing.
# ------------------------------------------------------------------------------------------
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, *, warmup: int = 3, reps: int = 20, flush: torch.Tensor | None = None) -> float:
    """Median milliseconds of fn() after warm-up: CUDA events on a GPU (optionally zeroing
    `flush`, a buffer larger than L2, before each rep and outside the events; a GPU spin ahead of
    each start event keeps host launch latency out), else perf_counter around fn() + synchronize."""
    for _ in range(warmup):
        fn()
    sync(device)
    if torch.device(device).type == "cuda":
        events = []
        for _ in range(reps):
            if flush is not None:
                flush.zero_()
            # ~0.5 ms of GPU spin before `start`: the host queues fn's launches meanwhile, so the
            # events time the kernels back to back, not the host's launch overhead (which exceeds
            # the kernels' time at the small FUNIT shapes).
            torch.cuda._sleep(1_000_000)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in events)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def l2_flush_buffer(device) -> torch.Tensor | None:
    """256 MiB to zero between reps (H100's L2 is 50 MB; the 512x16^2 bf16 working set is ~50 MB)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.empty(256 * 2**20 // 4, dtype=torch.float32, device=device)


def copy_bandwidth_gbps(device, nbytes: int = 2**30, reps: int = 20) -> float:
    """Device copy bandwidth: y.copy_(x) of `nbytes` (>= 1 GiB on a GPU, far beyond L2);
    bytes moved = 2 * nbytes (one read, one write)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), device, warmup=3, reps=reps)
    return 2 * nbytes / (ms * 1e-3) / 1e9
