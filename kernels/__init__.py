"""Fused Triton kernels for g2g-fast (leaf package: depends on torch and triton only).

The fused instance-norm / AdaIN kernel (`kernels.adain`) is tracked by issue 4; its plain-PyTorch
twin, which defines the semantics, is `g2g_fast.reference.ops.adain_ref`.
"""
