"""The `--out` folder of `python -m g2g_fast.train`: one run per folder.

A folder holds a run when it has any of config.json, metrics.jsonl, checkpoints/last.pt or a
checkpoints/step_*.pt snapshot (an empty or missing folder does not). Training into it needs
`--resume` (continue that run) or `--overwrite` (remove its files first); without either the
trainer refuses, before writing anything, so one run is never silently mixed into another.
Resuming puts the folder back to the checkpoint's step (metrics.jsonl lines after it are
dropped: they are recomputed) and removes temp files of a save that was killed.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .checkpoint import remove_stale_temps
from .options import UsageError

log = logging.getLogger("g2g_fast")

# What the trainer writes, and so what --overwrite removes; nothing else in --out is touched.
TRAINER_FILES = {"": ("config.json", "metrics.jsonl", ".metrics.jsonl.tmp"),
                 "checkpoints": ("last.pt", "step_*.pt", ".*.tmp"),
                 "samples": ("step_*.png",),
                 "tensorboard": ("events.out.tfevents.*",)}


def run_marks(out: Path) -> list[str]:
    """The files that make `out` hold a run (empty: no run there)."""
    marks = [name for name in ("config.json", "metrics.jsonl", "checkpoints/last.pt") if (out / name).is_file()]
    snapshots = len(list((out / "checkpoints").glob("step_*.pt")))
    if snapshots:
        marks.append(f"{snapshots} checkpoints/step_*.pt")
    return marks


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
    kept = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
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
