"""The `--out` folder of `python -m g2g_fast.train`: one run per folder.

A folder holds a run when it has any of config.json, metrics.jsonl, checkpoints/last.pt or a
checkpoints/step_*.pt snapshot (an empty or missing folder does not), unless that run never got
past its first step (`trained`: no metrics line, checkpoint or sample). Training into it needs
`--resume` (continue that run) or `--overwrite` (remove its files first); without either the
trainer refuses, before writing anything, so one run is never silently mixed into another.
Resuming puts the folder back to the checkpoint's step (metrics.jsonl lines after it are
dropped: they are recomputed) and removes temp files of a save that was killed.

A run also holds an exclusive lock on its folder for as long as it runs (`lock`, OUT/.lock), so two
processes never train into one folder at once; the checks above are made again once the lock is
held, so two starts at the same moment cannot both pass them.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from .checkpoint import remove_stale_temps
from .options import UsageError

try:
    import fcntl
except ImportError:  # Windows: no flock; there the lock is a no-op (see RunLock)
    fcntl = None

log = logging.getLogger("g2g_fast")

LOCK_NAME = ".lock"  # in --out while a run holds it; not a run mark, and --overwrite leaves it alone

# What the trainer writes, and so what --overwrite removes; nothing else in --out is touched.
TRAINER_FILES = {"": ("config.json", "metrics.jsonl", ".metrics.jsonl.tmp"),
                 "checkpoints": ("last.pt", "step_*.pt", ".*.tmp"),
                 "samples": ("step_*.png",),
                 "tensorboard": ("events.out.tfevents.*",)}


def run_marks(out: Path) -> list[str]:
    """The files that make `out` hold a run (empty: no run there, or one that never trained)."""
    marks = [name for name in ("config.json", "metrics.jsonl", "checkpoints/last.pt") if (out / name).is_file()]
    snapshots = len(list((out / "checkpoints").glob("step_*.pt")))
    if snapshots:
        marks.append(f"{snapshots} checkpoints/step_*.pt")
    return marks if marks and trained(out) else []


def trained(out: Path) -> bool:
    """Whether a run in `out` got past its first step: a metrics line, a checkpoint or a sample.
    A run that failed before (killed for memory, say) leaves only config.json and an empty
    metrics.jsonl, which then must not block the run that follows (issue 24)."""
    if (out / "checkpoints" / "last.pt").is_file() or any((out / "checkpoints").glob("step_*.pt")) \
            or any((out / "samples").glob("step_*.png")):
        return True
    try:
        with open(out / "metrics.jsonl", encoding="utf-8", errors="replace") as f:
            return any(line.strip() for line in f)
    except OSError:  # none
        return False


def refusal(out: Path, resume_from: Path | None, overwrite: bool) -> str | None:
    """Why training into `out` would mix two runs, or None when it may go ahead."""
    marks = run_marks(out)
    if not marks or overwrite:
        return None
    if resume_from is None:
        return (f"--out {out} already holds a run ({', '.join(marks)}); continue it with --resume, "
                f"choose a new --out, or replace it with --overwrite")
    ckpt_dir = out / "checkpoints"
    if not (ckpt_dir.is_dir() and os.path.samefile(Path(resume_from).parent, ckpt_dir)):
        return (f"--resume {resume_from} into --out {out}: that folder holds another run ({', '.join(marks)}); "
                f"training there would mix two runs: choose a new --out")
    return None


def check(out: Path, resume_from: Path | None, overwrite: bool) -> None:
    why = refusal(out, resume_from, overwrite)
    if why:
        raise UsageError(why)


def prepare(out: Path, resumed_step: int, overwrite: bool) -> None:
    """Make `out` ready for the run (rank 0, after every check passed): --overwrite removes the
    previous run's files; a resumed run drops metrics after its step; stale temp files go."""
    if overwrite:
        clear_run(out)
    elif resumed_step:
        dropped = truncate_metrics(out / "metrics.jsonl", resumed_step)
        if dropped:
            log.info("metrics.jsonl: dropped %d line(s) after step %d, logged after the checkpoint was "
                     "written; training repeats those steps", dropped, resumed_step)
    stale = remove_stale_temps(out / "checkpoints")
    if stale:
        log.info("removed %s, left by a checkpoint save that was killed (the checkpoint itself is intact)",
                 ", ".join(str(p) for p in stale))


