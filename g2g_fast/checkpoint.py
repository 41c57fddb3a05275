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
import time
from pathlib import Path

import torch

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
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a torn/foreign file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({msg[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        hint = " (an official FUNIT generator file? pass it with --init-funit)" \
            if isinstance(ckpt, dict) and "gen" in ckpt else ""
        raise CheckpointError(f"{path}: not a g2g-fast training checkpoint{hint}")
    return ckpt


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
