"""Data-parallel training on 2 CPU ranks (gloo): gradients, losses, resume and failures.

The ranks are real processes (this file is also their script: `python tests/test_distributed.py
MODE OUT` under RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, as torchrun sets them), and the
end-to-end tests run `python -m torch.distributed.run --nproc_per_node 2 -m g2g_fast.train`.
Reference: one process on the global batch (2 x 4 images), with the same pairs (`StepPlan`).
"""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from g2g_fast import distributed  # noqa: E402
from g2g_fast.config import config_from_dict  # noqa: E402
from g2g_fast.data import BatchStream, SyntheticDataset  # noqa: E402
from g2g_fast.reference.steps import build_approach  # noqa: E402

WORLD, BATCH, CLASSES = 2, 4, 4          # per-rank batch 4: one process gets 8
TINY = {  # tiny widths; PatchGAN and the naive encoders need 32 px
    "funit2funit": dict(image_size=16, nf=8, nf_mlp=16, latent_dim=8, dis_nf=8, dis_n_res_blks=4),
    "cyclefunit": dict(image_size=32, nf=8, nf_mlp=16, latent_dim=8, patch_nf=8),
    "naive": dict(image_size=32, code_dim=16, gen_channels=16),
}
APPROACHES = list(TINY)
STEPS = 5


def build(approach: str, batch: int, **kwargs):
    torch.manual_seed(0)
    cfg = config_from_dict(approach, {**TINY[approach], "batch_size": batch, "ema_beta": 0.9})
    return build_approach(cfg, CLASSES, "cpu", **kwargs)


def global_batch(approach: str, n: int = WORLD * BATCH):
    g = torch.Generator().manual_seed(1)
    size = TINY[approach]["image_size"]
    x = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return x, y


def rank_part(t: torch.Tensor, rank: int, world: int = WORLD) -> torch.Tensor:
    """Rank r's images of a global batch: pairs [r*h, (r+1)*h) of its halves pairing."""
    h, half = t.shape[0] // world // 2, t.shape[0] // 2
    return torch.cat([t[rank * h:(rank + 1) * h], t[half + rank * h:half + (rank + 1) * h]])


def dataset(approach: str):
    # 32 images: 4 global batches of 8 per epoch, so 5 steps cross an epoch boundary.
    return SyntheticDataset(image_size=TINY[approach]["image_size"], num_classes=CLASSES, per_class=8)


def state(a) -> dict:
    """Every gradient, parameter and BatchNorm running statistic of `a`'s networks, by name."""
    out = {}
    for part in ("gen", "dis"):
        net = getattr(a, part)
        if net is None:
            continue
        for name, p in net.named_parameters():
            if p.grad is not None:
                out[f"grad.{part}.{name}"] = p.grad.detach().clone()
            out[f"param.{part}.{name}"] = p.detach().clone()
        for name, b in net.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                out[f"buffer.{part}.{name}"] = b.detach().clone()
    return out


def cli_args(out, steps: int, *extra) -> list[str]:
    """A tiny FUNIT2FUNIT run of `python -m g2g_fast.train`: 32 synthetic images."""
    args = ["--approach", "funit2funit", "--device", "cpu", "--batch-size", str(BATCH), "--steps", str(steps),
            "--out", str(out), "--log-every", "1", "--sample-every", "2", "--ckpt-every", "2",
            "--set", f"synthetic_classes={CLASSES}", "--set", "synthetic_per_class=8"]
    for k, v in TINY["funit2funit"].items():
        args += ["--set", f"{k}={v}"]
    return args + list(extra)


# --- the rank processes ----------------------------------------------------------------------

