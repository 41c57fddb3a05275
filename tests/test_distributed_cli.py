"""The trainer under torchrun on 2 CPU ranks: training, resuming on 2 ranks and on 1, and a rank
that fails or hangs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_compare import max_rel
from dist_ranks import BATCH, WORLD, _one_thread, cli_args, loss_keys, metrics, run_workers, torchrun  # noqa: F401


def test_torchrun_trains_and_resumes_on_2_ranks_and_on_1(tmp_path):
    """torchrun, 2 ranks x 4: rank 0 alone writes metrics/samples/checkpoints; its first step
    equals one process with batch 8; resuming its step-2 checkpoint on 2 ranks is bitwise exact,
    and on 1 rank continues with batch 8 on the same images (step 3's losses agree)."""
    two = tmp_path / "two"
    run = torchrun(*cli_args(two, 4))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = metrics(two)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer
    assert all(r["world_size"] == 2 and r["img_per_s"] > 0 for r in rows)
    assert json.loads((two / "config.json").read_text())["run"]["world_size"] == 2
    assert sorted(p.name for p in (two / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    assert run.stderr.count("step 4/4") == 1  # rank 0's progress line only
    ckpt = torch.load(two / "checkpoints" / "step_0000002.pt", weights_only=True)
    assert ckpt["data"] == {"step": 2, "world_size": 2, "global_batch": 8} and len(ckpt["rng_ranks"]) == 2

    # One process with the global batch: the same images, pairs and losses at step 1.
    from g2g_fast.train import main
    one = tmp_path / "one"
    assert main(cli_args(one, 1, "--batch-size", str(WORLD * BATCH))) == 0
    keys = loss_keys(rows[0])
    # fp32: D's losses agree to rounding; G's follow D's first RMSprop step, which turns
    # rounding-level gradients into full steps (see `float64`); other images or pairs: ~1e-2.
    assert "d_r1" in keys and max_rel(rows[0], metrics(one)[0], keys) <= 1e-4

    # 2 ranks -> 2 ranks: exact.
    again = tmp_path / "again"
    run = torchrun(*cli_args(again, 4, "--resume", str(two / "checkpoints" / "step_0000002.pt")))
    assert run.returncode == 0, run.stderr[-3000:]
    a = torch.load(two / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(again / "checkpoints" / "last.pt", weights_only=True)
    for part in ("gen", "gen_test", "dis"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), f"{part} differs after resume"
    assert [r["step"] for r in metrics(again)] == [3, 4]

    # 2 ranks -> 1 rank: batch 8, the same images; fp32 rounding differs, so compare one step.
    # No --batch-size here: an explicit one (even the saved 4) would win and change the schedule.
    single = tmp_path / "single"
    args = cli_args(single, 3, "--resume", str(two / "checkpoints" / "step_0000002.pt"))
    i = args.index("--batch-size")
    assert main(args[:i] + args[i + 2:]) == 0
    resumed = load_last(single)
    assert resumed["config"]["batch_size"] == WORLD * BATCH and resumed["data"] == {"step": 3}
    got = metrics(single)
    assert [r["step"] for r in got] == [3] and max_rel(got[0], rows[2], keys) <= 1e-4


def load_last(out: Path) -> dict:
    from g2g_fast.checkpoint import load_checkpoint
    return load_checkpoint(out / "checkpoints" / "last.pt")


@pytest.mark.parametrize("fault", ["raise", "hang"])
def test_a_failing_or_stuck_rank_ends_the_job_with_a_clear_error(tmp_path, fault):
    """Rank 1 raises (or hangs) in its second step: rank 0 stops within --dist-timeout 5 s (a dead
    peer is noticed at once) with one line naming itself and the likely cause, and exits 1."""
    (code0, text0, seconds), (code1, text1, _) = run_workers("cli-fault", tmp_path, fault, timeout=120, grace=5)
    assert code0 == 1, f"rank 0 exited {code0}:\n{text0[-3000:]}"
    assert seconds < 90  # startup (a few s per process on a loaded machine) + 5 s, not rank 1's 600 s
    error = [line for line in text0.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "rank 0/2" in error[0] and "another rank probably crashed" in error[0], text0[-2000:]
    if fault == "raise":
        assert code1 not in (0, None) and "injected failure on rank 1" in text1
    else:
        assert code1 is None  # still asleep: killed by the launcher; rank 0 gave up on its own
        assert "--dist-timeout 5 s" in error[0]
    assert not (tmp_path / "checkpoints" / "step_0000002.pt").exists()  # no step 2 was completed
