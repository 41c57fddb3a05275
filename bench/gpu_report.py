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
  bandwidth     GB/s of fwd, bwd and fwd+bwd of the AdaIN ResBlock epilogue (relu, residual,
                (B, C) weights) for triton / torch eager / torch.compile(reference), both formats,
                from the byte ledger in bench/_shapes.py; median of CUDA-event timings after
                warm-up, L2 flushed before each rep; fraction of copy bandwidth; speedups.
  plans         the Triton launch plans of kernels/instance_norm.py measured against each other
                per FUNIT layer and mode (bf16 channels_last, the epilogue above): plan()'s
                default, split, two-pass (default, full-sector rows, 1 and 2 programs per SM),
                fused where it fits; GB/s from the same ledger; prints a DECISION line: keep
                the defaults, or which candidate beats them by > 3% where.
  train_step    one training iteration (D step + G step + EMA) per provider (bench/_train.py):
                FUNIT2FUNIT at 128^2, batch 64, 119 classes with reference-fp32 (TF32 off),
                reference-bf16-cl, reference-bf16-cl-compile, fast, fast-subpixel (the
                decoder's upsampling by kernels.upsample_conv), fast-cudagraph (the whole
                iteration replayed from a CUDA graph) and fast-compile (torch.compile of the
                fast generator): each of the last three is adopted only if it beats fast; naive and CycleFUNIT with reference-fp32 and fast; the compiled providers
                after all eager ones. A FLOP-counted eager iteration, warm-up (compile
                included), then 5 timed iterations (CUDA events, median): img/s, FLOPs, MFU
                against the measured bf16 matmul peak, peak memory, mean D / G / EMA times,
                speedups vs reference-fp32 and vs the best stock (PyTorch-only) provider, and
                issue 5's targets: fast >= 3x reference-fp32, >= 1.5x the best stock variant,
                peak memory <= 0.6x reference-fp32, MFU >= 35%. Where the time goes: fast
                FUNIT2FUNIT's iteration under torch.profiler (2 iterations after the timed
                ones): the top 20 CUDA kernels by self time and the shares of convolution/GEMM,
                the fused norms, elementwise, reductions, copies and the optimiser.
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
import datetime
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # this checkout's packages, not an installed copy

import torch  # noqa: E402

import _loaders as LD  # noqa: E402
import _report_kernels as K  # noqa: E402
import _report_model as M  # noqa: E402
import _shapes as S  # noqa: E402
import _train as T  # noqa: E402
from _report_common import f  # noqa: E402
from g2g_fast import cpu_threads  # noqa: E402


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
        self.reserve_s = 0.0  # seconds the compiled train_step rows leave for the sections after
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

    def flush(self) -> None:
        """Rewrite the JSON and markdown now (a budget cut or crash later keeps what is done)."""
        write(self)

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


# The kernel tables, then the training-step table, whose compiled rows (the slowest to set up)
# run last among its rows and leave LOADERS_RESERVE_S for the loaders: those run DALI's GPU
# decoder and worker processes, the least tried code here, so they go last where a crash or hang
# cannot cost the other sections (each is saved as it ends).
LOADERS_RESERVE_S = 45
SECTIONS = (("environment", environment, 0), ("peaks", peaks, 10), ("parity", K.parity, 20),
            ("model_parity", M.model_parity, 20), ("bandwidth", K.bandwidth, 20), ("plans", K.plans, 20),
            ("train_step", M.train_step, 30), ("loaders", LD.report_section, LOADERS_RESERVE_S))


# ------------------------------------------------------------------------------------------
# Output.
# ------------------------------------------------------------------------------------------


def markdown(ctx: Ctx) -> str:
    rep = ctx.report
    env, pk = rep.get("environment", {}), rep.get("peaks", {})
    L = [f"# g2g-fast GPU report: {ctx.name}, {env.get('date_utc', '')}", ""]
    L += [f"> {n}" for n in ctx.notes] + [""]
    L += ["## Environment", "", "| key | value |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in env.items() if k != "argv"]
    L += ["", "## Device peaks", "", "| copy bandwidth (GB/s) | bf16 matmul TFLOP/s (n) |", "|---|---|",
          f"| {f(pk.get('copy_gbps'))} | {f(pk.get('matmul_bf16_tflops'))} ({pk.get('matmul_n', '-')}) |", ""]
    L += M._step_targets_markdown(rep.get("train_step", {}))
    L += M._model_parity_markdown(rep.get("model_parity", {}))
    L += K.markdown(rep, len(ctx.shapes))
    L += K.plans_markdown(rep.get("plans", {}))
    L += M._step_markdown(rep.get("train_step", {}))
    L += M._profile_markdown(rep.get("train_step", {}))
    L += LD.report_markdown(rep.get("loaders", {}), f)
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
    if args.smoke:  # on a shared CPU: torch threads follow other processes' load (g2g_fast/cpu_threads.py)
        print(f"gpu_report: {cpu_threads.setup()}", file=sys.stderr)
    wanted = set(args.sections.split(","))
    unknown = wanted - {n for n, _, _ in SECTIONS}
    if unknown:
        ap.error(f"unknown section(s) {sorted(unknown)}; choose from {[n for n, _, _ in SECTIONS]}")
    ctx = Ctx(args)
    ctx.reserve_s = LOADERS_RESERVE_S if "loaders" in wanted and not args.smoke else 0
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
