"""Ahead-of-time compile gate (issue 14): every launch `kernels.adain` and `kernels.reflect_pad`
make, compiled for sm_90 and sm_80 on the CPU, with ptxas's register, spill and stack-frame counts.
No GPU is needed.

The CPU tests run the kernels through the Triton interpreter, which hides register pressure:
a tile too big for the register file spills to local memory only when ptxas compiles it. This
gate compiles exactly what the JIT would on the GPU:

  record   the launchers (`adain_fwd` / `adain_bwd`, `reflect_pad_fwd` / `reflect_pad_bwd`: `OPS`)
           run on meta tensors (shapes and strides, no memory) with every Triton kernel of their
           module (any module attribute that is a JITFunction and is launched) replaced by a
           recorder of (grid, args, kwargs), with FORCE_TARGET set to the GPU (`_utils.TARGETS`),
           so the plans are that GPU's (reflect_pad's tiles are the same on every GPU);
  bind     each launch's arguments are specialised by Triton's own JIT binder
           (`create_function_from_signature`, `JITFunction._pack_args`: dtypes, divisibility by
           16, value-1 integers, constexprs), as `JITFunction.run` does before compiling;
  compile  each distinct (kernel, signature, constexprs, attrs, options) once, with
           `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` in a process pool,
           through Triton's on-disk cache; ptxas's `-v` log (TRITON_DUMP_PTXAS_LOG) is parsed and
           kept beside the cached kernel, so a warm cache still reports its counts.

Launch sets (`aot_cases.cases`): "ci" is the FUNIT generator's adain variants at its stage shapes (batch
FUNIT_B = 64 of bench/_shapes.py and FUNIT2FUNIT's training batch of 8), forward and backward, in
the two benchmarked formats (bf16 channels_last, fp32 NCHW), plus the format mixes of the sub-pixel
decoder and the INT64 specialisation of each plan kind, and reflect_pad forward and backward at
FUNIT's padded convs (batch 8, the same two formats, one INT64 case): 112 compilations (86 adain,
26 reflect_pad), ~35 s on 2 cores from a cold cache; "full" (the bench sweep) adds bf16/fp16 NCHW,
fp32/fp16 channels_last, every variant at every stage shape and the edge shapes (H = W = 1, odd
sizes, C = 63, 2048 channels, 256^2 and 512^2 planes, fp32 AdaIN parameters with bf16
activations; reflect_pad: pads 1-3 at every FUNIT shape, batch 64 and 8, odd and tiny planes).

    python -m kernels.aot [--full] [--arch 90,80] [--jobs N] [--out FILE.md] [--json FILE.json]

Exit status 1 when a launch failed to compile, spilled or has a stack frame. Runs with
TRITON_INTERPRET=0 only (the interpreter replaces the JIT kernels). Needs triton's CUDA backend
and its bundled ptxas; `unsupported()` says why not, for a skip.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Optional

import torch

from .aot_cases import Case, cases

from .aot_record import OPS, Launch, jit_functions, record  # the record stage

# --------------------------------------------------------------------------------------------
# Binding (the JIT's own specialisation) and compiling.
# --------------------------------------------------------------------------------------------
def unsupported() -> Optional[str]:
    """Why this triton cannot run the gate (a skip reason), or None."""
    try:
        import triton
        import triton.backends
        from triton.runtime import jit
    except Exception as e:  # noqa: BLE001 - any broken install
        return f"triton is not importable ({type(e).__name__}: {e})"
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        return f"triton {triton.__version__} has no CUDA backend (triton.backends lacks 'nvidia')"
    missing = [n for n, ok in (("triton.runtime.jit.create_function_from_signature",
                                hasattr(jit, "create_function_from_signature")),
                               ("JITFunction._pack_args", hasattr(jit.JITFunction, "_pack_args")))
               if not ok]
    if missing:
        return (f"triton {triton.__version__} lacks the JIT internals the gate binds with "
                f"({', '.join(missing)}; present in 3.6-3.9)")
    try:
        from triton import knobs
    except ImportError:
        return f"triton {triton.__version__} has no triton.knobs (the gate needs triton >= 3.6)"
    try:
        for name in ("ptxas", "ptxas_blackwell"):   # sm_80's; sm_90's in triton >= 3.6
            if hasattr(knobs.nvidia, name) and not os.path.exists(getattr(knobs.nvidia, name).path):
                return f"no {name} at {getattr(knobs.nvidia, name).path}"
    except Exception as e:  # noqa: BLE001 - no ptxas found anywhere
        return f"no ptxas ({type(e).__name__}: {e})"
    return None


def default_jobs() -> int:
    """The CPUs this process may use (the CI machines have 2)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_BACKENDS: dict = {}
