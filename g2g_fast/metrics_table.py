"""The table `python -m g2g_fast.evaluate` prints from a metrics dict (`metrics.evaluate_model`)."""
from __future__ import annotations

from .fidelity import table_rows as fid_table_rows

ROWS = [("reconstruction (short)", "L1 / PSNR dB", "recon_short_l1", "recon_short_psnr"),
        ("reconstruction (long, two-stage)", "L1 / PSNR dB", "recon_long_l1", "recon_long_psnr"),
        ("class swap accuracy", "mixes / probe on real", "swap_acc", "probe_class_acc"),
        ("  classified as content image's class", "mixes / chance", "swap_kept_acc", "swap_chance"),
        ("content error (std units)", "mixes / probe on real", "content_error", "probe_content_error"),
        ("  the mixes' factors against the class image's", "std units (large is right)",
         "content_error_to_class", None),
        ("leakage: class from content codes", "accuracy / chance", "leak_class_from_content_acc",
         "leak_class_chance"),
        ("leakage: factors from class codes", "R^2 (0 best)", "leak_factors_from_class_r2", None)]


def fmt_value(v):
    return "n/a" if v is None else f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def format_table(metrics: dict) -> str:
    lines = ["| metric | values | value |", "|---|---|---|"]
    for name, what, a, b in ROWS:
        val = fmt_value(metrics.get(a)) + ("" if b is None else f" / {fmt_value(metrics.get(b))}")
        lines.append(f"| {name} | {what} | {val} |")
    if metrics.get("content_mae"):
        mae = ", ".join(f"{k} {v:.4f}" for k, v in metrics["content_mae"].items())
        lines.append(f"| content MAE of mixes (factor units) | per factor | {mae} |")
    if metrics.get("content_factor_error"):
        per = ", ".join(f"{k} {v:.2f} / {metrics['content_factor_error_to_class'][k]:.2f}"
                        for k, v in metrics["content_factor_error"].items())
        lines.append(f"| content error per factor (std units) | vs content image / vs class image | {per} |")
    if metrics.get("recon_short_factor_error"):  # (.get: JSON written before these keys existed)
        probe = metrics.get("probe_content_factor_error") or {}
        per = ", ".join(f"{k} {v:.2f} / {fmt_value(probe.get(k))}"
                        for k, v in metrics["recon_short_factor_error"].items())
        lines.append(f"| short reconstructions per factor (std units) | vs own image / probe on real | {per} |")
    lines += fid_table_rows(metrics)  # with --fid-weights only
    return "\n".join(lines)
