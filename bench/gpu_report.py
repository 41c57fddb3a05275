#!/usr/bin/env python
"""One command, one GPU, under eight minutes: what g2g-fast's kernels do on this device.

    python bench/gpu_report.py [--out bench/results] [--budget-s 420] [--sections a,b] [--smoke]

Every section runs in its own Python process (bench/_report_proc.py) with its own wall-clock
budget; on timeout its whole process group is killed. A CUDA fault (illegal address, launch
failure: it poisons the process) or a hang then costs that section only: the report records its
status (ok; error, with the last lines of its output; timeout), keeps whatever rows it had saved
(sections save after each row), and goes on. This process never touches the GPU (it imports the
section modules only to render markdown); it merges each section's JSON into the report and
rewrites <out>/gpu_report_<gpu-slug>_<YYYY-MM-DD>.json and .md after every section (the markdown
is also printed at the end). On SIGTERM (an outer `timeout`) or Ctrl-C it kills the running
section's process group, saves what it has and exits with 130.

Sections, in the order of the value of their decisions, with their budgets (seconds of a
--budget-s 420 run; another --budget-s scales them; --section-budget NAME=S sets one). A section
starts only with its minimum left (else it is skipped with a note); time a section does not use
goes to the last one:
  environment  15  GPU, driver, CUDA, cuDNN, torch, triton, git commit, date
  peaks        20  device copy bandwidth (1 GiB y.copy_(x), bytes = 2 x size) and bf16 matmul
                   TFLOP/s (8192^3, 2*n^3 FLOPs): the denominators of the fraction of copy
                   bandwidth and of MFU, passed on to the later sections
  train_step  160  one training iteration (D step + G step + EMA) per eager provider
                   (bench/_train.py) at batch 8 (FUNIT2FUNIT's training default, where plan()
                   picks split for the big layers) and 64, 128^2, 119 classes: FUNIT2FUNIT with
                   reference-fp32 (TF32 off), reference-bf16-cl, fast, fast-subpixel (the decoder's
                   upsampling by kernels.upsample_conv), fast-cudagraph (the whole iteration
                   replayed from a CUDA graph); naive and CycleFUNIT with reference-fp32 and fast.
                   A FLOP-counted eager iteration, warm-up, then 5 timed iterations (CUDA events,
                   median): img/s, FLOPs, MFU, peak memory (reset before every row), mean D / G /
                   EMA times, speedups vs reference-fp32 and vs the best stock (PyTorch-only)
                   provider; issue 5's targets per batch: fast >= 3x reference-fp32, >= 1.5x the
                   best stock variant, peak memory <= 0.6x reference-fp32, MFU >= 35%. Beside each
                   measured step time, the predicted one from bench/results/step_ledger.json
                   (bench/step_ledger.py; --ledger): "predicted (roofline lower bound) X ms,
                   measured Y ms, measured/predicted Z", or "no prediction" (bench/_report_ledger.py).
                   Where the time goes: fast FUNIT2FUNIT's iteration under torch.profiler at each
                   batch: the top 20 CUDA kernels by self time and the shares of convolution/GEMM,
                   the fused norms, elementwise, reductions, copies and the optimiser.
  model_parity 50  FUNIT2FUNIT at 128^2, batch 8: the fast backend (fp32) against the fp32
                   reference, and the reference in float64 as the truth, from identical weights
                   and optimiser states, TF32 off. Per tensor (every G2G output; every G gradient
                   after one g_step; every D gradient after one d_step), on the L2 norm:
                   ||fast - ref64|| <= 2 max(||ref32 - ref64||, ||ref32cl - ref64||)
                   + 1e-6 * layer scale * sqrt(numel), ref32 / ref32cl: the reference in fp32,
                   NCHW and channels_last (other convolution algorithms) (bench/_report_parity.py):
                   bounds relative to what the reference itself costs in fp32, not flat ones
                   that a correct build with other cuDNN algorithms can fail.
  parity       35  kernels.adain(impl="triton") against g2g_fast.reference.ops.adain_ref upcast to
                   fp32, forward and every gradient, at the four FUNIT shapes (B=64), fp32 NCHW and
                   bf16 channels_last, for act none / relu / relu+residual with (B, C) weights.
                   fp32: allclose(rtol=1e-4, atol=1e-4). bf16: the three-way rule
                   max|fast - ref32| <= 2 * max|ref_bf16 - ref32| + 1e-2. Where act is ReLU, the
                   upstream gradient is zeroed where the fp32 pre-activation is within 1e-3 of the
                   kink: there a one-ulp difference legitimately flips the derivative.
  plans        50  the Triton launch plans of kernels/instance_norm.py measured against each other
                   per batch (8 and 64), FUNIT layer and mode (bf16 channels_last, the epilogue
                   below): plan()'s default, split, two-pass (default, full-sector rows, 1 and 2
                   programs per SM), fused where plan() would fuse; prints a DECISION line: keep
                   the defaults, or which candidate beats them by > 3% where.
  loaders      30  img/s of each --loader (torch, gpu-cache, dali) at 128^2 from 2048 generated
                   JPEGs, batch 64; the fast FUNIT2FUNIT trainer on a fixed on-device batch vs fed
                   by the loader --loader auto picks; issue 6's targets: loader >= 3x the trainer's
                   img/s, fed training >= 95% of fixed-batch img/s (bench/_loaders.py).
  bandwidth    60  GB/s of fwd, bwd and fwd+bwd of the AdaIN ResBlock epilogue (relu, residual,
                   (B, C) weights) for triton / torch eager / torch.compile(reference), both
                   formats, B=64, from the byte ledger in bench/_shapes.py; median of CUDA-event
                   timings after warm-up, L2 flushed before each rep; fraction of copy bandwidth;
                   speedups; targets (bf16 channels_last fwd+bwd: >= 80% of copy bandwidth, >= 3x
                   eager, >= 1.3x torch.compile). Its inductor compiles are slow: last but one.
  train_step_compile  the rest (at least 100)  the torch.compile providers of the training step
                   (reference-bf16-cl-compile, fast-compile: the generator's three methods), batch
                   8 then 64, adopted only if they beat fast; the slowest of all to set up.
The sum is 420 s; with the processes' start-up (~5 s each on a GPU machine) the run ends within
about 7.5 minutes, inside `timeout 540` on the lent device machine.

Fault injection, for the CPU test of the isolation: G2G_REPORT_FAULT=<section>:crash (the section's
process dies by os.abort(), as after a CUDA fault), :hang (it sleeps far past its budget) or
:raise (an exception inside the section), optionally @flush (at its first save, after some
results), comma-separated for several sections (bench/_report_child.py).

--smoke: tiny shapes, few reps, runs on the CPU so CI can prove the script works. The "triton"
provider uses impl="triton" only under TRITON_INTERPRET=1 (else impl="ref", noted), and
torch.compile uses backend="aot_eager" (inductor's CPU codegen takes ~30 s per shape).
model_parity and train_step run the smallest configurations (bench/_train.py SMOKE_VALUES;
train_step at batches 2 and 4, plans at 1 and 2), one timed iteration each, and force the fast
generator's norms to impl="ref" (the interpreter would take minutes per step; the parity section
covers the Triton path); the compiled training-step providers use backend="eager" (dynamo's
capture of the generator's methods, without codegen).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # this checkout's packages, not an installed copy

import _report_child as child  # noqa: E402  (standard library only at import)
import _report_proc as proc  # noqa: E402

REFERENCE_BUDGET_S = 420.0
# name, "module:function" run in the section's process, budget (seconds of a --budget-s 420 run;
# None: what the sections before it left), minimum to start (seconds, scaled alike).
SECTIONS = (
    ("environment", "_report_env:environment", 15, 5),
    ("peaks", "_report_env:peaks", 20, 10),
    ("train_step", "_report_model:train_step", 160, 30),
    ("model_parity", "_report_parity:model_parity", 50, 20),
    ("parity", "_report_kernels:parity", 35, 15),
    ("plans", "_report_kernels:plans", 50, 20),
    ("loaders", "_loaders:report_section", 30, 20),
    # 60: its torch.compile cells need 25 s each of what is left (an inductor compile)
    ("bandwidth", "_report_kernels:bandwidth", 60, 20),
    # 100: a compiled row needs 90 s of the section's budget after the stop margin (10 s)
    ("train_step_compile", "_report_model:train_step_compile", None, 100),
)
NAMES = [s[0] for s in SECTIONS]
LEDGER = ROOT / "bench" / "results" / "step_ledger.json"


def _allot(name: str, cap, min_s: float, left: float, scale: float, overrides: dict) -> tuple[float, float]:
    """(seconds the section may run, seconds it needs to start)."""
    cap = overrides.get(name, None if cap is None else cap * scale)
    allot = left if cap is None else min(cap, left)
    return allot, min_s * scale if cap is None else min(min_s * scale, cap)


def _merge(rep: dict, name: str, res: dict, result: Path, allot: float) -> dict:
    """The section's result into the report; its status (ok / error / timeout) with the reason."""
    data = {}
    if result.is_file():
        try:
            data = json.loads(result.read_text())
        except ValueError:
            data = {}
    out = rep[name] = data.get("out", {})
    for key in ("errors", "skipped"):
        rep[key] += data.get(key, [])
    rep["meta"]["notes"] += [n for n in data.get("notes", []) if n not in rep["meta"]["notes"]]
    rc = res["rc"]
    if res["timed_out"]:
        status, msg = "timeout", res.get("message") or f"killed after its budget of {allot:.0f} s"
    elif rc != 0:
        status, msg = "error", f"its process died ({proc.describe_rc(rc)})"
    elif not data:
        status, msg = "error", "its process wrote no result"
    else:
        status, msg = ("error", out["error"]) if "error" in out else ("ok", None)
    sec = dict(status=status, seconds=res["seconds"], budget_s=round(allot, 1), rc=rc)
    if data.get("errors") and status == "ok":
        sec["note"] = f"{len(data['errors'])} error(s) in its rows (below)"
    if status != "ok":
        sec.update(message=msg + ("; partial results kept" if out and "error" not in out else ""),
                   stderr_tail=res["tail"])
        if "error" not in out or rc != 0 or res["timed_out"]:  # a caught error is in `errors` already
            rep["errors"].append({"where": f"section {name}", "error": sec["message"], "trace": res["tail"]})
    return sec


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _device_name(rep: dict, smoke: bool) -> str:
    name = rep.get("environment", {}).get("device")
    if not name and not smoke:
        try:
            name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=10).stdout.strip().splitlines()[0]
        except Exception:
            name = None
    return name or ("cpu" if smoke else "unknown-gpu")


