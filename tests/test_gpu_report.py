"""`python bench/gpu_report.py --smoke` runs end to end on the CPU (Triton interpreter) and writes
a JSON with every section and a markdown file, so the one-shot GPU run cannot die on a typo: kernel
parity, model parity (fast vs reference vs float64), the training-step tables at two batches (every
provider, the compiled ones with dynamo's eager backend) with a fake step ledger's prediction, the
launch plans at two batches, the AdaIN bandwidth table, the loaders. Each section runs in its own
process: a section that crashes, raises or hangs (G2G_REPORT_FAULT) costs only itself."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_report.py"


@pytest.fixture
def bench_modules():
    """bench/ on sys.path while a test imports its modules."""
    sys.path[:0] = [str(ROOT / "bench")]
    yield
    sys.path.remove(str(ROOT / "bench"))


def _run(tmp_path, *args, env=None, timeout=400):
    env = dict(os.environ, TRITON_INTERPRET="1", **(env or {}))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), *args],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (js,) = tmp_path.glob("gpu_report_*-smoke_*.json")
    return proc, json.loads(js.read_text()), js.with_suffix(".md").read_text()


def test_gpu_report_smoke(tmp_path):
    # A fake step ledger: one row matches fast FUNIT2FUNIT at the smoke batch 2 (fp32 on the CPU).
    ledger = tmp_path / "ledger.json"
    ledger.write_text(json.dumps({"rows": [
        {"approach": "funit2funit", "backend": "fast", "precision": "fp32", "batch": 2, "image_size": 32,
         "predicted_ms": {"h100": 5.0, "h200": 4.0}},
        {"approach": "funit2funit", "backend": "reference", "precision": "fp32", "batch": 2, "image_size": 128,
         "predicted_ms": {"h100": 1.0}}]}))  # another image size: no match
    proc, rep, md = _run(tmp_path, "--ledger", str(ledger), "--ledger-gpu", "h100")
    assert rep["errors"] == [], rep["errors"]
    assert rep["skipped"] == [], rep["skipped"]
    assert list(rep["sections"]) == ["environment", "peaks", "train_step", "model_parity", "parity", "plans",
                                     "loaders", "bandwidth", "train_step_compile"]
    assert {s["status"] for s in rep["sections"].values()} == {"ok"}, rep["sections"]

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

    pl = rep["plans"]   # every candidate plan ran (interpreter) at both batches, decisions taken from them
    assert pl["batches"] == [1, 2] and {r["batch"] for r in pl["rows"]} == {1, 2}
    for shape in {r["shape"] for r in pl["rows"]}:  # fused is a candidate at every shape plan() fuses
        plans = {r["plan"]: r for r in pl["rows"] if r["shape"] == shape}
        assert set(plans) >= {"auto", "split", "twopass", "twopass-sector", "twopass-1wave"}, shape
        assert ("fused" in plans) == (plans["auto"]["fwd_plan"][0] == "fused"), shape
    assert all("error" not in r and r["full"]["gbps"] > 0 for r in pl["rows"]), pl["rows"]
    assert {r["fwd_plan"][0] for r in pl["rows"] if r["plan"] == "split"} == {"split"}
    assert len(pl["decisions"]) == 2 * 2 * 3 and pl["verdict"] in proc.stderr

    mp = rep["model_parity"]
    assert mp["outputs"]["n"] == 6 and set(mp["outputs"]["tensors"]) == {"m1", "m2", "s1", "s2", "r1", "r2"}
    for key in ("outputs", "g_step", "d_step"):
        assert isinstance(mp[key]["ok"], bool) and mp[key]["worst_ratio"] >= 0 and not mp[key]["missing"], key
        assert all(len(t["ref_errs"]) == 2 and t["bound"] > 0 for t in mp[key]["tensors"].values()), key
    assert mp["g_step"]["n"] > 10 and mp["d_step"]["n"] > 10
    assert mp["all_pass"], {k: (mp[k]["worst"], mp[k]["failed"]) for k in ("outputs", "g_step", "d_step")}

    ts, tc = rep["train_step"], rep["train_step_compile"]
    rows = {(r["approach"], r["provider"], r["batch_size"]): r for r in ts["rows"] + tc["rows"]}
    eager = {"reference-fp32", "reference-bf16-cl", "fast", "fast-subpixel"}
    compiled = {"reference-bf16-cl-compile", "fast-compile"}
    assert set(rows) == {("funit2funit", p, b) for p in eager | compiled for b in (2, 4)} | \
        {(a, p, b) for a in ("naive", "cyclefunit") for p in ("reference-fp32", "fast") for b in (2, 4)}
    assert {r["provider"] for r in tc["rows"]} == compiled
    for r in rows.values():
        assert "error" not in r and r["img_per_s"] > 0 and r["flops"] > 0 and r["mfu"] > 0, r
        assert r["losses_finite"] and r["vs_reference_fp32"] > 0 and "G" in r["phase_ms"], r
        assert r["describe"]["provider"] == r["provider"], r
    assert "compiled" in rows["funit2funit", "reference-bf16-cl-compile", 2]["describe"]
    assert rows["funit2funit", "reference-fp32", 2]["describe"]["tf32"] is False
    # Compiling G changes no math, so the FLOP count (taken eagerly) is the bf16 reference's.
    for b in (2, 4):
        eager_flops = rows["funit2funit", "reference-bf16-cl", b]["flops"]
        assert rows["funit2funit", "reference-bf16-cl-compile", b]["flops"] == eager_flops
    assert rows["funit2funit", "fast", 4]["flops"] > rows["funit2funit", "fast", 2]["flops"]
    # The compile section's summary covers both sections' rows, per approach and batch.
    f2f = [s for s in tc["summary"] if s["approach"] == "funit2funit"]
    assert [s["batch_size"] for s in f2f] == [2, 4]
    for s in f2f:
        assert set(s["targets"]) == {"vs_reference_fp32", "vs_best_stock", "peak_memory_ratio", "mfu"}
        assert s["stock_complete"] and s["subpixel_vs_fast"] > 0 and s["compile_vs_fast"] > 0
    assert "compiled" in rows["funit2funit", "fast-compile", 4]["describe"]
    for b in (2, 4):
        prof = rows["funit2funit", "fast", b]["profile"]
        assert "error" not in prof and prof["ms_per_step"] > 0 and len(prof["top"]) >= 5, prof
        assert abs(sum(prof["by_category"].values()) - 1) < 1e-6 and "convolution / GEMM" in prof["by_category"]
        assert any(t["name"].startswith("aten::conv") for t in prof["top"])
    # CUDA graphs need a GPU: the row is skipped on the CPU, with a note saying so.
    assert any("fast-cudagraph: skipped, CUDA graphs need a CUDA device" in n for n in rep["meta"]["notes"])
    assert rows["funit2funit", "fast-subpixel", 2]["describe"]["decoder_upsample"] == "subpixel"

    # Predicted next to measured: the fake ledger's row for fast b2; "no prediction" elsewhere.
    pred = rows["funit2funit", "fast", 2]["predicted"]
    assert pred["predicted_ms"] == 5.0 and pred["gpu"] == "h100"
    assert pred["measured_over_predicted"] == pytest.approx(pred["measured_ms"] / 5.0)
    assert abs(pred["measured_ms"] - 1e3 * rows["funit2funit", "fast", 2]["s_per_step"]) < 1e-9
    assert "predicted (roofline lower bound) 5.00 ms, measured" in proc.stderr
    for key in (("funit2funit", "fast", 4), ("funit2funit", "reference-fp32", 2), ("naive", "fast", 2)):
        assert "predicted_ms" not in rows[key]["predicted"] and "no prediction" in rows[key]["predicted"]["note"], key

    for heading in ("## Sections", "## Targets: training step", "## Targets: AdaIN", "## Model parity",
                    "## Kernel parity", "## Training step throughput", "## Where the time goes",
                    "## Launch plans compared", "## Loaders"):
        assert heading in md, heading
    assert "| batch 2 | batch 4 |" in md and "| 5.00 |" in md and "| train_step_compile | ok |" in md
    assert proc.stdout.strip().startswith("# g2g-fast GPU report")

    ld = rep["loaders"]
    measured = {r["loader"] for r in ld["rows"] if r.get("img_per_s", 0) > 0}
    assert measured == {"torch", "gpu-cache"} | ({"dali"} if not any(r.get("skipped") for r in ld["rows"]) else set())
    assert ld["auto"] == "torch" and ld["train"]["fed_img_per_s"] > 0 and ld["train"]["synthetic_img_per_s"] > 0
    cache = next(r for r in ld["rows"] if r["loader"] == "gpu-cache")["parity_vs_torch"]
    assert cache["labels_equal"] and cache["max_level_diff"] == 0  # bit for bit
    assert set(ld["verdicts"]) == {"loader_vs_trainer", "fed_vs_synthetic"}


def test_a_faulty_section_costs_only_itself(tmp_path):
    """peaks raises, train_step's process aborts after its first saved row (as after a CUDA
    fault), model_parity hangs past its 6 s budget: each is recorded (error / error / timeout,
    with the last lines of its output) and the sections around them still report."""
    faults = "peaks:raise,train_step:crash@flush,model_parity:hang"
    proc, rep, md = _run(tmp_path, "--sections", "environment,peaks,train_step,model_parity,loaders",
                         "--section-budget", "model_parity=6", env={"G2G_REPORT_FAULT": faults})
    st = rep["sections"]
    assert {k: v["status"] for k, v in st.items()} == {
        "environment": "ok", "peaks": "error", "train_step": "error", "model_parity": "timeout", "loaders": "ok",
        "parity": "skipped", "plans": "skipped", "bandwidth": "skipped", "train_step_compile": "skipped"}
    assert "injected fault" in st["peaks"]["message"] and "injected fault" in st["peaks"]["stderr_tail"]
    assert "SIGABRT" in st["train_step"]["message"] and "partial results kept" in st["train_step"]["message"]
    assert len(rep["train_step"]["rows"]) == 1 and rep["train_step"]["rows"][0]["img_per_s"] > 0  # saved before
    assert st["model_parity"]["seconds"] < 6 + 5 and "budget of 6 s" in st["model_parity"]["message"]
    assert "injected fault (G2G_REPORT_FAULT): hang" in st["model_parity"]["stderr_tail"]
    assert rep["environment"]["torch"] and rep["loaders"]["train"]["synthetic_img_per_s"] > 0
    assert {e["where"] for e in rep["errors"]} == {"peaks", "section train_step", "section model_parity"}
    assert "section parity: not in --sections" in rep["skipped"]
    for line in ("| peaks | error |", "| train_step | error |", "| model_parity | timeout |", "| loaders | ok |",
                 "Last lines of train_step's output (error):"):
        assert line in md, line


def test_ledger_matching(tmp_path, bench_modules):
    import _report_ledger as LG
    assert LG.gpu_key("NVIDIA H200") == "h200" and LG.gpu_key("NVIDIA H100 80GB HBM3") == "h100"
    assert LG.gpu_key("NVIDIA A100-SXM4-80GB") is None and LG.gpu_key(None) is None
    ledger, why = LG.load(tmp_path / "missing.json")
    assert ledger is None and why.startswith("no prediction")
    (tmp_path / "bad.json").write_text("{")
    assert LG.load(tmp_path / "bad.json")[0] is None
    row = dict(approach="funit2funit", backend="fast", precision="bf16", batch=8, image_size=128,
               predicted_ms={"h100": 10.0, "h200": 8.0})
    ledger = {"rows": [row]}
    key = dict(approach="funit2funit", backend="fast", precision="bf16", batch=8, image_size=128)
    p = LG.compare(LG.predict(ledger, "h200", **key), 12.0)
    assert p["predicted_ms"] == 8.0 and p["measured_over_predicted"] == 1.5
    assert LG.line(p) == "predicted (roofline lower bound) 8.00 ms, measured 12.00 ms, measured/predicted 1.50"
    assert "predicted_ms" not in LG.predict(ledger, "h200", **dict(key, batch=64))
    assert "predicted_ms" not in LG.predict(ledger, None, **key)
    assert LG.line(LG.predict(None, "h100", **key, why_not="no prediction (x)")) == "no prediction (x)"


def test_plan_candidates_ignore_and_restore_a_forced_plan(bench_modules):
    """A plan forced by the previous candidate (or anyone) neither hides the fused candidate nor
    survives the candidate that forced it."""
    import torch

    import _report_kernels as K
    from kernels import instance_norm as KI
    from kernels._utils import target_of
    x = torch.zeros(2, 8, 16, 16).contiguous(memory_format=torch.channels_last).bfloat16()
    target = target_of(x.device)
    saved = KI.FORCE_PLAN
    try:
        KI.FORCE_PLAN = dict(kind="twopass")
        assert "fused" in K._plan_candidates(x, target) and KI.FORCE_PLAN == dict(kind="twopass")
        KI.FORCE_PLAN = None
        with pytest.raises(RuntimeError):
            with K._forced(dict(kind="split")):
                assert KI.plan(x, target, 2).kind == "split"
                raise RuntimeError
        assert KI.FORCE_PLAN is None
    finally:
        KI.FORCE_PLAN = saved


def test_three_way_rule_takes_the_larger_reference_error(bench_modules):
    import torch

    import _report_parity as P
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1000, generator=g, dtype=torch.float64)
    noise = lambda s: t + s * torch.randn(1000, generator=g, dtype=torch.float64)  # noqa: E731
    ref32, ref32cl = noise(1e-5), noise(3e-5)
    assert P.three_way(noise(5e-5), [ref32, ref32cl], t, 1.0)["ok"]          # within 2x the channels_last run
    assert not P.three_way(noise(5e-5), [ref32, ref32], t, 1.0)["ok"]       # beyond 2x the NCHW run alone
    assert not P.three_way(noise(1e-3), [ref32, ref32cl], t, 1.0)["ok"]     # a real error
    assert P.three_way(t + 1e-7, [t, t], t, 1.0)["ok"]                      # exact references: the floor
    res = P.judge({"a.weight": noise(1e-5)}, [{"a.weight": ref32, "b": ref32}, {"a.weight": ref32cl, "b": ref32}],
                  {"a.weight": t, "b": t})
    assert not res["ok"] and res["missing"] == ["b"] and res["n"] == 1


def test_graph_check_compares_a_step_with_an_eager_twin(bench_modules):
    """`_train.check_graph` (run on a GPU for the fast-cudagraph row) on the CPU, with an eager run
    in place of the captured one: the twin gets the run's state, so both steps agree exactly; a
    perturbed run (its D weights moved) is caught."""
    import torch

    import _train as T
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
