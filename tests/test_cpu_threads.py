"""g2g_fast/cpu_threads.py: the thread count follows other processes' load, a user's
OMP_NUM_THREADS is kept, and the CLIs say what they chose. Throughput under load is measured in
bench/test_bench_cpu_threads.py, not here."""
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from g2g_fast import cpu_threads as ct

ROOT = Path(__file__).resolve().parents[1]


class FakeStat:
    """A /proc/stat whose per-CPU busy time the test advances by hand, with a fake clock."""

    def __init__(self, path: Path, cores: int):
        self.path, self.cores, self.now, self.own = path, cores, 0.0, 0.0
        self.busy, self.idle = [100] * cores, [10000] * cores  # since boot
        self.write()

    def write(self):
        rows = [f"cpu  {sum(self.busy)} 0 0 {sum(self.idle)} 0 0 0 0 0 0"]
        rows += [f"cpu{i} {b} 0 0 {d} 0 0 0 0 0 0" for i, (b, d) in enumerate(zip(self.busy, self.idle))]
        self.path.write_text("\n".join(rows + ["intr 0", "procs_running 1"]) + "\n")

    def advance(self, seconds: float, others: float, own: float):
        """`seconds` pass; other processes use `others` cores, this process `own` cores."""
        hz = os.sysconf("SC_CLK_TCK")
        busy = (others + own) * seconds * hz
        for i in range(self.cores):
            self.busy[i] += round(busy / self.cores)
            self.idle[i] += round(seconds * hz - busy / self.cores)
        self.now += seconds
        self.own += own * seconds
        self.write()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    cores = len(os.sched_getaffinity(0))
    stat = FakeStat(tmp_path / "stat", cores)
    monkeypatch.setattr(ct, "_STAT", str(stat.path))
    monkeypatch.setattr(ct.time, "monotonic", lambda: stat.now)
    monkeypatch.setattr(ct.time, "sleep", lambda s: stat.advance(s, others=stat.others, own=0.0))
    monkeypatch.setattr(ct, "_own_cpu_seconds", lambda: stat.own)
    stat.others = 0.0
    return stat


def make(fake, log=None):
    chosen = []
    g = ct.Governor(chosen.append, log=log)
    return g, chosen


def test_choose_counts_the_cores_others_leave_free():
    g, _ = make(None)
    g.cpus, g.max_threads = set(range(4)), 4
    assert [g.choose(o) for o in (0.0, 0.2, 0.3, 1.0, 1.2, 2.9, 3.5, 8.0)] == [4, 4, 3, 3, 3, 1, 1, 1]
    g.max_threads = 2  # e.g. two torchrun ranks on 4 cores
    assert g.choose(0.0) == 2


def test_follows_load_as_it_comes_and_goes(fake, monkeypatch):
    lines = []
    g, chosen = make(fake, lines.append)
    monkeypatch.setattr(ct, "_governor", g)  # what setup() made: ct.tick() and ct.held() act on it
    n = len(g.cpus)
    assert "of %d cores (other processes use 0.0)" % n in g.start() and chosen == [n]
    fake.advance(1.0, others=n, own=1)  # too early: nothing re-decided
    ct.tick()
    assert chosen == [n]
    fake.advance(ct.INTERVAL, others=n, own=1)
    ct.tick()
    assert chosen == [n, 1] and f"CPU threads {n} -> 1" in lines[-1]
    with ct.held():  # e.g. inside one test: no change
        fake.advance(ct.INTERVAL, others=0, own=1)
        ct.tick()
        assert chosen == [n, 1]
    fake.advance(ct.INTERVAL, others=0, own=1)
    ct.tick()
    assert chosen[-1] == n and ct.threads() == n


def test_busy_start_picks_one_thread(fake):
    fake.others = 5.0
    g, chosen = make(fake)
    g.start()
    assert chosen == [1]


def test_unreadable_stat_keeps_torch_default(tmp_path, monkeypatch):
    monkeypatch.setattr(ct, "_STAT", str(tmp_path / "missing"))
    g, chosen = make(None)
    assert "unreadable" in g.start() and chosen == []
    g.tick()
    assert chosen == []


def _spin():
    while True:
        pass


def test_a_real_busy_process_is_seen():
    """Real /proc/stat: with every core taken by a busy process, one thread is chosen."""
    if not os.path.exists("/proc/stat"):
        pytest.skip("needs /proc/stat (Linux)")
    cores = len(os.sched_getaffinity(0))
    procs = [mp.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(cores)]
    for p in procs:
        p.start()
    try:
        time.sleep(1.0)  # the spawned interpreters are up and spinning
        g, chosen = make(None)
        g.start()
    finally:
        for p in procs:
            p.kill()
            p.join()
    assert chosen == [1], (g.others, chosen)


@pytest.mark.parametrize("env, expect", [({"OMP_NUM_THREADS": "1"}, "CPU threads: OMP_NUM_THREADS=1 (fixed"),
                                         ({"OMP_NUM_THREADS": None}, "adapts to load")])
def test_cli_logs_its_choice_once_the_input_is_checked(tmp_path, env, expect):
    from test_train_cli import tiny_args

    def run(module, *args):
        full = {k: v for k, v in {**os.environ, **env}.items() if v is not None}  # None: unset
        return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                              env=full, timeout=300)

    proc = run("g2g_fast.train", *tiny_args("naive", tmp_path / "run", 1))
    assert proc.returncode == 0 and expect in proc.stderr, proc.stderr
    if not env["OMP_NUM_THREADS"]:
        lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert lines[0]["cpu_threads"] >= 1
    proc = run("g2g_fast.translate", "--funit", str(tmp_path / "none.pt"), "--content", "a.png", "--class", "b.png")
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: --funit {tmp_path / 'none.pt'}: no such file"], proc.stderr
