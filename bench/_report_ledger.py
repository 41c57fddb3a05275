"""Predicted training-step times (bench/results/step_ledger.json, written by bench/step_ledger.py)
beside the measured ones in gpu_report.py's train-step table.

The ledger's rows: {"approach": "funit2funit", "backend": "fast" | "reference", "precision":
"bf16" | "fp32", "batch": 8, "image_size": 128, "predicted_ms": {"h100": ms, "h200": ms}, ...}, a
roofline lower bound of one iteration per GPU. A measured row is matched by (approach, backend,
precision, batch, and image_size where the ledger row gives one); its GPU key comes from the
device name ("H200" -> h200, "H100" -> h100, else none). A missing file, row or key is "no
prediction", never an error.
"""
from __future__ import annotations

import json
from pathlib import Path

GPU_KEYS = (("H200", "h200"), ("H100", "h100"))  # first match wins: an H200's name has no "H100"
NO_PREDICTION = "no prediction"


def load(path) -> tuple[dict | None, str]:
    """(ledger, why-not): the parsed file, or None and the reason."""
    p = Path(path)
    if not p.is_file():
        return None, f"{NO_PREDICTION} ({p.name} not found)"
    try:
        ledger = json.loads(p.read_text())
        if not isinstance(ledger.get("rows"), list):
            raise ValueError('no "rows" list')
        return ledger, ""
    except Exception as e:  # a ledger being rewritten, or of another format: say so, go on
        return None, f"{NO_PREDICTION} ({p.name} unreadable: {type(e).__name__}: {e})"


def gpu_key(device_name: str | None) -> str | None:
    name = (device_name or "").upper()
    return next((key for part, key in GPU_KEYS if part in name), None)


def predict(ledger: dict | None, gpu: str | None, *, approach: str, backend: str, precision: str,
            batch: int, image_size: int | None = None, why_not: str = "") -> dict:
    """{"predicted_ms", "gpu", "ledger_row"} for the matching row, else {"note": "no prediction ..."}."""
    if ledger is None:
        return {"note": why_not or NO_PREDICTION}
    if gpu is None:
        return {"note": f"{NO_PREDICTION} (no ledger GPU key for this device)"}
    for r in ledger["rows"]:
        if not isinstance(r, dict):
            continue
        if (r.get("approach"), r.get("backend"), r.get("precision"), r.get("batch")) != \
                (approach, backend, precision, batch):
            continue
        if image_size is not None and r.get("image_size", image_size) != image_size:
            continue
        ms = (r.get("predicted_ms") or {}).get(gpu)
        if isinstance(ms, (int, float)) and ms > 0:
            return {"predicted_ms": float(ms), "gpu": gpu, "ledger_row": f"{approach} {backend} {precision} b{batch}"}
    return {"note": f"{NO_PREDICTION} (no {gpu} row for {approach} {backend} {precision} batch {batch})"}


def compare(pred: dict, measured_ms: float | None) -> dict:
    """pred + measured_ms and measured_over_predicted (when both are known)."""
    out = dict(pred, measured_ms=measured_ms)
    if "predicted_ms" in pred and measured_ms:
        out["measured_over_predicted"] = measured_ms / pred["predicted_ms"]
    return out


def line(p: dict | None) -> str:
    """'predicted (roofline lower bound) X ms, measured Y ms, measured/predicted Z', or the note."""
    if not p or "predicted_ms" not in p:
        return (p or {}).get("note", NO_PREDICTION)
    ratio = p.get("measured_over_predicted")
    measured = "-" if p.get("measured_ms") is None else f"{p['measured_ms']:.2f}"
    return (f"predicted (roofline lower bound) {p['predicted_ms']:.2f} ms, measured {measured} ms, "
            f"measured/predicted {'-' if ratio is None else f'{ratio:.2f}'}")
