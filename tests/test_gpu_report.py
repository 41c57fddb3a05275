"""`python bench/gpu_report.py --smoke` runs end to end on the CPU (Triton interpreter) and writes
a JSON with every section and a markdown file, so the one-shot GPU run cannot die on a typo: kernel
parity, model parity (fast vs reference, flags), the training-step table (every provider, the
compiled one with backend="aot_eager"), the AdaIN bandwidth table."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_report_smoke(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_report.py"), "--smoke", "--out", str(tmp_path)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
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

    pl = rep["plans"]   # every candidate plan ran (interpreter) and the decision was taken from them
    assert {r["plan"] for r in pl["rows"]} >= {"auto", "split", "twopass", "twopass-sector", "twopass-1wave"}
    assert all("error" not in r and r["full"]["gbps"] > 0 for r in pl["rows"]), pl["rows"]
    assert {r["fwd_plan"][0] for r in pl["rows"] if r["plan"] == "split"} == {"split"}
    assert len(pl["decisions"]) == 2 * 3 and pl["verdict"] in proc.stdout

    mp = rep["model_parity"]
    assert set(mp["outputs"]) == {"m1", "m2", "s1", "s2", "r1", "r2"}
    assert all(isinstance(o["ok"], bool) and o["rel_err"] >= 0 for o in mp["outputs"].values())
    for phase in ("g_step", "d_step"):
        assert isinstance(mp[phase]["ok"], bool) and mp[phase]["grad_rel_err"] >= 0 and not mp[phase]["missing_grads"]
    assert mp["all_pass"], mp  # the tiny config of tests/test_fast_parity.py passes by a wide margin

    ts = rep["train_step"]
    rows = {(r["approach"], r["provider"]): r for r in ts["rows"]}
    assert set(rows) == {("funit2funit", p) for p in ("reference-fp32", "reference-bf16-cl",
                                                      "reference-bf16-cl-compile", "fast",
                                                      "fast-subpixel", "fast-compile")} | \
        {(a, p) for a in ("naive", "cyclefunit") for p in ("reference-fp32", "fast")}
    for r in rows.values():
        assert "error" not in r and r["img_per_s"] > 0 and r["flops"] > 0 and r["mfu"] > 0, r
        assert r["losses_finite"] and r["vs_reference_fp32"] > 0 and "G" in r["phase_ms"], r
        assert r["describe"]["provider"] == r["provider"], r
    assert "compiled" in rows["funit2funit", "reference-bf16-cl-compile"]["describe"]
    assert rows["funit2funit", "reference-fp32"]["describe"]["tf32"] is False
    # Compiling G changes no math, so the FLOP count (taken eagerly) is the bf16 reference's.
    compiled, eager = rows["funit2funit", "reference-bf16-cl-compile"], rows["funit2funit", "reference-bf16-cl"]
    assert compiled["flops"] == eager["flops"]
    (f2f,) = [s for s in ts["summary"] if s["approach"] == "funit2funit"]
    assert set(f2f["targets"]) == {"vs_reference_fp32", "vs_best_stock", "peak_memory_ratio", "mfu"}
    assert f2f["stock_complete"] and f2f["subpixel_vs_fast"] > 0 and f2f["compile_vs_fast"] > 0
    assert "compiled" in rows["funit2funit", "fast-compile"]["describe"]
    prof = rows["funit2funit", "fast"]["profile"]
    assert "error" not in prof and prof["ms_per_step"] > 0 and len(prof["top"]) >= 5, prof
    assert abs(sum(prof["by_category"].values()) - 1) < 1e-6 and "convolution / GEMM" in prof["by_category"]
    assert any(t["name"].startswith("aten::conv") for t in prof["top"])
    # CUDA graphs need a GPU: the row is skipped on the CPU, with a note saying so.
    assert any("fast-cudagraph: skipped, CUDA graphs need a CUDA device" in n for n in rep["meta"]["notes"])
    assert rows["funit2funit", "fast-subpixel"]["describe"]["decoder_upsample"] == "subpixel"

    md = js.with_suffix(".md").read_text()
    for heading in ("## Targets: training step", "## Targets: AdaIN", "## Model parity", "## Kernel parity",
                    "## Training step throughput", "## Where the time goes", "## Launch plans compared"):
        assert heading in md, heading
    assert proc.stdout.strip().startswith("# g2g-fast GPU report")

    ld = rep["loaders"]
    measured = {r["loader"] for r in ld["rows"] if r.get("img_per_s", 0) > 0}
    assert measured == {"torch", "gpu-cache"} | ({"dali"} if not any(r.get("skipped") for r in ld["rows"]) else set())
    assert ld["auto"] == "torch" and ld["train"]["fed_img_per_s"] > 0 and ld["train"]["synthetic_img_per_s"] > 0
    cache = next(r for r in ld["rows"] if r["loader"] == "gpu-cache")["parity_vs_torch"]
    assert cache["labels_equal"] and cache["max_level_diff"] == 0  # bit for bit
    assert set(ld["verdicts"]) == {"loader_vs_trainer", "fed_vs_synthetic"}
    assert "## Loaders" in js.with_suffix(".md").read_text()


def test_graph_check_compares_a_step_with_an_eager_twin():
    """`_train.check_graph` (run on a GPU for the fast-cudagraph row) on the CPU, with an eager run
    in place of the captured one: the twin gets the run's state, so both steps agree exactly; a
    perturbed run (its D weights moved) is caught."""
    sys.path[:0] = [str(ROOT / "bench")]
    try:
        import _train as T
    finally:
        sys.path.remove(str(ROOT / "bench"))
    import torch
    run = T.prepare("funit2funit", "fast", "cpu", T.SMOKE_VALUES["funit2funit"], count=False, adain_impl="ref")
    check = T.check_graph(run)
    assert check["ok"] and check["max_rel_loss_diff"] == 0, check
    assert run.ap.step == 1  # the run took its step; the twin took its own
    real_step = run.step

    def perturbed_step(timer=None):
        with torch.no_grad():
            for p in run.ap.dis.parameters():
                p.mul_(1.5)
        return real_step(timer)

    run.step = perturbed_step
    check = T.check_graph(run)
    assert not check["ok"] and check["max_rel_loss_diff"] > T.GRAPH_RTOL, check
