"""gpu_report.py's kernel sections: `parity` (kernels.adain against its fp32 reference at the
FUNIT shapes), `bandwidth` (AdaIN GB/s per provider, format, shape and mode) and `plans` (the
Triton launch plans measured against each other per batch and layer), with their markdown. `ctx`
is a section's Ctx (bench/_report_child.py: dev, B, plan_batches, shapes, impl, reps, warmup, smoke,
report, skip(), error(), free(), flush())."""
from __future__ import annotations

import contextlib
import sys
import time

import torch

import _shapes as S
from _report_common import f, verdict

TARGETS = {"frac_of_copy_bw": 0.80, "vs_eager": 3.0, "vs_compile": 1.3}
RTOL32 = ATOL32 = 1e-4
ATOL_LOWP = 1e-2
KINK = 1e-3
VARIANTS = {"none": ("none", False), "relu": ("relu", False), "relu+residual": ("relu", True)}


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


def _parity_case(ctx, shape, fmt: str, variant: str) -> dict:
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


def parity(ctx, out: dict) -> None:
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
                ctx.flush()
    out["all_pass"] = bool(out["rows"]) and all(r["ok"] for r in out["rows"])


def bandwidth(ctx, out: dict) -> None:
    copy = ctx.report.get("peaks", {}).get("copy_gbps")
    out.update(ledger=S.__doc__.split("Byte ledger", 1)[1].strip(), copy_gbps=copy, rows=[],
               timing=f"median of {ctx.reps} reps after {ctx.warmup} warm-up, L2 flushed before each rep")
    flush = S.l2_flush_buffer(ctx.dev)
    for provider in S.PROVIDERS:  # compile (slowest to set up) last: the budget cuts it first
        fn = None
        for fmt, (dtype, mf) in S.FORMATS.items():
            for C, H, W in ctx.shapes:
                where = f"bandwidth {provider} {fmt} {ctx.B}x{S.shape_id(C, H, W)}"
                if ctx.skip(where, 25 if provider == "compile" and not ctx.smoke else 5):  # an inductor compile
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
                ctx.flush()


# Candidate plans (plan()'s forced keyword arguments; None: the default). "twopass-sector": rows a
# full 32-byte sector wide, not narrowed to fit L2; "-1wave" / "-2wave": 1 or 2 programs per SM
# whatever the working set; "split": the two-kernel path (4N forward with residual, 5N backward).
PLAN_FORMAT = "bf16-channels_last"
PLAN_SLOWER = 1.03   # the default is kept unless a candidate is > 3% faster


@contextlib.contextmanager
def _forced(force: dict | None):
    """kernels.instance_norm.FORCE_PLAN = `force` for one candidate; FORCE_PLAN, FORCE_TARGET and
    FORCE_INT64 are restored afterwards, whatever happens (a plan left forced would be the
    "default" of the next shape, and hide its fused candidate)."""
    from kernels import instance_norm as KI
    saved = KI.FORCE_PLAN, KI.FORCE_TARGET, KI.FORCE_INT64
    KI.FORCE_PLAN = force
    try:
        yield KI
    finally:
        KI.FORCE_PLAN, KI.FORCE_TARGET, KI.FORCE_INT64 = saved


