"""bench/step_ledger.py (issue 22): one FUNIT2FUNIT iteration per backend traced under fake
tensors; per-op FLOPs and bytes, the kernels' ledgers for the fused ops, roofline bounds, and a
JSON the GPU report's train-step section reads. Tiny widths here; the committed ledger is at the
paper's (bench/results/step_ledger.md)."""
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import _report_ledger  # noqa: E402
import step_ledger as L  # noqa: E402

ARCH = dict(nf=8, nf_mlp=16, latent_dim=8, dis_nf=8, dis_n_res_blks=4)


def _results(batch=4, size=32):
    return {(b, p, batch): L.trace(b, p, batch, size, ARCH) for b, p in L.BACKENDS}


def test_ledger_counts_the_step_and_the_gpu_report_reads_it(tmp_path):
    results = _results()
    ref, fast = results["reference", "fp32", 4], results["fast", "bf16", 4]
    # The same convolutions (same FLOPs), the fast path's norms and pads as its own ops.
    assert ref.totals()["flops"] == fast.totals()["flops"] > 0
    assert "reflection_pad2d" in ref.rows and "reflection_pad2d" not in fast.rows
    for op in ("adain_fwd", "adain_bwd", "reflect_pad_fwd", "reflect_pad_bwd"):
        assert fast.rows[f"g2g_kernels::{op}"]["calls"] > 0, op
    assert sum(fast.plans.values()) == fast.rows["g2g_kernels::adain_fwd"]["calls"] + \
        fast.rows["g2g_kernels::adain_bwd"]["calls"]
    # A pad after a fused norm is fusable (the generator's); the image's and D's are not.
    pad = fast.rows["g2g_kernels::reflect_pad_fwd"]
    assert 0 < pad["fusable"] < pad["read"] + pad["written"]
    t = fast.totals()
    assert t["membound_minimum"]["h100"] <= t["membound_bytes"]["h100"]
    assert t["time"]["h200"] < t["time"]["h100"]   # same peaks, more bandwidth

    md, data = L.report(results, 32, 1.0)
    assert "| fast bf16 | 4 |" in md and "predicted speed-up" in md
    path = tmp_path / "step_ledger.json"
    path.write_text(json.dumps(data))
    ledger, why = _report_ledger.load(path)
    assert ledger is not None, why
    got = _report_ledger.predict(ledger, _report_ledger.gpu_key("NVIDIA H200"), approach="funit2funit",
                                 backend="fast", precision="bf16", batch=4, image_size=32)
    assert got["predicted_ms"] == next(r for r in data["rows"] if r["backend"] == "fast")["predicted_ms"]["h200"]


def test_adain_bytes_follow_the_kernel_ledger():
    n = 1000
    assert L.adain_bytes("fused", n, backward=False, residual=False) == 2 * n
    assert L.adain_bytes("twopass", n, backward=False, residual=True) == 3 * n
    assert L.adain_bytes("split", n, backward=False, residual=False) == 3 * n
    assert L.adain_bytes("fused", n, backward=True, residual=False) == 3 * n
    assert L.adain_bytes("split", n, backward=True, residual=False) == 5 * n


@pytest.mark.parametrize("argv, message", [
    (["--batches", "3"], "error: --batches: every batch must be even and >= 2, got 3"),
    (["--batches", "x"], "error: --batches: expected comma-separated integers, got 'x'"),
    (["--image-size", "100"], "error: --image-size 100, batch 8: image_size 100 must be divisible by 2**n_downs"),
])
def test_command_rejects_bad_input_in_one_line_before_tracing(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        L.main([*argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(message), err
    assert not list(tmp_path.iterdir())
