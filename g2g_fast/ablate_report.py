"""The report of `python -m g2g_fast.ablate`: per-variant statistics over seeds, the comparison
with the baseline variant against the seed-to-seed spread (the plain-words answer) and by Welch's
t-test, the issue-23 demo targets, and the markdown table.

Spread: the sample standard deviation over a variant's seeds (n - 1 in the denominator); the JSON
also has min and max. A difference between two variants counts as larger than the seed-to-seed
spread when |mean_a - mean_b| exceeds the larger of the two standard deviations. With one seed
there is no spread, and the answer says so. The spread rule is a screen; the p-values (g2g_fast/
welch.py: Welch's t-test of each variant against the baseline, two-sided, with scipy) are the test.
"""
from __future__ import annotations

import math

from . import fidelity as FID
from . import metrics as M
from . import welch as W

COLUMNS = [("short L1", "recon_short_l1"), ("long L1", "recon_long_l1"), ("long PSNR", "recon_long_psnr"),
           ("swap acc", "swap_acc"), ("kept acc", "swap_kept_acc"), ("content err", "content_error"),
           ("leak class<-content", "leak_class_from_content_acc"),
           ("leak factors<-class R2", "leak_factors_from_class_r2")]
LOSS_COLUMNS = [("g_long", "g_long"), ("g_fm_long", "g_fm_long"), ("g_fm_mix_rec", "g_fm_mix_rec")]
# The question of issue 15: does a variant change these by more than the seed-to-seed spread?
ANSWER_METRICS = [("swap acc", "swap_acc"), ("content err", "content_error"),
                  ("leak class<-content", "leak_class_from_content_acc"),
                  ("leak factors<-class R2", "leak_factors_from_class_r2")]
# Issue 23's demo preset targets (held-out split, g2g_fast.evaluate's probes), per synthetic family
# (a dotted key is one factor of a per-factor metric), and the time budget.
TARGETS = {
    "scheme": [("swap_acc", ">=", 0.9), ("swap_kept_acc", "<=", 0.05), ("content_error", "<=", 0.35),
               ("leak_class_from_content_acc", "<=", 0.25), ("content_factor_error.background", "<=", 0.5),
               ("content_factor_error.scale", "<=", 0.5)],
    "shape": [("swap_acc", ">=", 0.8), ("swap_kept_acc", "<=", 0.05)],
}
TARGET_TRAIN_S = 600.0


def target_list(report: dict) -> list:
    """The targets of the report's data: its synthetic family's (folder data: the default family's)."""
    return TARGETS.get(report.get("synthetic_family") or "scheme", TARGETS["scheme"])


def metric_value(metrics: dict, key: str):
    """metrics[key], or for 'name.factor' metrics[name][factor]; None where absent."""
    name, _, factor = key.partition(".")
    value = metrics.get(name)
    return value.get(factor) if factor and isinstance(value, dict) else None if factor else value
# Welch's t-test of every variant against the baseline: these, and each factor of FACTOR_KEYS
P_METRICS = [("swap acc", "swap_acc"), ("kept acc", "swap_kept_acc"), ("content err", "content_error"),
             ("leak class<-content", "leak_class_from_content_acc"),
             ("leak factors<-class R2", "leak_factors_from_class_r2"), ("long PSNR", "recon_long_psnr")]
# Per-factor metrics ({factor: value}); their statistics are flat, "content_factor_error.cx". The
# factors are whatever the runs' metrics hold (the synthetic family decides), never a fixed list.
FACTOR_KEYS = ("content_factor_error", "content_factor_error_to_class")