def _plan_candidates(x, target) -> dict:
    with _forced(None) as KI:  # plan()'s own default, whatever an earlier caller forced
        auto = KI.plan(x, target, x.element_size())
    sector = max(1, min(32 // x.element_size(), x.shape[1]))
    cands = {"auto": None, "split": dict(kind="split"), "twopass": dict(kind="twopass"),
             "twopass-sector": dict(kind="twopass", block_c=sector),
             "twopass-1wave": dict(kind="twopass", programs=target.sms),
             "twopass-2wave": dict(kind="twopass", programs=2 * target.sms)}
    if auto.kind == "fused":
        cands["fused"] = dict(kind="fused")
    return cands


def _plan_row(ctx, target, fn, inp, dy, force, flush, copy) -> dict:
    """One candidate's plans and per-mode ms / GB/s on one input."""
    x = inp["x"]
    B, C, H, W = x.shape
    row = {}
    with _forced(force) as KI:
        row["fwd_plan"] = tuple(KI.plan(x, target, x.element_size()))
        row["bwd_plan"] = tuple(KI.plan(x, target, 2 * x.element_size(), backward=True))
        for mode in S.MODES:
            ms = S.median_ms(S.make_step(fn, inp, mode, dy), ctx.dev, warmup=ctx.warmup, reps=ctx.reps, flush=flush)
            gbps = S.ledger_bytes(mode, B, C, H, W, x.dtype) / (ms * 1e-3) / 1e9
            row[mode] = dict(ms=ms, gbps=gbps, frac_of_copy_bw=gbps / copy if copy else None)
    return row


def plans(ctx, out: dict) -> None:
    """Each candidate plan per batch (ctx.plan_batches: the training default 8 and 64), FUNIT layer
    (bf16 channels_last, the benchmarked epilogue) and mode: GB/s from the byte ledger, and whether
    plan()'s default is the fastest."""
    from kernels._utils import target_of
    dtype, mf = S.FORMATS[PLAN_FORMAT]
    copy = ctx.report.get("peaks", {}).get("copy_gbps")
    target = target_of(ctx.dev)
    out.update(format=PLAN_FORMAT, target=str(target), batches=list(ctx.plan_batches), rows=[],
               decisions=[])
    flush = S.l2_flush_buffer(ctx.dev)
    fn = S.make_provider("triton", impl=ctx.impl)
    for B in ctx.plan_batches:
        for C, H, W in ctx.shapes:
            shape = f"{B}x{S.shape_id(C, H, W)}"
            if ctx.skip(f"plans {shape}", 15):
                continue
            inp = S.make_inputs(B, C, H, W, dtype, mf, ctx.dev)
            dy = S.grad_like(inp["x"])
            rows = []
            for name, force in _plan_candidates(inp["x"], target).items():
                row = dict(batch=B, shape=shape, plan=name)
                try:
                    row.update(_plan_row(ctx, target, fn, inp, dy, force, flush, copy))
                except Exception as e:
                    row["error"] = ctx.error(f"plans {shape} {name}", e)
                rows.append(row)
            out["rows"] += rows
            out["decisions"] += _decisions(shape, rows)
            inp = dy = None
            ctx.free()
            out["verdict"] = _verdict(out["decisions"])  # so far: a cut keeps a verdict on what ran
            ctx.flush()
    print(f"[gpu_report] plans DECISION: {out.get('verdict', 'none (no shape ran)')}", file=sys.stderr, flush=True)


def _verdict(decisions: list) -> str:
    changes = [d for d in decisions if not d["keep_default"]]
    return ("keep plan()'s defaults: no candidate is more than 3% faster anywhere" if not changes else
            "change plan(): " + "; ".join(f"{d['shape']} {d['mode']}: {d['best']} {d['best_ms']:.3f} ms vs "
                                          f"default {f(d['auto_ms'], '.3f')} ms" for d in changes))


def _decisions(shape: str, rows: list) -> list:
    """Per mode: the fastest candidate, and whether plan()'s default is within PLAN_SLOWER of it."""
    auto = next((r for r in rows if r["plan"] == "auto"), {})
    out = []
    for mode in S.MODES:
        timed = [(r[mode]["ms"], r["plan"]) for r in rows if mode in r]
        if not timed:
            continue
        ms, best = min(timed, key=lambda t: t[0])  # the first of equals: auto on a tie
        a = auto.get(mode, {}).get("ms")
        out.append(dict(shape=shape, mode=mode, best=best, best_ms=ms, auto_ms=a,
                        keep_default=a is not None and a <= ms * PLAN_SLOWER))
    return out


def plans_markdown(pl: dict) -> list:
    if not pl.get("rows"):
        return []
    L = ["", f"## Launch plans compared ({pl.get('format')}, relu + residual; {pl.get('target')})", "",
         f"**Decision: {pl.get('verdict', '-')}**", "",
         "Plan tuples: (kind, BLOCK_C, BLOCK_P, splits, chunk, programs), forward and backward.", "",
         "| shape | plan | fwd plan | bwd plan | fwd GB/s | bwd GB/s | full GB/s | full of copy |",
         "|---|---|---|---|---|---|---|---|"]
    for r in pl["rows"]:
        g = [f(r.get(m, {}).get("gbps")) for m in S.MODES]
        L.append(f"| {r['shape']} | {r['plan']} | {r.get('fwd_plan', '-')} | {r.get('bwd_plan', '-')} | "
                 + " | ".join(g) + f" | {f(r.get('full', {}).get('frac_of_copy_bw'), '.0%')} |"
                 + (f" error: {r['error']}" if "error" in r else ""))
    return L


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


def markdown(rep: dict, n_shapes: int) -> list:
    """Target verdicts, the parity table and the GB/s tables."""
    L = []
    bw = rep.get("bandwidth", {})
    tgt = [s for s in bw.get("summary", []) if "targets" in s]
    L += ["## Targets: AdaIN ResBlock epilogue, bf16 channels_last, fwd+bwd", "",
          "| shape | GB/s | of copy BW | >= 80% | vs eager | >= 3x | vs compile | >= 1.3x |",
          "|---|---|---|---|---|---|---|---|"]
    for s in tgt:
        v = s["targets"]
        L.append(f"| {s['shape']} | {f(s['gbps'])} | {f(s['frac_of_copy_bw'], '.0%')} "
                 f"| {verdict(v['frac_of_copy_bw'])} "
                 f"| {f(s['vs_eager'], '.2f')}x | {verdict(v['vs_eager'])} | {f(s['vs_compile'], '.2f')}x "
                 f"| {verdict(v['vs_compile'])} |")
    for k in TARGETS:
        vals = [s["targets"][k] for s in tgt]
        ok = None if not vals or None in vals else all(vals)
        L.append(f"\n{k}: {verdict(ok)} at all {len(vals)} measured shapes"
                 + ("" if len(vals) == n_shapes else f" (of {n_shapes})"))
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
    L += ["", "## AdaIN GB/s (relu + residual, (B, C) weights)", "", f"Copy bandwidth {f(bw.get('copy_gbps'))} GB/s; "
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
                L.append(f"| {shape} | {mode} | {f(g['triton'] and g['triton']['ms'], '.3f')} | "
                         + " | ".join([f(g["triton"] and g["triton"]["gbps"]), f(s.get("frac_of_copy_bw"), ".0%"),
                                       f(g["torch"] and g["torch"]["gbps"]), f(g["compile"] and g["compile"]["gbps"]),
                                       f(s.get("vs_eager"), ".2f"), f(s.get("vs_compile"), ".2f")]) + " |")
    return L
