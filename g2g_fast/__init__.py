"""g2g-fast: G2G cross-training disentanglement, fast and checked against a plain-PyTorch reference.

`g2g_fast.reference` is the executable specification (fp32, plain PyTorch); everything fast is
tested against it. For inference from Python: `model = g2g_fast.load(path)` (`g2g_fast.api`); its
argument errors are `g2g_fast.InputError` (a ValueError; `InputTypeError` also a TypeError).
"""

__version__ = "0.1.0"
__all__ = ["load", "Translator", "InputError", "InputTypeError"]


def __getattr__(name):
    # Imported on first use, so `import g2g_fast` (every CLI's first step) stays free of torch.
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'g2g_fast' has no attribute {name!r}")