def _safe(render, *args) -> list:
    """A renderer's lines, or one line saying why it failed (a bad section never costs the file)."""
    try:
        return render(*args)
    except Exception as e:
        return ["", f"(could not render this part: {type(e).__name__}: {e})", ""]


def markdown(rep: dict, name: str, smoke: bool) -> str:
    L = [f"# g2g-fast GPU report: {name}, {rep.get('environment', {}).get('date_utc', '')}", ""]
    L += [f"> {n}" for n in rep["meta"]["notes"]] + [""]
    L += ["## Sections", "", "| section | status | seconds | budget s | note |", "|---|---|---|---|---|"]
    for sec, st in rep["sections"].items():
        note = (st.get("message") or st.get("note") or "").replace("\n", " ").replace("|", "\\|")
        L.append(f"| {sec} | {st['status']} | {st.get('seconds', '-')} | {st.get('budget_s', '-')} | {note} |")
    L.append("")
    try:
        import _loaders as LD
        import _report_env as E
        import _report_kernels as K
        import _report_model as M
        import _report_parity as MP
        import _shapes as S
        from _report_common import f
    except Exception:
        L += ["(the section renderers do not import: the JSON has every number)", "```", traceback.format_exc(), "```"]
    else:
        steps = M.merged(rep)
        L += _safe(E.markdown, rep) + _safe(M.targets_markdown, steps) + _safe(MP.markdown, rep.get("model_parity", {}))
        if rep.get("parity") or rep.get("bandwidth"):
            L += _safe(K.markdown, rep, len(S.SMOKE_SHAPES if smoke else S.FUNIT_SHAPES))
        L += _safe(K.plans_markdown, rep.get("plans", {})) + _safe(M.step_markdown, steps)
        L += _safe(M.profile_markdown, steps)
        if rep.get("loaders"):
            L += _safe(LD.report_markdown, rep["loaders"], f)
    L += ["", "## Skipped and errors", ""] + [f"- skipped: {s}" for s in rep["skipped"]]
    L += [f"- error in {e['where']}: {e['error']}" for e in rep["errors"]] or ["- none"]
    for sec, st in rep["sections"].items():
        if st.get("stderr_tail"):
            L += ["", f"Last lines of {sec}'s output ({st['status']}):", "", "```", st["stderr_tail"], "```"]
    L.append(f"\nSection seconds: {rep['section_seconds']}; budget {rep['meta']['budget_s']:.0f} s.")
    return "\n".join(L) + "\n"


