"""Training checkpoints (SPEC §8): atomic writes, `weights_only=True` loads, exact resume.

A checkpoint is a plain dict of tensors and primitives:
  format      "g2g-fast/1"
  config      the approach config (`config_to_dict`), trainer options under "trainer"
  step        iterations done
  gen, gen_test, dis, opt_g, opt_d, scaler_g, scaler_d, adv, opt_adv   (`Approach.state_dict()`)
  rng         torch CPU (+ CUDA) generator states
  data        the loader position (batches consumed) and its seed
FUNIT-based generators keep the official key layout, so `{'gen', 'gen_test'}` of a checkpoint is
itself a valid FUNIT generator file.
"""
from __future__ import annotations

import errno
import os
import re
import time
from pathlib import Path

import torch

from .torch_files import UnreadableFile, safe_torch_load

FORMAT = "g2g-fast/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class WriteFailed(OSError):
    """A file of the run could not be written (the disk is full, say); the message names the file
    and the system's reason. The previous version of the file, if any, is intact."""


# A full disk or an exhausted quota: the user frees space and resumes (docs/training.md).
NO_SPACE = {errno.ENOSPC} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())


def os_error_behind(exc: BaseException | None) -> OSError | None:
    """The OSError that `exc` is or was raised from (`__cause__`, `__context__`), or None.
    torch.save into a file whose write fails raises a RuntimeError of its zip writer ("unexpected
    pos ...") during the handling of the OSError, which says what actually went wrong."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def describe_os_error(err: OSError) -> str:
    """'no space left on device (errno 28)'."""
    reason = err.strerror or os.strerror(err.errno)
    return f"{reason[:1].lower()}{reason[1:]} (errno {err.errno})"


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` atomically: a temp file in the same folder, fsync, then `os.replace`.

    A crash or kill at any moment leaves either the previous file or the new one, never a torn one.
    A failed write (disk full, quota) removes the temp file and raises WriteFailed naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        # Test hook: widen the window between writing and renaming so a test can kill the
        # process inside it (tests/test_train_cli.py). Unset in normal use.
        delay = float(os.environ.get("G2G_TEST_SAVE_DELAY", "0") or 0)
        if delay > 0:
            time.sleep(delay)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        err = os_error_behind(e)
        if err is None:
            raise
        failed = WriteFailed(f"{path}: cannot write the checkpoint: {describe_os_error(err)}")
        failed.errno = err.errno
        raise failed from e
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_failure(exc: BaseException, out: Path, step: int) -> str | None:
    """The one line for a run whose write failed at `step` because the disk is full (or any
    failed checkpoint write), or None when `exc` is not such a failure: what could not be written,
    the last good checkpoint, and how to go on. Removes the temp file a failed sample write left.
    An OSError from elsewhere (reading the data, say) is not reported as a write."""
    err = os_error_behind(exc)
    if err is None or not (isinstance(exc, WriteFailed) or err.errno in NO_SPACE):
        return None
    for tmp in Path(out, "samples").glob(".step_*.png.tmp"):  # samples.save_png's, not renamed
        tmp.unlink(missing_ok=True)
    what = str(exc) if isinstance(exc, WriteFailed) else \
        f"cannot write into --out {out}: {describe_os_error(err)}" + (f" ({err.filename})" if err.filename else "")
    last = Path(out, "checkpoints", "last.pt")
    good = checkpoint_step(last)
    if good is None:
        return f"{what} at step {step}; the last good checkpoint: none yet; free some space, then start again " \
               f"with --overwrite"
    return f"{what} at step {step}; the last good checkpoint: {last} (step {good}), intact; free some space, " \
           f"then continue with --resume"


def checkpoint_step(path: Path) -> int | None:
    """The step of the checkpoint at `path` (memory-mapped: no tensor is read), None if unreadable."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:  # absent, torn, not ours: no good checkpoint to name
        return None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a g2g-fast training checkpoint (never runs pickled code)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(folder_message(path))
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = safe_torch_load(path)
    except UnreadableFile as e:
        snapshot = newest_snapshot(path.parent, exclude=path)
        hint = f"; the newest snapshot there is {snapshot.name}: --resume {snapshot}" if snapshot else ""
        raise CheckpointError(f"{e}{hint}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        hint = " (an official FUNIT generator file? pass it with --init-funit)" \
            if isinstance(ckpt, dict) and "gen" in ckpt else ""
        raise CheckpointError(f"{path}: not a g2g-fast training checkpoint{hint}")
    return ckpt


def folder_message(folder: Path) -> str:
    """The error for a folder given where a checkpoint file goes: which file inside it would do (a
    run folder's checkpoints/last.pt, a checkpoints folder's last.pt, else its newest snapshot)."""
    for candidate in (folder / "checkpoints" / "last.pt", folder / "last.pt"):
        if candidate.is_file():
            return f"{folder} is a folder; pass {candidate}"
    snapshot = newest_snapshot(folder) or newest_snapshot(folder / "checkpoints")
    if snapshot is not None:
        return f"{folder} is a folder; pass a checkpoint file in it, e.g. {snapshot}"
    return (f"{folder} is a folder, and holds no checkpoints/last.pt; pass a checkpoint file (a training "
            f"run's OUT/checkpoints/last.pt)")


def newest_snapshot(folder: Path, exclude: Path | None = None) -> Path | None:
    """The `step_XXXXXXX.pt` of the highest step in `folder` (other than `exclude`), or None."""
    snaps = sorted(p for p in Path(folder).glob("step_*.pt") if exclude is None or p.name != Path(exclude).name)
    return snaps[-1] if snaps else None


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files (`.NAME.PID.tmp`) that `save_checkpoint` left in `folder` when its
    process was killed during a save, unless that process is still alive -> the removed paths."""
    removed = []
    for tmp in sorted(Path(folder).glob(".*.tmp")):
        m = re.fullmatch(r"\..+\.(\d+)\.tmp", tmp.name)
        if m and not _pid_alive(int(m.group(1))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # ours is not saving now; no signal 0 off POSIX
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
