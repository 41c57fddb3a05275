"""Fixed-recipe probes for `python -m g2g_fast.evaluate`: small, CPU-friendly and deterministic.

* `ImageProbe`: a small CNN on images downsampled to 32x32; a class classifier, or a regressor of
  the (standardised) synthetic content factors. Trained with a fixed seed for a fixed number of
  Adam steps, so the same data always gives the same probe; cached on disk per dataset identity.
* `fit_logistic` / `fit_ridge`: linear probes on (flattened, reduced) codes for the leakage metrics:
  full-batch L-BFGS logistic regression and closed-form ridge regression.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

PROBE_SIZE = 32          # probes see images at 32x32
RECIPE_VERSION = 1       # bump when the recipe below changes: invalidates cached probes
PROBE_STEPS = 300        # Adam steps, whatever the dataset size
PROBE_BATCH = 64
PROBE_LR = 2e-3


@contextlib.contextmanager
def one_thread():
    """Run the probes' small tensor ops on one CPU thread (faster on a busy machine, fixed order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "g2g_fast" / "probes"


def probe_input(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) in [-1, 1] -> (N, 3, 32, 32), antialiased (exact copy when S == 32)."""
    x = x.float()
    if x.shape[-1] == PROBE_SIZE and x.shape[-2] == PROBE_SIZE:
        return x
    return F.interpolate(x, size=(PROBE_SIZE, PROBE_SIZE), mode="bilinear", antialias=True,
                         align_corners=False)


class ImageProbe(nn.Module):
    """Three stride-2 convs (16, 32, 64 channels) -> flatten the 4x4 map (keeps position) -> MLP."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.out_dim = out_dim
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 48, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(48, 64, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, out_dim))

    def forward(self, x):
        return self.head(self.features(probe_input(x)))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
        with one_thread():
            return self._predict(x, batch)

    def _predict(self, x, batch):
        self.eval()
        p = next(self.parameters())
        return torch.cat([self(x[i:i + batch].to(p.device)).float().cpu() for i in range(0, len(x), batch)])


def train_image_probe(x: torch.Tensor, target: torch.Tensor, kind: str, seed: int = 0,
                      steps: int = PROBE_STEPS) -> ImageProbe:
    """`kind="class"`: target = int64 labels; `kind="regress"`: target = float (N, K), standardised.

    Runs on one CPU thread: for a network this small, more threads mostly add synchronisation
    (10x slower on a busy 2-core machine), and one thread fixes the summation order."""
    with one_thread():
        return _train_image_probe(x, target, kind, seed, steps)


def _train_image_probe(x, target, kind, seed, steps):
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out_dim = int(target.max()) + 1 if kind == "class" else target.shape[1]
        probe = ImageProbe(out_dim)
    x = probe_input(x)  # downsample once
    opt = torch.optim.Adam(probe.parameters(), lr=PROBE_LR)
    n, order, pos = len(x), torch.randperm(len(x), generator=gen), 0
    probe.train()
    for step in range(steps):
        if pos + PROBE_BATCH > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + PROBE_BATCH]
        pos += PROBE_BATCH
        out = probe(x[idx])
        loss = F.cross_entropy(out, target[idx]) if kind == "class" else F.smooth_l1_loss(out, target[idx], beta=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for g in opt.param_groups:  # cosine decay to 0: a stable end point
            g["lr"] = PROBE_LR * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
    return probe.eval()


def cache_key(identity: dict) -> str:
    blob = json.dumps({**identity, "recipe": RECIPE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_cached(path: Path):
    """-> (ImageProbe, extra dict) or None when absent/unreadable."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        probe = ImageProbe(int(state["out_dim"]))
        probe.load_state_dict(state["state_dict"])
    except Exception:  # a torn or foreign file: retrain
        return None
    return probe.eval(), state.get("extra", {})


def save_cached(path: Path, probe: ImageProbe, extra: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"out_dim": probe.out_dim, "state_dict": probe.state_dict(), "extra": extra}, tmp)
    os.replace(tmp, path)


# ---- linear probes on codes (leakage) ----------------------------------------------------------

CODE_DIM = 512  # codes wider than this are randomly projected (fixed seed) to this many dims


def code_features(codes: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Codes (N, ...) -> (N, D <= 512) float64 features.

    Spatial codes (N, C, H, W) are average-pooled to at most 4x4; then, if wider than 512, a fixed
    Gaussian random projection (seeded; it preserves linear separability approximately).
    """
    c = codes.detach().float().cpu()
    if c.dim() == 4 and (c.shape[-1] > 4 or c.shape[-2] > 4):
        c = F.adaptive_avg_pool2d(c, (min(4, c.shape[-2]), min(4, c.shape[-1])))
    c = c.flatten(1).double()
    if c.shape[1] > CODE_DIM:
        g = torch.Generator().manual_seed(seed + 7919)
        proj = torch.randn(c.shape[1], CODE_DIM, generator=g, dtype=torch.float64) / math.sqrt(CODE_DIM)
        c = c @ proj
    return c


class Standardizer:
    def __init__(self, x: torch.Tensor):
        self.mean, self.std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-8)

    def __call__(self, x):
        return (x - self.mean) / self.std


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-3, iters: int = 100):
    """Multinomial logistic regression, full-batch L-BFGS from zeros -> predict(x) -> labels."""
    s = Standardizer(x)
    xs = s(x)
    w = torch.zeros(xs.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with one_thread():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda q: (s(q) @ w + b).argmax(1)


def fit_ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1.0):
    """Ridge regression (closed form, standardised inputs) -> predict(x) -> y-hat."""
    s = Standardizer(x)
    xs = s(x)
    ym = y.mean(0)
    a = xs.T @ xs + lam * torch.eye(xs.shape[1], dtype=xs.dtype)
    w = torch.linalg.solve(a, xs.T @ (y - ym))
    return lambda q: s(q) @ w + ym
