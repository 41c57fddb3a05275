"""gpu_report.py's first two sections, with their markdown: `environment` (what ran where) and
`peaks` (device copy bandwidth and the bf16 matmul peak: the denominators of the later sections'
fraction-of-copy-bandwidth and MFU, which read them from the report)."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

from _report_common import f

ROOT = Path(__file__).resolve().parents[1]


def _cmd(*argv: str) -> str | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=ROOT).stdout.strip() or None
    except Exception:
        return None


def environment(ctx, out: dict) -> None:
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except Exception as e:
        triton_version = f"not importable ({type(e).__name__})"
    out.update(
        date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=ctx.name, cuda_available=torch.cuda.is_available(), python=platform.python_version(),
        platform=platform.platform(), torch=torch.__version__, triton=triton_version,
        cuda_runtime=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
        TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET"), adain_impl=ctx.impl,
        git_commit=_cmd("git", "rev-parse", "--short", "HEAD"),
        git_dirty_files=len((_cmd("git", "status", "--porcelain") or "").splitlines()),
    )
    if ctx.dev.type == "cuda":
        p = torch.cuda.get_device_properties(ctx.dev)
        out.update(capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1),
                   driver=_cmd("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"))


def peaks(ctx, out: dict) -> None:
    import _shapes as S
    import _train as T
    out["copy_gbps"] = S.copy_bandwidth_gbps(ctx.dev, nbytes=2**26 if ctx.smoke else 2**30, reps=ctx.reps)
    ctx.flush()
    out.update(matmul_n=ctx.matmul_n, matmul_bf16_tflops=T.matmul_peak_tflops(ctx.dev, ctx.matmul_n, reps=ctx.reps))


def markdown(rep: dict) -> list:
    env, pk = rep.get("environment", {}), rep.get("peaks", {})
    L = ["## Environment", "", "| key | value |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in env.items()]
    L += ["", "## Device peaks", "", "| copy bandwidth (GB/s) | bf16 matmul TFLOP/s (n) |", "|---|---|",
          f"| {f(pk.get('copy_gbps'))} | {f(pk.get('matmul_bf16_tflops'))} ({pk.get('matmul_n', '-')}) |", ""]
    return L
