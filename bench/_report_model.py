"""gpu_report.py's model sections: `model_parity` (the fast backend against the fp32 reference,
FUNIT2FUNIT) and `train_step` (img/s, MFU and memory per provider, issue 5's targets), with their
markdown. `ctx` is gpu_report's Ctx (dev, smoke, scale, step_reps, model_impl,
step_compile_backend, matmul_n, reps, report, skip(), error(), free(), flush())."""
from __future__ import annotations

import copy
import statistics
import time

import torch

import _shapes as S
import _train as T
from _report_common import f, verdict

# Model parity: relative max error bounds per G2G output stage and per network's gradients.
PARITY_TOL = {"stage1": 1e-4, "stage2": 1e-3, "g_grad": 0.1, "d_grad": 1e-4}
STAGE1, STAGE2 = ("m1", "m2", "s1", "s2"), ("r1", "r2")
PARITY_VALUES = dict(image_size=128, batch_size=8)  # FUNIT widths (config defaults)
# The row whose iteration is profiled kernel by kernel ("where the time goes", issue 5).
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


def model_parity(ctx, out: dict) -> None:
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


def _step_row(ctx, approach: str, provider: str, peak_tflops: float | None) -> dict:
    T.free(ctx.dev)  # nothing of an earlier section or row in this row's peak memory
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
            if run.graph is not None:  # adopt a CUDA graph only if a replay is the eager step
                row["graph_check"] = T.check_graph(run)
            warm = T.warmup_steps(provider, ctx.dev)
            for _ in range(warm):
                run.step()
            S.sync(ctx.dev)
            row.update(flops=run.flops, warmup=1 + warm, setup_s=round(time.monotonic() - t, 1))
            # The peak of the timed iterations (no empty_cache: keep the pool). A graph's replays
            # allocate nothing: its peak is the capture's (its pool holds the step's intermediates).
            if ctx.dev.type == "cuda" and run.graph is None:
                torch.cuda.reset_peak_memory_stats(ctx.dev)
            secs, phases, finite = _time_steps(ctx, run, ctx.step_reps)
            s = statistics.median(secs)
            row.update(reps=len(secs), s_per_step=s, img_per_s=values["batch_size"] / s, phase_ms=phases,
                       losses_finite=finite, tflops_per_s=run.flops / s / 1e12 if run.flops else None,
                       mfu=T.mfu(run.flops, s, peak_tflops), peak_memory_gib=T.peak_memory_gib(ctx.dev))
        if (approach, provider) == PROFILED:
            try:  # its own try: a profiler failure (no CUPTI, say) keeps the row's numbers
                row["profile"] = profile_step(ctx, run)
            except Exception as e:
                row["profile"] = {"error": ctx.error(f"profile {approach} {provider}", e)}
    except Exception as e:
        row["error"] = ctx.error(f"train_step {approach} {provider}", e)
    finally:
        del run
        T.free(ctx.dev, dynamo=T.PROVIDERS[provider].compile)
    return row


def train_step(ctx, out: dict) -> None:
    peak = ctx.report.get("peaks", {}).get("matmul_bf16_tflops")
    if peak is None:
        peak = T.matmul_peak_tflops(ctx.dev, ctx.matmul_n, reps=ctx.reps)
    out.update(rows=[], matmul_bf16_tflops=peak, targets={k: v for k, (v, _) in STEP_TARGETS.items()},
               timing=f"FLOP-counted eager iteration + warm-up, then median of {ctx.step_reps} iterations "
                      + ("(CUDA events)" if ctx.dev.type == "cuda" else "(perf_counter)"))
    # T.STEP_PLAN's order (FUNIT2FUNIT first: the targets), except that every compiled provider
    # (the slowest to set up) comes after all eager ones, so a tight budget cuts those first.
    cases = [(a, p) for a, providers in T.STEP_PLAN.items() for p in providers]
    for approach, provider in sorted(cases, key=lambda c: T.PROVIDERS[c[1]].compile):
        # Compiled rows also leave `ctx.reserve_s` for the sections after this one.
        need = (150 + ctx.reserve_s if T.PROVIDERS[provider].compile else 30) if not ctx.smoke else 2
        if ctx.skip(f"train_step {approach} {provider}", need):
            continue
        if T.PROVIDERS[provider].graph and ctx.dev.type != "cuda":
            ctx.notes.append(f"train_step {approach} {provider}: skipped, {T.cpu_skip_reason(provider)}")
            continue
        out["rows"].append(_step_row(ctx, approach, provider, peak))
        out["summary"] = _step_summary(out["rows"])
        ctx.flush()  # a budget cut or crash later still leaves these rows


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
        if fast is not None and "fast-compile" in got:  # and torch.compile of the fast generator
            s["compile_vs_fast"] = got["fast-compile"]["img_per_s"] / fast["img_per_s"]
        if fast is not None and "fast-cudagraph" in got:  # and replaying the iteration from a CUDA graph
            s["cudagraph_vs_fast"] = got["fast-cudagraph"]["img_per_s"] / fast["img_per_s"]
            s["cudagraph_ok"] = got["fast-cudagraph"].get("graph_check", {}).get("ok", False)
        for name, option in (("subpixel", "fast-subpixel"), ("compile", "fast-compile"), ("cudagraph", "fast-cudagraph")):
            if option in got:  # an option is adopted only if it is faster and trains correctly
                s[f"{name}_losses_finite"] = got[option].get("losses_finite", False)
        if fast is not None:
            s.update({k: fast.get(k) for k in STEP_TARGETS})
            if approach == "funit2funit":
                s["targets"] = {k: (None if fast.get(k) is None else
                                    bool(fast[k] <= t if kind == "max" else fast[k] >= t))
                                for k, (t, kind) in STEP_TARGETS.items()}
        summary.append(s)
    return summary


