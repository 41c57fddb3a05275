"""g2g-fast: G2G cross-training disentanglement, fast and checked against a plain-PyTorch reference.

`g2g_fast.reference` is the executable specification (fp32, plain PyTorch); everything fast is
tested against it.
"""

__version__ = "0.1.0"
