"""The compact tables of docs/evaluation.md's issue-23 results, from `ablate` reports.

    python docs/demo/summarize.py docs/demo/issue23/scheme/ablation.json [...]

Per variant: mean ± sample std over the seeds of the headline metrics and of the per-factor content
errors (against the content image; the class image's in the per-factor table), Welch's two-sided
p against the report's first variant (the baseline), from the report's own tests, and the short
reconstructions' per-factor errors against their own images (what a mix can keep at most).
"""
import json
import sys

HEAD = [("swap", "swap_acc"), ("kept", "swap_kept_acc"), ("content err", "content_error"),
        ("leak class<-content", "leak_class_from_content_acc"), ("leak factors<-class R2", "leak_factors_from_class_r2"),
        ("long PSNR", "recon_long_psnr")]


def cell(stats: dict, key: str, tests: dict, variant: str) -> str:
    s = stats.get(key)
    if not s or s.get("mean") is None:
        return "-"
    text = f"{s['mean']:.2f} ± {s['std']:.2f}" if s.get("std") is not None else f"{s['mean']:.2f}"
    p = tests.get((variant, key))
    if p is not None:
        text += f" (p {p:.2f})" if p >= 0.01 else " (p < 0.01)"
    return text


def main(paths):
    for path in paths:
        report = json.load(open(path))
        tests = {(t["variant"], t["metric"]): t.get("p") for t in (report.get("comparison") or {}).get("tests", [])}
        variants = report["variants"]
        print(f"\n{path} ({report.get('synthetic_family') or 'scheme'} family, seeds {report.get('seeds')})\n")
        print("| setting | " + " | ".join(h for h, _ in HEAD) + " | train s |")
        print("|---" * (len(HEAD) + 2) + "|")
        for v, e in variants.items():
            st = e.get("stats", {})
            print(f"| {v} | " + " | ".join(cell(st, k, tests, v) for _, k in HEAD) + f" | {e.get('train_s') or 0:.0f} |")
        factors = []
        for e in variants.values():
            for k in e.get("stats", {}):
                if k.startswith("content_factor_error.") and k.split(".", 1)[1] not in factors:
                    factors.append(k.split(".", 1)[1])
        print("\n| setting | " + " | ".join(factors) + " |")
        print("|---" * (len(factors) + 1) + "|")
        for v, e in variants.items():
            st = e.get("stats", {})
            row = []
            for f in factors:
                a, b = st.get(f"content_factor_error.{f}"), st.get(f"content_factor_error_to_class.{f}")
                if not a:
                    row.append("-")
                    continue
                p = tests.get((v, f"content_factor_error.{f}"))
                ptxt = "" if p is None else f" (p {p:.2f})" if p >= 0.01 else " (p < 0.01)"
                row.append(f"{a['mean']:.2f} ± {a['std'] or 0:.2f}{ptxt} / {b['mean']:.2f}" if b else f"{a['mean']:.2f}")
            print(f"| {v} | " + " | ".join(row) + " |")
        # what bounds a mix: the short reconstructions' own factors (mean over the seeds)
        print("\n| setting (short reconstructions vs their own image) | " + " | ".join(factors) + " |")
        print("|---" * (len(factors) + 1) + "|")
        for v, e in variants.items():
            runs = [r["metrics"]["recon_short_factor_error"] for r in e["runs"].values()
                    if (r.get("metrics") or {}).get("recon_short_factor_error")]
            print(f"| {v} | " + " | ".join(f"{sum(r[f] for r in runs) / len(runs):.2f}" if runs else "-"
                                            for f in factors) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
