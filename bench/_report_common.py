"""Number formatting shared by the gpu_report.py section modules."""


def f(v, fmt=".1f", none="-"):
    """`v` formatted, or `none` when it was not measured."""
    return none if v is None else format(v, fmt)


def verdict(ok):
    return "n/a" if ok is None else ("met" if ok else "missed")