def write(rep: dict, path: Path, name: str, smoke: bool) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(rep, indent=1, default=str))
    md = markdown(rep, name, smoke)
    path.with_suffix(".md").write_text(md)
    return md


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="output folder")
    ap.add_argument("--budget-s", type=float, default=REFERENCE_BUDGET_S,
                    help="global time budget in seconds (the section budgets scale with it)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (CI)")
    ap.add_argument("--sections", default=",".join(NAMES), help="comma-separated subset of sections (default: all)")
    ap.add_argument("--section-budget", action="append", default=[], metavar="NAME=S",
                    help="one section's budget in seconds (repeatable)")
    ap.add_argument("--ledger", default=str(LEDGER), help="predicted step times (bench/step_ledger.py's JSON)")
    ap.add_argument("--ledger-gpu", choices=("h100", "h200"),
                    help="the ledger's GPU key (default: by the device's name)")
    for hidden, kind in (("--child", str), ("--child-dir", str), ("--child-budget-s", float), ("--child-start", float)):
        ap.add_argument(hidden, type=kind, help=argparse.SUPPRESS)  # a section's own process
    return ap


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    targets = {n: t for n, t, _, _ in SECTIONS}
    if args.child:
        return child.main(args, targets[args.child])
    wanted = set(args.sections.split(","))
    try:
        faults = child.parse_faults(os.environ.get(child.FAULT_ENV))
    except ValueError as e:
        ap.error(str(e))
    try:
        overrides = {k: float(v) for k, v in (s.split("=", 1) for s in args.section_budget)}
    except ValueError:
        ap.error(f"--section-budget wants NAME=SECONDS, got {args.section_budget}")
    unknown = (wanted | set(overrides) | set(faults)) - set(NAMES)
    if unknown:
        ap.error(f"unknown section(s) {sorted(unknown)}; choose from {NAMES}")
    notes = []
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        notes.append('no GPU and TRITON_INTERPRET!=1: provider "triton" runs impl="ref"')
    if args.smoke:
        notes.append("--smoke: tiny shapes, CPU, few reps; numbers are not meaningful; torch.compile uses "
                     'backend="aot_eager" (train_step: "eager"); model_parity and train_step: tiniest configs, '
                     'fast generator with impl="ref"')
    rep = {"meta": {"smoke": args.smoke, "budget_s": args.budget_s, "notes": notes,
                    "argv": sys.argv[1:] if argv is None else list(argv)},
           "sections": {}, "skipped": [], "errors": [], "section_seconds": {}}
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    t0, scale, path, name, interrupted = time.monotonic(), args.budget_s / REFERENCE_BUDGET_S, None, None, False
    signal.signal(signal.SIGTERM, _interrupt)
    passthrough = ["--ledger", args.ledger] + (["--smoke"] if args.smoke else []) + \
        (["--ledger-gpu", args.ledger_gpu] if args.ledger_gpu else [])
    with tempfile.TemporaryDirectory(prefix="gpu_report_") as tmp:
        for sec, _, cap, min_s in SECTIONS:
            left = args.budget_s - (time.monotonic() - t0)
            allot, need = _allot(sec, cap, min_s, left, scale, overrides)
            if sec not in wanted or allot < max(need, 1.0):
                why = ("not in --sections" if sec not in wanted else
                       f"{allot:.0f} s of budget for it, needs {need:.0f} s")
                rep["sections"][sec] = {"status": "skipped", "note": why}
                rep["skipped"].append(f"section {sec}: {why}")
            else:
                (Path(tmp) / "report_in.json").write_text(json.dumps(rep, default=str))
                margin = min(10.0, 0.1 * allot)  # the section's own cuts come before the kill
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", sec, "--child-dir", tmp,
                       "--child-budget-s", f"{allot - margin:.1f}", "--child-start", f"{time.time():.3f}"] + passthrough
                t = time.monotonic()
                try:
                    res = proc.run_section(cmd, allot)
                except KeyboardInterrupt:  # SIGTERM (an outer timeout) or Ctrl-C: save what there is, stop
                    res = dict(rc=None, timed_out=True, seconds=round(time.monotonic() - t, 1), tail="",
                               message="the run was interrupted (an outer timeout or Ctrl-C) during this section")
                    interrupted = True
                st = rep["sections"][sec] = _merge(rep, sec, res, Path(tmp) / f"{sec}.json", allot)
                rep["section_seconds"][sec] = res["seconds"]
                print(f"[gpu_report] {sec}: {st['status']} in {res['seconds']} s (budget {allot:.0f} s; "
                      f"{args.budget_s - (time.monotonic() - t0):.0f} s of the run's budget left)"
                      + (f": {st['message']}" if st["status"] != "ok" else ""), file=sys.stderr, flush=True)
                if sec == "environment" and not args.smoke and rep["environment"].get("cuda_available") is False:
                    print("gpu_report: no CUDA GPU; the full report needs one (use --smoke to test the script)",
                          file=sys.stderr)
                    return 2
            if path is None:  # named after the device the environment section saw
                name = _device_name(rep, args.smoke)
                slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ("-smoke" if args.smoke else "")
                path = Path(args.out) / f"gpu_report_{slug}_{date}"
            md = write(rep, path, name, args.smoke)
            if interrupted:
                print(f"[gpu_report] interrupted; wrote {path}.json and .md", file=sys.stderr)
                return 130
    print(md)
    print(f"[gpu_report] wrote {path}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
