#!/usr/bin/env python
"""The step ledger: what one training iteration moves and computes, per op, on no GPU (issue 22).

    python bench/step_ledger.py [--out bench/results] [--batches 8,64] [--image-size 128]

Traces one FUNIT2FUNIT iteration (D step with R1, G step, EMA; the paper's configuration, 119
classes) of each backend, the fp32 reference (NCHW) and the fast path (bf16 autocast,
channels_last, fused kernels), at 128 px and batch 8 (the GPU training default) and 64 (the
benchmarks'), under `FakeTensorMode`: the weights are real CPU tensors, every activation is
fake, so nothing is computed and nothing of the activations' size is allocated (~1.5 GB of RSS,
a few seconds a trace). The Triton ops run their registered fakes; their traffic is their
kernels' own ledger for the plan `kernels.instance_norm.plan` picks on an H100/H200.

Per op: calls, FLOPs (`torch.utils.flop_counter`'s registry: convolutions and matmuls,
forward, backward and R1's double backward), bytes read and written (every tensor argument
read once, every output written once: the compulsory traffic; views and metadata ops move
nothing). Per backend: the totals and the roofline lower bound of the step time on an H100 SXM
and an H200 (stated peaks below): each op takes max(FLOPs / peak, bytes / bandwidth), summed,
with the bf16 tensor-core peak for bf16/fp16 ops and the CUDA-core fp32 peak for fp32 ops (the
reference runs with TF32 off, as `bench/_train.py` measures it). Launch overhead and the CPU
are not counted: a lower bound, not a forecast. The predicted speed-up of fast over the fp32
reference is the ratio of the bounds.

The issue's goal for the fast path at 128 px: the bytes moved by its memory-bound ops (below
the ridge point FLOPs/byte = peak/bandwidth) at most 1.3x the minimum of the kernels' own
ledgers, and a predicted speed-up of at least 3x. The minimum counts each fused norm at its
fused ledger (2N forward, 3N with a residual, 3N backward: no split pass, no layout copy), a
reflect pad whose input is a fused norm's output at 0 (in the fused design the norm stores its
output straight into the padded buffer, border mirrored in the same pass), and so the fold of
such a pad's gradient when it feeds the norm's backward directly (one that is first summed with
a residual's gradient is not counted as fusable: conservative), and every other op at its own
compulsory traffic. The layout copies a norm launcher would make (`match_layout`, for an input
in the other layout) happen inside the launcher, which fakes do not run: the layout audit
(`python -m g2g_fast.audit`) shows that every tensor the fused ops are given is channels_last,
so none is made.

Writes <out>/step_ledger.md (the tables) and <out>/step_ledger.json (what
`bench/gpu_report.py`'s train-step section prints beside its measurements).
"""
from __future__ import annotations

import collections
import json
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # the fast path's Triton ops (as fakes: never run)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils.flop_counter import flop_registry  # noqa: E402

from g2g_fast.audit import NO_TRAFFIC, Tracer, build, nbytes, tensors, traffic  # noqa: E402

# Stated peaks (NVIDIA datasheets, SXM parts, dense): bf16 tensor cores, fp32 CUDA cores, HBM.
MACHINES = {
    "h100": dict(name="H100 SXM", bf16_flops=989.4e12, fp32_flops=66.9e12, bandwidth=3.35e12),
    "h200": dict(name="H200 SXM", bf16_flops=989.4e12, fp32_flops=66.9e12, bandwidth=4.8e12),
}
BACKENDS = (("reference", "fp32"), ("fast", "bf16"))
NUM_CLASSES = 119
# The pads: fusable into a fused norm whose output they read (forward) or whose backward reads theirs.
PADS = {"reflection_pad2d", "g2g_kernels::reflect_pad_fwd"}
PAD_BACKWARDS = {"reflection_pad2d_backward", "g2g_kernels::reflect_pad_bwd"}


