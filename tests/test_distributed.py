"""Data-parallel training on 2 CPU ranks (gloo): gradients, losses, fp16 loss scaling, the fast
backend, resume and failures.

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
AMP_STEPS = 3  # fp16 loss scaling: a normal step, one with an inf gradient on rank 1, a normal one


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
        # Buckets of ~4 KiB: dozens per network, most started by the hooks during backward (after
        # each optimiser's first, checking, step), so these steps test the overlapped all-reduce.
        distributed.attach(a, bucket_bytes=4096)
        stream = BatchStream(dataset(approach), BATCH, seed=3, rank=ctx.rank, world_size=ctx.world_size)
        history = []
        for _ in range(STEPS):
            x, y = next(stream)
            history.append({k: v.item() for k, v in distributed.mean_losses(a.train_step(x.double(), y)).items()})
        result[approach]["history"], result[approach]["final"] = history, state(a)
        result[approach]["buckets"] = {"started_in_backward": a.grad_sync.started_in_backward,
                                       "total": sum(map(len, a.grad_sync._buckets.values()))}

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


def poison_d_gradient(a, at: int) -> None:
    """In the D backward of iteration `at` + 1, one entry of D's first weight gradient becomes +inf
    in this process, as an fp16 overflow would make it (before any all-reduce or unscale)."""
    p = next(a.dis.parameters())

    def hook(grad):
        if a.step != at:
            return grad
        grad = grad.clone()
        grad[(0,) * grad.dim()] = float("inf")
        return grad

    p.register_hook(hook)


def amp_state(a) -> dict:
    """The loss scalers (scale, growth tracker) and how many updates each optimiser applied."""
    steps = {name: max((int(s["step"]) for s in opt.state.values()), default=0)
             for name, opt in (("d", a.opt_d), ("g", a.opt_g))}
    return {"scaler_d": a.scaler_d.state_dict(), "scaler_g": a.scaler_g.state_dict(), "updates": steps}


def build_fp16(batch: int, autocast: bool = True):
    """FUNIT2FUNIT with precision fp16 (a GradScaler per optimiser). In fp16 autocast its scalers
    start at 2^10: at GradScaler's default 2^16 this tiny model's scaled fp16 backward overflows in
    D and G alike (in one process too), so the first iteration would apply no update."""
    a = build("funit2funit", batch, precision="fp16")
    if autocast:
        a.scaler_d, a.scaler_g = (torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) for _ in range(2))
    return a


def build_fast(batch: int):
    """FUNIT2FUNIT on the fast backend, its norms forced to the reference impl (see worker_amp_fast)."""
    from g2g_fast.backends import FastBackend
    a = build("funit2funit", batch, backend=FastBackend())
    a.gen.impl = "ref"
    return a


def worker_amp_fast(out: Path) -> None:
    """fp16 loss scaling and the fast backend on 2 ranks, FUNIT2FUNIT on this rank's part of the
    fixed global batch; rank 1 alone gets an inf in a D gradient in the second iteration of each
    fp16 run (`poison_d_gradient`).
    - "autocast": AMP_STEPS iterations of real fp16 autocast (fp32 weights, GradScaler).
    - "scaled": the same in float64, where autocast casts nothing (it leaves float64 tensors
      alone) but the GradScalers still scale the loss, the all-reduce sees the scaled gradients
      and `scaler.step` unscales them and decides: the scaler path, comparable to 1e-6.
    - "fast": one iteration of the fast backend (fused-kernel generator, channels_last, foreach
      RMSprop and EMA) in float64, with the generator's norms forced to the reference impl
      (`gen.impl = "ref"`): under TRITON_INTERPRET=1 the Triton kernels would run in the
      interpreter, far too slow here (and it has no float64 kernels: "auto" would fall back too)."""
    ctx = distributed.init_from_env(torch.device("cpu"), timeout_s=60)
    result = {}
    for mode in ("autocast", "scaled"):
        if mode == "scaled":
            torch.set_default_dtype(torch.float64)
        x, y = global_batch("funit2funit")  # "scaled" (and "fast"): drawn in float64, as the tests draw them
        x, y = rank_part(x, ctx.rank), rank_part(y, ctx.rank)
        a = build_fp16(BATCH, autocast=mode == "autocast")
        distributed.attach(a)
        if ctx.rank == 1:
            poison_d_gradient(a, at=1)
        result[mode] = []
        for _ in range(AMP_STEPS):
            a.train_step(x, y)
            result[mode].append({"state": state(a), "amp": amp_state(a)})

    a = build_fast(BATCH)
    distributed.attach(a)
    a.train_step(x, y)
    convs = [p for p in a.gen.parameters() if p.dim() == 4]
    result["fast"] = {"state": state(a), "foreach": a.opt_g.defaults["foreach"] and a.opt_d.defaults["foreach"],
                      "channels_last": bool(convs) and all(p.is_contiguous(memory_format=torch.channels_last)
                                                           and p.grad.is_contiguous(memory_format=torch.channels_last)
                                                           for p in convs)}
    torch.save(result, out / f"rank{ctx.rank}.pt")
    distributed.teardown()


def worker_cli_fault(out: Path, fault: str) -> None:
    """The trainer CLI, with rank 1 failing (`raise`) or stuck (`hang`) in its second step."""
    from g2g_fast.reference.steps import Approach
    from g2g_fast.train import cli

    step = Approach.train_step

    def faulty(self, x, y, timer=None):
        if os.environ["RANK"] == "1" and self.step == 1:
            if fault == "raise":
                raise RuntimeError("injected failure on rank 1")
            time.sleep(600)
        return step(self, x, y, timer)

    Approach.train_step = faulty
    cli(cli_args(out, 4, "--dist-timeout", "5"))  # the CLI's own entry point, exit handling included


WORKERS = {"equivalence": worker_equivalence, "amp-fast": worker_amp_fast, "cli-fault": worker_cli_fault}


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
    assert distributed.resume_batch_size(ckpt, 6, explicit=True) == 6  # the user's batch size wins ...
    assert distributed.resume_batch_size(ckpt, 4, explicit=True) == 4  # ... also when it equals the saved one
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

def worker_results(kind: str, out) -> list[dict]:
    """Run the `kind` worker on WORLD ranks into `out`; its saved results: [rank 0's, rank 1's]."""
    for rank, (code, text, _) in enumerate(run_workers(kind, out)):
        assert code == 0, f"rank {rank} failed:\n{text[-3000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The results of worker_equivalence on 2 ranks: [rank 0's, rank 1's]."""
    return worker_results("equivalence", tmp_path_factory.mktemp("equivalence"))


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


