"""64-bit offsets in the instance norm / AdaIN kernels (issue 14, part 3).

The kernels compute element offsets (`b * sxb + c * sxc + p * sxp`) in int32 unless the launcher
sets the INT64 constexpr, which it does by size (`kernels._utils.needs_int64`). A real tensor past
2^31 elements is far too slow for the interpreter, so the end-to-end tests read a (3, C, H, W)
*view* whose batch stride is 2^30 + 64: sample 2 starts at element 2^31 + 128 of its storage, so
`2 * sxb` wraps in int32. The storage is ~8 GiB of bf16 but only the touched pages are ever
committed (torch.empty does not write it; the views hold a few KiB), so the test costs < 1 s and
a few MB. The view sits 2^31 - 128 elements into its storage, so the wrapped int32 address of
sample 2 is the storage's first element: without INT64 the kernel reads the wrong (but valid)
memory instead of faulting, and the test shows a silent wrong result. In the interpreter the
offsets are numpy int32 arrays, which wrap exactly as the GPU's `mul.lo.s32` does.
"""
import pytest
import torch

from g2g_fast.reference.ops import adain_ref
from kernels import instance_norm as K
from kernels._utils import INT32_MAX, check_interpreter_loops, max_offset, needs_int64
from utils import LOWP_ATOL, assert_three_way

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, C, H, W = 3, 4, 8, 9
S = 2**30 + 64                  # batch stride: 2 * S = 2^31 + 128 overflows int32
OFFSET = 2**31 - 128            # storage offset: the int32-wrapped start of sample 2 is element 0
PATHS = {"fused": None, "looped": dict(kind="split", block_p=16, splits=1),   # plan() forced
         "split": dict(kind="split", block_p=16, splits=3), "twopass": dict(kind="twopass", block_p=16, programs=2)}


@pytest.fixture(scope="module")
def huge_view():
    """(x, x_compact): x a (B, C, H, W) bf16 view with batch stride S; x_compact its dense copy."""
    n = OFFSET + (B - 1) * S + C * H * W
    try:
        storage = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    except (RuntimeError, MemoryError) as e:  # no overcommit (CPU) or too little memory (GPU)
        pytest.skip(f"cannot reserve {2 * n / 2**30:.1f} GiB of address space: {e}")
    g = torch.Generator().manual_seed(0)
    x = storage.as_strided((B, C, H, W), (S, H * W, W, 1), OFFSET)
    x.copy_((torch.randn(B, C, H, W, generator=g) * 2.5 + 1.5).to(DEVICE, torch.bfloat16))
    storage[: C * H * W].fill_(7.0)   # what a wrapped read of sample 2 would see instead
    yield x, x.contiguous()
    del x, storage


def skip_if_loops_unsupported():
    """Skip (with the fix in the reason) where the interpreter cannot run looped kernels."""
    try:
        check_interpreter_loops()
    except RuntimeError as e:
        pytest.skip(str(e))


def _inputs():
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(B, C, generator=g) * 0.5 + 1.0).to(DEVICE, torch.bfloat16)
    b = (torch.randn(B, C, generator=g) * 0.5 + 0.2).to(DEVICE, torch.bfloat16)
    r = torch.randn(B, C, H, W, generator=g).to(DEVICE, torch.bfloat16)
    dy = torch.randn(B, C, H, W, generator=g).to(DEVICE, torch.bfloat16)
    return w, b, r, dy


def _fwd_bwd(x, w, b, r, dy):
    y, mean, rstd = K.adain_fwd(x, w, b, r, "lrelu", 0.2, 1e-5)
    dx, dw, db = K.adain_bwd(dy, x, w, b, mean, rstd, "lrelu", 0.2)
    return y, dx, dw, db


def test_needs_int64_by_size():
    """The launcher's decision on meta tensors (no memory): the largest offset any argument can
    reach, sum((size - 1) * |stride|), against int32. FUNIT shapes keep the int32 kernels."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    assert not needs_int64(torch.empty(64, 64, 128, 128, **meta), None)          # FUNIT stage 1
    assert not needs_int64(torch.empty(2047, 64, 128, 128, **meta))             # 2^31 - 2^20
    assert needs_int64(torch.empty(2049, 64, 128, 128, **meta))                 # past 2^31
    assert needs_int64(torch.empty(513, 64, 256, 256, **meta).to(memory_format=torch.channels_last))
    assert max_offset(torch.empty(2048, 64, 128, 128, **meta)) == INT32_MAX     # exactly 2^31 elements
    assert needs_int64(torch.empty(2048, 64, 128, 128, **meta))                 # the boundary counts
    small = torch.empty(2, 3, 4, 4, **meta)
    assert needs_int64(small, small.as_strided((2, 3), (S * 2, 1)))             # any argument counts
    assert not needs_int64(small[:1].expand(2**30, 3, 4, 4))                      # stride 0 reaches nothing
    assert max_offset(torch.empty(0, 3, **meta)) == 0


@pytest.mark.parametrize("path", list(PATHS))
def test_int64_offsets_huge_batch_stride(path, huge_view, monkeypatch):
    """A view whose offsets pass 2^31: forward and every gradient equal the same launch on the
    dense copy (bitwise) and the fp32 reference (three-way rule)."""
    if path != "fused":
        skip_if_loops_unsupported()
    monkeypatch.setattr(K, "FORCE_PLAN", PATHS[path])
    x, xc = huge_view
    assert max_offset(x) > INT32_MAX and K._int64(x) and not K._int64(xc)
    w, b, r, dy = _inputs()
    got = _fwd_bwd(x, w, b, r, dy)
    want = _fwd_bwd(xc, w, b, r, dy)
    for name, g, e in zip(("y", "dx", "dw", "db"), got, want):
        assert torch.equal(g, e), f"{path}: {name} differs from the dense copy's"
    # ...and the dense result is the reference's (fp32 truth, bf16 reference for the slack).
    y32 = adain_ref(xc.float(), w.float(), b.float(), act="lrelu", slope=0.2, residual=r.float())
    ylp = adain_ref(xc, w, b, act="lrelu", slope=0.2, residual=r, upcast=False)
    assert_three_way(got[0], y32, ylp, LOWP_ATOL[torch.bfloat16], "y")


@pytest.mark.parametrize("path", ["fused", "split", "twopass"])
def test_int32_offsets_would_be_wrong(path, huge_view, monkeypatch):
    """The case above with INT64 forced off reads sample 2 from the wrapped address (the storage's
    first element): proof that the test catches the int32 bug, here and on a GPU."""
    if path != "fused":
        skip_if_loops_unsupported()
    monkeypatch.setattr(K, "FORCE_PLAN", PATHS[path])
    monkeypatch.setattr(K, "FORCE_INT64", False)
    x, xc = huge_view
    w, b, r, dy = _inputs()
    y = _fwd_bwd(x, w, b, r, dy)[0]
    y_dense = _fwd_bwd(xc, w, b, r, dy)[0]
    assert torch.equal(y[:2], y_dense[:2])          # samples 0 and 1: offsets < 2^31
    assert not torch.equal(y[2], y_dense[2])        # sample 2: wrapped, silently wrong
    # What it read is the storage's first C*H*W elements (the 7.0 block), bitwise.
    x_wrapped = xc.clone()
    x_wrapped[2] = 7.0
    assert torch.equal(y[2], _fwd_bwd(x_wrapped, w, b, r, dy)[0][2])
