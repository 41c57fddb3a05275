"""`python -m g2g_fast.train`: one run per --out (refused, resumed, overwritten), and the honest
messages: progress and ETA, unreadable checkpoints, interrupts, resuming past --steps, a folder as
the checkpoint, what --dry-run refuses. The tiny runs and helpers: test_train_cli.py."""
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from g2g_fast.checkpoint import load_checkpoint
from g2g_fast.train import main
from test_train_cli import one_line_error, tiny_args


def tree(folder: Path) -> dict:
    """{relative path: bytes} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def metric_steps(out: Path, evals: bool = False) -> list:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if ("eval" in r) == evals]


def test_an_existing_run_is_refused_unless_resumed_or_overwritten(tmp_path, capsys, caplog):
    out, other = tmp_path / "run", tmp_path / "other"
    assert main(tiny_args("naive", out, 4)) == 0  # snapshots and samples at steps 2 and 4
    (out / "notes.txt").write_text("mine")
    (out / "samples" / "favourite.png").write_bytes(b"mine")
    before = tree(out)
    # Without --resume or --overwrite: one line, nothing written or changed (a dry run only notes it).
    one_line_error(capsys, main(tiny_args("naive", out, 3)),
                   r"--out .*run already holds a run \(config\.json, metrics\.jsonl, checkpoints/last\.pt.*"
                   r"--resume.*new --out.*--overwrite")
    caplog.set_level("INFO", logger="g2g_fast")
    assert main(tiny_args("naive", out, 3, "--dry-run")) == 0
    assert "training would stop here: --out" in caplog.text
    one_line_error(capsys, main(tiny_args("naive", out, 3, "--overwrite", "--resume")), "--overwrite and --resume")
    # Resuming another run's checkpoint into it would mix the two.
    assert main(tiny_args("naive", other, 2)) == 0
    one_line_error(capsys, main(tiny_args("naive", out, 3, "--resume", str(other / "checkpoints" / "last.pt"))),
                   r"--resume .*other.*last\.pt into --out .*run: that folder holds another run \(.*\); "
                   r"training there would mix two runs: choose a new --out")
    assert tree(out) == before
    # --overwrite: the old run's files go (and the log says which), the user's stay.
    caplog.clear()
    assert main(tiny_args("naive", out, 3, "--overwrite")) == 0
    assert re.search(r"--overwrite: removed the previous run in .*: config\.json, metrics\.jsonl, checkpoints/ "
                     r"\(3 files\), samples/ \(2 files\).*kept .*notes\.txt", caplog.text), caplog.text
    assert (out / "notes.txt").read_text() == "mine" and (out / "samples" / "favourite.png").read_bytes() == b"mine"
    assert metric_steps(out) == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "step_0000002.pt", "step_0000003.pt"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["favourite.png", "step_0000002.png",
                                                                   "step_0000003.png"]
    # An empty folder is no run.
    (tmp_path / "empty").mkdir()
    assert main(tiny_args("naive", tmp_path / "empty", 1)) == 0


def test_resume_drops_metrics_after_the_checkpoint_and_stale_temp_files(tmp_path, caplog):
    """A run killed after logging steps 3-4 but before checkpointing them: on --resume each step
    appears once in metrics.jsonl (eval lines too, by step); a save's temp file left by a killed
    process goes, one of a live process stays."""
    out = tmp_path / "run"
    assert main(tiny_args("naive", out, 2)) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "eval": {"swap_acc": 0.5}, "sec_eval": 1.0}) + "\n")
        for step in (3, 4):
            f.write(json.dumps({"step": step, "g_total": 1.0}) + "\n")
        f.write(json.dumps({"step": 4, "eval": {"swap_acc": 0.6}, "sec_eval": 1.0}) + "\n")
        f.write('{"step": 5, "g_to')  # torn by the kill
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / "checkpoints" / f".last.pt.{int(dead.stdout)}.tmp"
    live = out / "checkpoints" / f".step_0000004.pt.{os.getppid()}.tmp"
    stale.write_bytes(b"partial")
    live.write_bytes(b"partial")
    caplog.set_level("INFO", logger="g2g_fast")
    assert main(tiny_args("naive", out, 4, "--resume")) == 0
    assert metric_steps(out) == [1, 2, 3, 4] and metric_steps(out, evals=True) == [2]
    assert "metrics.jsonl: dropped 4 line(s) after step 2" in caplog.text
    assert not stale.exists() and live.exists()
    assert f"removed {stale}, left by a checkpoint save that was killed" in caplog.text


def test_eta_format_and_progress_line_on_a_terminal(monkeypatch):
    from g2g_fast.train_io import Progress, format_eta
    assert format_eta(0) == "00:00:00" and format_eta(59.6) == "00:01:00" and format_eta(86399) == "23:59:59"
    assert format_eta(86400) == "1d 00:00:00"
    assert format_eta(15 * 86400 + 9 * 3600 + 34 * 60 + 46) == "15d 09:34:46"  # strftime showed 09:34:46
    assert format_eta(float("inf")) == format_eta(float("nan")) == "--:--:--"

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    progress = Progress(total=10, start=0)
    progress.update(1, {"g_total": 123456.0, "d_total": 1.0}, 1000.0, final=False)
    progress.update(10, {"g_total": 1.0}, 5.0, final=True)
    first, last = term.getvalue().split("\r")[1:]
    assert first.endswith("\x1b[K")  # a shorter next line leaves nothing behind
    assert last.startswith("step 10/10") and last.endswith("\x1b[K\n")


class Pickled:  # a class a checkpoint must not make us import
    pass


def test_unreadable_checkpoints_say_what_the_file_is_not(tmp_path, capsys):
    from g2g_fast.checkpoint import CheckpointError
    from g2g_fast.torch_files import UnreadableFile, safe_torch_load
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(1000)}, good)
    files = {"truncated.pt": good.read_bytes()[:500], "notes.pt": b"hello world\n", "empty.pt": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"obj": Pickled()}, tmp_path / "objects.pt")
    import pickle
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"w": [1.0]}))
    want = {"truncated.pt": r"not a readable checkpoint \(truncated: the end of its zip archive is missing\)$",
            "notes.pt": r"not a readable checkpoint \(a text file starting 'hello world', not a torch file\)$",
            "empty.pt": r"not a readable checkpoint \(an empty file\)$",
            "objects.pt": r"refused: the checkpoint holds pickled Python objects beyond tensors \(.*Pickled\); "
                          r"it is read with weights_only=True, and we never run code from a file$",
            "plain.pkl": r"not a readable checkpoint \(a plain Python pickle, not a file written by torch\.save\)$"}
    for name, pattern in want.items():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path / name)
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path / name}: ") and re.search(pattern, msg), msg
        assert "weights_only=False" not in msg and "\n" not in msg
    with pytest.raises(UnreadableFile, match=r"^--init-funit .*notes\.pt: not a readable FUNIT generator file"):
        safe_torch_load(tmp_path / "notes.pt", what="FUNIT generator file", flag="--init-funit")
    # A torn last.pt points to the newest snapshot.
    out = tmp_path / "run"
    assert main(tiny_args("naive", out, 3)) == 0
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    one_line_error(capsys, main(tiny_args("naive", out, 4, "--resume")),
                   rf"last\.pt: not a readable checkpoint \(truncated.*\); the newest snapshot there is "
                   rf"step_0000003\.pt: --resume {re.escape(str(out / 'checkpoints' / 'step_0000003.pt'))}$")


def test_interrupt_and_nonfinite_messages_name_the_saved_checkpoint(tmp_path, capsys, monkeypatch):
    import g2g_fast.train as train_mod

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_mod, "write_samples", ctrl_c)
    assert main(tiny_args("naive", tmp_path / "a", 4, "--sample-every", "1")) == 130  # before step 1's save
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted at step 1; no checkpoint was written yet"
    assert main(tiny_args("naive", tmp_path / "b", 4, "--sample-every", "3")) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"interrupted at step 3; the last checkpoint is {tmp_path / 'b' / 'checkpoints' / 'last.pt'} (step 2)"
    monkeypatch.undo()
    assert main(tiny_args("naive", tmp_path / "c", 3, "--set", "lr=1e30", "--ckpt-every", "100")) == 1
    assert capsys.readouterr().err.strip().endswith("training stopped, no checkpoint was written yet")


def test_dali_missing_is_reported_before_any_other_line(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if DALI were not installed
    caplog.set_level("INFO", logger="g2g_fast")
    one_line_error(capsys, main(tiny_args("naive", tmp_path / "run", 1, "--loader", "dali")),
                   r"--loader dali: NVIDIA DALI is not installed; pip install")
    assert caplog.records == [] and not (tmp_path / "run").exists()


def test_fp16_on_the_cpu_is_refused(tmp_path, capsys):
    for flag in (["--precision", "fp16"], ["--set", "precision=fp16"]):
        one_line_error(capsys, main(tiny_args("naive", tmp_path / "run", 1, *flag)),
                       r"--precision fp16 on the CPU: .*slower than fp32; use --precision fp32 or bf16")
    assert not (tmp_path / "run").exists()


def test_resume_at_or_past_its_steps_is_refused(tmp_path, capsys):
    """Issue 24 #6: a --resume that would train nothing is an error naming the run's step, not a
    'done: N steps' line; the run is left as it was."""
    out = tmp_path / "run"
    assert main(tiny_args("naive", out, 3)) == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    one_line_error(capsys, main(tiny_args("naive", out, 2, "--resume")),
                   r"^error: --resume: the run is already at step 3, past --steps 2; pass --steps above 3 to train "
                   r"further$")
    one_line_error(capsys, main(["--device", "cpu", "--resume", "--out", str(out), "--dry-run"]),
                   r"already at step 3, which is its --steps 3 \(from the checkpoint\): nothing to train")
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert main(tiny_args("naive", out, 4, "--resume")) == 0  # above it: trains on


def test_a_folder_given_as_the_checkpoint_names_the_file_inside(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args("naive", out, 2)) == 0
    ckpts = out / "checkpoints"
    for folder, named in ((out, ckpts / "last.pt"), (ckpts, ckpts / "last.pt")):
        one_line_error(capsys, main(tiny_args("naive", out, 4, "--resume", str(folder))),
                       rf"^error: {re.escape(str(folder))} is a folder; pass {re.escape(str(named))}$")
    (ckpts / "last.pt").rename(tmp_path / "elsewhere.pt")
    one_line_error(capsys, main(tiny_args("naive", out, 4, "--resume", str(out))),
                   rf"is a folder; pass a checkpoint file in it, e.g. {re.escape(str(ckpts / 'step_0000002.pt'))}$")
    one_line_error(capsys, main(tiny_args("naive", out, 4, "--resume", str(out / "samples"))),
                   r"samples is a folder, and holds no checkpoints/last.pt; pass a checkpoint file")


def test_dry_run_refuses_what_the_run_refuses_and_counts_are_checked(tmp_path, capsys):
    """--dry-run makes the run's checks of its flags (it exited 0 on --device cuda without CUDA);
    every count flag has its range."""
    if not torch.cuda.is_available():
        one_line_error(capsys, main(["--device", "cuda", "--dry-run", "--out", str(tmp_path / "r")]),
                       r"^error: --device cuda: no CUDA GPU is available")
        one_line_error(capsys, main(["--precision", "fp16", "--dry-run", "--out", str(tmp_path / "r")]),
                       r"^error: --precision fp16 on the CPU")
    for extra, pattern in ((["--keep-snapshots", "-1"], r"--keep-snapshots must be >= 0 \(0 = no step_\*\.pt"),
                           (["--workers", "-3"], r"--workers must be >= 0, or -1 for the default"),
                           (["--set", "workers=-2"], r"--workers must be >= 0, or -1"),
                           (["--set", "synthetic_per_class=0"], r"synthetic_per_class must be a positive integer"),
                           (["--set", "resize_to=0"], r"--set resize_to: resize_to must be a positive integer")):
        one_line_error(capsys, main(["--device", "cpu", "--dry-run", "--out", str(tmp_path / "r"), *extra]), pattern)
    for fine in (["--workers", "-1"], ["--workers", "0"], ["--keep-snapshots", "0"]):
        assert main(["--device", "cpu", "--dry-run", "--out", str(tmp_path / "r"), *fine]) == 0
    assert not (tmp_path / "r").exists()
