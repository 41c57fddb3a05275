#!/usr/bin/env python
"""One command, one GPU, under eight minutes: what g2g-fast's kernels do on this device.

    python bench/gpu_report.py [--out bench/results] [--budget-s 420] [--smoke]

Sections, in order of value (each in its own try/except: an error is recorded and the report
goes on; the slowest to set up come last so the budget cuts them first):
  environment   GPU, driver, CUDA, cuDNN, torch, triton, git commit, date
  peaks         device copy bandwidth (1 GiB y.copy_(x), bytes = 2 x size) and bf16 matmul
                TFLOP/s (8192^3, 2*n^3 FLOPs; the MFU denominator)
  parity        kernels.adain(impl="triton") against g2g_fast.reference.ops.adain_ref upcast to
                fp32, forward and every gradient, at the four FUNIT shapes (B=64), fp32 NCHW and
                bf16 channels_last, for act none / relu / relu+residual with (B, C) weights.
                fp32: allclose(rtol=1e-4, atol=1e-4). bf16: the three-way rule
                max|fast - ref32| <= 2 * max|ref_bf16 - ref32| + 1e-2.
                Where act is ReLU, the upstream gradient is zeroed where the fp32 pre-activation
                is within 1e-3 of the kink: there a one-ulp difference legitimately flips the
                derivative, and at 10^8 elements some element always lands there.
  model_parity  FUNIT2FUNIT at 128^2, batch 8: the fast backend (fp32) against the fp32 reference
                with identical weights and optimiser states (a deepcopy of the reference's
                state_dict), TF32 off. Relative max error (max|fast - ref| / max|ref|) of every
                G2G output (m1, m2, s1, s2: <= 1e-4; r1, r2: <= 1e-3); after one g_step each, the
                all-parameter G gradient error ||g_fast - g_ref|| / ||g_ref|| (<= 0.1: rounding-
                level differences flip a few ReLU masks, see tests/test_fast_parity.py); after
                one d_step each from re-synchronised states, the same for D (<= 1e-4, R1 included).
  train_step    one training iteration (D step + G step + EMA) per provider (bench/_train.py):
                FUNIT2FUNIT at 128^2, batch 64, 119 classes with reference-fp32 (TF32 off),
                reference-bf16-cl, reference-bf16-cl-compile, fast and fast-subpixel (the
                decoder's upsampling by kernels.upsample_conv: default only if faster); naive and CycleFUNIT with
                reference-fp32 and fast. A FLOP-counted eager iteration, warm-up (compile
                included), then 5 timed iterations (CUDA events, median): img/s, FLOPs, MFU
                against the measured bf16 matmul peak, peak memory, mean D / G / EMA times,
                speedups vs reference-fp32 and vs the best stock (PyTorch-only) provider, and
                issue 5's targets: fast >= 3x reference-fp32, >= 1.5x the best stock variant,
                peak memory <= 0.6x reference-fp32, MFU >= 35%.
  bandwidth     GB/s of fwd, bwd and fwd+bwd of the AdaIN ResBlock epilogue (relu, residual,
                (B, C) weights) for triton / torch eager / torch.compile(reference), both formats,
                from the byte ledger in bench/_shapes.py; median of CUDA-event timings after
                warm-up, L2 flushed before each rep; fraction of copy bandwidth; speedups.
  loaders       img/s of each --loader (torch, gpu-cache, dali) at 128^2 from 2048 generated
                JPEGs, batch 64; the fast FUNIT2FUNIT trainer on a fixed on-device batch vs fed
                by the loader --loader auto picks; issue 6's targets: loader >= 3x the trainer's
                img/s, fed training >= 95% of fixed-batch img/s (bench/_loaders.py).

The kernel targets (bf16 channels_last, fwd+bwd: >= 80% of copy bandwidth, >= 3x eager,
>= 1.3x torch.compile) and the training-step targets are printed beside the measured numbers as
met / missed.

A global budget (--budget-s) skips the remaining work with a note once it would be exceeded.
The JSON is rewritten after every section, so a run cut short still leaves its results in
<out>/gpu_report_<gpu-slug>_<YYYY-MM-DD>.json and .md; the markdown is also printed.

--smoke: tiny shapes, few reps, runs on the CPU so CI can prove the script works. The "triton"
provider uses impl="triton" only under TRITON_INTERPRET=1 (else impl="ref", noted), and
torch.compile uses backend="aot_eager" (inductor's CPU codegen takes ~30 s per shape).
model_parity and train_step run the smallest configurations (bench/_train.py SMOKE_VALUES), one
timed iteration each, and force the fast generator's norms to impl="ref" (the interpreter would
take minutes per step; the parity section covers the Triton path); the compiled training-step
provider uses backend="eager" (dynamo's capture of the generator's methods, without codegen).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # this checkout's packages, not an installed copy

import torch  # noqa: E402

import _loaders as LD  # noqa: E402
import _shapes as S  # noqa: E402
import _train as T  # noqa: E402

TARGETS = {"frac_of_copy_bw": 0.80, "vs_eager": 3.0, "vs_compile": 1.3}
RTOL32 = ATOL32 = 1e-4
ATOL_LOWP = 1e-2
KINK = 1e-3
VARIANTS = {"none": ("none", False), "relu": ("relu", False), "relu+residual": ("relu", True)}
# Model parity: relative max error bounds per G2G output stage and per network's gradients.
PARITY_TOL = {"stage1": 1e-4, "stage2": 1e-3, "g_grad": 0.1, "d_grad": 1e-4}
STAGE1, STAGE2 = ("m1", "m2", "s1", "s2"), ("r1", "r2")
PARITY_VALUES = dict(image_size=128, batch_size=8)  # FUNIT widths (config defaults)
# Issue 5's training-step targets for fast on FUNIT2FUNIT; "max" marks an upper bound.
STEP_TARGETS = {"vs_reference_fp32": (3.0, "min"), "vs_best_stock": (1.5, "min"),
                "peak_memory_ratio": (0.6, "max"), "mfu": (0.35, "min")}


class Ctx:
    """Run-wide settings derived from the command line and the machine."""

    def __init__(self, args):
        self.smoke, self.t0, self.budget = args.smoke, time.monotonic(), args.budget_s
        self.dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        self.name = torch.cuda.get_device_name(self.dev) if self.dev.type == "cuda" else "cpu"
        self.B, self.shapes = (S.SMOKE_B, S.SMOKE_SHAPES) if args.smoke else (S.FUNIT_B, S.FUNIT_SHAPES)
        self.warmup, self.reps = (1, 2) if args.smoke else (3, 20)
        self.scale, self.step_reps = ("smoke", 1) if args.smoke else ("gpu", 5)
        self.matmul_n = 256 if args.smoke else 8192
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        self.impl = "triton" if (self.dev.type == "cuda" or interp) else "ref"
        self.compile_backend = "aot_eager" if args.smoke else "inductor"
        # The compiled training-step provider in --smoke: dynamo capture only (aot_eager adds ~10 s).
        self.step_compile_backend = "eager" if args.smoke else "inductor"
        # The fast generator's fused norms in model_parity / train_step: "auto" on a GPU.
        self.model_impl = "ref" if self.dev.type == "cpu" else None
        self.notes: list[str] = []
        if self.impl == "ref":
            self.notes.append('no GPU and TRITON_INTERPRET!=1: provider "triton" runs impl="ref"')
        if args.smoke:
            self.notes.append("--smoke: tiny shapes, CPU, few reps; numbers are not meaningful; "
                              'torch.compile uses backend="aot_eager" (train_step: "eager"); model_parity '
                              'and train_step: tiniest configs, fast generator with impl="ref"')
        self.report = {"meta": {"smoke": args.smoke, "budget_s": args.budget_s, "notes": self.notes},
                       "skipped": [], "errors": []}
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        slug = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") + ("-smoke" if args.smoke else "")
        self.path = Path(args.out) / f"gpu_report_{slug}_{date}"

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def skip(self, what: str, need_s: float) -> bool:
        """True (and a note) when fewer than need_s seconds of the budget are left."""
        if self.left() >= need_s:
            return False
        self.report["skipped"].append(f"{what}: {self.left():.0f} s of budget left, needs ~{need_s:.0f} s")
        return True

    def error(self, where: str, e: BaseException) -> str:
        msg = f"{type(e).__name__}: {e}"
        self.report["errors"].append({"where": where, "error": msg, "trace": traceback.format_exc(limit=4)})
        return msg

    def free(self) -> None:
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()


def _cmd(*argv: str) -> str | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=ROOT).stdout.strip() or None
    except Exception:
        return None


# ------------------------------------------------------------------------------------------
# Sections: each fills `out` (already in the report, so partial results survive an error).
# ------------------------------------------------------------------------------------------
def environment(ctx: Ctx, out: dict) -> None:
    try:
        import triton
        triton_version = triton.__version__
    except Exception as e:
        triton_version = f"not importable ({type(e).__name__})"
    out.update(
        date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=ctx.name, python=platform.python_version(), platform=platform.platform(),
        torch=torch.__version__, triton=triton_version, cuda_runtime=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
        TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET"), adain_impl=ctx.impl,
        git_commit=_cmd("git", "rev-parse", "--short", "HEAD"),
        git_dirty_files=len((_cmd("git", "status", "--porcelain") or "").splitlines()),
        argv=sys.argv[1:],
    )
    if ctx.dev.type == "cuda":
        p = torch.cuda.get_device_properties(ctx.dev)
        out.update(capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1),
                   driver=_cmd("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"))


def peaks(ctx: Ctx, out: dict) -> None:
    out["copy_gbps"] = S.copy_bandwidth_gbps(ctx.dev, nbytes=2**26 if ctx.smoke else 2**30, reps=ctx.reps)
    out.update(matmul_n=ctx.matmul_n, matmul_bf16_tflops=T.matmul_peak_tflops(ctx.dev, ctx.matmul_n, reps=ctx.reps))


def _compare(fast, r32, lowp) -> dict:
    """One tensor against the fp32 reference: allclose for fp32, the three-way rule otherwise."""
    f, r = fast.detach().float(), r32.detach().float()
    diff = (f - r).abs()
    rec = {"max_err": diff.max().item()}
    if lowp is None:
        bad = diff > ATOL32 + RTOL32 * r.abs()
    else:
        rec["ref_lowp_err"] = (lowp.detach().float() - r).abs().max().item()
        rec["bound"] = 2 * rec["ref_lowp_err"] + ATOL_LOWP
        bad = diff > rec["bound"]
    bad |= ~torch.isfinite(f)
    rec["n_bad"] = int(bad.sum())
    rec["ok"] = rec["n_bad"] == 0
    if not rec["ok"]:
        worst = torch.nan_to_num(diff, nan=float("inf")).argmax()
        rec["worst_index"] = [int(i) for i in torch.unravel_index(worst, diff.shape)]
    return rec


def _parity_case(ctx: Ctx, shape, fmt: str, variant: str) -> dict:
    import kernels
    from g2g_fast.reference.ops import adain_ref
    (C, H, W), (dtype, mf), (act, has_res) = shape, S.FORMATS[fmt], VARIANTS[variant]
    seed = sum(shape) + list(VARIANTS).index(variant)
    inp = S.make_inputs(ctx.B, C, H, W, dtype, mf, ctx.dev, residual=has_res, seed=seed)
    names = ["x", "weight", "bias"] + (["residual"] if has_res else [])
    leaves = [inp[n] for n in names]
    dy = S.grad_like(inp["x"])
    if act != "none":
        with torch.no_grad():  # zero dy near the ReLU kink of the fp32 pre-activation (see above)
            z = adain_ref(*(t.float() for t in leaves[:3]))
            dy = dy.masked_fill(z.abs() < KINK, 0)
            del z

    def run(fn, cast):
        ls = [cast(t).detach().requires_grad_() for t in leaves]
        d = dict(zip(names, ls))
        y = fn(d["x"], d["weight"], d["bias"], act=act, residual=d.get("residual"))
        return [y, *torch.autograd.grad(y, ls, cast(dy))]

    fast = run(lambda *a, **k: kernels.adain(*a, impl=ctx.impl, **k), lambda t: t)
    ref32 = run(lambda *a, **k: adain_ref(*a, upcast=True, **k), lambda t: t.float())
    lowp = (run(lambda *a, **k: adain_ref(*a, upcast=False, **k), lambda t: t)
            if dtype != torch.float32 else [None] * len(fast))
    outs = ["y"] + ["d" + n for n in names]
    tensors = {o: _compare(f, r, lo) for o, f, r, lo in zip(outs, fast, ref32, lowp)}
    return {"tensors": tensors, "ok": all(t["ok"] for t in tensors.values()),
            "layout_kept": fast[0].is_contiguous(memory_format=mf)}


def parity(ctx: Ctx, out: dict) -> None:
    out.update(impl=ctx.impl, rows=[], rule=(
        f"fp32: allclose rtol={RTOL32} atol={ATOL32}; bf16: max|fast-ref32| <= "
        f"2*max|ref_bf16-ref32| + {ATOL_LOWP}; dy zeroed where |fp32 pre-activation| < {KINK} (ReLU)"))
    for shape in ctx.shapes:
        for fmt in S.FORMATS:
            for variant in VARIANTS:
                row = {"shape": f"{ctx.B}x{S.shape_id(*shape)}", "format": fmt, "variant": variant}
                if ctx.skip(f"parity {row['shape']} {fmt} {variant}", 5):
                    continue
                t = time.monotonic()
                try:
                    row.update(_parity_case(ctx, shape, fmt, variant))
                except Exception as e:
                    row.update(ok=False, error=ctx.error(f"parity {row}", e))
                row["seconds"] = round(time.monotonic() - t, 2)
                out["rows"].append(row)
                ctx.free()
    out["all_pass"] = bool(out["rows"]) and all(r["ok"] for r in out["rows"])


def bandwidth(ctx: Ctx, out: dict) -> None:
    copy = ctx.report.get("peaks", {}).get("copy_gbps")
    out.update(ledger=S.__doc__.split("Byte ledger", 1)[1].strip(), copy_gbps=copy, rows=[],
               timing=f"median of {ctx.reps} reps after {ctx.warmup} warm-up, L2 flushed before each rep")
    flush = S.l2_flush_buffer(ctx.dev)
    for provider in S.PROVIDERS:  # compile (slowest to set up) last: the budget cuts it first
        fn = None
        for fmt, (dtype, mf) in S.FORMATS.items():
            for C, H, W in ctx.shapes:
                where = f"bandwidth {provider} {fmt} {ctx.B}x{S.shape_id(C, H, W)}"
                if ctx.skip(where, 40 if provider == "compile" and not ctx.smoke else 5):
                    continue
                try:
                    fn = fn or S.make_provider(provider, impl=ctx.impl, compile_backend=ctx.compile_backend)
                    inp = S.make_inputs(ctx.B, C, H, W, dtype, mf, ctx.dev)
                    dy = S.grad_like(inp["x"])
                    for mode in S.MODES:
                        step = S.make_step(fn, inp, mode, dy)
                        ms = S.median_ms(step, ctx.dev, warmup=ctx.warmup, reps=ctx.reps, flush=flush)
                        nbytes = S.ledger_bytes(mode, ctx.B, C, H, W, dtype)
                        gbps = nbytes / (ms * 1e-3) / 1e9
                        out["rows"].append(dict(provider=provider, format=fmt, shape=f"{ctx.B}x{S.shape_id(C, H, W)}",
                                                mode=mode, ms=ms, bytes=nbytes, gbps=gbps,
                                                frac_of_copy_bw=gbps / copy if copy else None))
                        del step
                except Exception as e:
                    out["rows"].append(dict(provider=provider, format=fmt, shape=f"{ctx.B}x{S.shape_id(C, H, W)}",
                                            error=ctx.error(where, e)))
                inp = dy = None
                ctx.free()
    out["summary"] = _summary(out["rows"])


def _summary(rows: list) -> list:
    """Per (format, shape, mode): triton GB/s, speedups, and the targets' verdicts."""
    t = {(r["provider"], r["format"], r["shape"], r["mode"]): r for r in rows if "ms" in r}
    summary = []
    for (p, fmt, shape, mode), r in t.items():
        if p != "triton":
            continue
        eager, comp = t.get(("torch", fmt, shape, mode)), t.get(("compile", fmt, shape, mode))
        s = dict(format=fmt, shape=shape, mode=mode, gbps=r["gbps"], frac_of_copy_bw=r["frac_of_copy_bw"],
                 vs_eager=eager["ms"] / r["ms"] if eager else None, vs_compile=comp["ms"] / r["ms"] if comp else None)
        if fmt == "bf16-channels_last" and mode == "full":
            s["targets"] = {k: (None if s[k] is None else s[k] >= v) for k, v in TARGETS.items()}
        summary.append(s)
    return summary


