"""Throughput of one full training iteration (D step + G step + EMA, `Approach.train_step`).

Parametrised approach x provider (`bench/_train.py` describes the providers): FUNIT2FUNIT with
all of them (reference-fp32, reference-bf16-cl, reference-bf16-cl-compile, fast, fast-subpixel,
fast-cudagraph, fast-compile), CycleFUNIT and naive with reference-fp32 and fast. On CUDA the
paper-scale configuration (128², batch 64, 119 classes, FUNIT widths); on the CPU a tiny one so
the suite stays quick, where the compile, CUDA-graph and bf16 stock providers are skipped (with
the reason) and fast runs fp32 with its norms falling back to the reference op (visible in
extra_info["describe"]). The CUDA-graph provider has no per-phase times (a replay is one launch).

extra_info: img/s, FLOPs per iteration (FlopCounterMode around one eager train_step, R1's double
backward included), achieved TFLOP/s, MFU against the bf16 matmul peak measured once per session
(8192^3 on a GPU), peak memory over the timed rounds (max_memory_allocated after
reset_peak_memory_stats; GPU only), mean ms per phase (D, G, EMA; CUDA events) and
`backend.describe` (which optimiser, kernels and precision ran).
"""
import pytest
import torch

import _train as T
from conftest import sync
from g2g_fast.train import PhaseTimer

CASES = [(a, p) for a, providers in T.STEP_PLAN.items() for p in providers]


@pytest.mark.parametrize("approach,provider", CASES, ids=[f"{a}-{p}" for a, p in CASES])
def test_train_step(benchmark, device, approach, provider):
    cuda = device.type == "cuda"
    if not cuda and T.cpu_skip_reason(provider):
        pytest.skip(T.cpu_skip_reason(provider))
    benchmark.group = f"train_step {approach}"
    peak_tflops = T.matmul_peak_tflops(device)
    T.free(device)
    values = T.SCALES["gpu" if cuda else "cpu"][approach]
    calls = [0]
    with T.numerics(provider):
        run = T.prepare(approach, provider, device, values)  # FLOPs counted on the first iteration
        for _ in range(T.warmup_steps(provider, device)):
            run.step()
        sync()
        timer = PhaseTimer(device)

        def step():
            run.step(timer)
            sync()
            calls[0] += 1

        if cuda and run.graph is None:  # a graph's replays allocate nothing: its peak is the capture's
            torch.cuda.reset_peak_memory_stats(device)
        benchmark.pedantic(step, rounds=10 if cuda else 2, iterations=1)
        peak_gib = T.peak_memory_gib(device)
    phases_ms = {k: 1e3 * v / calls[0] for k, v in timer.collect().items()}
    stats = getattr(benchmark.stats, "stats", None)  # None under --benchmark-disable
    seconds = stats.median if stats is not None else None
    benchmark.extra_info.update(
        provider=provider, approach=approach, device=str(device), image_size=run.cfg.image_size,
        batch_size=run.cfg.batch_size, num_classes=T.NUM_CLASSES,
        img_per_s=run.cfg.batch_size / seconds if seconds else None,
        flops_per_iter=run.flops, tflops_per_s=run.flops / seconds / 1e12 if seconds else None,
        matmul_peak_tflops=peak_tflops, mfu=T.mfu(run.flops, seconds, peak_tflops) if seconds else None,
        peak_memory_gib=peak_gib, phase_ms=phases_ms, describe=run.describe(),
    )
    del run
    T.free(device, dynamo=T.PROVIDERS[provider].compile)
