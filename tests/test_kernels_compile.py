"""The compile gate (issue 14): every launch `kernels.adain` and `kernels.reflect_pad` make, compiled
for sm_90 and sm_80 on the CPU by `kernels/aot.py`, must compile with no register spill and no
stack frame.

The interpreter tests cannot see register pressure; ptxas can. The gate needs the JIT kernels,
not the interpreter's, so it runs in a subprocess with TRITON_INTERPRET=0 (conftest sets 1).
The CI set (`kernels.aot_cases.cases("ci")`, 112 compilations: 86 adain, 26 reflect_pad) takes
~35-40 s on 2 cores from a cold Triton cache (85 s beside two busy processes), ~12 s warm;
`python -m kernels.aot --full` is the bench sweep (1647 adain + 264 reflect_pad compilations,
~20 minutes cold; bench/results/compile_sm90.md, written before reflect_pad).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import aot, aot_cases

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("sm_90", "sm_80")

_reason = aot.unsupported()
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"compile gate: {_reason}")


def _run(args, *, code=None, timeout=900):
    """python -m kernels.aot ARGS (or python -c CODE) without the interpreter; -> CompletedProcess."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "kernels.aot", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ci(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "ci.json"
    proc = _run(["--json", str(out)])
    if proc.returncode not in (0, 1) or not out.exists():  # 1: the gate ran and found violations
        pytest.fail(f"python -m kernels.aot exited {proc.returncode}:\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def test_launch_set_is_the_benchmarked_funit_generator():
    """kernels/ cannot import bench/: its copy of the benchmark's batch and shapes must not drift."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import _shapes
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert (aot_cases.FUNIT_B, aot_cases.FUNIT_SHAPES) == (_shapes.FUNIT_B, tuple(map(tuple, _shapes.FUNIT_SHAPES)))
    ci = aot_cases.cases("ci")
    names = {(d, f): (dn, fn) for dn, d in aot_cases.DTYPES.items() for fn, f in aot_cases.FORMATS.items()}
    assert {(c.dtype, c.fmt) for c in ci} == {names[v] for v in _shapes.FORMATS.values()}
    assert {(aot_cases.FUNIT_B, *s) for s in aot_cases.FUNIT_SHAPES} <= {c.shape for c in ci}
    assert {c.other_fmt for c in ci if c.fmt == "cl"} == {"cl", "nchw"}            # the format mixes
    pads = {(c.shape[1:], aot_cases.PADS[c.variant]) for c in ci if c.op == "reflect_pad"}
    assert {((C, H, W), pad) for C, H, W, pad in aot_cases.PAD_SHAPES} <= pads       # FUNIT's padded convs
    assert set(aot_cases.cases("ci")) < set(aot_cases.cases("full"))


def test_every_kernel_compiled_for_both_archs(ci):
    rows = ci["rows"]
    errors = [r for r in rows if r.get("error")]
    if errors:
        pytest.fail(f"{len(errors)} launches did not compile:\n" + aot.table(errors), pytrace=False)
    assert ci["kernels"], "no Triton kernel found in kernels.instance_norm or kernels.reflect_pad"
    for arch in ARCHS:
        compiled = {r["kernel"] for r in rows if r["arch"] == arch}
        missing = sorted(set(ci["kernels"]) - compiled)
        assert not missing, f"the CI set launches no {missing} for {arch} (add a case that plans it)"
    # The CI set holds the format mixes and the INT64 specialisation of every plan kind.
    assert {r["plan"] for r in rows if r["int64"] and r["op"] == "adain"} == {"fused", "twopass", "split"}
    assert {r["direction"] for r in rows if r["int64"] and r["op"] == "reflect_pad"} == {"fwd", "bwd"}
    assert any("+dy:" in r["format"] for r in rows) and any("+res:" in r["format"] for r in rows)


def test_no_spills_and_no_stack_frame(ci):
    bad = aot.violations(ci["rows"])
    if bad:
        pytest.fail(f"{len(bad)} of {len(ci['rows'])} launches spill registers or use a stack frame "
                    f"(ptxas -v, triton {ci['triton']}; fix the plan or the kernel):\n" + aot.table(bad),
                    pytrace=False)


def test_gate_reports_a_spilling_plan():
    """The gate can fail: a forced fused plan of 65536 fp32 values (16 warps, 128 per thread) must
    show up as spill stores, spill loads and a stack frame."""
    code = (
        "import json\n"
        "from kernels import aot, aot_cases, instance_norm as K\n"
        "K.FORCE_PLAN = dict(kind='fused', block_c=1)\n"
        "case = aot_cases.Case('in_relu', (1, 1, 256, 256), 'fp32', 'nchw', 'nchw', 'fwd')\n"
        "print(json.dumps(aot.run_gate([case], archs=(90,), jobs=1)))\n")
    proc = _run(None, code=code, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert len(rows) == 1 and rows[0]["block"] == "1x65536" and not rows[0]["error"], rows
    assert aot.violations(rows) == rows, aot.table(rows)
    assert rows[0]["spill_stores"] > 0 and rows[0]["spill_loads"] > 0 and rows[0]["stack"] > 0
