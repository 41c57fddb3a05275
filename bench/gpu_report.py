#!/usr/bin/env python
"""One command, one GPU, under eight minutes: what g2g-fast's kernels do on this device.

    python bench/gpu_report.py [--out bench/results] [--budget-s 420] [--smoke]

Sections, in order (each in its own try/except: an error is recorded and the report goes on):
  environment   GPU, driver, CUDA, cuDNN, torch, triton, git commit, date
  peaks         device copy bandwidth (1 GiB y.copy_(x), bytes = 2 x size) and bf16 matmul
                TFLOP/s (8192^3, 2*n^3 FLOPs)
  parity        kernels.adain(impl="triton") against g2g_fast.reference.ops.adain_ref upcast to
                fp32, forward and every gradient, at the four FUNIT shapes (B=64), fp32 NCHW and
                bf16 channels_last, for act none / relu / relu+residual with (B, C) weights.
                fp32: allclose(rtol=1e-4, atol=1e-4). bf16: the three-way rule
                max|fast - ref32| <= 2 * max|ref_bf16 - ref32| + 1e-2.
                Where act is ReLU, the upstream gradient is zeroed where the fp32 pre-activation
                is within 1e-3 of the kink: there a one-ulp difference legitimately flips the
                derivative, and at 10^8 elements some element always lands there.
  bandwidth     GB/s of fwd, bwd and fwd+bwd of the AdaIN ResBlock epilogue (relu, residual,
                (B, C) weights) for triton / torch eager / torch.compile(reference), both formats,
                from the byte ledger in bench/_shapes.py; median of CUDA-event timings after
                warm-up, L2 flushed before each rep; fraction of copy bandwidth; speedups.
  train_step    img/s of one fp32 reference training iteration per approach (128^2, batch 64).

The issue's targets (bf16 channels_last, fwd+bwd: >= 80% of copy bandwidth, >= 3x eager,
>= 1.3x torch.compile) are printed beside the measured numbers as met / missed.

A global budget (--budget-s) skips the remaining work with a note once it would be exceeded.
The JSON is rewritten after every section, so a run cut short still leaves its results in
<out>/gpu_report_<gpu-slug>_<YYYY-MM-DD>.json and .md; the markdown is also printed.

--smoke: tiny shapes, few reps, runs on the CPU so CI can prove the script works. The "triton"
provider uses impl="triton" only under TRITON_INTERPRET=1 (else impl="ref", noted), and
torch.compile uses backend="aot_eager" (inductor's CPU codegen takes ~30 s per shape).
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

import _shapes as S  # noqa: E402

TARGETS = {"frac_of_copy_bw": 0.80, "vs_eager": 3.0, "vs_compile": 1.3}
RTOL32 = ATOL32 = 1e-4
ATOL_LOWP = 1e-2
KINK = 1e-3
VARIANTS = {"none": ("none", False), "relu": ("relu", False), "relu+residual": ("relu", True)}
APPROACHES = ("funit2funit", "cyclefunit", "naive")
SMOKE_STEP = {"cyclefunit": dict(image_size=32, batch_size=2, nf=16, nf_mlp=32, latent_dim=16, patch_nf=16)}


class Ctx:
    """Run-wide settings derived from the command line and the machine."""

    def __init__(self, args):
        self.smoke, self.t0, self.budget = args.smoke, time.monotonic(), args.budget_s
        self.dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        self.name = torch.cuda.get_device_name(self.dev) if self.dev.type == "cuda" else "cpu"
        self.B, self.shapes = (S.SMOKE_B, S.SMOKE_SHAPES) if args.smoke else (S.FUNIT_B, S.FUNIT_SHAPES)
        self.warmup, self.reps = (1, 2) if args.smoke else (3, 20)
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        self.impl = "triton" if (self.dev.type == "cuda" or interp) else "ref"
        self.compile_backend = "aot_eager" if args.smoke else "inductor"
        self.notes: list[str] = []
        if self.impl == "ref":
            self.notes.append('no GPU and TRITON_INTERPRET!=1: provider "triton" runs impl="ref"')
        if args.smoke:
            self.notes.append("--smoke: tiny shapes, CPU, few reps; numbers are not meaningful; "
                              'torch.compile uses backend="aot_eager"')
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
    n = 256 if ctx.smoke else 8192
    a, b = (torch.randn(n, n, device=ctx.dev, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    ms = S.median_ms(lambda: torch.matmul(a, b, out=c), ctx.dev, warmup=ctx.warmup, reps=ctx.reps)
    out.update(matmul_n=n, matmul_bf16_tflops=2 * n**3 / (ms * 1e-3) / 1e12)


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


def train_step(ctx: Ctx, out: dict) -> None:
    from g2g_fast.config import config_from_dict
    from g2g_fast.reference.steps import build_approach
    out["rows"] = []
    plan = SMOKE_STEP if ctx.smoke else {a: dict(image_size=128, batch_size=64) for a in APPROACHES}
    if ctx.smoke:
        ctx.notes.append("--smoke: train_step runs one tiny cyclefunit config only")
    for approach, values in plan.items():
        if ctx.skip(f"train_step {approach}", 10 if ctx.smoke else 40):
            continue
        row = dict(approach=approach, precision="fp32 reference", **values)
        ap = None
        try:
            cfg = config_from_dict(approach, values)
            torch.manual_seed(0)
            ap = build_approach(cfg, 119, ctx.dev)
            x = torch.rand(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=ctx.dev) * 2 - 1
            y = torch.randint(0, 119, (cfg.batch_size,), device=ctx.dev)
            ap.train_step(x, y)  # warm-up: cuDNN autotuning, allocator
            times = []
            for _ in range(1 if ctx.smoke else 3):
                S.sync(ctx.dev)
                t = time.perf_counter()
                ap.train_step(x, y)
                S.sync(ctx.dev)
                times.append(time.perf_counter() - t)
            s = sorted(times)[len(times) // 2]
            row.update(s_per_step=s, img_per_s=cfg.batch_size / s, reps=len(times))
        except Exception as e:
            row["error"] = ctx.error(f"train_step {approach}", e)
        out["rows"].append(row)
        del ap
        ctx.free()


SECTIONS = (("environment", environment, 0), ("peaks", peaks, 10), ("parity", parity, 20),
            ("bandwidth", bandwidth, 20), ("train_step", train_step, 10))


# ------------------------------------------------------------------------------------------
# Output.
# ------------------------------------------------------------------------------------------
def _f(v, fmt=".1f", none="-"):
    return none if v is None else format(v, fmt)


def _verdict(ok):
    return "n/a" if ok is None else ("met" if ok else "missed")


def markdown(ctx: Ctx) -> str:
    rep = ctx.report
    env, pk = rep.get("environment", {}), rep.get("peaks", {})
    L = [f"# g2g-fast GPU report: {ctx.name}, {env.get('date_utc', '')}", ""]
    L += [f"> {n}" for n in ctx.notes] + [""]
    L += ["## Environment", "", "| key | value |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in env.items() if k != "argv"]
    L += ["", "## Device peaks", "", "| copy bandwidth (GB/s) | bf16 matmul TFLOP/s (n) |", "|---|---|",
          f"| {_f(pk.get('copy_gbps'))} | {_f(pk.get('matmul_bf16_tflops'))} ({pk.get('matmul_n', '-')}) |", ""]
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
    L += ["", "## Reference training step (fp32, PyTorch defaults)", "",
          "| approach | image | batch | s/step | img/s |",
          "|---|---|---|---|---|"]
    for r in rep.get("train_step", {}).get("rows", []):
        L.append(f"| {r['approach']} | {r['image_size']} | {r['batch_size']} | {_f(r.get('s_per_step'), '.3f')} | "
                 f"{_f(r.get('img_per_s'))} |" + (f" {r['error']}" if "error" in r else ""))
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