_BINDERS: dict = {}


def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    if arch not in _BACKENDS:
        target = GPUTarget("cuda", arch, 32)
        _BACKENDS[arch] = (target, make_backend(target))
    return _BACKENDS[arch]


def bind(launch: Launch):
    """-> (signature, constexprs, attrs, options): what `JITFunction.run` hands to the compiler."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature
    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    _, backend = _backend(launch.arch)
    kwargs = dict(launch.kwargs)
    # The options JITFunction.run adds before binding (those this triton's options have).
    fields = backend.parse_options({}).__dict__
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if name in fields and hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    if (fn, launch.arch) not in _BINDERS:
        _BINDERS[fn, launch.arch] = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = _BINDERS[fn, launch.arch](*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return signature, constexprs, attrs, options


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_LOG = "ptxas-v.log"   # kept beside each cached kernel


def _compile(job) -> dict:
    """Compile one specialisation (in a pool worker); -> ptxas counts, or an error."""
    module, name, arch, signature, constexprs, attrs, options = job
    import triton
    from triton import knobs
    from triton.compiler import ASTSource
    from triton.runtime.cache import get_cache_manager
    fn = getattr(importlib.import_module(module), name)
    target, _ = _backend(arch)
    t0 = time.perf_counter()
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    try:
        knobs.nvidia.dump_ptxas_log = True   # ptxas -v output, printed to stdout
        for _ in range(2):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
            log, cache, cached = buf.getvalue(), get_cache_manager(k.hash), False
            if _REGS.search(log):
                cache.put(log, _LOG, binary=False)
                break
            path = cache.get_file(_LOG)   # a cache hit runs no ptxas: its log from the first time
            if path:
                with open(path) as f:
                    log, cached = f.read(), True
                break
            knobs.compilation.always_compile = True   # cached by someone else, without the log
        frames = [tuple(map(int, m)) for m in _PTXAS.findall(log)]
        regs = [int(r) for r in _REGS.findall(log)]
        if not frames or not regs:
            raise RuntimeError(f"no ptxas -v counts in the log: {log[-500:]!r}")
        return dict(registers=max(regs), stack=max(f[0] for f in frames), spill_stores=sum(f[1] for f in frames),
                    spill_loads=sum(f[2] for f in frames), shared=k.metadata.shared, warps=k.metadata.num_warps,
                    compile_s=round(time.perf_counter() - t0, 2), cached=cached, error=None)
    except Exception as e:  # noqa: BLE001 - reported per launch, the gate fails on it
        return dict(error=f"{type(e).__name__}: {str(e)[:2000]}", compile_s=round(time.perf_counter() - t0, 2))
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved


def run_gate(case_list: list[Case], archs=(90, 80), jobs: Optional[int] = None) -> dict:
    """Record, bind, dedupe and compile; -> {"rows": one per launch, "compilations": n, ...}."""
    reason = unsupported()
    if reason:
        raise RuntimeError(f"the compile gate cannot run: {reason}")
    import triton
    t0 = time.perf_counter()
    launches = [ln for arch in archs for c in case_list for ln in record(c, arch)]
    keyed, jobs_by_key = [], {}
    for ln in launches:
        sig, constexprs, attrs, options = bind(ln)
        opts = options.__dict__
        key = repr((ln.kernel, ln.arch, sorted(sig.items()), sorted(constexprs.items()),
                    sorted(attrs.items()), sorted(opts.items())))
        jobs_by_key.setdefault(key, (ln.module, ln.kernel, ln.arch, sig, constexprs, attrs, opts))
        keyed.append((ln, key))
    t_record = time.perf_counter() - t0
    keys = list(jobs_by_key)
    n = max(1, min(jobs or default_jobs(), len(keys)))
    if n == 1:
        results = [_compile(jobs_by_key[k]) for k in keys]
    else:
        import multiprocessing
        # fork: the workers inherit the imported kernel modules (nothing was compiled or run yet).
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_compile, [jobs_by_key[k] for k in keys], chunksize=1))
    by_key = dict(zip(keys, results))
    rows = []
    for ln, key in keyed:
        c = ln.case
        row = dict(kernel=ln.kernel, op=c.op, variant=c.variant, direction=c.direction,
                   shape="x".join(map(str, c.shape)), format=c.label(), dtype=c.dtype,
                   param_dtype=c.param_dtype or c.dtype, **ln.plan, int64=bool(ln.kwargs.get("INT64")),
                   num_warps=ln.kwargs.get("num_warps"), arch=f"sm_{ln.arch}",
                   compile_id=hashlib.sha1(key.encode()).hexdigest()[:12], **by_key[key])
        row["num_warps"] = row.pop("warps", None) or row["num_warps"] or 4   # compiled, else launched
        rows.append(row)
    # The launchable kernels of every op (by the `_<op>_..._kernel` naming), for the coverage check.
    names = sorted(n for module, _, _ in OPS.values() for n in jit_functions(importlib.import_module(module))
                   if n.endswith("_kernel"))
    return dict(triton=triton.__version__, kernels=names, rows=rows, launches=len(rows), compilations=len(keys),
                cached=sum(bool(r.get("cached")) for r in results),
                jobs=n, record_s=round(t_record, 1), wall_s=round(time.perf_counter() - t0, 1))


def violations(rows: list[dict]) -> list[dict]:
    """Rows that fail the gate: not compiled, any spill, or a stack frame."""
    return [r for r in rows if r.get("error") or r["spill_stores"] or r["spill_loads"] or r["stack"]]


def register_cap(warps: int) -> int:
    """Registers per thread ptxas may use at `warps` warps per program (64K per SM, 255 at most)."""
    return min(255, 65536 // (32 * warps))


def at_cap(rows: list[dict]) -> list[dict]:
    """Rows that compiled at the per-thread register cap: no spill, but no headroom either."""
    return [r for r in rows if not r.get("error") and r["registers"] >= register_cap(r["num_warps"])]


COLUMNS = ("kernel", "variant", "dir", "shape", "format", "dtype", "plan", "BLOCK_C x BLOCK_P", "warps",
           "registers", "spill st/ld (B)", "stack (B)", "shared (B)", "arch")


def table(rows: list[dict], merge: bool = True) -> str:
    """Markdown, one row per launch; `merge` joins the format mixes that compiled to the same
    kernel as their plain format (as the launchers intend) into one row, e.g. "cl, cl+dy:nchw"."""
    groups: dict = {}
    for r in rows:
        key = (r["kernel"], r["variant"], r["direction"], r["shape"], r["dtype"], r["param_dtype"], r["arch"],
               r.get("compile_id")) if merge else len(groups)
        groups.setdefault(key, []).append(r)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for group in groups.values():
        r = group[0]
        dtype = r["dtype"] + (f" (params {r['param_dtype']})" if r["param_dtype"] != r["dtype"] else "")
        plan = r["plan"] + (" int64" if r["int64"] else "")
        if r.get("error"):
            counts = ["**error**", r["error"].splitlines()[0][:80].replace("|", "/"), "", ""]
        else:
            flag = "**" if (r["spill_stores"] or r["spill_loads"] or r["stack"]) else ""
            counts = [str(r["registers"]), f"{flag}{r['spill_stores']}/{r['spill_loads']}{flag}",
                      f"{flag}{r['stack']}{flag}", str(r["shared"])]
        lines.append("| " + " | ".join([r["kernel"], r["variant"], r["direction"], r["shape"],
                                         ", ".join(g["format"] for g in group), dtype, plan,
                                         r["block"].replace("x", " x "), str(r["num_warps"]), *counts,
                                         r["arch"]]) + " |")
    return "\n".join(lines)


def report(result: dict, command: str, date: str) -> str:
    """The markdown file: header, the failing launches, those at the register cap, every launch."""
    rows, bad, cap = result["rows"], violations(result["rows"]), at_cap(result["rows"])
    archs = sorted({r["arch"] for r in rows}, reverse=True)
    out = [
        f"# Compile gate: kernels.adain and kernels.reflect_pad for {' and '.join(archs)} (ptxas -v)", "",
        f"Command: `{command}`  ",
        f"triton {result['triton']}, torch {torch.__version__}, {date}; compiled on the CPU (no GPU) by "
        "`kernels/aot.py`, exactly as Triton's JIT would on the GPU.", "",
        f"{result['launches']} launches (launcher calls x kernels x archs), {result['compilations']} distinct "
        f"compilations ({result.get('cached', 0)} of them from Triton's on-disk cache; {result['jobs']} "
        f"processes, {result['wall_s']} s). "
        + (f"**{len(bad)} launches fail the gate** (not compiled, spill or stack frame)." if bad else
           "Every launch compiled with 0 spill bytes and a 0-byte stack frame."),
        "", "A format written `cl, cl+dy:nchw` is a launch in channels_last and its format mix (a gradient or "
        "residual in the other layout), which compiled to the same kernel.",
    ]
    if bad:
        out += ["", "## Launches that fail the gate", "", table(bad)]
    if cap:
        out += ["", f"## At the register cap ({len(cap)} launches)", "",
                "No spill, but ptxas used every register a thread may have at that warp count "
                "(65536 / (32 x warps), at most 255): no headroom for a bigger tile or a compiler change.", "",
                table(cap)]
    out += ["", "## Every launch", "", table(rows), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the full sweep (fp16, every variant, edge shapes)")
    ap.add_argument("--arch", default="90,80", help="compute capabilities x 10, comma-separated (default 90,80)")
    ap.add_argument("--jobs", type=int, default=None, help="compiling processes (default: the CPUs available)")
    ap.add_argument("--out", help="write the markdown table to this file")
    ap.add_argument("--json", help="write every row as JSON to this file")
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d"), help="date written in --out's header")
    a = ap.parse_args(argv)
    from ._utils import interpreting
    if interpreting():
        ap.error("TRITON_INTERPRET=1 replaces the JIT kernels by the interpreter: run with TRITON_INTERPRET=0")
    reason = unsupported()
    if reason:
        print(f"compile gate: cannot run: {reason}", file=sys.stderr)
        return 2
    archs = tuple(int(s) for s in a.arch.split(","))
    result = run_gate(cases("full" if a.full else "ci"), archs, a.jobs)
    bad = violations(result["rows"])
    command = "python -m kernels.aot " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.out:
        with open(a.out, "w") as f:
            f.write(report(result, command.strip(), a.date))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"compile gate: {result['launches']} launches, {result['compilations']} compilations "
          f"for sm_{', sm_'.join(map(str, archs))} in {result['wall_s']} s ({result['jobs']} processes); "
          f"{len(bad)} fail (error, spill or stack frame)")
    if bad:
        print(table(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
