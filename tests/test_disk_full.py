"""A full disk during a run (issue 24 #3): one `error:` line naming the step, the file and the last
good checkpoint, exit code 1, no temp file left, the previous checkpoint intact and resumable.

The disk is filled by injection, deterministically: the file objects the writes go through fail
with ENOSPC (or EDQUOT) after part of the data is written, as a real full disk does."""
from __future__ import annotations

import builtins
import errno
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

import g2g_fast.checkpoint as C
import g2g_fast.train as T
from g2g_fast.checkpoint import WriteFailed, load_checkpoint, save_checkpoint
from g2g_fast.train import main

from test_train_cli import tiny_args

ROOT = Path(__file__).resolve().parents[1]
REAL_OPEN = builtins.open


def filling_open(after_bytes: int, code: int = errno.ENOSPC, match=lambda path: True):
    """An `open` whose files opened for writing (and whose path `match`es) fail with `code`
    once `after_bytes` bytes have gone through them."""
    def fake_open(path, mode="r", *args, **kwargs):
        f = REAL_OPEN(path, mode, *args, **kwargs)
        if ("w" in mode or "a" in mode) and match(Path(path)):
            write, done = f.write, [0]

            def full_write(data):
                if done[0] + len(data) > after_bytes:
                    raise OSError(code, "No space left on device" if code == errno.ENOSPC else "Disk quota exceeded")
                done[0] += len(data)
                return write(data)
            f.write = full_write
        return f
    return fake_open


def chain(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "no space left on device"),
                                          (errno.EDQUOT, "disk quota exceeded")])
def test_a_checkpoint_save_on_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch, code, reason):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"step": 2, "w": torch.arange(50_000.0)})
    before = path.read_bytes()
    monkeypatch.setattr(C, "open", filling_open(20_000, code), raising=False)
    with pytest.raises(WriteFailed) as info:
        save_checkpoint(path, {"step": 4, "w": torch.zeros(50_000)})
    assert str(info.value) == f"{path}: cannot write the checkpoint: {reason} (errno {code})"
    assert info.value.errno == code
    # what torch's zip writer raises on the failed write ("unexpected pos ...") is behind it
    assert any(isinstance(e, OSError) and e.errno == code for e in list(chain(info.value))[1:])
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # the temp file is gone
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 2


def test_other_save_errors_are_not_reported_as_a_full_disk(tmp_path):
    with pytest.raises(Exception) as info:  # a lambda cannot be pickled: a bug, shown as such
        save_checkpoint(tmp_path / "last.pt", {"step": 1, "f": lambda: 0})
    assert not isinstance(info.value, WriteFailed)
    assert C.write_failure(RuntimeError("CUDA out of memory"), tmp_path, 3) is None
    assert C.write_failure(FileNotFoundError(errno.ENOENT, "No such file", "data/x.png"), tmp_path, 3) is None
    assert list(tmp_path.iterdir()) == []


# The train CLI as a user runs it, with the disk filling up at the third checkpoint write (step 4's
# last.pt; step 2 wrote last.pt and its snapshot).
INJECT = textwrap.dedent("""
    import builtins, errno, runpy, sys
    import g2g_fast.checkpoint as C
    real, saves = builtins.open, [0]
    def fake_open(path, mode="r", *a, **k):
        f = real(path, mode, *a, **k)
        if "w" in mode and str(path).endswith(".tmp"):
            saves[0] += 1
            if saves[0] == 3:
                write, done = f.write, [0]
                def full(data):
                    if done[0] + len(data) > 4096:
                        raise OSError(errno.ENOSPC, "No space left on device")
                    done[0] += len(data)
                    return write(data)
                f.write = full
        return f
    C.open = fake_open
    sys.argv = ["g2g_fast.train"] + sys.argv[1:]
    runpy.run_module("g2g_fast.train", run_name="__main__")
""")


def test_train_on_a_full_disk_says_so_in_one_line_and_resumes(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", INJECT, *tiny_args("naive", out, 4)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    last = out / "checkpoints" / "last.pt"
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "unexpected pos" not in proc.stderr, proc.stderr[-3000:]
    assert errors == [f"error: {last}: cannot write the checkpoint: no space left on device (errno 28) at step 4; "
                      f"the last good checkpoint: {last} (step 2), intact; free some space, then continue "
                      f"with --resume"], proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "step_0000002.pt"]
    assert load_checkpoint(last)["step"] == 2
    assert main(tiny_args("naive", out, 4, "--resume")) == 0  # space freed: the run goes on
    assert load_checkpoint(last)["step"] == 4


def test_a_full_disk_while_writing_samples_or_metrics_is_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = Image.Image.save

    def full_save(self, fp, *args, **kwargs):  # a PNG cut short: the temp file has part of it
        Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", full_save)
    assert main(tiny_args("naive", out, 4)) == 1  # the first sample grid, at step 2, before its checkpoint
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("error")] == [
        f"error: cannot write into --out {out}: no space left on device (errno 28) at step 2; the last good "
        f"checkpoint: none yet; free some space, then start again with --overwrite"], err
    assert "Traceback" not in err and list((out / "samples").iterdir()) == []  # its temp file removed
    monkeypatch.setattr(Image.Image, "save", real_save)

    # metrics.jsonl: full after step 2's checkpoint, at the line of step 3
    monkeypatch.setattr(T, "open", filling_open(0, match=lambda p: p.name == "metrics.jsonl"), raising=False)
    assert main(tiny_args("naive", out, 4, "--overwrite", "--log-every", "3")) == 1
    err = capsys.readouterr().err
    assert f"error: cannot write into --out {out}: no space left on device (errno 28) at step 3; the last good " \
           f"checkpoint: {out / 'checkpoints' / 'last.pt'} (step 2), intact; free some space, then continue " \
           f"with --resume" in err.splitlines(), err
    monkeypatch.undo()
    assert main(tiny_args("naive", out, 4, "--resume")) == 0