def _step_targets_markdown(ts: dict) -> list:
    f2f = next((s for s in ts.get("summary", []) if s["approach"] == "funit2funit"), {})
    v = f2f.get("targets", {})
    best = f2f.get("best_stock") or "-"
    if best != "-" and not f2f.get("stock_complete"):
        best += f" (measured: {', '.join(f2f.get('stock_measured', []))})"
    fast = next((r for r in ts.get("rows", []) if (r["approach"], r["provider"]) == ("funit2funit", "fast")), {})
    L = [f"## Targets: training step, FUNIT2FUNIT {fast.get('image_size', '-')}^2 batch "
         f"{fast.get('batch_size', '-')} (fast)", "", "| target | measured | verdict |", "|---|---|---|",
         f"| img/s >= 3x reference-fp32 | {f(f2f.get('vs_reference_fp32'), '.2f')}x "
         f"| {verdict(v.get('vs_reference_fp32'))} |",
         f"| img/s >= 1.5x best stock ({best}) | {f(f2f.get('vs_best_stock'), '.2f')}x "
         f"| {verdict(v.get('vs_best_stock'))} |",
         f"| peak memory <= 0.6x reference-fp32 | {f(f2f.get('peak_memory_ratio'), '.2f')}x "
         f"| {verdict(v.get('peak_memory_ratio'))} |",
         f"| MFU >= 35% | {f(f2f.get('mfu'), '.1%')} | {verdict(v.get('mfu'))} |",
         f"| sub-pixel decoder (fast-subpixel / fast img/s; make it the default if > 1) "
         f"| {f(f2f.get('subpixel_vs_fast'), '.2f')}x | {_adopt(f2f, 'subpixel')} |",
         f"| torch.compile of the fast generator (fast-compile / fast img/s; adopt if > 1) "
         f"| {f(f2f.get('compile_vs_fast'), '.2f')}x | {_adopt(f2f, 'compile')} |",
         f"| CUDA graph of the whole fast iteration (fast-cudagraph / fast img/s; add a trainer option if > 1) "
         f"| {f(f2f.get('cudagraph_vs_fast'), '.2f')}x | {_adopt(f2f, 'cudagraph')} |",
         ""]
    return L


def _adopt(f2f: dict, name: str) -> str:
    """Verdict on an option (`name`_vs_fast: its img/s over fast's): adopt it only if faster, its
    losses are finite and (the CUDA graph) a replay equals the eager step."""
    ratio = f2f.get(f"{name}_vs_fast")
    if ratio is None:
        return verdict(None)
    sound = f2f.get(f"{name}_losses_finite", False) and f2f.get(f"{name}_ok", True)
    return verdict(ratio > 1 and sound) + ("" if sound else " (losses not finite or replay != eager)")


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


def _profile_markdown(ts: dict) -> list:
    row = next((r for r in ts.get("rows", []) if (r["approach"], r["provider"]) == PROFILED), {})
    p = row.get("profile")
    if not p:
        return []
    L = ["", f"## Where the time goes: {PROFILED[0]} {PROFILED[1]} ({p.get('unit', '')}, "
             f"{p.get('steps', '-')} iterations under torch.profiler)", ""]
    if "error" in p:
        return L + [f"profiler error: {p['error']}"]
    L += [f"{f(p['ms_per_step'])} ms per iteration of profiled time. By category: "
          + ", ".join(f"{c} {v:.0%}" for c, v in p["by_category"].items()), "",
          "| kernel / op | category | calls per iteration | ms per iteration | share |", "|---|---|---|---|---|"]
    L += [f"| `{t['name']}` | {t['category']} | {t['calls']} | {f(t['ms_per_step'], '.2f')} | {t['share']:.1%} |"
          for t in p["top"]]
    return L


def _step_markdown(ts: dict) -> list:
    L = ["", "## Training step throughput (D step + G step + EMA)", "",
         f"bf16 matmul peak {f(ts.get('matmul_bf16_tflops'))} TFLOP/s (the MFU denominator); "
         f"{ts.get('timing', '')}. FLOPs: FlopCounterMode around one eager train_step (R1's double "
         "backward included).", "",
         "| approach | provider | image | batch | img/s | ms/step | D ms | G ms | EMA ms | TFLOP/iter | TFLOP/s "
         "| MFU | peak GiB | vs ref-fp32 | vs best stock | setup s | what ran |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ts.get("rows", []):
        ph = r.get("phase_ms", {})
        fl = r.get("flops")
        what = _describe(r.get("describe")) + ("" if r.get("losses_finite", True) else " NON-FINITE LOSS")
        gc = r.get("graph_check")
        if gc:
            what += f"; replay vs eager step: losses within {gc['max_rel_loss_diff']:.1e} ({'ok' if gc['ok'] else 'FAIL'})"
        L.append(" | ".join([
            f"| {r['approach']}", r["provider"], str(r["image_size"]), str(r["batch_size"]), f(r.get("img_per_s")),
            f(r.get("s_per_step") and 1e3 * r["s_per_step"]), f(ph.get("D")), f(ph.get("G")),
            f(ph.get("ema"), ".2f"), f(fl and fl / 1e12, ".2f"), f(r.get("tflops_per_s")), f(r.get("mfu"), ".1%"),
            f(r.get("peak_memory_gib"), ".2f"), f(r.get("vs_reference_fp32"), ".2f"),
            f(r.get("vs_best_stock"), ".2f"), f(r.get("setup_s")),
            what + (f" {r['error']}" if "error" in r else "")]) + " |")
    return L