def adain_bytes(kind: str, n_bytes: int, backward: bool, residual: bool) -> int:
    """The fused norm's DRAM traffic for a plan kind, from kernels/instance_norm.py's ledger
    (N = bytes of x; statistics are O(B*C) and left out)."""
    if backward:
        return (5 if kind == "split" else 3) * n_bytes
    return (3 if kind == "split" else 2) * n_bytes + (n_bytes if residual else 0)


class Ledger:
    """The per-op rows of one traced iteration."""

    def __init__(self):
        self.rows = collections.defaultdict(lambda: dict(
            calls=0, flops=0, read=0, written=0, lowp=0, minimum=0, fusable=0, time=collections.Counter(),
            membound=collections.Counter(), membound_min=collections.Counter()))
        self.plans = collections.Counter()
        # Fusable pads: a pad whose input is a fused norm's output (forward), or whose gradient
        # goes straight into a fused norm's backward. Tensors are held, so their ids stay unique.
        self._norm_outputs, self._pad_grads = {}, {}

    def record(self, func, args, kwargs, out):
        op = func.overloadpacket.__name__
        ns = func.namespace
        if ns not in ("aten", "g2g_kernels") or func.is_view or op in NO_TRAFFIC:
            return
        name = op if ns == "aten" else f"{ns}::{op}"
        tensors_in = tensors((args, kwargs))
        outs = tensors(out)
        read, written = traffic(func, args, kwargs, out)
        minimum = read + written
        if name in ("g2g_kernels::adain_fwd", "g2g_kernels::adain_bwd"):
            read, written, minimum = self._adain(name, args, read, written)
            if name.endswith("fwd"):
                self._norm_outputs[id(outs[0])] = outs[0]
            elif id(args[0]) in self._pad_grads:   # dy: the fold of a pad of this norm's output
                pad_name, t, moved = self._pad_grads.pop(id(args[0]))
                pad_row = self.rows[pad_name]
                pad_row["minimum"] -= moved
                pad_row["fusable"] += moved
                for key in MACHINES:   # a pad is memory-bound on every machine
                    pad_row["membound_min"][key] -= moved
        if name in PADS and id(args[0]) in self._norm_outputs:
            minimum = 0  # written by the norm's store in the fused design: no pass of its own
            self.rows[name]["fusable"] += read + written
        if name in PAD_BACKWARDS and outs:
            self._pad_grads[id(outs[0])] = (name, outs[0], read + written)
        flops = 0
        f = flop_registry.get(func.overloadpacket)
        if f is not None:
            flops = int(f(*args, **kwargs, out_val=out))
        lowp = any(t.dtype in (torch.bfloat16, torch.float16) for t in tensors_in + outs if t.is_floating_point())
        r = self.rows[name]
        r["calls"] += 1
        r["flops"] += flops
        r["read"] += read
        r["written"] += written
        r["minimum"] += minimum
        r["lowp"] += lowp
        for key, m in MACHINES.items():
            peak = m["bf16_flops"] if lowp else m["fp32_flops"]
            moved = read + written
            r["time"][key] += max(flops / peak, moved / m["bandwidth"])
            if moved and flops / moved < peak / m["bandwidth"]:  # memory-bound, call by call
                r["membound"][key] += moved
                r["membound_min"][key] += minimum

    def _adain(self, name, args, read, written):
        from kernels import instance_norm as KI
        from kernels._utils import TARGETS
        backward = name.endswith("bwd")
        x = args[1] if backward else args[0]
        residual = (not backward) and args[3] is not None
        n = nbytes(x)
        reread = x.element_size() * (2 if backward else 1)
        kind = KI.plan(x, TARGETS["h100"], reread, backward=backward).kind
        self.plans[(name.split("::")[1], kind)] += 1
        total = adain_bytes(kind, n, backward, residual)
        stats = read + written - (adain_bytes("fused", n, backward, residual))  # the O(B*C) rest
        minimum = adain_bytes("fused", n, backward, residual) + max(stats, 0)
        return total + max(stats, 0) - written, written, minimum

    def totals(self):
        t = dict(calls=0, flops=0, read=0, written=0, minimum=0, time=collections.Counter(),
                 membound_bytes=collections.Counter(), membound_minimum=collections.Counter())
        for name, r in self.rows.items():
            for k in ("calls", "flops", "read", "written", "minimum"):
                t[k] += r[k]
            t["time"].update(r["time"])
            t["membound_bytes"].update(r["membound"])
            t["membound_minimum"].update(r["membound_min"])
        return t