def worker_equivalence(out: Path) -> None:
    """Per approach, in float64 (see test_one_iteration_gradients_match_one_process): one iteration
    on this rank's part of a fixed global batch, then STEPS steps through the sharded loader, with
    gradients averaged by GradSync and the naive approach's BatchNorm synchronised."""
    ctx = distributed.init_from_env(torch.device("cpu"), timeout_s=60)
    torch.set_default_dtype(torch.float64)
    result = {}
    for approach in APPROACHES:
        a = build(approach, BATCH)
        if approach == "naive":
            assert distributed.convert_sync_batchnorm(a.gen) == 12  # 6 per encoder
        distributed.broadcast_state(a.gen, a.gen_ema, a.dis)
        distributed.attach(a)
        x, y = global_batch(approach)
        losses = distributed.mean_losses(a.train_step(rank_part(x, ctx.rank), rank_part(y, ctx.rank)))
        result[approach] = {"one": state(a), "losses": {k: v.item() for k, v in losses.items()}}

        a = build(approach, BATCH)
        if approach == "naive":
            distributed.convert_sync_batchnorm(a.gen)
        distributed.attach(a)
        stream = BatchStream(dataset(approach), BATCH, seed=3, rank=ctx.rank, world_size=ctx.world_size)
        history = []
        for _ in range(STEPS):
            x, y = next(stream)
            history.append({k: v.item() for k, v in distributed.mean_losses(a.train_step(x.double(), y)).items()})
        result[approach]["history"], result[approach]["final"] = history, state(a)

    # The naive approach without --sync-bn: per-rank BatchNorm statistics, so not one process's step.
    a = build("naive", BATCH)
    distributed.attach(a)
    x, y = global_batch("naive")
    a.train_step(rank_part(x, ctx.rank), rank_part(y, ctx.rank))
    result["naive_local_bn"] = state(a)

    # --nan-policy skip: a non-finite loss on rank 1 alone must skip the update on both ranks.
    a = build("funit2funit", BATCH, skip_nonfinite=True)
    distributed.attach(a)
    x, y = global_batch("funit2funit")
    x, y = rank_part(x, ctx.rank), rank_part(y, ctx.rank)
    if ctx.rank == 1:
        x[0] = float("nan")
    before = state(a)
    a.train_step(x, y)
    after = state(a)
    result["skip"] = {"skipped": a.skipped, "unchanged": all(torch.equal(before[k], after[k]) for k in before)}
    torch.save(result, out / f"rank{ctx.rank}.pt")
    distributed.teardown()


def worker_cli_fault(out: Path, fault: str) -> None:
    """The trainer CLI, with rank 1 failing (`raise`) or stuck (`hang`) in its second step."""
    from g2g_fast.reference.steps import Approach
    from g2g_fast.train import main

    step = Approach.train_step

    def faulty(self, x, y, timer=None):
        if os.environ["RANK"] == "1" and self.step == 1:
            if fault == "raise":
                raise RuntimeError("injected failure on rank 1")
            time.sleep(600)
        return step(self, x, y, timer)

    Approach.train_step = faulty
    sys.exit(main(cli_args(out, 4, "--dist-timeout", "5")))


WORKERS = {"equivalence": worker_equivalence, "cli-fault": worker_cli_fault}


