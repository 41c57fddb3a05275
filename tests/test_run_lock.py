"""One process per run folder (issue 24 #2): a run holds an exclusive lock on its --out
(`run_folder.lock`, OUT/.lock), so a second run, resume or ablation into it is refused with one
line naming the holder's PID, and a killed run never leaves a stale lock. Deterministic: the
holder is another process that has the lock before the second one starts (no timing races)."""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from g2g_fast import run_folder
from g2g_fast.options import UsageError
from g2g_fast.train import main
from test_train_cli import one_line_error, tiny_args
from test_train_cli_runs import metric_steps, tree

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(run_folder.fcntl is None, reason="no fcntl: the run lock is a no-op here")

# A process that takes the lock on argv[1] and holds it until killed. With "fork": it forks a child
# (as a data-loader worker is) that inherits the lock, prints the child's PID and exits.
HOLDER = """import os, sys, time
from g2g_fast.run_folder import lock
held = lock(sys.argv[1])
if len(sys.argv) > 2:
    child = os.fork()
    if child == 0:
        time.sleep(300)
        os._exit(0)
    print(child, flush=True)
    os._exit(0)
print("locked", flush=True)
time.sleep(300)
"""


@contextlib.contextmanager
def holder(out: Path):
    """A separate process holding the lock on `out` (its PID is the one the error must name)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def in_use(out: Path, pid: int) -> str:
    return f"error: --out {out} is in use by another run (PID {pid}); wait for it, or choose another --out"


def test_a_second_run_into_a_locked_out_is_refused_naming_the_pid(tmp_path):
    """A real second trainer process: one error line with the holder's PID, exit 2, nothing written."""
    out = tmp_path / "run"
    with holder(out) as proc:
        second = subprocess.run([sys.executable, "-m", "g2g_fast.train", *tiny_args("naive", out, 2)], cwd=ROOT,
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines() == [in_use(out, proc.pid)], second.stderr
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the holder's, untouched
        assert (out / ".lock").read_text() == f"{proc.pid}\n"


def test_kill_9_leaves_no_stale_lock(tmp_path, capsys):
    """A trainer killed with SIGKILL mid-run: its .lock file stays, its lock does not, so the next
    run goes ahead (and removes the file when it ends)."""
    out = tmp_path / "run"
    args = tiny_args("naive", out, 100000)
    proc = subprocess.Popen([sys.executable, "-m", "g2g_fast.train", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 240
        while not (out / "checkpoints" / "last.pt").is_file():  # training, so the lock is held
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "the trainer wrote no checkpoint"
            time.sleep(0.2)
        assert (out / ".lock").read_text() == f"{proc.pid}\n"
        one_line_error(capsys, main(tiny_args("naive", out, 2, "--overwrite")), re.escape(in_use(out, proc.pid)))
    finally:
        proc.kill()
        proc.wait()
    assert (out / ".lock").is_file()
    assert main(tiny_args("naive", out, 2, "--overwrite")) == 0
    assert metric_steps(out) == [1, 2] and not (out / ".lock").exists()


def test_resume_and_overwrite_of_a_locked_run_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args("naive", out, 2)) == 0
    assert not (out / ".lock").exists()  # released (and removed) at the end of the run
    before = tree(out)
    with holder(out) as proc:
        one_line_error(capsys, main(tiny_args("naive", out, 4, "--resume")), re.escape(in_use(out, proc.pid)))
        one_line_error(capsys, main(tiny_args("naive", out, 4, "--overwrite")), re.escape(in_use(out, proc.pid)))
        assert tree(out) == {**before, ".lock": f"{proc.pid}\n".encode()}
    assert main(tiny_args("naive", out, 4, "--resume")) == 0
    assert metric_steps(out) == [1, 2, 3, 4]


def test_a_lock_held_by_a_dead_holders_child_says_so(tmp_path):
    """The holder exited but a forked child (a data-loader worker) still has the lock: the message
    says the PID has exited and to retry."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), "fork"], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    child = int(proc.stdout.readline())
    proc.wait(timeout=60)  # reaped: its PID is gone (the child keeps the pipe open, so no communicate)
    proc.stdout.close()
    try:
        with pytest.raises(UsageError) as e:
            run_folder.lock(out)
        pid = int((out / ".lock").read_text())  # the holder's, not the child's
        assert pid != child
        assert str(e.value) == (f"--out {out} is in use by another run (PID {pid}, which has exited; its worker "
                                f"processes still hold the lock: retry in a few seconds); wait for it, or choose "
                                f"another --out")
    finally:
        os.kill(child, 9)
    deadline = time.time() + 30
    while True:  # the child is gone once the lock can be taken (it is not our child: not waited for)
        try:
            run_folder.lock(out).release()
            break
        except UsageError:
            assert time.time() < deadline
            time.sleep(0.05)


def test_the_lock_itself(tmp_path, caplog):
    """In one process: the folder made for the lock goes again on release if still empty; the lock
    file is no run mark and --overwrite keeps no note of it; a leftover .lock is taken over."""
    out = tmp_path / "a" / "b"
    held = run_folder.lock(out)
    assert (out / ".lock").read_text() == f"{os.getpid()}\n"
    assert run_folder.run_marks(out) == [] and run_folder.refusal(out, None, False) is None
    with pytest.raises(UsageError, match=rf"in use by another run \(PID {os.getpid()}\)"):
        run_folder.lock(out)  # flock: a second open of the file conflicts even in one process
    held.release()
    assert not (tmp_path / "a").exists()
    # A folder that was there stays; a .lock a killed run left is locked again, its PID replaced.
    out.mkdir(parents=True)
    (out / ".lock").write_text("999999999\n")
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")
    with run_folder.lock(out):
        assert (out / ".lock").read_text() == f"{os.getpid()}\n"
        caplog.set_level("INFO", logger="g2g_fast")
        run_folder.clear_run(out)
        assert "kept the files the trainer does not write: notes.txt" in caplog.text
        assert ".lock" not in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_out_must_be_a_folder(tmp_path):
    """Issue 24 #4: --out an existing file (or under one) is one line, not mkdir's FileExistsError."""
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    with pytest.raises(UsageError, match=rf"^--out {f} is a file, not a folder; choose another --out"):
        run_folder.lock(f)
    with pytest.raises(UsageError, match=rf"^--out {f}/run: {f} is a file, not a folder"):
        run_folder.lock(f / "run")
    run_folder.check_out_folder(tmp_path / "new" / "run")  # missing folders are fine
    assert not (tmp_path / "new").exists() and f.read_text() == "mine"


def test_ablate_out_and_its_run_folders_are_locked(tmp_path, capsys):
    """A second ablate into one --out is refused before it reads anything; and a variant's run
    folder is locked by its training like any run's (here held by another process: ablate stops)."""
    from g2g_fast import ablate as A
    out = tmp_path / "abl"
    argv = ["--out", str(out), "--steps", "1", "--variants", "all_on", "--device", "cpu", "--samples", "8",
            "--probe-train", "32", "--probe-steps", "1", "--no-probe-cache",
            "--", "--image-size", "32", "--batch-size", "4", "--set", "nf=8", "--set", "nf_mlp=16",
            "--set", "latent_dim=8", "--set", "synthetic_classes=4", "--set", "synthetic_per_class=16"]
    with holder(out) as proc:
        one_line_error(capsys, A.main(argv), re.escape(in_use(out, proc.pid)))
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    with holder(out / "all_on") as proc:
        one_line_error(capsys, A.main(argv), re.escape(in_use(out / "all_on", proc.pid)))
        assert sorted(p.name for p in (out / "all_on").iterdir()) == [".lock"]
    assert sorted(p.name for p in out.iterdir()) == ["all_on"]  # ablate's own lock went with it