def _rel_max(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got - want| / max|want| (nan if got is not finite)."""
    got, want = got.detach().float(), want.detach().float()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def _grad_rel(fast_net, ref_net) -> tuple[float, list[str]]:
    """||g_fast - g_ref|| / ||g_ref|| over all parameters with a reference gradient, and the names
    of those the fast side has no gradient for."""
    fast = dict(fast_net.named_parameters())
    num = den = 0.0
    missing = []
    for n, p in ref_net.named_parameters():
        if p.grad is None:
            continue
        if fast[n].grad is None:
            missing.append(n)
            continue
        g = p.grad.float()
        num += (fast[n].grad.float() - g).pow(2).sum().item()
        den += g.pow(2).sum().item()
    return (num / den) ** 0.5 if den > 0 else float("nan"), missing


def _phase_parity(ref, fast, phase: str, x, xc, y) -> dict:
    """One `phase` step ("g" or "d") on each side; gradient and loss errors."""
    lr = getattr(ref, f"{phase}_step")(x, y)
    lf = getattr(fast, f"{phase}_step")(xc, y)
    nets = (fast.gen, ref.gen) if phase == "g" else (fast.dis, ref.dis)
    err, missing = _grad_rel(*nets)
    tol = PARITY_TOL[f"{phase}_grad"]
    loss_err = max(abs(lf[k].item() - lr[k].item()) / max(abs(lr[k].item()), 1e-12) for k in lr)
    return dict(grad_rel_err=err, tol=tol, missing_grads=missing, loss_max_rel_err=loss_err,
                ok=bool(err <= tol) and not missing)


def model_parity(ctx: Ctx, out: dict) -> None:
    from g2g_fast.backends import FastBackend
    from g2g_fast.config import config_from_dict
    from g2g_fast.reference.g2g import g2g_forward, make_pairs
    from g2g_fast.reference.steps import build_approach
    values = T.SMOKE_VALUES["funit2funit"] if ctx.smoke else PARITY_VALUES
    out.update(approach="funit2funit", config=values, tolerances=PARITY_TOL, rule=(
        "outputs: max|fast-ref|/max|ref| (stage 1 m1 m2 s1 s2 <= 1e-4, stage 2 r1 r2 <= 1e-3); gradients "
        "after one step each from identical states: ||g_fast-g_ref|| / ||g_ref|| over all parameters "
        "(G <= 0.1, D <= 1e-4); fp32, TF32 off"))
    ref = fast = None
    try:
        with T.numerics("reference-fp32"):  # both sides true fp32
            cfg = config_from_dict("funit2funit", values)
            torch.manual_seed(0)
            ref = build_approach(cfg, T.NUM_CLASSES, ctx.dev)
            fast = build_approach(cfg, T.NUM_CLASSES, ctx.dev, backend=FastBackend())
            if ctx.model_impl:
                fast.gen.impl = ctx.model_impl
            # A deepcopy: loading the reference's own tensors would alias the optimiser states.
            fast.load_state_dict(copy.deepcopy(ref.state_dict()))
            out["describe"] = fast.backend.describe(fast)
            if ctx.model_impl:
                out["describe"]["kernels"] = f"adain:{ctx.model_impl} (forced)"
            x, y = T.make_batch(cfg, ctx.dev)
            xc = x.contiguous(memory_format=torch.channels_last)
            (x1, _, x2, _), (xc1, _, xc2, _) = make_pairs(x, y, cfg.pairing), make_pairs(xc, y, cfg.pairing)
            with torch.no_grad():
                o_ref = g2g_forward(ref.gen, x1, x2, short=True)
                o_fast = g2g_forward(fast.gen, xc1, xc2, short=True)
            out["outputs"] = {}
            for name in STAGE1 + STAGE2:
                err = _rel_max(getattr(o_fast, name), getattr(o_ref, name))
                tol = PARITY_TOL["stage1" if name in STAGE1 else "stage2"]
                out["outputs"][name] = dict(rel_err=err, tol=tol, ok=bool(err <= tol))
            del o_ref, o_fast
            out["g_step"] = _phase_parity(ref, fast, "g", x, xc, y)
            fast.load_state_dict(copy.deepcopy(ref.state_dict()))  # identical states again for D
            out["d_step"] = _phase_parity(ref, fast, "d", x, xc, y)
    finally:
        out["all_pass"] = (bool(out.get("outputs")) and all(o["ok"] for o in out["outputs"].values())
                           and out.get("g_step", {}).get("ok", False) and out.get("d_step", {}).get("ok", False))
        del ref, fast
        ctx.free()


def _time_steps(ctx: Ctx, run, reps: int) -> tuple[list[float], dict, bool]:
    """Seconds of `reps` iterations (CUDA events around each, no host sync between them), mean
    ms per phase (PhaseTimer: CUDA events), and whether the last iteration's losses are finite."""
    from g2g_fast.train import PhaseTimer
    timer, spans, losses = PhaseTimer(ctx.dev), [], {}
    for _ in range(reps):
        if ctx.dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses = run.step(timer)
            end.record()
            spans.append((start, end))
        else:
            t = time.perf_counter()
            losses = run.step(timer)
            spans.append(time.perf_counter() - t)
    S.sync(ctx.dev)
    secs = [s.elapsed_time(e) / 1e3 for s, e in spans] if ctx.dev.type == "cuda" else spans
    phases = {k: 1e3 * v / reps for k, v in timer.collect().items()}
    finite = all(bool(torch.isfinite(v).all()) for v in losses.values())
    return secs, phases, finite


def _step_row(ctx: Ctx, approach: str, provider: str, peak_tflops: float | None) -> dict:
    values = T.SCALES[ctx.scale][approach]
    row = dict(approach=approach, provider=provider, image_size=values["image_size"],
               batch_size=values["batch_size"])
    run = None
    try:
        with T.numerics(provider):
            t = time.monotonic()
            run = T.prepare(approach, provider, ctx.dev, values, compile_backend=ctx.step_compile_backend,
                            adain_impl=ctx.model_impl)
            row["describe"] = run.describe()
            warm = T.warmup_steps(provider, ctx.dev)
            for _ in range(warm):
                run.step()
            S.sync(ctx.dev)
            row.update(flops=run.flops, warmup=1 + warm, setup_s=round(time.monotonic() - t, 1))
            if ctx.dev.type == "cuda":  # the peak of the timed iterations (no empty_cache: keep the pool)
                torch.cuda.reset_peak_memory_stats(ctx.dev)
            secs, phases, finite = _time_steps(ctx, run, ctx.step_reps)
            s = statistics.median(secs)
            row.update(reps=len(secs), s_per_step=s, img_per_s=values["batch_size"] / s, phase_ms=phases,
                       losses_finite=finite, tflops_per_s=run.flops / s / 1e12 if run.flops else None,
                       mfu=T.mfu(run.flops, s, peak_tflops), peak_memory_gib=T.peak_memory_gib(ctx.dev))
    except Exception as e:
        row["error"] = ctx.error(f"train_step {approach} {provider}", e)
    finally:
        del run
        T.free(ctx.dev, dynamo=T.PROVIDERS[provider].compile)
    return row


def train_step(ctx: Ctx, out: dict) -> None:
    peak = ctx.report.get("peaks", {}).get("matmul_bf16_tflops")
    if peak is None:
        peak = T.matmul_peak_tflops(ctx.dev, ctx.matmul_n, reps=ctx.reps)
    out.update(rows=[], matmul_bf16_tflops=peak, targets={k: v for k, (v, _) in STEP_TARGETS.items()},
               timing=f"FLOP-counted eager iteration + warm-up, then median of {ctx.step_reps} iterations "
                      + ("(CUDA events)" if ctx.dev.type == "cuda" else "(perf_counter)"))
    # T.STEP_PLAN's order: FUNIT2FUNIT first (the targets), its compiled provider last of the four.
    for approach, providers in T.STEP_PLAN.items():
        for provider in providers:
            need = (150 if T.PROVIDERS[provider].compile else 30) if not ctx.smoke else 2
            if ctx.skip(f"train_step {approach} {provider}", need):
                continue
            out["rows"].append(_step_row(ctx, approach, provider, peak))
            out["summary"] = _step_summary(out["rows"])
            write(ctx)  # a budget cut or crash later still leaves these rows


def _step_summary(rows: list) -> list:
    """Per approach: speedups of every provider vs reference-fp32 and vs the best stock provider,
    peak-memory ratios (written into the rows), and fast's verdicts on the FUNIT2FUNIT targets."""
    summary = []
    for approach in T.STEP_PLAN:
        got = {r["provider"]: r for r in rows if r["approach"] == approach and r.get("img_per_s")}
        if not got:
            continue
        base = got.get("reference-fp32")
        stock = [p for p in got if T.PROVIDERS[p].stock]
        best = max(stock, key=lambda p: got[p]["img_per_s"]) if stock else None
        for r in got.values():
            r["vs_reference_fp32"] = r["img_per_s"] / base["img_per_s"] if base else None
            r["vs_best_stock"] = r["img_per_s"] / got[best]["img_per_s"] if best else None
            mem, mem0 = r.get("peak_memory_gib"), base and base.get("peak_memory_gib")
            r["peak_memory_ratio"] = mem / mem0 if mem and mem0 else None
        s = dict(approach=approach, best_stock=best,
                 stock_measured=sorted(stock), stock_complete=set(stock) == {p for p in T.STEP_PLAN[approach]
                                                                            if T.PROVIDERS[p].stock})
        fast = got.get("fast")
        if fast is not None and "fast-subpixel" in got:  # issue 5: keep the rewrite only if faster
            s["subpixel_vs_fast"] = got["fast-subpixel"]["img_per_s"] / fast["img_per_s"]
        if fast is not None:
            s.update({k: fast.get(k) for k in STEP_TARGETS})
            if approach == "funit2funit":
                s["targets"] = {k: (None if fast.get(k) is None else
                                    bool(fast[k] <= t if kind == "max" else fast[k] >= t))
                                for k, (t, kind) in STEP_TARGETS.items()}
        summary.append(s)
    return summary


SECTIONS = (("environment", environment, 0), ("peaks", peaks, 10), ("parity", parity, 20),
            ("model_parity", model_parity, 20), ("train_step", train_step, 30), ("bandwidth", bandwidth, 20),
            ("loaders", LD.report_section, 40))


# ------------------------------------------------------------------------------------------
# Output.
# ------------------------------------------------------------------------------------------
def _f(v, fmt=".1f", none="-"):
    return none if v is None else format(v, fmt)


def _verdict(ok):
    return "n/a" if ok is None else ("met" if ok else "missed")


def _step_targets_markdown(ts: dict) -> list:
    f2f = next((s for s in ts.get("summary", []) if s["approach"] == "funit2funit"), {})
    v = f2f.get("targets", {})
    best = f2f.get("best_stock") or "-"
    if best != "-" and not f2f.get("stock_complete"):
        best += f" (measured: {', '.join(f2f.get('stock_measured', []))})"
    fast = next((r for r in ts.get("rows", []) if (r["approach"], r["provider"]) == ("funit2funit", "fast")), {})
    L = [f"## Targets: training step, FUNIT2FUNIT {fast.get('image_size', '-')}^2 batch "
         f"{fast.get('batch_size', '-')} (fast)", "", "| target | measured | verdict |", "|---|---|---|",
         f"| img/s >= 3x reference-fp32 | {_f(f2f.get('vs_reference_fp32'), '.2f')}x "
         f"| {_verdict(v.get('vs_reference_fp32'))} |",
         f"| img/s >= 1.5x best stock ({best}) | {_f(f2f.get('vs_best_stock'), '.2f')}x "
         f"| {_verdict(v.get('vs_best_stock'))} |",
         f"| peak memory <= 0.6x reference-fp32 | {_f(f2f.get('peak_memory_ratio'), '.2f')}x "
         f"| {_verdict(v.get('peak_memory_ratio'))} |",
         f"| MFU >= 35% | {_f(f2f.get('mfu'), '.1%')} | {_verdict(v.get('mfu'))} |",
         f"| sub-pixel decoder (fast-subpixel / fast img/s; make it the default if > 1) "
         f"| {_f(f2f.get('subpixel_vs_fast'), '.2f')}x | {_verdict(None if f2f.get('subpixel_vs_fast') is None else f2f['subpixel_vs_fast'] > 1)} |",
         ""]
    return L


def _model_parity_markdown(mp: dict) -> list:
    L = [f"## Model parity (fast fp32 vs reference fp32, {mp.get('approach', '-')} {mp.get('config', '')}): "
         + ("all pass" if mp.get("all_pass") else "NOT all pass"), "", f"Rule: {mp.get('rule', '-')}",
         f"Fast backend: {_describe(mp.get('describe'))}", "", "| quantity | relative error | bound | pass |",
         "|---|---|---|---|"]
    for name, o in mp.get("outputs", {}).items():
        L.append(f"| {name} | {o['rel_err']:.2e} | {o['tol']:.0e} | {'ok' if o['ok'] else 'FAIL'} |")
    for phase, net in (("g_step", "G"), ("d_step", "D")):
        o = mp.get(phase)
        if o:
            extra = f" (no fast grad: {', '.join(o['missing_grads'][:3])})" if o["missing_grads"] else ""
            L.append(f"| {net} gradients after one {phase} (losses {o['loss_max_rel_err']:.1e}) "
                     f"| {o['grad_rel_err']:.2e} | {o['tol']:.0e} | {'ok' if o['ok'] else 'FAIL'}{extra} |")
    if "error" in mp:
        L.append(f"\nerror: {mp['error']}")
    return L + [""]


def _describe(d: dict | None) -> str:
    if not d:
        return "-"
    keys = ("generator", "kernels", "optimizer", "precision", "memory_format", "compiled", "tf32")
    return ", ".join(f"{k}={d[k]}" for k in keys if k in d)


def _step_markdown(ts: dict) -> list:
    L = ["", "## Training step throughput (D step + G step + EMA)", "",
         f"bf16 matmul peak {_f(ts.get('matmul_bf16_tflops'))} TFLOP/s (the MFU denominator); "
         f"{ts.get('timing', '')}. FLOPs: FlopCounterMode around one eager train_step (R1's double "
         "backward included).", "",
         "| approach | provider | image | batch | img/s | ms/step | D ms | G ms | EMA ms | TFLOP/iter | TFLOP/s "
         "| MFU | peak GiB | vs ref-fp32 | vs best stock | setup s | what ran |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ts.get("rows", []):
        ph = r.get("phase_ms", {})
        fl = r.get("flops")
        what = _describe(r.get("describe")) + ("" if r.get("losses_finite", True) else " NON-FINITE LOSS")
        L.append(" | ".join([
            f"| {r['approach']}", r["provider"], str(r["image_size"]), str(r["batch_size"]), _f(r.get("img_per_s")),
            _f(r.get("s_per_step") and 1e3 * r["s_per_step"]), _f(ph.get("D")), _f(ph.get("G")),
            _f(ph.get("ema"), ".2f"), _f(fl and fl / 1e12, ".2f"), _f(r.get("tflops_per_s")), _f(r.get("mfu"), ".1%"),
            _f(r.get("peak_memory_gib"), ".2f"), _f(r.get("vs_reference_fp32"), ".2f"),
            _f(r.get("vs_best_stock"), ".2f"), _f(r.get("setup_s")),
            what + (f" {r['error']}" if "error" in r else "")]) + " |")
    return L


def markdown(ctx: Ctx) -> str:
    rep = ctx.report
    env, pk = rep.get("environment", {}), rep.get("peaks", {})
    L = [f"# g2g-fast GPU report: {ctx.name}, {env.get('date_utc', '')}", ""]
    L += [f"> {n}" for n in ctx.notes] + [""]
    L += ["## Environment", "", "| key | value |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in env.items() if k != "argv"]
    L += ["", "## Device peaks", "", "| copy bandwidth (GB/s) | bf16 matmul TFLOP/s (n) |", "|---|---|",
          f"| {_f(pk.get('copy_gbps'))} | {_f(pk.get('matmul_bf16_tflops'))} ({pk.get('matmul_n', '-')}) |", ""]
    L += _step_targets_markdown(rep.get("train_step", {}))
    L += _model_parity_markdown(rep.get("model_parity", {}))
    bw = rep.get("bandwidth", {})
    tgt = [s for s in bw.get("summary", []) if "targets" in s]
    L += ["## Targets: AdaIN ResBlock epilogue, bf16 channels_last, fwd+bwd", "",
          "| shape | GB/s | of copy BW | >= 80% | vs eager | >= 3x | vs compile | >= 1.3x |",
          "|---|---|---|---|---|---|---|---|"]
    for s in tgt:
        v = s["targets"]
        L.append(f"| {s['shape']} | {_f(s['gbps'])} | {_f(s['frac_of_copy_bw'], '.0%')} "
                 f"| {_verdict(v['frac_of_copy_bw'])} "
                 f"| {_f(s['vs_eager'], '.2f')}x | {_verdict(v['vs_eager'])} | {_f(s['vs_compile'], '.2f')}x "
                 f"| {_verdict(v['vs_compile'])} |")
    for k in TARGETS:
        vals = [s["targets"][k] for s in tgt]
        ok = None if not vals or None in vals else all(vals)
        L.append(f"\n{k}: {_verdict(ok)} at all {len(vals)} measured shapes"
                 + ("" if len(vals) == len(ctx.shapes) else f" (of {len(ctx.shapes)})"))
    par = rep.get("parity", {})
    L += ["", f"## Kernel parity (impl={par.get('impl')}): {'all pass' if par.get('all_pass') else 'NOT all pass'}",
          "", f"Rule: {par.get('rule', '-')}", "",
          "| shape | format | variant | pass | y | dx | dweight | dbias | dresidual |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in par.get("rows", []):
        cells = []
        for o in ("y", "dx", "dweight", "dbias", "dresidual"):
            t = r.get("tensors", {}).get(o)
            cells.append("-" if t is None else f"{t['max_err']:.1e}" + ("" if t["ok"] else f" FAIL({t['n_bad']})")
                         + (f" <= {t['bound']:.1e}" if "bound" in t else ""))
        L.append(f"| {r['shape']} | {r['format']} | {r['variant']} | {'ok' if r['ok'] else 'FAIL'} | "
                 + " | ".join(cells)
                 + (f" ({r['error']})" if "error" in r else "") + " |")
    L += ["", "## AdaIN GB/s (relu + residual, (B, C) weights)", "", f"Copy bandwidth {_f(bw.get('copy_gbps'))} GB/s; "
          f"{bw.get('timing', '')}.", "", "Byte ledger:", "", "```", bw.get("ledger", ""), "```"]
    rows = {(r["provider"], r["format"], r["shape"], r["mode"]): r for r in bw.get("rows", []) if "ms" in r}
    summ = {(s["format"], s["shape"], s["mode"]): s for s in bw.get("summary", [])}
    for fmt in S.FORMATS:
        L += ["", f"### {fmt}", "", "| shape | mode | triton ms | triton GB/s | of copy | eager GB/s | compile GB/s "
              "| vs eager | vs compile |", "|---|---|---|---|---|---|---|---|---|"]
        for shape in dict.fromkeys(k[2] for k in rows if k[1] == fmt):
            for mode in S.MODES:
                g = {p: rows.get((p, fmt, shape, mode)) for p in S.PROVIDERS}
                s = summ.get((fmt, shape, mode), {})
                L.append(f"| {shape} | {mode} | {_f(g['triton'] and g['triton']['ms'], '.3f')} | "
                         + " | ".join([_f(g["triton"] and g["triton"]["gbps"]), _f(s.get("frac_of_copy_bw"), ".0%"),
                                       _f(g["torch"] and g["torch"]["gbps"]), _f(g["compile"] and g["compile"]["gbps"]),
                                       _f(s.get("vs_eager"), ".2f"), _f(s.get("vs_compile"), ".2f")]) + " |")
    L += _step_markdown(rep.get("train_step", {}))
    L += LD.report_markdown(rep.get("loaders", {}), _f)
    L += ["", "## Skipped and errors", ""] + [f"- skipped: {s}" for s in rep["skipped"]]
    L += [f"- error in {e['where']}: {e['error']}" for e in rep["errors"]] or ["- none"]
    L.append(f"\nSection seconds: {rep.get('section_seconds', {})}; budget {ctx.budget:.0f} s.")
    return "\n".join(L) + "\n"


def write(ctx: Ctx) -> str:
    ctx.path.parent.mkdir(parents=True, exist_ok=True)
    ctx.path.with_suffix(".json").write_text(json.dumps(ctx.report, indent=1, default=str))
    md = markdown(ctx)
    ctx.path.with_suffix(".md").write_text(md)
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="output folder")
    ap.add_argument("--budget-s", type=float, default=420.0, help="global time budget in seconds")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (CI)")
    ap.add_argument("--sections", default=",".join(n for n, _, _ in SECTIONS),
                    help="comma-separated subset of sections to run (default: all)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_report: no CUDA GPU; the full report needs one (use --smoke to test the script)", file=sys.stderr)
        return 2
    wanted = set(args.sections.split(","))
    unknown = wanted - {n for n, _, _ in SECTIONS}
    if unknown:
        ap.error(f"unknown section(s) {sorted(unknown)}; choose from {[n for n, _, _ in SECTIONS]}")
    ctx = Ctx(args)
    times = ctx.report["section_seconds"] = {}
    for name, fn, need in SECTIONS:
        out = ctx.report[name] = {}
        if name not in wanted:
            ctx.report["skipped"].append(f"section {name}: not in --sections")
            continue
        if ctx.skip(f"section {name}", need / 4 if ctx.smoke else need):
            continue
        t = time.monotonic()
        try:
            fn(ctx, out)
        except Exception as e:
            out["error"] = ctx.error(name, e)
        times[name] = round(time.monotonic() - t, 1)
        print(f"[gpu_report] {name}: {times[name]} s ({ctx.left():.0f} s of budget left)", file=sys.stderr, flush=True)
        write(ctx)
    print(write(ctx))
    print(f"[gpu_report] wrote {ctx.path}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