def test_all_reduce_overlaps_backward(ranks):
    """In test_five_steps_same_losses' runs (4 KiB buckets) the buckets start during backward:
    every one of them in each step after the first (which checks the gradient layout first)."""
    for approach in APPROACHES:
        b = ranks[0][approach]["buckets"]
        assert b["total"] >= 8, b
        assert b["started_in_backward"] == (STEPS - 1) * b["total"], (approach, b)
        assert ranks[1][approach]["buckets"] == b


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


# --- tests: fp16 loss scaling and the fast backend on 2 ranks ------------------------------------

@pytest.fixture(scope="module")
def amp_fast(tmp_path_factory):
    """The results of worker_amp_fast on 2 ranks: [rank 0's, rank 1's]."""
    return worker_results("amp-fast", tmp_path_factory.mktemp("amp_fast"))


def one_process_fp16(autocast: bool) -> list[dict]:
    """worker_amp_fast's fp16 run in one process on the 8 images, with the same inf injected
    (float64 under the `float64` fixture)."""
    a = build_fp16(WORLD * BATCH, autocast=autocast)
    poison_d_gradient(a, at=1)
    x, y = global_batch("funit2funit")
    out = []
    for _ in range(AMP_STEPS):
        a.train_step(x, y)
        out.append({"state": state(a), "amp": amp_state(a)})
    return out


def rel_l2(got: dict, want: dict, prefix: str) -> float:
    """|got - want| / |want| over all the tensors whose key starts with `prefix`, together."""
    keys = [k for k in want if k.startswith(prefix)]
    assert keys and sorted(keys) == sorted(k for k in got if k.startswith(prefix))
    g, w = (torch.cat([d[k].reshape(-1) for k in keys]) for d in (got, want))
    return ((g - w).norm() / w.norm()).item()


def assert_ranks_identical(ranks_: list, what: str) -> None:
    a, b = ranks_
    assert a["amp"] == b["amp"], f"{what}: the ranks' scalers or update counts differ: {a['amp']} vs {b['amp']}"
    assert a["state"].keys() == b["state"].keys()
    differ = [k for k in a["state"] if not torch.equal(a["state"][k], b["state"][k])]
    assert not differ, f"{what}: the ranks differ in {differ[:3]}"


def test_fp16_loss_scaling_gives_one_process_updates(amp_fast, float64):
    """precision fp16 (GradScaler) on 2 ranks: every gradient and weight after each of AMP_STEPS
    iterations equals one process's on the 8 images within 1e-6, and so do the scalers (scale,
    growth tracker) and the number of updates applied, the iteration in which one rank alone
    has an inf gradient included. Run in float64, where autocast casts nothing but the loss
    scaling, the all-reduce of the scaled gradients, the unscale and the skip decision are real:
    the fp16 arithmetic itself is test_fp16_autocast_..."""
    want = one_process_fp16(autocast=False)
    for step in range(AMP_STEPS):
        got = amp_fast[0]["scaled"][step]
        for prefix in ("grad.", "param."):
            diff, name, n = worst_diff(got["state"], want[step]["state"], prefix)
            assert n >= 20 and diff <= 1e-6, f"iteration {step + 1}: {name} differs by {diff:.3g}"
        assert got["amp"] == want[step]["amp"], f"iteration {step + 1}: {got['amp']} vs one process's {want[step]['amp']}"
        assert_ranks_identical([r["scaled"][step] for r in amp_fast], f"iteration {step + 1}")


