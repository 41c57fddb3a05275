"""The rank processes of the distributed tests and what they share: tiny approaches, the fixed
global batch, the workers (this file is their script: `python tests/dist_ranks.py MODE OUT` under
RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, as torchrun sets them) and the launcher; the comparisons are in dist_compare.py.

Memory: a worker saves each result as soon as it has it (one file per key, `RankResults` loads a
key when a test asks for it), and rank 1 saves only digests of its tensors (`digest`), which is
all the bitwise comparison of the ranks needs: the float64 states of five naive steps are ~1 GB
per copy, and holding both ranks' took the test process to 7 GB.
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

from dist_compare import digest  # noqa: E402
from g2g_fast import distributed, grad_sync  # noqa: E402
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

def sharded_steps(a, shard: int, keep=copy.deepcopy, steps: int = STEPS) -> dict:
    """`steps` steps of `a` (on this rank) through the loader of rank `shard` of WORLD, across an
    epoch boundary (`dataset`, at STEPS): per step the losses (mean over the ranks) and their scale
    (the mean over the ranks of |loss|), the gradients (as averaged), and `a.state_dict()`
    (weights, BatchNorm buffers, EMA, optimiser states, step) before the first step and after each:
    "states"[k] is the state step k + 1 started from (test_five_steps_same_losses redoes each step
    in one process from it). Gradients and states are stored as `keep` makes them (rank 1: `digest`)."""
    stream = BatchStream(dataset(a.cfg.approach), BATCH, seed=3, rank=shard, world_size=WORLD)
    out = {"losses": [], "loss_scales": [], "grads": [], "states": [keep(a.state_dict())]}
    for _ in range(steps):
        x, y = next(stream)
        losses = a.train_step(x.double(), y)
        out["losses"].append({k: v.item() for k, v in grad_sync.mean_losses(losses).items()})
        out["loss_scales"].append({k: v.item() for k, v in grad_sync.mean_losses(
            {k: v.abs() for k, v in losses.items()}).items()})
        out["grads"].append(keep({k: v for k, v in state(a).items() if k.startswith("grad.")}))
        out["states"].append(keep(a.state_dict()))
    return out


def worker_equivalence(out: Path) -> None:
    """Per approach, in float64 (see test_one_iteration_gradients_match_one_process): one iteration
    on this rank's part of a fixed global batch, then STEPS steps through the sharded loader
    (`sharded_steps`), with gradients averaged by GradSync and the naive approach's BatchNorm
    synchronised. Each result is saved as soon as it is complete (`save`; rank 1: digests)."""
    ctx = distributed.init_from_env(torch.device("cpu"), timeout_s=60)
    torch.set_default_dtype(torch.float64)
    keep = copy.deepcopy if ctx.rank == 0 else digest

    def save(key: str, value) -> None:
        torch.save(value if ctx.rank == 0 else digest(value), out / f"rank{ctx.rank}.{key}.pt")

    for approach in APPROACHES:
        a = build(approach, BATCH)
        if approach == "naive":
            assert grad_sync.convert_sync_batchnorm(a.gen) == 12  # 6 per encoder
        distributed.broadcast_state(a.gen, a.gen_ema, a.dis)
        grad_sync.attach(a)
        x, y = global_batch(approach)
        losses = grad_sync.mean_losses(a.train_step(rank_part(x, ctx.rank), rank_part(y, ctx.rank)))
        result = {"one": state(a), "losses": {k: v.item() for k, v in losses.items()}}

        a = build(approach, BATCH)
        if approach == "naive":
            grad_sync.convert_sync_batchnorm(a.gen)
        # Buckets of ~4 KiB: dozens per network, most started by the hooks during backward (after
        # each optimiser's first, checking, step), so these steps test the overlapped all-reduce.
        grad_sync.attach(a, bucket_bytes=4096)
        result["run"] = sharded_steps(a, ctx.rank, keep)
        result["buckets"] = {"started_in_backward": a.grad_sync.started_in_backward,
                             "total": sum(map(len, a.grad_sync._buckets.values()))}
        save(approach, result)
        del result, a

    # A sharding error (test_five_step_comparison_catches_a_sharding_error): the naive run above,
    # but both ranks read rank 0's shard, so rank 1's images are never seen and rank 0's count twice.
    # Two steps show it (every step differs by far); five would double this run's memory.
    a = build("naive", BATCH)
    grad_sync.convert_sync_batchnorm(a.gen)
    grad_sync.attach(a, bucket_bytes=4096)
    save("naive_one_shard", sharded_steps(a, 0, keep, steps=2))

    # The naive approach without --sync-bn: per-rank BatchNorm statistics, so not one process's step.
    a = build("naive", BATCH)
    grad_sync.attach(a)
    x, y = global_batch("naive")
    a.train_step(rank_part(x, ctx.rank), rank_part(y, ctx.rank))
    save("naive_local_bn", state(a))

    # --nan-policy skip: a non-finite loss on rank 1 alone must skip the update on both ranks.
    a = build("funit2funit", BATCH, skip_nonfinite=True)
    grad_sync.attach(a)
    x, y = global_batch("funit2funit")
    x, y = rank_part(x, ctx.rank), rank_part(y, ctx.rank)
    if ctx.rank == 1:
        x[0] = float("nan")
    before = state(a)
    a.train_step(x, y)
    after = state(a)
    save("skip", {"skipped": a.skipped, "unchanged": all(torch.equal(before[k], after[k]) for k in before)})
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
    """FUNIT2FUNIT on the fast backend, its norms and pads forced to the reference impl (see
    worker_amp_fast)."""
    from g2g_fast.backends import FastBackend, force_impl
    a = build("funit2funit", batch, backend=FastBackend())
    force_impl(a, "ref")
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
      RMSprop and EMA) in float64, with the norms and pads forced to the reference impl
      (`force_impl(a, "ref")`): under TRITON_INTERPRET=1 the Triton kernels would run in the
      interpreter, far too slow here (and it has no float64 kernels: "auto" would fall back too)."""
    ctx = distributed.init_from_env(torch.device("cpu"), timeout_s=60)
    result = {}
    for mode in ("autocast", "scaled"):
        if mode == "scaled":
            torch.set_default_dtype(torch.float64)
        x, y = global_batch("funit2funit")  # "scaled" (and "fast"): drawn in float64, as the tests draw them
        x, y = rank_part(x, ctx.rank), rank_part(y, ctx.rank)
        a = build_fp16(BATCH, autocast=mode == "autocast")
        grad_sync.attach(a)
        if ctx.rank == 1:
            poison_d_gradient(a, at=1)
        result[mode] = []
        for _ in range(AMP_STEPS):
            a.train_step(x, y)
            result[mode].append({"state": state(a), "amp": amp_state(a)})

    a = build_fast(BATCH)
    grad_sync.attach(a)
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

    def faulty(self, x, y, timer=None, shots=None):
        if os.environ["RANK"] == "1" and self.step == 1:
            if fault == "raise":
                raise RuntimeError("injected failure on rank 1")
            time.sleep(600)
        return step(self, x, y, timer, shots=shots)

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


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread here too, like the rank processes (OMP_NUM_THREADS=1): with the ranks
    (or other jobs) on the same cores, OpenMP's spinning threads slow tiny ops down ~100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def worker_results(kind: str, out) -> list[dict]:
    """Run the `kind` worker on WORLD ranks into `out`; its saved results: [rank 0's, rank 1's]."""
    for rank, (code, text, _) in enumerate(run_workers(kind, out)):
        assert code == 0, f"rank {rank} failed:\n{text[-3000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


if __name__ == "__main__":
    WORKERS[sys.argv[1]](Path(sys.argv[2]), *sys.argv[3:])
    # As g2g_fast.train.cli: skip the interpreter's shutdown, where gloo's threads can abort (SIGABRT).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
