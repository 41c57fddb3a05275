"""One gpu_report.py section in its own process: the run-wide settings (`Ctx`), fault injection,
and the entry point `main` (`gpu_report.py --child NAME ...`, started by the parent).

The child reads the report so far (`<child-dir>/report_in.json`: the peaks, for instance, are
the MFU and copy-bandwidth denominators of later sections), runs the section function
`fn(ctx, out)` and writes `<child-dir>/<NAME>.json` = {"out", "errors", "skipped", "notes"}
atomically, at every `ctx.flush()` (sections call it after each row) and at the end, so a crash or
a kill keeps what was done. It leaves with os._exit(0) after the final write: a CUDA context torn
down after a fault, or a worker thread that never joins, cannot then turn a finished section
into a hang or a crash.

Fault injection (CPU tests of the isolation): G2G_REPORT_FAULT="<section>:<mode>[@flush][,...]",
mode crash (os.abort(), as a CUDA fault kills a process), hang (sleeps far past the section's
budget) or raise (a RuntimeError inside the section); at the section's start, or with "@flush"
at its first flush, after the partial result is written.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

FAULT_ENV = "G2G_REPORT_FAULT"
FAULT_MODES = ("crash", "hang", "raise")
# Batches of the train-step and plans sections: FUNIT2FUNIT's training default (its config's
# batch_size, which the gpu preset keeps), where plan() picks split for the big layers, and the
# benchmarks' 64. --smoke: tiny ones (the interpreter pays per program).
GPU_BATCHES = (8, 64)
SMOKE_STEP_BATCHES, SMOKE_PLAN_BATCHES = (2, 4), (1, 2)


def parse_faults(spec: str | None) -> dict:
    """{section: (mode, when)} from G2G_REPORT_FAULT; ValueError on a malformed entry."""
    faults = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        name, _, mode = item.partition(":")
        mode, _, when = mode.partition("@")
        if not name or mode not in FAULT_MODES or when not in ("", "flush"):
            raise ValueError(f"{FAULT_ENV}: bad entry {item!r}; want <section>:<{'|'.join(FAULT_MODES)}>[@flush]")
        faults[name] = (mode, when or "start")
    return faults


def fire(mode: str, budget_s: float) -> None:
    print(f"[gpu_report] injected fault ({FAULT_ENV}): {mode}", file=sys.stderr, flush=True)
    if mode == "crash":
        os.abort()
    if mode == "hang":
        time.sleep(budget_s + 3600)
    raise RuntimeError(f"injected fault ({FAULT_ENV}: {mode})")


class Ctx:
    """Run-wide settings derived from the command line and the machine, for one section."""

    def __init__(self, args, report: dict, section: str, result_path: Path):
        import torch

        import _shapes as S
        self.smoke, self.section, self.result_path = args.smoke, section, result_path
        self.t0, self.budget = args.child_start, args.child_budget_s  # wall clock: the launch counts
        self.dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        self.name = torch.cuda.get_device_name(self.dev) if self.dev.type == "cuda" else "cpu"
        self.B, self.shapes = (S.SMOKE_B, S.SMOKE_SHAPES) if args.smoke else (S.FUNIT_B, S.FUNIT_SHAPES)
        self.plan_batches, self.step_batches = (SMOKE_PLAN_BATCHES, SMOKE_STEP_BATCHES) if args.smoke else \
            (GPU_BATCHES, GPU_BATCHES)
        self.warmup, self.reps = (1, 2) if args.smoke else (3, 20)
        self.scale, self.step_reps = ("smoke", 1) if args.smoke else ("gpu", 5)
        self.matmul_n = 256 if args.smoke else 8192
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        self.impl = "triton" if (self.dev.type == "cuda" or interp) else "ref"
        self.compile_backend = "aot_eager" if args.smoke else "inductor"
        # The compiled training-step providers in --smoke: dynamo capture only (aot_eager adds ~10 s).
        self.step_compile_backend = "eager" if args.smoke else "inductor"
        # The fast networks' kernels (the generator's fused norms, the pads) in model_parity,
        # train_step and loaders: "auto" on a GPU, the reference ops on the CPU (T.force_impl).
        self.model_impl = "ref" if self.dev.type == "cpu" else None
        self.ledger_path, self.ledger_gpu = args.ledger, args.ledger_gpu
        self.report = report
        self.out: dict = {}
        report[section] = self.out
        self.notes: list[str] = []
        self.errors: list[dict] = []
        self.skipped: list[str] = []
        self.fault = parse_faults(os.environ.get(FAULT_ENV)).get(section)

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def skip(self, what: str, need_s: float) -> bool:
        """True (and a note) when fewer than need_s seconds of the section's budget are left."""
        if self.left() >= need_s:
            return False
        self.skipped.append(f"{what}: {self.left():.0f} s of the section's budget left, needs ~{need_s:.0f} s")
        return True

    def error(self, where: str, e: BaseException) -> str:
        msg = f"{type(e).__name__}: {e}"
        self.errors.append({"where": where, "error": msg, "trace": traceback.format_exc(limit=4)})
        return msg

    def flush(self) -> None:
        """Write the section's result so far (a crash, kill or budget cut later keeps it)."""
        data = {"out": self.out, "errors": self.errors, "skipped": self.skipped, "notes": self.notes}
        tmp = self.result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, self.result_path)
        if self.fault and self.fault[1] == "flush":
            mode, self.fault = self.fault[0], None
            fire(mode, self.budget)

    def free(self) -> None:
        import gc

        import torch
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()


def main(args, target: str) -> None:
    """Run section args.child (`target`: "module:function") and exit."""
    if args.smoke:  # on a shared CPU: torch threads follow other processes' load (g2g_fast/cpu_threads.py)
        from g2g_fast import cpu_threads
        print(f"[gpu_report] {args.child}: {cpu_threads.setup()}", file=sys.stderr, flush=True)
    folder = Path(args.child_dir)
    report = json.loads((folder / "report_in.json").read_text())
    ctx = Ctx(args, report, args.child, folder / f"{args.child}.json")
    try:
        if ctx.fault and ctx.fault[1] == "start":
            fire(ctx.fault[0], ctx.budget)
        module, func = target.split(":")
        getattr(importlib.import_module(module), func)(ctx, ctx.out)
    except Exception as e:
        ctx.out["error"] = ctx.error(args.child, e)
    ctx.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