@pytest.mark.parametrize("mode", ["scaled", "autocast"])
def test_fp16_inf_gradient_on_one_rank_skips_the_step_on_both(amp_fast, mode):
    """Rank 1 alone gets an inf in a D gradient in iteration 2: the all-reduce hands it to rank 0
    too, so both ranks skip that D update (D's weights and optimiser state stay as they were),
    both halve D's scale and reset its growth tracker, and G's update goes ahead on both."""
    runs = [r[mode] for r in amp_fast]
    scale = 2.0 ** 10 if mode == "autocast" else 2.0 ** 16
    for rank, run in enumerate(runs):
        first, poisoned, after = (run[i]["amp"] for i in range(3))
        assert first["updates"] == {"d": 1, "g": 1} and first["scaler_d"]["scale"] == scale, f"rank {rank}: {first}"
        assert poisoned["updates"] == {"d": 1, "g": 2}, f"rank {rank} did not skip D alone: {poisoned}"
        assert poisoned["scaler_d"]["scale"] == scale / 2 and poisoned["scaler_d"]["_growth_tracker"] == 0
        assert poisoned["scaler_g"] == first["scaler_g"] | {"_growth_tracker": 2}
        assert after["updates"] == {"d": 2, "g": 3} and after["scaler_d"]["scale"] == scale / 2
        before, now = run[0]["state"], run[1]["state"]
        assert all(torch.equal(before[k], now[k]) for k in before if k.startswith("param.dis.")), f"rank {rank}: D moved"
        assert not all(torch.equal(before[k], now[k]) for k in before if k.startswith("param.gen."))
    for step in range(AMP_STEPS):
        assert_ranks_identical([run[step] for run in runs], f"{mode} iteration {step + 1}")


def test_fp16_autocast_matches_one_process(amp_fast):
    """Real fp16 autocast on 2 ranks vs one process on the 8 images: the first iteration's
    gradients agree to fp16 rounding (relative L2 over all of G's, or D's, gradients; pairing one
    image differently moves them by 0.7 and 0.14), and in every iteration the scalers and the
    updates applied are one process's. Weights are not compared: RMSprop's first step is
    ~lr/sqrt(1 - alpha) x sign(gradient), so the fp16 rounding noise of gradients that are 0 in
    exact arithmetic (conv biases before an instance norm) flips whole updates.
    Each rank backpropagates loss / W and the ranks' gradients are summed (`Approach._update`):
    averaged after backward, its fp16 activation gradients were W x one process's and in
    iteration 2 G's backward overflowed (its step skipped, the scale halved) on both ranks
    while one process's did not."""
    want = one_process_fp16(autocast=True)
    got = amp_fast[0]["autocast"]
    for net, tol in (("gen", 5e-2), ("dis", 1e-2)):
        err = rel_l2(got[0]["state"], want[0]["state"], f"grad.{net}.")
        assert err <= tol, f"{net}'s gradients differ from one process's by {err:.3g} (relative L2)"
    for step in range(AMP_STEPS):
        assert got[step]["amp"] == want[step]["amp"], \
            f"iteration {step + 1}: {got[step]['amp']} vs one process's {want[step]['amp']}"


def test_fast_backend_one_iteration_matches_one_process(amp_fast, float64):
    """The fast backend (fused-kernel generator with its norms on the reference impl, see
    worker_amp_fast; channels_last weights and gradients; foreach RMSprop) on 2 ranks: after one
    iteration every gradient and weight equals one process's on the 8 images within 1e-6."""
    a = build_fast(WORLD * BATCH)
    x, y = global_batch("funit2funit")
    a.train_step(x, y)
    got = amp_fast[0]["fast"]
    assert got["foreach"] and got["channels_last"]
    for prefix in ("grad.", "param."):
        diff, name, n = worst_diff(got["state"], state(a), prefix)
        assert n >= 20 and diff <= 1e-6, f"fast backend: {name} differs by {diff:.3g} ({n} tensors)"
    assert_ranks_identical([{"amp": None, "state": r["fast"]["state"]} for r in amp_fast], "fast backend")


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


if __name__ == "__main__":
    WORKERS[sys.argv[1]](Path(sys.argv[2]), *sys.argv[3:])
    # As g2g_fast.train.cli: skip the interpreter's shutdown, where gloo's threads can abort (SIGABRT).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