def trace(backend: str, precision: str, batch: int, image_size: int, arch: dict | None = None) -> Ledger:
    """One FUNIT2FUNIT iteration under FakeTensorMode; `arch`: config overrides (default none:
    the paper's widths)."""
    import logging
    logging.getLogger("g2g_fast").setLevel(logging.ERROR)
    a, x, y = build("funit2funit", backend, precision, batch, image_size, arch=arch or {}, num_classes=NUM_CLASSES)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    x = mode.from_tensor(x.contiguous(memory_format=a.backend.memory_format))
    y = mode.from_tensor(y)
    ledger = Ledger()
    with mode, Tracer(audit=False, on_op=ledger.record):
        a.train_step(x, y)
    return ledger


def _gb(b) -> str:
    return f"{b / 1e9:.2f}"


def report(results: dict, image_size: int, seconds: float) -> tuple[str, dict]:
    lines = ["# Step ledger: one FUNIT2FUNIT iteration, traced on the CPU", "",
             f"`python bench/step_ledger.py` ({seconds:.0f} s; torch {torch.__version__}). FUNIT2FUNIT at "
             f"the paper's widths, {image_size} px, {NUM_CLASSES} classes: D step with R1, G step, EMA. "
             "Traced under FakeTensorMode (no GPU, no activation memory); bytes are compulsory "
             "traffic, times roofline lower bounds with the stated peaks "
             + ", ".join(f"{m['name']}: {m['bf16_flops'] / 1e12:.0f} TFLOP/s bf16, {m['fp32_flops'] / 1e12:.1f} fp32, "
                         f"{m['bandwidth'] / 1e12:.2f} TB/s" for m in MACHINES.values())
             + ". See the script's docstring for the rules. The fast path's bf16 autocast follows the "
             "CPU's policy (a CPU-only torch cannot fake CUDA tensors); where CUDA's differs for an op "
             "of this step, so do its casts (not checked op by op). The reference runs fp32 without "
             "autocast.", ""]
    rows_json = []
    summary = ["## Totals", "",
               "| backend | batch | calls | TFLOP | GB moved | memory-bound GB | / kernel-ledger minimum | "
               "reflect pads GB | bound H100 ms | bound H200 ms | img/s bound H100 |",
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    verdicts = []
    for (backend, precision, batch), led in results.items():
        t = led.totals()
        pads = sum(led.rows[k]["read"] + led.rows[k]["written"] for k in led.rows if "pad" in k)
        fusable = sum(r["fusable"] for r in led.rows.values())
        ratio = t["membound_bytes"]["h100"] / max(t["membound_minimum"]["h100"], 1)
        summary.append(
            f"| {backend} {precision} | {batch} | {t['calls']} | {t['flops'] / 1e12:.2f} | "
            f"{_gb(t['read'] + t['written'])} | {_gb(t['membound_bytes']['h100'])} | {ratio:.2f}x | {_gb(pads)} | "
            f"{t['time']['h100'] * 1e3:.1f} | {t['time']['h200'] * 1e3:.1f} | {batch / t['time']['h100']:.0f} |")
        rows_json.append(dict(approach="funit2funit", backend=backend, precision=precision, batch=batch,
                              image_size=image_size, flops=t["flops"], bytes=t["read"] + t["written"],
                              membound_bytes=t["membound_bytes"]["h100"],
                              membound_minimum=t["membound_minimum"]["h100"], reflect_pad_bytes=pads,
                              fusable_pad_bytes=fusable,
                              predicted_ms={k: t["time"][k] * 1e3 for k in MACHINES},
                              adain_plans={f"{k[0]}:{k[1]}": v for k, v in sorted(led.plans.items())}))
    lines += summary + [""]
    lines += ["## Predicted speed-up and the issue's goals", ""]
    by = {(r["backend"], r["batch"]): r for r in rows_json}
    for batch in sorted({r["batch"] for r in rows_json}):
        ref, fast = by.get(("reference", batch)), by.get(("fast", batch))
        if not (ref and fast):
            continue
        for key, m in MACHINES.items():
            speed = ref["predicted_ms"][key] / fast["predicted_ms"][key]
            fast.setdefault("predicted_speedup", {})[key] = speed
            verdicts.append(f"- batch {batch}, {m['name']}: fast {fast['predicted_ms'][key]:.1f} ms vs reference "
                            f"fp32 {ref['predicted_ms'][key]:.1f} ms: predicted speed-up **{speed:.2f}x** "
                            f"(goal >= 3x: {'met' if speed >= 3 else 'missed'})")
        ratio = fast["membound_bytes"] / max(fast["membound_minimum"], 1)
        mb = max(fast["membound_bytes"], 1)
        verdicts.append(f"- batch {batch}: fast path's memory-bound bytes {ratio:.2f}x the kernel-ledger minimum "
                        f"(goal <= 1.3x: {'met' if ratio <= 1.3 else 'missed'}); reflect pads "
                        f"{fast['reflect_pad_bytes'] / mb:.0%} of them (pads after a fused norm, which the norm's store "
                        f"could write: {fast['fusable_pad_bytes'] / mb:.1%}; the rest are D's, after an "
                        f"activation, or on the image); norm plans "
                        + ", ".join(f"{k} {v}" for k, v in fast["adain_plans"].items()))
    lines += verdicts + [""]
    for (backend, precision, batch), led in results.items():
        lines += [f"## {backend} {precision}, batch {batch}: ops by bytes moved", "",
                  "| op | calls | GFLOP | GB read | GB written | bound H100 ms |", "|---|---:|---:|---:|---:|---:|"]
        for name, r in sorted(led.rows.items(), key=lambda kv: -(kv[1]["read"] + kv[1]["written"])):
            lines.append(f"| {name} | {r['calls']} | {r['flops'] / 1e9:.1f} | {_gb(r['read'])} | {_gb(r['written'])} | "
                         f"{r['time']['h100'] * 1e3:.2f} |")
        lines.append("")
    return "\n".join(lines), {"machines": MACHINES, "rows": rows_json,
                              "command": "python bench/step_ledger.py", "torch": torch.__version__}


def main(argv=None) -> int:
    from g2g_fast.options import OneLineErrorParser
    p = OneLineErrorParser(prog="python bench/step_ledger.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--batches", default="8,64", help="comma-separated even batch sizes (default 8,64)")
    p.add_argument("--image-size", type=int, default=128)
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches: expected comma-separated integers, got {args.batches!r}")
    if any(b < 2 or b % 2 for b in batches):
        p.error(f"--batches: every batch must be even and >= 2, got {args.batches}")
    from g2g_fast.config import config_from_dict
    for batch in batches:  # a configuration FUNIT2FUNIT rejects, before any tracing
        try:
            config_from_dict("funit2funit", dict(image_size=args.image_size, batch_size=batch)).validate()
        except ValueError as e:
            p.error(f"--image-size {args.image_size}, batch {batch}: {e}")
    t0 = time.time()
    results = {}
    for batch in batches:
        for backend, precision in BACKENDS:
            print(f"tracing {backend} {precision} batch {batch} ...", file=sys.stderr, flush=True)
            results[(backend, precision, batch)] = trace(backend, precision, batch, args.image_size)
    md, data = report(results, args.image_size, time.time() - t0)
    os.makedirs(args.out, exist_ok=True)
    for name, text in (("step_ledger.md", md), ("step_ledger.json", json.dumps(data, indent=1))):
        path = os.path.join(args.out, name)
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)
    print(md)
    print(f"wrote {os.path.join(args.out, 'step_ledger.md')} and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
