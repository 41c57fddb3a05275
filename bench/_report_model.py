"""gpu_report.py's training-step sections, with their markdown: `train_step` (every eager provider
of bench/_train.py, each approach at every batch of ctx.step_batches: 8, FUNIT2FUNIT's training
default, and 64; img/s, MFU and memory, issue 5's targets, and the predicted step time of
bench/results/step_ledger.json beside the measured one) and `train_step_compile` (the
torch.compile providers, the slowest to set up, run last on the time the other sections left; its
summary covers both sections' rows). `ctx` is gpu_report's Ctx (bench/_report_child.py)."""
from __future__ import annotations

import statistics
import sys
import time

import torch

import _report_ledger as LG
import _shapes as S
import _train as T
from _report_common import f, verdict
from _report_parity import describe

# The row whose iteration is profiled kernel by kernel ("where the time goes", issue 5), at every batch.
PROFILED = ("funit2funit", "fast")
PROFILE_STEPS, PROFILE_TOP = 2, 20
# Kernel (or, on the CPU, aten op) name fragments -> category, first match wins.
CATEGORIES = (
    ("fused norm (g2g Triton)", ("_adain_",)),
    ("optimiser / EMA (foreach)", ("foreach", "multi_tensor", "lerp")),
    ("layout conversion", ("nchwtonhwc", "nhwctonchw", "transpose")),
    ("convolution / GEMM", ("conv", "xmma", "gemm", "cutlass", "cudnn", "fprop", "dgrad", "wgrad", "sm90_", "sm80_",
                            "mm", "addmm", "bmm", "implicit")),
    ("copy", ("copy", "memcpy", "memset", "contiguous", "cat")),
    ("padding", ("pad",)),
    ("reduction", ("reduce", "sum", "mean", "norm")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "leaky", "relu", "add", "mul", "div", "where",
                     "pow", "abs", "tanh", "fill")),
)
# Issue 5's training-step targets for fast on FUNIT2FUNIT; "max" marks an upper bound.
STEP_TARGETS = {"vs_reference_fp32": (3.0, "min"), "vs_best_stock": (1.5, "min"),
                "peak_memory_ratio": (0.6, "max"), "mfu": (0.35, "min")}
# Seconds of the section's budget a row needs to start (GPU; --smoke: 2).
ROW_NEED_S, COMPILED_ROW_NEED_S = 20, 90


def _time_steps(ctx, run, reps: int) -> tuple[list[float], dict, bool]:
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


