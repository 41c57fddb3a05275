"""CPU threads that survive a busy machine.

torch's OpenMP threads wait at every barrier by spinning. With as many threads as cores and one
core taken by another process, each parallel region waits for a time slice on that core: the CPU
preset ran 10x slower beside two busy processes. A fixed single thread survives load but loses
~40% on a quiet 2-core machine, and OpenMP's passive waiting loses ~25% there (both measured:
`bench/test_bench_cpu_threads.py`). So the thread count follows the machine instead:

- `setup()` (once per process, at a CLI's start, before torch's first parallel region) reads how
  busy this process's cores are over a short window and sets torch's thread count to the cores
  that other processes leave free (at least one). The CLI logs what it chose and why.
- `tick()` (the training loop calls it every step; it reads `/proc/stat` at most every
  `INTERVAL` seconds) re-decides the same way, so a run that starts quiet drops to one thread when
  another job starts, and comes back when it ends.
- The waiting policy stays OpenMP's default (spin briefly, then sleep): with one thread nothing
  waits at a barrier, and on a quiet machine spinning is what makes two threads pay off.

A user's own `OMP_NUM_THREADS` is respected: the count is then fixed, and that is also the way to
bitwise-reproducible CPU runs (another thread count changes the order of floating-point sums). A
user's `OMP_WAIT_POLICY` is left to OpenMP, which reads it when torch loads. Without `/proc/stat` (not Linux) torch's default count is kept.
"""
from __future__ import annotations

import contextlib
import math
import os
import time

INTERVAL = 2.0      # seconds between re-decisions in tick()
FIRST_WINDOW = 0.2  # seconds of /proc/stat read by setup() (20 clock ticks per core at 100 Hz)
TAKEN = 0.25        # a core counts as taken when other processes use more than this share of it
_STAT = "/proc/stat"


def _cpu_times(cpus) -> tuple[float, float] | None:
    """(busy, total) seconds of `cpus` since boot from /proc/stat, or None where unreadable."""
    try:
        with open(_STAT) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        v = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(v)
        busy += sum(v) - v[3] - v[4]      # steal counts as taken: the hypervisor gave the core away
    return (busy / tick, total / tick) if total else None


def _own_cpu_seconds() -> float:
    """This process's CPU time, with that of the children it has waited for: a CLI run by the test
    suite, or a torchrun job's ranks, is this process's own work, not another job's load."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Governor:
    """Chooses torch's intra-op thread count from how much of our cores other processes use."""

    def __init__(self, set_threads, max_threads: int | None = None, fixed: str | None = None, log=None):
        self.cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # torchrun: the cores are shared
        self.max_threads = max(1, max_threads or len(self.cpus) // local_ranks)
        self.set_threads, self.fixed, self.log = set_threads, fixed, log or (lambda msg: None)
        self.threads, self.others, self.held, self.line = None, 0.0, 0, ""
        self._last = None  # (wall, busy, own) at the previous reading

    def _read(self):
        times = _cpu_times(self.cpus)
        return None if times is None else (time.monotonic(), times[0], _own_cpu_seconds())

    def _others(self, now) -> float | None:
        """Cores that other processes used since the last reading (a fraction of `cpus`)."""
        if self._last is None or now is None:
            return None
        wall, busy, own = (b - a for a, b in zip(self._last, now))
        return None if wall <= 0 else max(0.0, (busy - own) / wall)

    def choose(self, others: float) -> int:
        taken = max(0, math.ceil(others - TAKEN))
        return max(1, min(self.max_threads, len(self.cpus) - taken))

    def start(self) -> str:
        """Decide the first thread count; -> one line saying what was chosen and why (also `.line`)."""
        self.line = self._start()
        return self.line

    def _start(self) -> str:
        if self.fixed:
            return f"CPU threads: {self.fixed} (fixed by the environment)"
        self._last = self._read()
        if self._last is None:
            self.fixed = "unreadable"
            return f"CPU threads: torch's default ({_STAT} unreadable here: no adaptation to other processes' load)"
        time.sleep(FIRST_WINDOW)
        now = self._read()
        self.others, self._last = self._others(now), now
        self.threads = self.choose(self.others)
        self.set_threads(self.threads)
        return (f"CPU threads: {self.threads} of {len(self.cpus)} cores (other processes use {self.others:.1f}); "
                "adapts to load, OMP_NUM_THREADS=N fixes it")

    def tick(self) -> None:
        if self.fixed or self.held or self._last is None or time.monotonic() - self._last[0] < INTERVAL:
            return
        now = self._read()
        others = self._others(now)
        self._last = now
        if others is None:
            return
        self.others, threads = others, self.choose(others)
        if threads != self.threads:
            self.log(f"CPU threads {self.threads} -> {threads}: other processes use {others:.1f} of "
                     f"{len(self.cpus)} cores")
            self.threads = threads
            self.set_threads(threads)


_governor: Governor | None = None


def setup(log=None) -> str:
    """Once per process, before torch's first parallel region: the first thread count (later calls
    only return the line). -> the line saying what was chosen, for the caller to log once its input
    is checked (a bad input's error stays the only line); `log` gets the changes tick() makes."""
    global _governor
    if _governor is None:
        import torch

        fixed = os.environ.get("OMP_NUM_THREADS")
        _governor = Governor(torch.set_num_threads, fixed=fixed and f"OMP_NUM_THREADS={fixed}", log=log)
        _governor.start()
    return _governor.line


def tick() -> None:
    """Re-decide the thread count if INTERVAL has passed (cheap; a no-op before setup())."""
    if _governor is not None:
        _governor.tick()


def threads() -> int | None:
    """The count the governor chose last (None when fixed by the environment or not set up)."""
    return None if _governor is None or _governor.fixed else _governor.threads


@contextlib.contextmanager
def held():
    """No re-decisions inside (the test suite holds one count per test, so a test's numbers do not
    depend on when another process started)."""
    g = _governor
    if g is not None:
        g.held += 1
    try:
        yield
    finally:
        if g is not None:
            g.held -= 1
