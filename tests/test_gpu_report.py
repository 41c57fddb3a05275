"""`python bench/gpu_report.py --smoke` runs end to end on the CPU (Triton interpreter) and writes
a JSON with every section and a markdown file, so the one-shot GPU run cannot die on a typo."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_report_smoke(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_report.py"), "--smoke", "--out", str(tmp_path)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (js,) = tmp_path.glob("gpu_report_*-smoke_*.json")
    assert js.with_suffix(".md").is_file()
    rep = json.loads(js.read_text())
    assert rep["errors"] == [], rep["errors"]
    assert rep["skipped"] == [], rep["skipped"]

    env_ = rep["environment"]
    assert env_["torch"] and env_["device"] == "cpu" and env_["adain_impl"] == "triton"
    assert rep["peaks"]["copy_gbps"] > 0 and rep["peaks"]["matmul_bf16_tflops"] > 0

    par = rep["parity"]
    assert len(par["rows"]) == 2 * 2 * 3  # smoke shapes x formats x variants
    assert all(isinstance(r["ok"], bool) and r["layout_kept"] for r in par["rows"])
    assert par["all_pass"], [r for r in par["rows"] if not r["ok"]]

    bw = rep["bandwidth"]
    got = {(r["provider"], r["format"], r["shape"], r["mode"]) for r in bw["rows"] if r.get("gbps", 0) > 0}
    assert len(got) == 3 * 2 * 2 * 3  # providers x formats x shapes x modes, all measured
    targets = [s for s in bw["summary"] if "targets" in s]
    assert len(targets) == 2
    assert all(set(s["targets"]) == {"frac_of_copy_bw", "vs_eager", "vs_compile"} for s in targets)

    (step,) = rep["train_step"]["rows"]
    assert step["img_per_s"] > 0
    md = js.with_suffix(".md").read_text()
    assert "## Targets" in md and "## Kernel parity" in md and proc.stdout.strip().startswith("# g2g-fast GPU report")
