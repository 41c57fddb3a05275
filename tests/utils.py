"""Tolerance helpers shared by the parity tests."""
import torch

# fp32 kernels vs the fp32 reference: same math, different summation order.
FP32_TOL = dict(rtol=1e-4, atol=1e-5)
# Low precision: the three-way rule's absolute slack per dtype.
LOWP_ATOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def describe_mismatch(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> str:
    err = (got.float() - want.float()).abs()
    bad = err > bound
    idx = tuple(int(i) for i in torch.nonzero(bad)[0]) if bad.any() else None
    return (f"{int(bad.sum())}/{err.numel()} elements out of tolerance; max error {err.max().item():.3g} "
            f"at {tuple(int(i) for i in torch.nonzero(err == err.max())[0])}; first bad index {idx}")


def assert_close(got, want, rtol, atol, name=""):
    got, want = got.float(), want.float()
    bound = atol + rtol * want.abs()
    assert ((got - want).abs() <= bound).all(), f"{name}: " + describe_mismatch(got, want, bound)


def assert_three_way(fast, ref32, ref_lowp, atol, name=""):
    """max|fast - ref32| <= 2 * max|ref_lowp - ref32| + atol (flash-attention's rule)."""
    fast, ref32, ref_lowp = fast.float(), ref32.float(), ref_lowp.float()
    allowed = 2 * (ref_lowp - ref32).abs().max() + atol
    assert (fast - ref32).abs().max() <= allowed, \
        f"{name}: allowed {allowed.item():.3g}; " + describe_mismatch(fast, ref32, allowed)