def category(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")


def profile_step(ctx, run) -> dict:
    """Where the time of `PROFILE_STEPS` iterations goes: torch.profiler's self time per CUDA
    kernel (per aten op on the CPU), the top PROFILE_TOP and per-category shares."""
    from torch.profiler import ProfilerActivity, profile
    cuda = ctx.dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(PROFILE_STEPS):
            run.step()
        S.sync(ctx.dev)

    def self_us(e) -> float:
        if not cuda:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    from torch.autograd import DeviceType
    averages = prof.key_averages()
    if cuda:  # kernels only: a CPU op's self device time repeats the time of the kernels it launched
        averages = [e for e in averages if e.device_type == DeviceType.CUDA]
    else:  # aten ops only: their self times partition the CPU time
        averages = [e for e in averages if e.key.startswith("aten::")]
    events = [(e.key, e.count, self_us(e)) for e in averages]
    events = [ev for ev in events if ev[2] > 0]
    total = sum(us for _, _, us in events) or 1.0
    cats: dict = {}
    for name, _, us in events:
        cats[category(name)] = cats.get(category(name), 0.0) + us
    top = sorted(events, key=lambda ev: -ev[2])[:PROFILE_TOP]
    return dict(steps=PROFILE_STEPS, unit="CUDA kernel self time" if cuda else "aten op CPU self time",
                ms_per_step=total / 1e3 / PROFILE_STEPS,
                by_category={c: us / total for c, us in sorted(cats.items(), key=lambda kv: -kv[1])},
                top=[dict(name=name[:120], calls=n // PROFILE_STEPS, ms_per_step=us / 1e3 / PROFILE_STEPS,
                          share=us / total, category=category(name)) for name, n, us in top])


def prediction(ctx, ledger: tuple, approach: str, provider: str, batch: int, image_size: int,
               s_per_step: float | None) -> dict:
    """The ledger's predicted step time for this row's (approach, backend, precision, batch)
    beside the measured one. `ledger`: _report_ledger.load's (ledger, why-not)."""
    p = T.PROVIDERS[provider]
    gpu = ctx.ledger_gpu or LG.gpu_key(ctx.name)
    pred = LG.predict(ledger[0], gpu, approach=approach, backend="reference" if p.stock else "fast",
                      precision=p.precision_on(ctx.dev), batch=batch, image_size=image_size, why_not=ledger[1])
    return LG.compare(pred, 1e3 * s_per_step if s_per_step else None)


def _step_row(ctx, approach: str, provider: str, batch: int, peak_tflops: float | None, ledger: tuple) -> dict:
    T.free(ctx.dev)  # nothing of an earlier section or row in this row's memory
    cuda = ctx.dev.type == "cuda"
    if cuda:  # every row's peak is its own, the CUDA graph row's included
        torch.cuda.reset_peak_memory_stats(ctx.dev)
    values = dict(T.SCALES[ctx.scale][approach], batch_size=batch)
    row = dict(approach=approach, provider=provider, image_size=values["image_size"], batch_size=batch)
    run = None
    try:
        with T.numerics(provider):
            t = time.monotonic()
            run = T.prepare(approach, provider, ctx.dev, values, compile_backend=ctx.step_compile_backend,
                            adain_impl=ctx.model_impl)
            row["describe"] = run.describe()
            if run.graph is not None:  # adopt a CUDA graph only if a replay is the eager step
                row["graph_check"] = T.check_graph(run)
            warm = T.warmup_steps(provider, ctx.dev)
            for _ in range(warm):
                run.step()
            S.sync(ctx.dev)
            row.update(flops=run.flops, warmup=1 + warm, setup_s=round(time.monotonic() - t, 1))
            # The peak of the timed iterations (no empty_cache: keep the pool). A graph's replays
            # allocate nothing: its peak is the row's, capture included (its pool holds the step's
            # intermediates).
            if cuda and run.graph is None:
                torch.cuda.reset_peak_memory_stats(ctx.dev)
            row["peak_memory_scope"] = "row (capture included)" if run.graph is not None else "timed iterations"
            secs, phases, finite = _time_steps(ctx, run, ctx.step_reps)
            s = statistics.median(secs)
            row.update(reps=len(secs), s_per_step=s, img_per_s=batch / s, phase_ms=phases,
                       losses_finite=finite, tflops_per_s=run.flops / s / 1e12 if run.flops else None,
                       mfu=T.mfu(run.flops, s, peak_tflops), peak_memory_gib=T.peak_memory_gib(ctx.dev))
        row["predicted"] = prediction(ctx, ledger, approach, provider, batch, row["image_size"], s)
        print(f"[gpu_report] train_step {approach} {provider} batch {batch}: {row['img_per_s']:.1f} img/s; "
              f"{LG.line(row['predicted'])}", file=sys.stderr, flush=True)
        if (approach, provider) == PROFILED:
            try:  # its own try: a profiler failure (no CUPTI, say) keeps the row's numbers
                row["profile"] = profile_step(ctx, run)
            except Exception as e:
                row["profile"] = {"error": ctx.error(f"profile {approach} {provider} batch {batch}", e)}
    except Exception as e:
        row["error"] = ctx.error(f"train_step {approach} {provider} batch {batch}", e)
    finally:
        del run
        T.free(ctx.dev, dynamo=T.PROVIDERS[provider].compile)
    return row


def _run_rows(ctx, out: dict, cases: list, need_s: float, earlier: list) -> None:
    """The rows of `cases` [(approach, provider, batch)], each saved as it ends; the summary
    covers them and the `earlier` rows (another section's)."""
    peak = ctx.report.get("peaks", {}).get("matmul_bf16_tflops")
    if peak is None:
        peak = T.matmul_peak_tflops(ctx.dev, ctx.matmul_n, reps=ctx.reps)
    ledger = LG.load(ctx.ledger_path)
    out.update(rows=[], batches=list(ctx.step_batches), matmul_bf16_tflops=peak, ledger=str(ctx.ledger_path),
               ledger_note=ledger[1] or None, targets={k: v for k, (v, _) in STEP_TARGETS.items()},
               timing=f"FLOP-counted eager iteration + warm-up, then median of {ctx.step_reps} iterations "
                      + ("(CUDA events)" if ctx.dev.type == "cuda" else "(perf_counter)"))
    for approach, provider, batch in cases:
        if ctx.skip(f"train_step {approach} {provider} batch {batch}", 2 if ctx.smoke else need_s):
            continue
        if T.PROVIDERS[provider].graph and ctx.dev.type != "cuda":
            note = f"train_step {approach} {provider}: skipped, {T.cpu_skip_reason(provider)}"
            if note not in ctx.notes:
                ctx.notes.append(note)
            continue
        out["rows"].append(_step_row(ctx, approach, provider, batch, peak, ledger))
        out["summary"] = _step_summary(earlier + out["rows"])
        ctx.flush()  # a budget cut or crash later still leaves these rows


def train_step(ctx, out: dict) -> None:
    """Every eager provider; per approach (FUNIT2FUNIT first: the targets), batch by batch, in
    T.STEP_PLAN's order."""
    cases = [(a, p, b) for a, providers in T.STEP_PLAN.items() for b in ctx.step_batches
             for p in providers if not T.PROVIDERS[p].compile]
    _run_rows(ctx, out, cases, ROW_NEED_S, [])


def train_step_compile(ctx, out: dict) -> None:
    """The torch.compile providers, batch by batch; the summary includes the train_step rows."""
    cases = [(a, p, b) for b in ctx.step_batches for a, providers in T.STEP_PLAN.items()
             for p in providers if T.PROVIDERS[p].compile]
    _run_rows(ctx, out, cases, COMPILED_ROW_NEED_S, list(ctx.report.get("train_step", {}).get("rows", [])))


def merged(rep: dict) -> dict:
    """Both training-step sections as one: every row; the later summary (it covers both)."""
    ts, tc = rep.get("train_step", {}), rep.get("train_step_compile", {})
    return dict(ts, rows=ts.get("rows", []) + tc.get("rows", []),
                summary=tc.get("summary") or ts.get("summary", []))


def _step_summary(rows: list) -> list:
    """Per approach and batch: speedups of every provider vs reference-fp32 and vs the best stock
    provider, peak-memory ratios (written into the rows), and fast's verdicts on the FUNIT2FUNIT
    targets."""
    summary = []
    keys = dict.fromkeys((r["approach"], r["batch_size"]) for r in rows)
    for approach, batch in sorted(keys, key=lambda k: (list(T.STEP_PLAN).index(k[0]), k[1])):
        got = {r["provider"]: r for r in rows
               if (r["approach"], r["batch_size"]) == (approach, batch) and r.get("img_per_s")}
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
        s = dict(approach=approach, batch_size=batch, best_stock=best,
                 stock_measured=sorted(stock), stock_complete=set(stock) == {p for p in T.STEP_PLAN[approach]
                                                                            if T.PROVIDERS[p].stock})
        fast = got.get("fast")
        for name in ("subpixel", "compile", "cudagraph"):
            option = f"fast-{name}"
            if fast is not None and option in got:  # issue 5: an option is adopted only if faster and sound
                s[f"{name}_vs_fast"] = got[option]["img_per_s"] / fast["img_per_s"]
                s[f"{name}_losses_finite"] = got[option].get("losses_finite", False)
        if "cudagraph_vs_fast" in s:  # and a replay equals the eager step
            s["cudagraph_ok"] = got["fast-cudagraph"].get("graph_check", {}).get("ok", False)
        if fast is not None:
            s.update({k: fast.get(k) for k in STEP_TARGETS})
            if approach == "funit2funit":
                s["targets"] = {k: (None if fast.get(k) is None else
                                    bool(fast[k] <= t if kind == "max" else fast[k] >= t))
                                for k, (t, kind) in STEP_TARGETS.items()}
        summary.append(s)
    return summary


TARGET_ROWS = (  # label, summary key, kind (a target of fast's, or an option adopted only if faster)
    ("img/s >= 3x reference-fp32", "vs_reference_fp32", "target"),
    ("img/s >= 1.5x best stock", "vs_best_stock", "target"),
    ("peak memory <= 0.6x reference-fp32", "peak_memory_ratio", "target"),
    ("MFU >= 35%", "mfu", "target"),
    ("sub-pixel decoder (fast-subpixel / fast img/s; make it the default if > 1)", "subpixel", "option"),
    ("torch.compile of the fast generator (fast-compile / fast img/s; adopt if > 1)", "compile", "option"),
    ("CUDA graph of the whole fast iteration (fast-cudagraph / fast img/s; add a trainer option if > 1)",
     "cudagraph", "option"),
)


def _target_cell(s: dict, key: str, kind: str) -> str:
    if kind == "option":
        v = s.get(f"{key}_vs_fast")
        return f"{f(v, '.2f')}x {_adopt(s, key)}" if v is not None else verdict(None)
    v = s.get(key)
    value = f(v, ".1%") if key == "mfu" else ("-" if v is None else f"{v:.2f}x")
    if key == "vs_best_stock":
        best = s.get("best_stock") or "-"
        value += f" vs {best}" + ("" if best == "-" or s.get("stock_complete") else
                                  f" (measured: {', '.join(s.get('stock_measured', []))})")
    return f"{value} {verdict(s.get('targets', {}).get(key))}"


def targets_markdown(ts: dict) -> list:
    """Issue 5's targets and the three decisions for fast FUNIT2FUNIT, one column per batch."""
    f2f = [s for s in ts.get("summary", []) if s["approach"] == "funit2funit"]
    if not f2f:
        return []
    size = next((r["image_size"] for r in ts.get("rows", []) if r["approach"] == "funit2funit"), "-")
    L = [f"## Targets: training step, FUNIT2FUNIT {size}^2 (fast)", "",
         "| target | " + " | ".join(f"batch {s['batch_size']}" for s in f2f) + " |", "|---|" + "---|" * len(f2f)]
    L += [f"| {label} | " + " | ".join(_target_cell(s, key, kind) for s in f2f) + " |"
          for label, key, kind in TARGET_ROWS]
    return L + [""]


def _adopt(s: dict, name: str) -> str:
    """Verdict on an option (`name`_vs_fast: its img/s over fast's): adopt it only if faster, its
    losses are finite and (the CUDA graph) a replay equals the eager step."""
    ratio = s.get(f"{name}_vs_fast")
    if ratio is None:
        return verdict(None)
    sound = s.get(f"{name}_losses_finite", False) and s.get(f"{name}_ok", True)
    note = "" if sound else " (losses not finite or replay != eager)"
    if name == "subpixel":  # python -m g2g_fast.audit with FastBackend(subpixel=True) fails
        note += (" (its decoder still calls pixel_shuffle and replication_pad2d, NCHW on CUDA "
                 "(g2g_fast/audit.py KNOWN_BAD): move them to channels_last kernels before adopting)")
    return verdict(ratio > 1 and sound) + note


def profile_markdown(ts: dict) -> list:
    L = []
    for row in (r for r in ts.get("rows", []) if (r["approach"], r["provider"]) == PROFILED and r.get("profile")):
        p = row["profile"]
        L += ["", f"## Where the time goes: {PROFILED[0]} {PROFILED[1]} batch {row['batch_size']} "
                  f"({p.get('unit', '')}, {p.get('steps', '-')} iterations under torch.profiler)", ""]
        if "error" in p:
            L.append(f"profiler error: {p['error']}")
            continue
        L += [f"{f(p['ms_per_step'])} ms per iteration of profiled time. By category: "
              + ", ".join(f"{c} {v:.0%}" for c, v in p["by_category"].items()), "",
              "| kernel / op | category | calls per iteration | ms per iteration | share |", "|---|---|---|---|---|"]
        L += [f"| `{t['name']}` | {t['category']} | {t['calls']} | {f(t['ms_per_step'], '.2f')} | {t['share']:.1%} |"
              for t in p["top"]]
    return L


def step_markdown(ts: dict) -> list:
    if not ts.get("rows"):
        return []
    L = ["", "## Training step throughput (D step + G step + EMA)", "",
         f"bf16 matmul peak {f(ts.get('matmul_bf16_tflops'))} TFLOP/s (the MFU denominator); "
         f"{ts.get('timing', '')}. FLOPs: FlopCounterMode around one eager train_step (R1's double "
         "backward included). Predicted: the roofline lower bound of one iteration from "
         f"{ts.get('ledger', 'the step ledger')}" + (f" ({ts['ledger_note']})" if ts.get("ledger_note") else "")
         + "; measured/predicted >= 1.", "",
         "| approach | provider | image | batch | img/s | ms/step | predicted ms | measured/predicted | D ms | G ms "
         "| EMA ms | TFLOP/iter | TFLOP/s | MFU | peak GiB | vs ref-fp32 | vs best stock | setup s | what ran |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ts.get("rows", []):
        ph, pr = r.get("phase_ms", {}), r.get("predicted", {})
        fl = r.get("flops")
        what = describe(r.get("describe")) + ("" if r.get("losses_finite", True) else " NON-FINITE LOSS")
        gc = r.get("graph_check")
        if gc:
            what += (f"; replay vs eager step: losses within {gc['max_rel_loss_diff']:.1e} "
                     f"({'ok' if gc['ok'] else 'FAIL'})")
        L.append(" | ".join([
            f"| {r['approach']}", r["provider"], str(r["image_size"]), str(r["batch_size"]), f(r.get("img_per_s")),
            f(r.get("s_per_step") and 1e3 * r["s_per_step"], ".2f"),
            f(pr.get("predicted_ms"), ".2f", "no prediction"), f(pr.get("measured_over_predicted"), ".2f"),
            f(ph.get("D")), f(ph.get("G")), f(ph.get("ema"), ".2f"), f(fl and fl / 1e12, ".2f"),
            f(r.get("tflops_per_s")), f(r.get("mfu"), ".1%"), f(r.get("peak_memory_gib"), ".2f"),
            f(r.get("vs_reference_fp32"), ".2f"), f(r.get("vs_best_stock"), ".2f"), f(r.get("setup_s")),
            what + (f" {r['error']}" if "error" in r else "")]) + " |")
    return L
