"""What the training loop shows and writes, beside its steps: the progress line and per-phase
timer, the Fig. 4 sample grids, TensorBoard, and checkpoints with their snapshots (`save`, which
every rank calls: it gathers the ranks' RNG states). Split from train.py, which keeps the checks
of the user's input and the loop itself."""
from __future__ import annotations

import contextlib
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from . import distributed
from .checkpoint import rng_state, save_checkpoint
from .config import config_to_dict
from .options import TrainOptions
from .reference.g2g import g2g_forward
from .samples import g2g_grid, save_png


class PhaseTimer:
    """Seconds per phase: CUDA events on the GPU (read at log time), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events, self.totals = [], defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.totals[name] += time.perf_counter() - t0

    def collect(self) -> dict[str, float]:
        if self.events:
            torch.cuda.synchronize()
            for name, start, end in self.events:
                self.totals[name] += start.elapsed_time(end) / 1000.0
        out, self.events, self.totals = dict(self.totals), [], defaultdict(float)
        return out


class Progress:
    """One status line: step, main losses, img/s, ETA. Rewritten in place on a terminal."""

    def __init__(self, total: int, start: int):
        self.total, self.start, self.t0 = total, start, time.time()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, losses: dict[str, float], img_s: float, final: bool):
        done = step - self.start
        eta = (self.total - step) * (time.time() - self.t0) / max(done, 1)
        shown = " ".join(f"{k} {v:.4g}" for k, v in losses.items() if k.endswith("total"))
        line = (f"step {step}/{self.total} [{100 * step / self.total:3.0f}%] {shown} | "
                f"{img_s:.1f} img/s | ETA {format_eta(eta)}")
        if self.tty:  # rewrite the line in place, clearing what a longer previous line left
            print("\r" + line + "\x1b[K", end="" if not final else "\n", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def format_eta(seconds: float) -> str:
    """HH:MM:SS, with whole days in front past 24 hours (`15d 09:34:46`)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "--:--:--"
    days, rest = divmod(int(round(seconds)), 86400)
    hms = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {hms}" if days else hms


def sample_pairs(dataset, n_pairs: int):
    """Fixed pairs with different classes (first images of class j and j+1), eval transform."""
    by_class = defaultdict(list)
    for i, label in enumerate(dataset.labels):
        by_class[label].append(i)
    classes = sorted(by_class)
    x1, x2 = [], []
    for j in range(n_pairs):
        c1, c2 = classes[j % len(classes)], classes[(j + 1) % len(classes)]
        k = j // len(classes)
        x1.append(dataset.get(by_class[c1][k % len(by_class[c1])], None)[0])
        x2.append(dataset.get(by_class[c2][k % len(by_class[c2])], None)[0])
    return torch.stack(x1), torch.stack(x2)


@torch.no_grad()
def write_samples(approach, pairs, path: Path, tb=None, step=0):
    """Fig. 4 grid of the EMA generator (the raw one when there is no EMA)."""
    gen = approach.gen_ema if approach.gen_ema is not None else approach.gen
    was_training = gen.training
    gen.eval()
    x1, x2 = (p.to(approach.device) for p in pairs)
    o = g2g_forward(gen, x1, x2)
    gen.train(was_training)
    grid = g2g_grid(o.x1, o.x2, o.m1, o.m2, o.r1, o.r2)
    save_png(grid, path)
    if tb is not None:
        tb.add_image("samples", grid.permute(2, 0, 1), step)


def open_tensorboard(out: Path, start_step: int = 0):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    # On resume, events logged after the checkpoint's step are purged (training repeats them).
    return SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)


def save(approach, opts: TrainOptions, stream, out: Path, snapshot: bool):
    ctx = distributed.context()
    rng_ranks = distributed.gather_rng(rng_state(approach.device))  # a collective: every rank calls save
    if not ctx.is_main:
        return
    state = {"config": config_to_dict(approach.cfg), "trainer": vars(opts).copy(),
             "num_classes": approach.num_classes, **approach.state_dict(),
             "rng": rng_state(approach.device), "data": {"step": stream.step}}
    if ctx.enabled:  # what resuming on another number of ranks needs (distributed.resume_batch_size)
        state["data"].update(world_size=ctx.world_size, global_batch=approach.cfg.batch_size * ctx.world_size)
        state["rng_ranks"] = rng_ranks
    ckpt_dir = out / "checkpoints"
    save_checkpoint(ckpt_dir / "last.pt", state)
    if snapshot and opts.keep_snapshots > 0:
        save_checkpoint(ckpt_dir / f"step_{approach.step:07d}.pt", state)
        for old in sorted(ckpt_dir.glob("step_*.pt"))[:-opts.keep_snapshots]:
            old.unlink()