def clear_run(out: Path) -> None:
    """--overwrite: remove the files the trainer writes (TRAINER_FILES) and log what went."""
    removed = []
    for sub, patterns in TRAINER_FILES.items():
        folder = out / sub
        files = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
        for p in files:
            p.unlink()
        if not sub:
            removed += [p.name for p in files if not p.name.startswith(".")]
        elif files:
            removed.append(f"{sub}/ ({len(files)} file{'s' if len(files) > 1 else ''})")
            if not any(folder.iterdir()):
                folder.rmdir()
    if not removed:
        return
    kept = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p != out / LOCK_NAME)
    note = ""
    if kept:
        note = "; kept the files the trainer does not write: " + ", ".join(kept[:5]) + \
            (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
    log.info("--overwrite: removed the previous run in %s: %s%s", out, ", ".join(removed), note)


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the lines of metrics.jsonl with a step <= `step` (loss and eval lines alike), replacing
    the file atomically -> the number of lines dropped (a torn last line counts)."""
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        try:
            if int(json.loads(ln)["step"]) <= step:
                keep.append(ln)
        except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-write
            pass
    if len(keep) < len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(ln + "\n" for ln in keep))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return len(lines) - len(keep)


def check_out_folder(out: Path, flag: str = "--out") -> None:
    """`out` names a folder to write into: it, or the nearest of its parents that exists, must be
    a folder (a one-line error instead of mkdir's FileExistsError / NotADirectoryError)."""
    out = Path(out)
    for p in (out, *out.parents):
        if p.is_dir():
            return
        if p.exists() or p.is_symlink():
            what = "is a file, not a folder" if p.is_file() else "exists and is not a folder"
            where = f"{flag} {out} {what}" if p == out else f"{flag} {out}: {p} {what}"
            raise UsageError(f"{where}; choose another {flag} (a folder, created if missing)")


def check_out_file(path: Path, flag: str, example: str) -> None:
    """`path` names a file to write: not a folder, and the nearest of its parents that exists is a
    folder (a one-line error before any work, instead of a traceback when it is written)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file name, e.g. {path / example}")
    for p in path.parents:
        if p.is_dir():
            return
        if p.exists() or p.is_symlink():
            raise UsageError(f"{flag} {path}: {p} is a file, not a folder; choose another {flag}")


def lock(out: Path, flag: str = "--out") -> "RunLock":
    """Take the run lock on `out` (see RunLock) or raise UsageError naming the PID that holds it."""
    return RunLock(out, flag).acquire()


class RunLock:
    """An exclusive `fcntl.flock` on OUT/.lock, the file holding the holder's PID. The OS drops the
    lock when the holding process ends, however it ends (kill -9 included), so a lock is never
    stale: a .lock file a killed run left behind is simply locked again. Forked children (data-loader
    workers) share the lock until they exit. Taking it creates `out` if need be; releasing it
    removes the .lock file and the folders created for it if they are still empty, so a run refused
    after taking the lock leaves nothing behind. Without fcntl (Windows) the lock is a no-op: two
    runs into one folder are not detected there. A context manager: `with lock(out): ...`."""

    def __init__(self, out: Path, flag: str = "--out"):
        self.out, self.flag = Path(out), flag
        self.path = self.out / LOCK_NAME
        self.fd: int | None = None
        self.created: list[Path] = []  # folders made for the lock, outermost first

    def acquire(self) -> "RunLock":
        check_out_folder(self.out, self.flag)
        if fcntl is None:
            return self
        holder = None
        for _ in range(100):  # a retry is a race with a holder that is starting or releasing
            self._make_folder()
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except FileNotFoundError:  # a refused run removed the folder it had made: make it again
                continue
            except OSError as e:
                self.release()
                raise UsageError(f"{self.flag} {self.out}: cannot write {self.path} ({e.strerror}); "
                                 f"choose another {self.flag}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held
                holder = _read_pid(fd)
                os.close(fd)
                if holder is None:  # the holder has not written its PID yet, or is releasing
                    time.sleep(0.02)
                    continue
                break
            except OSError as e:  # ENOLCK, EOPNOTSUPP: a file system without locks (some network ones)
                log.warning("%s %s: no lock (%s); another run into this folder at the same time would "
                            "not be detected", self.flag, self.out, e.strerror)
                self.fd = fd
                return self
            if not _same_file(fd, self.path):  # locked a .lock its holder unlinked on release
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
            return self
        self.release()
        raise UsageError(f"{self.flag} {self.out} is in use by another run ({_describe(holder)}); "
                         f"wait for it, or choose another {self.flag}")

    def release(self) -> None:
        if self.fd is not None:
            # Unlinked while still locked: a process that opened this file meanwhile sees, once it
            # gets the lock, that the path is gone, and starts over with a new file.
            try:
                self.path.unlink()
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
        for folder in reversed(self.created):  # only if still empty: a refused run made it
            try:
                folder.rmdir()
            except OSError:
                break
        self.created = []

    def _make_folder(self) -> None:
        missing = [p for p in (self.out, *self.out.parents) if not p.is_dir()]
        for p in reversed(missing):
            try:
                p.mkdir()
            except FileExistsError:  # made meanwhile by another process: not ours to remove
                continue
            except OSError as e:
                self.release()
                raise UsageError(f"{self.flag} {self.out}: cannot create {p} ({e.strerror}); "
                                 f"choose another {self.flag}") from None
            self.created.append(p)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _describe(pid: int | None) -> str:
    if pid is None:
        return "PID unknown"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:  # its forked data-loader workers still hold the lock for a moment
        return f"PID {pid}, which has exited; its worker processes still hold the lock: retry in a few seconds"
    except OSError:
        pass
    return f"PID {pid}"
