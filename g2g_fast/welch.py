"""Welch's t-test of two variants' means over seeds, for `python -m g2g_fast.ablate`'s report.

t and the Welch-Satterthwaite degrees of freedom are computed here, from the summaries the report
already has (mean, sample standard deviation, n); only the two-sided p needs Student's t
distribution, from scipy (`pip install -e ".[stats]"`). Without scipy, t and df are still given and
p is None: the report then says how to get it, and nothing fails.

Welch's rather than Student's test: the variants need not have the same seed-to-seed spread (a loss
switched off can make training less stable), and Welch's test does not assume they do.
"""
from __future__ import annotations

import math

INSTALL = 'pip install -e ".[stats]"'
HINT = f"No p-values: scipy is not installed ({INSTALL})."  # the report's one line about it
IDENTICAL, EXACT = "identical values", "no spread in either variant: the difference is exact"


def t_sf():
    """scipy.stats.t.sf (the survival function of Student's t), or None without scipy."""
    try:
        from scipy.stats import t
    except ImportError:
        return None
    return t.sf


def have_scipy() -> bool:
    return t_sf() is not None


def welch(base: dict | None, other: dict | None, sf=None) -> dict:
    """Welch's t-test of other's mean against base's, from two summaries ({mean, std, n}; std the
    sample standard deviation) -> {delta (other - base), t, df, p (two-sided), note}.

    None where a number cannot be computed: p and t without 2 values on each side; p without
    scipy (`sf` None; pass `t_sf()` once for a whole table, the import is not free). When both
    sides have no spread at all (every seed gave the same number), t is undefined: identical means
    give p = 1 (nothing differs), different ones p = 0 (the difference is exact), said in the note
    (sf is not called then)."""
    if base is None or other is None:
        return {"delta": None, "t": None, "df": None, "p": None, "note": "missing in a variant"}
    delta = other["mean"] - base["mean"]
    out = {"delta": delta, "t": None, "df": None, "p": None, "note": None}
    if base["n"] < 2 or other["n"] < 2 or base["std"] is None or other["std"] is None:
        out["note"] = "needs 2 seeds per variant"
        return out
    va, vb = base["std"] ** 2 / base["n"], other["std"] ** 2 / other["n"]  # squared standard errors
    if not all(math.isfinite(x) for x in (delta, va, vb)):
        out["note"] = "not finite"
        return out
    se2 = va + vb
    denom = va ** 2 / (base["n"] - 1) + vb ** 2 / (other["n"] - 1)
    if se2 == 0 or denom == 0:  # no spread on either side (denom underflows only for a spread ~1e-154)
        same = delta == 0
        # p without sf too would mix p-values into a report that says it has none
        out.update(t=0.0 if same else None, note=IDENTICAL if same else EXACT,
                   p=None if sf is None else 1.0 if same else 0.0)
        return out
    t = delta / math.sqrt(se2)
    df = se2 ** 2 / denom  # Welch-Satterthwaite
    out.update(t=t, df=df)
    if sf is not None:
        out["p"] = min(1.0, 2.0 * float(sf(abs(t), df)))
    return out


def fmt_p(test: dict) -> str:
    """A p-value for a table cell: two digits, three below 0.01, '<0.001' below that; the
    zero-spread cases say so."""
    p = test.get("p")
    if p is None:
        return "-"
    note = test.get("note") or ""
    if note == IDENTICAL:
        return "1, identical"
    if note == EXACT:
        return "0, no spread"
    return f"{p:.2f}" if p >= 0.01 else f"{p:.3f}" if p >= 0.001 else "<0.001"
