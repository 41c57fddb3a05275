"""Training checkpoints (SPEC §8): atomic writes, `weights_only=True` loads, exact resume.

A checkpoint is a plain dict of tensors and primitives:
  format      "g2g-fast/1"
  config      the approach config (`config_to_dict`), trainer options under "trainer"
  step        iterations done
  gen, gen_test, dis, opt_g, opt_d, scaler_g, scaler_d   (`Approach.state_dict()`)
  rng         torch CPU (+ CUDA) generator states
  data        the loader position (batches consumed) and its seed
FUNIT-based generators keep the official key layout, so `{'gen', 'gen_test'}` of a checkpoint is
itself a valid FUNIT generator file.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch

from .torch_files import UnreadableFile, safe_torch_load

FORMAT = "g2g-fast/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` atomically: a temp file in the same folder, fsync, then `os.replace`.

    A crash or kill at any moment leaves either the previous file or the new one, never a torn one.
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


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a g2g-fast training checkpoint (never runs pickled code)."""
    path = Path(path)
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