# --- launching -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict:
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def launch(cmd_for_rank, world: int = WORLD, timeout: float = 240, grace: float | None = None):
    """Start `world` processes (env as torchrun sets it) -> [(returncode, output, seconds)].
    A process still running at `timeout` (ranks > 0: `grace` seconds after rank 0 ended, if
    given) is killed and reported with returncode None."""
    port = free_port()
    procs = [subprocess.Popen(cmd_for_rank(r), cwd=ROOT, env=rank_env(r, world, port), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
    t0, results = time.time(), []
    for rank, p in enumerate(procs):
        left = max(1.0, timeout - (time.time() - t0))
        if rank > 0 and grace is not None:
            left = min(left, grace)
        try:
            out, _ = p.communicate(timeout=left)
            results.append((p.returncode, out, time.time() - t0))
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            results.append((None, out, time.time() - t0))
    return results


def run_workers(mode: str, out: Path, *args: str, timeout: float = 240, grace: float | None = None):
    return launch(lambda r: [sys.executable, __file__, mode, str(out), *args], timeout=timeout, grace=grace)


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node 2 -m g2g_fast.train ARGS` on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--standalone",
           "-m", "g2g_fast.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def loss_keys(record: dict) -> list[str]:
    return [k for k in record if k.startswith(("d_", "g_"))]


def max_rel(a: dict, b: dict, keys) -> float:
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in keys)


# --- tests ---------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread here too, like the rank processes (OMP_NUM_THREADS=1): with the ranks
    (or other jobs) on the same cores, OpenMP's spinning threads slow tiny ops down ~100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- tests: the pieces, in this process ---------------------------------------------------------

@pytest.mark.parametrize("world,batch", [(2, 4), (3, 6), (4, 2)])
def test_step_plan_gives_the_ranks_the_pairs_of_one_process(world, batch):
    """Rank shards are disjoint and, paired by halves within each rank, are exactly the halves
    pairs of one process with batch world*batch (so W ranks train that process's step)."""
    from g2g_fast.data import StepPlan
    n = 50
    plans = [StepPlan(n, batch, seed=2, rank=r, world_size=world) for r in range(world)]
    single = StepPlan(n, batch * world, seed=2)
    for step in range(2 * single.per_epoch + 1):
        shards = [[i for _, i in p.keys(step)] for p in plans]
        flat = [i for shard in shards for i in shard]
        assert len(set(flat)) == len(flat) == batch * world
        h = batch // 2
        pairs = {(s[j], s[j + h]) for s in shards for j in range(h)}
        one = [i for _, i in single.keys(step)]
        assert pairs == {(one[j], one[j + h * world]) for j in range(h * world)}, f"step {step}"


def test_resume_batch_size_keeps_the_global_batch(monkeypatch):
    ckpt = {"config": {"batch_size": 4}, "data": {"step": 2, "world_size": 2, "global_batch": 8}}
    monkeypatch.setattr(distributed, "_CTX", distributed.DistContext(world_size=1))
    assert distributed.resume_batch_size(ckpt, 4) == 8        # 2 x 4 -> 1 x 8
    assert distributed.resume_batch_size(ckpt, 6) == 6        # an explicit other batch size wins
    monkeypatch.setattr(distributed, "_CTX", distributed.DistContext(rank=1, world_size=4))
    assert distributed.resume_batch_size(ckpt, 4) == 2        # 2 x 4 -> 4 x 2
    monkeypatch.setattr(distributed, "_CTX", distributed.DistContext(world_size=8))
    with pytest.raises(ValueError, match="global batch 8 .2 ranks x 4. does not split into an even batch on each of 8"):
        distributed.resume_batch_size(ckpt, 4)
    monkeypatch.setattr(distributed, "_CTX", distributed.DistContext(world_size=2))
    assert distributed.resume_batch_size({"config": {"batch_size": 8}, "data": {"step": 5}}, 8) == 4  # a 1-rank run


def test_sync_batchnorm_is_batchnorm_in_one_process_and_keeps_parameters():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Sequential(torch.nn.BatchNorm2d(4)))
    params, keys = list(net.parameters()), list(net.state_dict())
    ref = copy.deepcopy(net)
    assert distributed.convert_sync_batchnorm(net) == 2
    assert isinstance(net[1], distributed.SyncBatchNorm2d) and isinstance(net[3][0], distributed.SyncBatchNorm2d)
    assert all(a is b for a, b in zip(net.parameters(), params))  # optimisers keep their references
    assert list(net.state_dict()) == keys
    x = torch.randn(5, 3, 8, 8)
    assert torch.equal(net(x), ref(x))  # one process: plain BatchNorm2d
    assert torch.equal(net[1].running_var, ref[1].running_var)


def test_env_world_reads_torchrun_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.env_world() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.env_world() == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK 4 is not in .0, WORLD_SIZE 4."):
        distributed.env_world()


# --- tests: gradients and losses against one process -----------------------------------------

@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The results of worker_equivalence on 2 ranks: [rank 0's, rank 1's]."""
    out = tmp_path_factory.mktemp("equivalence")
    for rank, (code, text, _) in enumerate(run_workers("equivalence", out)):
        assert code == 0, f"rank {rank} failed:\n{text[-3000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture
def float64():
    """fp32 cannot compare two trainings: Adam/RMSprop turn rounding-level gradients (e.g. of a
    conv bias cancelled by the instance norm after it, exactly 0 in exact arithmetic) into
    full-size steps of random sign, and a single process fed the same pairs in another order
    drifts by 10% within 3 steps. In float64 that noise stays below the optimisers' eps."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def worst_diff(got: dict, want: dict, prefix: str) -> tuple[float, str, int]:
    keys = [k for k in want if k.startswith(prefix)]
    assert keys and sorted(keys) == sorted(k for k in got if k.startswith(prefix))
    diff, name = max(((got[k] - want[k]).abs().max().item(), k) for k in keys)
    return diff, name, len(keys)


@pytest.mark.parametrize("approach", APPROACHES)
def test_one_iteration_gradients_match_one_process(ranks, float64, approach):
    """After one D + G iteration, every gradient on 2 ranks (4 images each) equals one process's on
    the 8 images arranged so that it forms the same pairs (R1 and synchronised BatchNorm included)."""
    a = build(approach, WORLD * BATCH)
    x, y = global_batch(approach)
    losses = a.train_step(x, y)
    want, got = state(a), ranks[0][approach]["one"]
    diff, name, n = worst_diff(got, want, "grad.")
    assert n >= 20 and diff <= 1e-6, f"{approach}: gradient {name} differs by {diff:.3g} ({n} gradients)"
    if approach != "naive":
        assert any(k.startswith("grad.dis.") for k in want)  # D's gradients (R1's included) are compared
    diff, name, _ = worst_diff(got, want, "param.")
    assert diff <= 1e-6, f"{approach}: after the update {name} differs by {diff:.3g}"
    assert max_rel(ranks[0][approach]["losses"], {k: v.item() for k, v in losses.items()}, losses) <= 1e-6


def test_naive_without_sync_bn_uses_per_rank_statistics(ranks, float64):
    """Without --sync-bn each rank normalises with its own 4 images: not one process's step (this
    also shows the comparison above can fail)."""
    a = build("naive", WORLD * BATCH)
    x, y = global_batch("naive")
    a.train_step(x, y)
    diff, name, _ = worst_diff(ranks[0]["naive_local_bn"], state(a), "grad.")
    assert diff > 1e-3, f"per-rank BatchNorm unexpectedly matched one process ({name}: {diff:.3g})"


@pytest.mark.parametrize("approach", APPROACHES)
def test_five_steps_same_losses(ranks, float64, approach):
    """STEPS steps through the sharded loader (across an epoch boundary) give one process's losses
    (batch 8) and weights (and BatchNorm running statistics)."""
    a = build(approach, WORLD * BATCH)
    stream = BatchStream(dataset(approach), WORLD * BATCH, seed=3)
    got = ranks[0][approach]["history"]
    for step in range(STEPS):
        x, y = next(stream)
        want = {k: v.item() for k, v in a.train_step(x.double(), y).items()}
        # losses are reported in fp32
        assert max_rel(got[step], want, want) <= 1e-6, f"{approach} step {step + 1}: {got[step]} vs {want}"
    final = ranks[0][approach]["final"]
    for prefix in ("param.", "buffer.") if approach == "naive" else ("param.",):
        diff, name, _ = worst_diff(final, state(a), prefix)
        assert diff <= 1e-6, f"{approach}: {name} differs by {diff:.3g} after {STEPS} steps"


def test_ranks_stay_bitwise_identical(ranks):
    """The all-reduce hands every rank the same gradients, so their weights never drift apart."""
    for approach in APPROACHES:
        for part in ("one", "final"):
            a, b = ranks[0][approach][part], ranks[1][approach][part]
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a), f"{approach} ({part}): ranks differ"


def test_nonfinite_loss_on_one_rank_skips_everywhere(ranks):
    """--nan-policy skip: a NaN on rank 1 only skips the D and G updates on both ranks."""
    for r in range(WORLD):
        assert ranks[r]["skip"] == {"skipped": 2, "unchanged": True}, f"rank {r}: {ranks[r]['skip']}"


# --- tests: the trainer under torchrun ---------------------------------------------------------

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
    single = tmp_path / "single"
    assert main(cli_args(single, 3, "--resume", str(two / "checkpoints" / "step_0000002.pt"))) == 0
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


if __name__ == "__main__":
    WORKERS[sys.argv[1]](Path(sys.argv[2]), *sys.argv[3:])
