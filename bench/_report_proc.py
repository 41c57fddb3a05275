"""gpu_report.py's section isolation: one section, one Python process (this module is
torch-free: the parent that runs the sections never touches the GPU).

A CUDA fault (illegal address, launch failure) poisons the process it happens in, and a hang stops
it; run in a process of its own, each costs one section. `run_section` starts the section's
process in a new session (its own process group: DataLoader workers, inductor's compile workers
and anything else it starts belong to it), copies its stdout and stderr to ours as they come,
keeps their last lines, and on the section's wall-clock timeout kills the whole group (SIGTERM,
then SIGKILL after KILL_GRACE_S). The group is killed after a normal exit too, so that no stray
worker outlives its section, and at once when this process is interrupted (the group, in its own
session, would not get an outer `timeout`'s signal).
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time

TAIL_LINES = 40     # lines of a section's output kept for the report when it fails
KILL_GRACE_S = 3.0  # seconds between SIGTERM and SIGKILL of a timed-out section's process group


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to the group; False when no process of it is left."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _kill_group(proc: subprocess.Popen, grace: float) -> None:
    if grace > 0 and _signal_group(proc.pid, signal.SIGTERM):
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc.pid, signal.SIGKILL)


def describe_rc(rc: int | None) -> str:
    """'rc 3', or 'killed by SIGABRT' for a negative return code."""
    if rc is not None and rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"rc {rc}"


def run_section(argv: list, timeout_s: float, *, env: dict | None = None, cwd=None, echo=sys.stderr) -> dict:
    """Run `argv` with a wall-clock limit -> {"rc", "timed_out", "seconds", "tail"} (tail: the last
    TAIL_LINES lines of its merged stdout and stderr)."""
    t = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env=env, cwd=cwd)
    tail: collections.deque = collections.deque(maxlen=TAIL_LINES)

    def pump():
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace")
            tail.append(line.rstrip("\n"))
            echo.write(line)
            echo.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=max(timeout_s, 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc, KILL_GRACE_S)
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # stuck in the driver even after SIGKILL: go on without it
            rc = None
    except BaseException:  # interrupted (an outer timeout's SIGTERM, Ctrl-C): leave no orphan on the GPU
        _kill_group(proc, 0)
        raise
    _kill_group(proc, 0)  # what the section left running (its group outlives its leader)
    reader.join(timeout=5)
    return dict(rc=rc, timed_out=timed_out, seconds=round(time.monotonic() - t, 1), tail="\n".join(tail))
