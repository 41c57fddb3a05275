"""Add runs of a missing seed to an ablate report whose other runs' folders are gone (issue 23:
the 2026-12-03 reports' runs were not kept, and seed 2 of some variants had been stopped for time).

    python docs/demo/issue23/s1205/add_seed.py OLD/ablation.json NEW_DIR VARIANT=RUN_DIR ...

Each RUN_DIR is checked against its variant (approach, steps, family, the variant's --set values)
and evaluated by `python -m g2g_fast.evaluate --checkpoint RUN_DIR/checkpoints/last.pt` with the
report's data and eval seeds, which gives the numbers `ablate` gives a row (its docstring says
so); its run entry is added, and the statistics, Welch tests and tables are recomputed by ablate's
own report code into NEW_DIR/ablation.{json,md}."""
import json
import subprocess
import sys
from pathlib import Path

from g2g_fast import ablate_report as R
from g2g_fast.ablate import ABLATED, final_losses


def check(run: Path, report: dict, entry: dict) -> dict:
    cfg = json.loads((run / "config.json").read_text())
    c, t = cfg["config"], cfg["trainer"]
    want = {"approach": entry["approach"], "steps": entry["steps"],
            "synthetic_family": report["synthetic_family"] or "scheme"}
    have = {"approach": c["approach"], "steps": t["steps"], "synthetic_family": t.get("synthetic_family", "scheme")}
    for kv in entry["set"]:
        k, v = kv.split("=", 1)
        want[k], have[k] = str(v), str(c[k]).replace(".0", "") if isinstance(c[k], float) else str(c[k])
    if want != have:
        sys.exit(f"error: {run} is not this variant: wants {want}, has {have}")
    return c


def main(argv):
    old, new, pairs = Path(argv[0]), Path(argv[1]), argv[2:]
    report = json.loads(old.read_text())
    new.mkdir(parents=True, exist_ok=True)
    for pair in pairs:
        name, run = pair.split("=", 1)
        run, entry = Path(run), report["variants"][name]
        seed = check(run, report, entry)["seed"]
        out = run / "eval_add_seed.json"
        if not out.is_file():
            subprocess.run([sys.executable, "-m", "g2g_fast.evaluate", "--checkpoint", str(run / "checkpoints" / "last.pt"),
                            "--data-seed", str(report["data_seed"]), "--seed", str(report["eval_seed"]),
                            "--samples", str(report["samples"]), "--json", str(out)], check=True)
        metrics = json.loads(out.read_text())["metrics"]
        entry["runs"][str(seed)] = {"seed": seed, "data_seed": report["data_seed"], "eval_seed": report["eval_seed"],
                                    "dir": str(run), "status": "ok", "train_s": None, "metrics": metrics,
                                    "final_losses": final_losses(run / "metrics.jsonl")}
        entry["metrics"], entry["stats"], entry["final_losses"] = R.variant_stats(entry["runs"])
        report["seeds"] = sorted({*report.get("seeds", []), seed})
    report["comparison"] = R.comparison(report, report["mode"])
    report["answer"] = R.answer(report, report["mode"], ABLATED, {v: e["off"] for v, e in report["variants"].items()})
    report["targets"] = R.targets(report)
    report["command"] += f"  [+ add_seed.py {' '.join(pairs)}]"
    report["figure"] = None  # the curves of the first report's runs only: not redrawn
    table = R.format_report(report)
    (new / "ablation.md").write_text(table + "\n")
    (new / "ablation.json").write_text(json.dumps(report, indent=2))
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