def summarize(values: list) -> dict | None:
    """Numbers (None skipped) -> {mean, std (sample, n-1; None for n < 2), min, max, n}, or None."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not xs:
        return None
    n = len(xs)
    if min(xs) == max(xs):  # exact: a float mean of equal values can be a rounding step off (std ~1e-17)
        return {"mean": xs[0], "std": 0.0 if n > 1 else None, "min": xs[0], "max": xs[0], "n": n}
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "min": min(xs), "max": max(xs), "n": n}


def mean_of(dicts: list[dict]) -> dict:
    """The per-key mean of flat metric dicts; nested dicts (per-factor values) key by key; a key
    whose values are all None stays None; keys are the union, in order of first appearance. One
    dict gives itself back exactly."""
    if len(dicts) == 1:
        return dict(dicts[0])
    out = {}
    for k in dict.fromkeys(k for d in dicts for k in d):
        vals = [d.get(k) for d in dicts]
        if all(isinstance(v, dict) for v in vals):
            out[k] = mean_of(vals)
        else:
            s = summarize(vals)
            out[k] = None if s is None else s["mean"]
    return out


def factors_of(metrics: list[dict], key: str) -> list[str]:
    """The factors of the per-factor metric `key` in any of `metrics`, in order of first appearance."""
    return list(dict.fromkeys(f for m in metrics if isinstance(m.get(key), dict) for f in m[key]))


def variant_stats(runs: dict) -> tuple[dict, dict, dict]:
    """{seed: run entry} -> (mean metrics, {metric: summary}, mean final losses) over the finished
    runs. The summaries include each factor of FACTOR_KEYS as "<key>.<factor>"."""
    ok = [r for r in runs.values() if r["status"] == "ok" and r.get("metrics")]
    metrics = mean_of([r["metrics"] for r in ok]) if ok else None
    stats = {k: summarize([r["metrics"].get(k) for r in ok]) for k in (*M.METRIC_KEYS, *FID.SCALAR_KEYS)
             if ok and not isinstance(ok[0]["metrics"].get(k), dict)}
    for key in FACTOR_KEYS:
        for f in factors_of([r["metrics"] for r in ok], key):
            stats[f"{key}.{f}"] = summarize([(r["metrics"].get(key) or {}).get(f) for r in ok])
    losses = mean_of([r["final_losses"] for r in runs.values() if r.get("final_losses")]) \
        if any(r.get("final_losses") for r in runs.values()) else {}
    return metrics, stats, losses


def compare(report: dict, baseline: str, others: list[str], sf=None) -> list[dict]:
    """Each of `others` against `baseline` on ANSWER_METRICS -> rows {variant, metric, delta
    (other - baseline), spread, exceeds, p}; spread/exceeds/p are None without 2 seeds on both
    sides, p also without scipy (`sf`, see welch.welch)."""
    rows = []
    base = report["variants"][baseline].get("stats") or {}
    for v in others:
        st = report["variants"][v].get("stats") or {}
        for _, key in ANSWER_METRICS:
            a, b = base.get(key), st.get(key)
            if a is None or b is None:
                continue
            spread = max(a["std"], b["std"]) if a["std"] is not None and b["std"] is not None else None
            delta, test = b["mean"] - a["mean"], W.welch(a, b, sf)
            rows.append({"variant": v, "metric": key, "delta": delta, "spread": spread,
                         "exceeds": None if spread is None else abs(delta) > spread,
                         "p": test["p"], "note": test["note"]})
    return rows


def welch_tests(report: dict, baseline: str, others: list[str], sf=None) -> list[dict]:
    """Welch's t-test of each of `others` against `baseline` on P_METRICS and every per-factor
    error -> rows {variant, metric, delta, t, df, p, note} (welch.welch), for the metrics both
    variants have."""
    base = report["variants"][baseline].get("stats") or {}
    rows = []
    for v in others:
        st = report["variants"][v].get("stats") or {}
        keys = [k for _, k in P_METRICS] + [k for k in dict.fromkeys([*base, *st]) if k.split(".")[0] in FACTOR_KEYS]
        rows += [{"variant": v, "metric": k, **W.welch(base[k], st[k], sf)} for k in keys
                 if base.get(k) is not None and st.get(k) is not None]
    return rows


def _effects(rows: list[dict], variant: str) -> str:
    names = dict((k, n) for n, k in ANSWER_METRICS)
    parts = []
    for r in (r for r in rows if r["variant"] == variant):
        verdict = "under 2 seeds: no spread" if r["spread"] is None else \
            f"spread {r['spread']:.3f}: {'**exceeds**' if r['exceeds'] else 'within'}" + \
            (f", p {W.fmt_p(r)}" if r.get("p") is not None else "")
        parts.append(f"{names[r['metric']]} {r['delta']:+.3f} ({verdict})")
    return "; ".join(parts) or "no metrics"


def comparison(report: dict, mode: str) -> dict | None:
    """The baseline (the loss ablation: all_on; otherwise the first variant) against every other
    variant -> {baseline, rows (see `compare`), rule, tests (see `welch_tests`), test, p_values},
    or None with fewer than two variants. p_values: False when scipy is missing (t and df are
    still there) or no variant pair has 2 seeds on both sides."""
    names = list(report["variants"])
    base = "all_on" if mode == "losses" else names[0]
    others = [v for v in names if v != base]
    if base not in names or not others:
        return None
    sf = W.t_sf()
    tests = welch_tests(report, base, others, sf)
    return {"baseline": base, "rows": compare(report, base, others, sf),
            "rule": "|mean difference| > the larger of the two variants' sample standard deviations over seeds",
            "tests": tests, "p_values": sf is not None and any(t["p"] is not None for t in tests),
            "test": "Welch's t-test (unequal variances) of each variant's mean over seeds against the baseline's, "
                    "two-sided; t and Welch-Satterthwaite df computed by g2g_fast.welch, p from scipy.stats.t.sf"
                    + ("" if sf else f" (scipy is not installed, so no p: {W.INSTALL})")}


def answer(report: dict, mode: str, ablated: dict, variants_off: dict) -> list[str]:
    """The plain-words answer, computed from report["comparison"]: markdown lines."""
    names = list(report["variants"])
    seeds = len(report.get("seeds") or [report.get("seed")])
    cmp = report.get("comparison")
    if cmp is None:
        return ["Not answered: the comparison needs " + ("the variant all_on and at least one other."
                                                          if mode == "losses" else "at least two variants.")]
    base, rows = cmp["baseline"], cmp["rows"]
    others = [v for v in names if v != base]
    lines = []
    if seeds < 2:
        lines.append("Not answered: the seed-to-seed spread needs at least 2 seeds per variant (`--seeds N`). "
                     "The differences from a single seed:")
    beyond = sorted({r["variant"] for r in rows if r["exceeds"]}, key=names.index)
    if mode == "losses":
        question = ("Does any of G2G's three losses change swap accuracy, content error or leakage by more than "
                    "the seed-to-seed spread?")
        if seeds >= 2:
            said = []
            for v in beyond:
                what = ", ".join(dict((k, n) for n, k in ANSWER_METRICS)[r["metric"]] for r in rows
                                 if r["variant"] == v and r["exceeds"])
                off = " + ".join(ablated[k] for k in variants_off[v])
                said.append(f"removing {off} ({v}) changes {what}")
            lines.append(f"**{question}** " + (f"Yes: {'; '.join(said)}." if said else
                                                "No: every difference from all_on is within the spread."))
        for v in others:
            off = " + ".join(f"{ablated[k]} ({k})" for k in variants_off[v])
            lines.append(f"- without {off}, {v} vs all_on: {_effects(rows, v)}")
    else:
        if seeds >= 2:
            lines.append(f"**Differences from {base} beyond the seed-to-seed spread:** "
                         + (", ".join(beyond) + " (marked below)." if beyond else "none."))
        for v in others:
            lines.append(f"- {v} vs {base}: {_effects(rows, v)}")
    lines.append(f"(Difference = mean over seeds minus {base}'s; spread = the larger of the two variants' "
                 f"sample standard deviations over seeds.)")
    return lines


def targets(report: dict) -> dict:
    """Per variant: how many finished seeds meet all of the targets (`target_list`), and within
    TARGET_TRAIN_S."""
    out, goals = {}, target_list(report)
    for v, entry in report["variants"].items():
        runs = [r for r in entry["runs"].values() if r["status"] == "ok" and r.get("metrics")]
        values = [[metric_value(r["metrics"], k) for k, _, _ in goals] for r in runs]
        met = [all(x is not None and (x >= t if op == ">=" else x <= t) for x, (_, op, t) in zip(row, goals))
               for row in values]
        fast = [r.get("train_s") is not None and r["train_s"] <= TARGET_TRAIN_S for r in runs]
        out[v] = {"metrics_met": sum(met), "metrics_and_time_met": sum(m and f for m, f in zip(met, fast)),
                  "runs": len(runs)}
    return out


def _cell(stat: dict | None, value) -> str:
    if stat is None or stat["n"] < 2:
        return M.fmt_value(value)
    return f"{M.fmt_value(stat['mean'])} ± {M.fmt_value(stat['std'])}"


def _factor_cell(entry: dict, key: str, factor: str) -> str:
    value = ((entry.get("metrics") or {}).get(key) or {}).get(factor)
    if value is None:
        return "-"
    s = (entry.get("stats") or {}).get(f"{key}.{factor}")
    return f"{value:.2f} ± {s['std']:.2f}" if s is not None and s["std"] is not None else f"{value:.2f}"


def factor_table(report: dict) -> list[str]:
    """Which image each content factor of the mixes follows: per variant and factor, the error
    against the content image / against the class image (std units, mean ± std over seeds);
    markdown lines, none without synthetic factors. The factors are the union of the variants'
    (a variant without one, e.g. of another synthetic family, shows '-')."""
    rows = {v: e for v, e in report["variants"].items()
            if any(isinstance((e.get("metrics") or {}).get(k), dict) for k in FACTOR_KEYS)}
    if not rows:
        return []
    factors = list(dict.fromkeys(f for k in FACTOR_KEYS for f in factors_of([e["metrics"] for e in rows.values()], k)))
    lines = ["", "Content error per factor (std units; mean ± sample std over the seeds): the mixes against the "
                 "content image / against the class image. Small on the left is right; a factor small on the right "
                 "rides on the class code.", "", "| variant | " + " | ".join(factors) + " |",
             "|---|" + "---|" * len(factors)]
    for v, e in rows.items():
        cells = [" / ".join(_factor_cell(e, k, f) for k in FACTOR_KEYS) for f in factors]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def p_tables(report: dict) -> list[str]:
    """Welch's t-test of each variant against the baseline (comparison["tests"]): the headline
    metrics' differences with p, and p per factor; markdown lines. Without 2 seeds on both sides
    nothing; without scipy the one line that says how to get p."""
    cmp = report.get("comparison") or {}
    tests = [t for t in cmp.get("tests") or [] if t["t"] is not None or t["note"] == W.EXACT]  # >= 2 seeds each
    if not tests:
        return []
    if not cmp.get("p_values"):
        return ["", W.HINT]
    base, by = cmp["baseline"], {(t["variant"], t["metric"]): t for t in tests}
    variants = list(dict.fromkeys(t["variant"] for t in tests))
    head = [c for c, k in P_METRICS if any((v, k) in by for v in variants)]
    keys = [k for c, k in P_METRICS if c in head]
    lines = ["", f"Welch's t-test of each variant against {base} (two-sided, over the seeds, unequal variances): "
                 f"difference of means (p). With {len(report.get('seeds') or [])} seeds per variant only large "
                 f"effects reach a small p, and a large p is no evidence of no effect.", "",
             "| variant | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(f"{by[v, k]['delta']:+.3f} (p {W.fmt_p(by[v, k])})" if (v, k) in by
                                              else "-" for k in keys) + " |")
    factors = list(dict.fromkeys(t["metric"].split(".", 1)[1] for t in tests if "." in t["metric"]))
    if factors:
        def cell(v, f):
            return " / ".join(W.fmt_p(by[v, f"{k}.{f}"]) if (v, f"{k}.{f}") in by else "-" for k in FACTOR_KEYS)
        lines += ["", f"p per factor (the same test against {base}): content error against the content image / "
                      f"against the class image.", "", "| variant | " + " | ".join(factors) + " |",
                  "|---|" + "---|" * len(factors)]
        lines += [f"| {v} | " + " | ".join(cell(v, f) for f in factors) + " |" for v in variants]
    return lines


def format_report(report: dict) -> str:
    seeds = report.get("seeds") or [report["seed"]]
    multi = len(seeds) > 1
    head = ["variant", "off" if report.get("mode", "losses") == "losses" else "settings"] + \
        [c for c, _ in COLUMNS] + [c for c, _ in LOSS_COLUMNS] + ["train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, v in report["variants"].items():
        m, loss, stats = v.get("metrics") or {}, v.get("final_losses") or {}, v.get("stats") or {}
        what = ", ".join(v["off"]) if report.get("mode", "losses") == "losses" else \
            ", ".join([v["approach"]] + v.get("set", []))
        cells = [name, what or "-"]
        cells += ([_cell(stats.get(k), m.get(k)) for _, k in COLUMNS] if v["status"] == "ok" or (multi and m)
                  else [v["status"]] + ["-"] * (len(COLUMNS) - 1))
        cells += [M.fmt_value(loss.get(k)) for _, k in LOSS_COLUMNS]
        cells.append(f"{v['train_s']:.0f}" if v.get("train_s") is not None else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    ref = report.get("reference") or {}
    runs = (f"seeds {', '.join(map(str, seeds))} per variant (cells: mean ± sample standard deviation over the "
            f"seeds; min and max in ablation.json)" if multi else f"seed {seeds[0]}")
    steps = f"{report['steps']} steps" if report.get("steps") is not None else "steps as set per variant"
    lines += ["", f"{steps} per run, {runs}, {report['image_size']}x{report['image_size']}, data "
              f"{report['data']} ({report['heldout']}, {report['samples']} pairs); "
              f"EMA generators. Chance: swap and class-leak accuracy {M.fmt_value(ref.get('swap_chance'))}; "
              f"probes on real images: class accuracy {M.fmt_value(ref.get('probe_class_acc'))}, content error "
              f"{M.fmt_value(ref.get('probe_content_error'))}. Loss columns: each unweighted term's mean over the "
              f"last tenth of training (computed also when its weight is 0)"
              + (", averaged over the seeds" if multi else "") + ". train s: wall time of the "
              + ("variant's training, the first one's includes one-time start-up." if not multi else
                 "training per run (mean over the seeds); the first run's includes one-time start-up.")]
    if report.get("data_seed") is not None:
        lines += ["", f"Held-out data: data seed {report['data_seed']} for every run, whatever seed it trained with "
                      f"(the same images, pairs and probes for every row); pairs and probes seed "
                      f"{report.get('eval_seed')}. `python -m g2g_fast.evaluate --checkpoint "
                      f"<run>/checkpoints/last.pt` with the same evaluation flags (the defaults are the same) gives "
                      f"a run's numbers."]
    lines += factor_table(report)
    lines += FID.report_lines(report)  # with --fid-weights only
    lines += p_tables(report)
    if report.get("answer"):
        lines += [""] + report["answer"]
    if report.get("targets"):
        t = ", ".join(f"{v} {x['metrics_met']}/{x['runs']}" + (f" ({x['metrics_and_time_met']} within "
                                                               f"{TARGET_TRAIN_S / 60:.0f} min)")
                      for v, x in report["targets"].items())
        goals = target_list(report)
        family = report.get("synthetic_family") or "scheme"
        lines += ["", f"Issue-23 demo targets, {family} family ({', '.join(f'{k} {op} {x}' for k, op, x in goals)}; "
                      f"training within {TARGET_TRAIN_S / 60:.0f} minutes), runs meeting all {len(goals)}: {t}."]
    if report.get("figure"):
        lines += ["", f"![learning curves]({report['figure']})"]
    return "\n".join(lines)
