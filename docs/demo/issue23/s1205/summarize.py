"""The compact tables of summary.md from ablate reports: python summarize.py REPORT_DIR ... > summary.md"""
import json
import sys

MAIN = [("swap", "swap_acc"), ("kept", "swap_kept_acc"), ("content err", "content_error"),
        ("leak class<-content", "leak_class_from_content_acc"), ("leak factors<-class R2", "leak_factors_from_class_r2"),
        ("long PSNR", "recon_long_psnr")]


def p_of(report, variant, key):
    for t in (report.get("comparison") or {}).get("tests", []):
        if t["variant"] == variant and t["metric"] == key and t.get("p") is not None:
            return " (p < 0.01)" if t["p"] < 0.01 else f" (p {t['p']:.2f})"
    return ""


def cell(report, variant, key, nd=2):
    s = report["variants"][variant]["stats"].get(key)
    if not s:
        return "n/a"
    sd = f" ± {s['std']:.{nd}f}" if s["n"] > 1 else ""
    return f"{s['mean']:.{nd}f}{sd}{p_of(report, variant, key)}"


for d in sys.argv[1:]:
    r = json.load(open(f"{d}/ablation.json"))
    print(f"\n{d}/ablation.json ({r.get('synthetic_family') or 'scheme'} family, seeds {r.get('seeds')}; "
          f"Welch p against {(r.get('comparison') or {}).get('baseline')})\n")
    print("| setting | " + " | ".join(n for n, _ in MAIN) + " |")
    print("|---|" + "---|" * len(MAIN))
    for v in r["variants"]:
        print(f"| {v} | " + " | ".join(cell(r, v, k) for _, k in MAIN) + " |")
    first = next(iter(r["variants"].values()))["metrics"]
    factors = list((first.get("content_factor_error") or {}).keys())
    print("\n| setting: mixes vs content image / vs class image; short recon vs own | " + " | ".join(factors) + " |")
    print("|---|" + "---|" * len(factors))
    for v, e in r["variants"].items():
        m = e["metrics"]
        print(f"| {v} | " + " | ".join(
            f"{cell(r, v, 'content_factor_error.' + f)} / {m['content_factor_error_to_class'][f]:.2f}; "
            f"{m['recon_short_factor_error'][f]:.2f}" for f in factors) + " |")
