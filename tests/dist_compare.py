"""What the distributed tests compare with: float64 as the default dtype, the largest difference
between two states, tensor digests (rank 1 saves only those: a bitwise comparison needs no more)
and the lazily loaded results of the rank processes (dist_ranks.py)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch


def max_rel(a: dict, b: dict, keys) -> float:
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in keys)


@pytest.fixture
def float64():
    """fp32 cannot compare two trainings: Adam/RMSprop turn rounding-level gradients (e.g. of a
    conv bias cancelled by the instance norm after it, exactly 0 in exact arithmetic) into
    full-size steps of random sign, and a single process fed the same pairs in another order
    drifts by 10% within 3 steps. In float64 that noise stays below the optimisers' eps, except
    for gradients that are 0 in exact arithmetic: the instance norms and AdaIN compute in fp32 even
    on float64 tensors (`adain_ref`), so those come out as fp32 rounding noise (ZeroGradientEntries)."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def worst_diff(got: dict, want: dict, prefix: str, skip: dict | None = None,
               relative: bool = False) -> tuple[float, str, int]:
    """The largest |got - want| over the tensors whose key starts with `prefix`, its key, and how
    many tensors; leaving out the entries of `skip` ({key: bool mask}: ZeroGradientEntries.masks).
    `relative`: each tensor's difference relative to its largest |want| entry (of those compared)."""
    keys = [k for k in want if k.startswith(prefix)]
    assert keys and sorted(keys) == sorted(k for k in got if k.startswith(prefix))
    skip = skip or {}
    diffs = []
    for k in keys:
        g, w = got[k].double(), want[k].double()
        if k in skip:
            g, w = g[~skip[k]], w[~skip[k]]
        d = (g - w).abs().max().item() if w.numel() else 0.0
        if relative and w.numel() and w.abs().max() > 0:
            d /= w.abs().max().item()
        diffs.append((d, k))
    diff, name = max(diffs)
    return diff, name, len(keys)


def digest(obj):
    """`obj` (nested dicts, lists, tuples, tensors, numbers) with every tensor replaced by its
    dtype, shape and a SHA-256 of its bytes: what a bitwise comparison needs, in a few bytes."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().contiguous().reshape(-1)
        return ("tensor", str(t.dtype), tuple(obj.shape), hashlib.sha256(t.view(torch.uint8).numpy()).hexdigest())
    if isinstance(obj, dict):
        return {k: digest(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(digest(v) for v in obj)
    return obj


class RankResults:
    """What `worker_equivalence` saved in `out`: `results[rank][key]` loads that rank's file for
    `key` when a test asks (nothing is kept, so a test holds one result at a time)."""

    def __init__(self, out: Path):
        self.out = out

    def __getitem__(self, rank: int):
        return _RankFiles(self.out, rank)


class _RankFiles:
    def __init__(self, out: Path, rank: int):
        self.out, self.rank = out, rank

    def __getitem__(self, key: str):
        return torch.load(self.out / f"rank{self.rank}.{key}.pt", weights_only=True)
