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
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from g2g_fast import distributed  # noqa: E402
from g2g_fast.config import config_from_dict  # noqa: E402
from g2g_fast.data import BatchStream, SyntheticDataset  # noqa: E402
from g2g_fast.reference.funit import Conv2dBlock  # noqa: E402
from g2g_fast.reference.naive import LordGenerator  # noqa: E402
from g2g_fast.reference.patchgan import InstanceNorm  # noqa: E402
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


class ZeroGradientEntries:
    """The parameter entries of `a` whose gradient is exactly 0 in exact arithmetic, found from the
    networks' structure while `a` trains (`step`), as {state key: bool mask} in `masks`:
    - structurally, in every step: the bias of a conv followed directly by an instance norm (FUNIT's
      Conv2dBlocks with norm "in"/"adain", CycleGAN's PatchGAN): the norm subtracts each map's mean,
      which removes a per-channel constant whatever the data;
    - data-dependent (the naive LORD generator's `adain_convs`, conv -> LeakyReLU -> AdaIN): a
      channel's bias in a step in which every map it gets in every (gradient-taking) call keeps one
      sign, so the LeakyReLU is linear on it and the AdaIN after it cancels the bias all the same.
    (The naive encoders' convs have no bias; their BatchNorm weights and biases have gradients.)
    Computed, such a gradient is rounding noise (AdaIN and instance norm run in fp32, even on
    float64 tensors: `adain_ref`), which Adam and RMSprop turn into steps of up to ~lr whose size
    and sign depend on the summation order. `last`: the entries of the last step; `masks`: those
    of any step so far. `worst` checks the claim: the largest |gradient| of an entry in a step it
    was claimed 0 in, relative to the largest |gradient| of its network in that step (rounding
    level: <= ~1e-6; the real ones of the naive adain_convs' biases are >= ~6e-5)."""

    def __init__(self, a):
        self.a, self.masks, self.last, self.worst = a, {}, {}, (0.0, "")
        self.structural, self._now = [], {}
        for part in ("gen", "dis"):
            net = getattr(a, part)
            for name, m in net.named_modules() if net is not None else ():
                key = f"param.{part}.{name}." if name else f"param.{part}."
                if isinstance(m, Conv2dBlock) and m.norm_kind in ("in", "adain") and m.conv.bias is not None:
                    self.structural.append(key + "conv.bias")
                elif isinstance(m, nn.Sequential):
                    for i, (conv, norm) in enumerate(zip(m, m[1:])):
                        if isinstance(conv, nn.Conv2d) and isinstance(norm, InstanceNorm) and conv.bias is not None:
                            self.structural.append(f"{key}{i}.bias")
                elif isinstance(m, LordGenerator):
                    for i, conv in enumerate(m.adain_convs):
                        conv.register_forward_hook(self._one_sign_maps(f"{key}adain_convs.{i}.bias"))

    def _one_sign_maps(self, key: str):
        def hook(_module, _inputs, out):
            if torch.is_grad_enabled():  # the D step's G forward takes no gradient
                one_sign = ((out > 0).flatten(2).all(2) | (out < 0).flatten(2).all(2)).all(0)
                self._now[key] = one_sign & self._now.get(key, one_sign)
        return hook

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        self._now = {}
        losses = self.a.train_step(x, y)
        s = state(self.a)
        now = {k: torch.ones_like(s[k], dtype=torch.bool) for k in self.structural} | self._now
        self.last = {k: m for k, m in now.items() if m.any()}
        for key, zero in now.items():
            part = key.split(".")[1]
            scale = max(v.abs().max().item() for k, v in s.items() if k.startswith(f"grad.{part}."))
            grad = s["grad." + key[len("param."):]]
            if zero.any():
                self.worst = max(self.worst, (grad[zero].abs().max().item() / scale, key))
            self.masks[key] = zero | self.masks.get(key, torch.zeros_like(zero))
        self.masks = {k: m for k, m in self.masks.items() if m.any()}
        return losses


# Which entries ZeroGradientEntries must find (it excludes nothing else): every conv bias before an
# instance norm / AdaIN in FUNIT's generator (TINY: 3 downs, 2 ResBlocks), and in CycleGAN's PatchGAN
# (its FUNIT discriminator has no norm); in the naive approach, single channels of the LORD
# generator's adain_convs biases (which ones depends on the data and the weights).
FUNIT_G_ZERO = ([f"param.gen.enc_content.model.{i}.conv.bias" for i in range(4)]
                + [f"param.gen.{part}.model.{r}.model.{c}.conv.bias" for part in ("enc_content.model.4", "dec.model.0")
                   for r in range(2) for c in range(2)]
                + [f"param.gen.dec.model.{i}.conv.bias" for i in (2, 4, 6)])
ZERO_GRADIENT = {
    "funit2funit": FUNIT_G_ZERO,
    "cyclefunit": FUNIT_G_ZERO + [f"param.dis.model.{i}.bias" for i in (2, 5, 8)],
    "naive": r"param\.gen\.gen\.adain_convs\.\d+\.bias",
}
ZERO_GRADIENT_MAX = 1e-5  # ZeroGradientEntries.worst: between rounding level and the real gradients


def check_zero_gradient_entries(approach: str, z: ZeroGradientEntries) -> None:
    """`z` claims exactly the expected entries and their gradients were rounding noise."""
    expected = ZERO_GRADIENT[approach]
    if isinstance(expected, str):
        assert all(re.fullmatch(expected, k) and not z.masks[k].all() for k in z.masks), \
            f"{approach}: unexpected zero-gradient entries {sorted(z.masks)}"
    else:
        assert sorted(z.masks) == sorted(expected) and all(m.all() for m in z.masks.values()), \
            f"{approach}: zero-gradient entries {sorted(z.masks)}, expected {sorted(expected)}"
    ratio, key = z.worst
    assert ratio <= ZERO_GRADIENT_MAX, f"{approach}: {key} has a real gradient ({ratio:.3g} of the largest)"


def cli_args(out, steps: int, *extra) -> list[str]:
    """A tiny FUNIT2FUNIT run of `python -m g2g_fast.train`: 32 synthetic images."""
    args = ["--approach", "funit2funit", "--device", "cpu", "--batch-size", str(BATCH), "--steps", str(steps),
            "--out", str(out), "--log-every", "1", "--sample-every", "2", "--ckpt-every", "2",
            "--set", f"synthetic_classes={CLASSES}", "--set", "synthetic_per_class=8"]
    for k, v in TINY["funit2funit"].items():
        args += ["--set", f"{k}={v}"]
    return args + list(extra)


# --- the rank processes ----------------------------------------------------------------------

def sharded_steps(a, shard: int) -> dict:
    """STEPS steps of `a` (on this rank) through the loader of rank `shard` of WORLD, across an
    epoch boundary (`dataset`): per step the losses (mean over the ranks) and their scale (the
    mean over the ranks of |loss|), the gradients (as averaged), and `a.state_dict()` (weights,
    BatchNorm buffers, EMA, optimiser states, step) before the first step and after each:
    "states"[k] is the state step k + 1 started from (test_five_steps_same_losses redoes each step
    in one process from it)."""
    stream = BatchStream(dataset(a.cfg.approach), BATCH, seed=3, rank=shard, world_size=WORLD)
    out = {"losses": [], "loss_scales": [], "grads": [], "states": [copy.deepcopy(a.state_dict())]}
    for _ in range(STEPS):
        x, y = next(stream)
        losses = a.train_step(x.double(), y)
        out["losses"].append({k: v.item() for k, v in distributed.mean_losses(losses).items()})
        out["loss_scales"].append({k: v.item() for k, v in distributed.mean_losses(
            {k: v.abs() for k, v in losses.items()}).items()})
        out["grads"].append({k: v for k, v in state(a).items() if k.startswith("grad.")})
        out["states"].append(copy.deepcopy(a.state_dict()))
    return out


def worker_equivalence(out: Path) -> None:
    """Per approach, in float64 (see test_one_iteration_gradients_match_one_process): one iteration
    on this rank's part of a fixed global batch, then STEPS steps through the sharded loader
    (`sharded_steps`), with gradients averaged by GradSync and the naive approach's BatchNorm
    synchronised."""
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
        result[approach]["run"] = sharded_steps(a, ctx.rank)
        result[approach]["buckets"] = {"started_in_backward": a.grad_sync.started_in_backward,
                                       "total": sum(map(len, a.grad_sync._buckets.values()))}

    # A sharding error (test_five_step_comparison_catches_a_sharding_error): the naive run above,
    # but both ranks read rank 0's shard, so rank 1's images are never seen and rank 0's count twice.
    a = build("naive", BATCH)
    distributed.convert_sync_batchnorm(a.gen)
    distributed.attach(a, bucket_bytes=4096)
    result["naive_one_shard"] = sharded_steps(a, 0)

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
    drifts by 10% within 3 steps. In float64 that noise stays below the optimisers' eps, except
    for gradients that are 0 in exact arithmetic: the instance norms and AdaIN compute in fp32 even
    on float64 tensors (`adain_ref`), so those come out as fp32 rounding noise (ZeroGradientEntries)."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def worst_diff(got: dict, want: dict, prefix: str, skip: dict | None = None,
               relative: bool = False) -> tuple[float, str, int]:
    """The largest |got - want| over the tensors whose key starts with `prefix`, its key, and how
    many tensors; leaving out the entries of `skip` ({key: bool mask}: ZeroGradientEntries.masks).
    `relative`: each tensor's difference relative to its largest |want| entry (of those compared)."""
    keys = [k for k in want if k.startswith(prefix)]
    assert keys and sorted(keys) == sorted(k for k in got if k.startswith(prefix))
    skip = skip or {}
    diffs = []
    for k in keys:
        g, w = got[k].double(), want[k].double()
        if k in skip:
            g, w = g[~skip[k]], w[~skip[k]]
        d = (g - w).abs().max().item() if w.numel() else 0.0
        if relative and w.numel() and w.abs().max() > 0:
            d /= w.abs().max().item()
        diffs.append((d, k))
    diff, name = max(diffs)
    return diff, name, len(keys)


def flat_state(a, sd: dict) -> dict[str, torch.Tensor]:
    """`sd`, a state_dict of an approach built as `a`, as {key: tensor}: "param.PART.NAME" and
    "buffer.PART.NAME" for the networks (PART: gen, dis, gen_test for the EMA), "opt.PART.NAME:KEY"
    for the optimiser state of parameter PART.NAME (Adam's exp_avg, exp_avg_sq, step; RMSprop's
    square_avg, step), and "step"."""
    out = {"step": torch.tensor(sd["step"])}
    for part, net in (("gen", a.gen), ("gen_test", a.gen_ema), ("dis", a.dis)):
        if net is not None:
            params = dict(net.named_parameters())
            out |= {f"{'param' if k in params else 'buffer'}.{part}.{k}": v for k, v in sd[part].items()}
    for part, opt in (("gen", a.opt_g), ("dis", a.opt_d)):
        if opt is not None:
            name = {id(p): n for n, p in getattr(a, part).named_parameters()}
            names = [name[id(p)] for group in opt.param_groups for p in group["params"]]
            for i, per_param in sd["opt_g" if part == "gen" else "opt_d"]["state"].items():
                out |= {f"opt.{part}.{names[i]}:{k}": v for k, v in per_param.items()}
    return out


def state_masks(zero: dict[str, torch.Tensor], flat: dict) -> dict[str, torch.Tensor]:
    """`zero` ({"param.PART.NAME": mask}) extended to the keys of `flat` (`flat_state`, `state`)
    holding the same entries: the parameter, its gradient, its EMA and its optimiser states (not
    the step counts)."""
    out = {}
    for k, v in flat.items():
        if k.startswith("param.gen_test."):
            p = "param.gen." + k[len("param.gen_test."):]
        elif k.startswith(("opt.", "grad.")):
            p = "param." + k.split(".", 1)[1].split(":")[0]
        else:
            p = k
        if p in zero and zero[p].shape == v.shape:
            out[k] = zero[p]
    return out


def load_state(a, sd: dict) -> None:
    """`a.load_state_dict(sd)`, then the networks once more as they are: `load_checked` casts them
    to fp32 (to keep a reference fp32 when a file is half precision), which would round these
    float64 weights. Checked: `a` then holds exactly `sd`. `sd` is copied first: the optimisers
    would keep its tensors as their state and update them in place."""
    sd = copy.deepcopy(sd)
    a.load_state_dict(sd, source="the ranks' state")
    for part, net in (("gen", a.gen), ("gen_test", a.gen_ema), ("dis", a.dis)):
        if net is not None:
            net.load_state_dict(sd[part], strict=True)
    want, got = flat_state(a, sd), flat_state(a, a.state_dict())
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), "state not restored"


# What redo_steps compares, and within what: losses, the averaged gradients and the optimisers'
# moving averages (and step counts) relative to their size (each tensor's largest entry): the
# instance norms and AdaIN round to fp32, so a float64 difference of ~1e-16 can move an activation
# by an fp32 ulp (seen: 1e-8 of a gradient tensor's largest entry, in the naive run's step 3);
# weights (G, its EMA, D) and BatchNorm running statistics (and batch counts) absolutely.
STEP_TOLERANCE = {"losses": 1e-6, "grad.": 1e-6, "param.": 1e-6, "buffer.": 1e-6, "opt.": 1e-6}


def redo_steps(approach: str, run: dict) -> tuple[list[dict], ZeroGradientEntries, float]:
    """Each step of a 2-rank run (`sharded_steps`), redone in one process (float64, batch 8, the
    images the ranks read in that step together) from the state the ranks started it from, and
    compared with what the ranks got: per step {what: (difference, where)} for each STEP_TOLERANCE
    category (`worst_diff`), leaving out the entries of zero gradient in exact arithmetic
    (ZeroGradientEntries: their gradients, weights, EMA and optimiser states), and "moved": how far
    such an entry moved in that step, in the ranks' run or this one, in units of the largest
    learning rate. Also -> the ZeroGradientEntries, and that lr.
    Losses are reported in fp32, by each rank before the mean, so a loss is compared relative to
    its size on the ranks (the mean of |loss|) where that is larger (FUNIT's g_adv, -D(fake), has
    either sign, so the ranks' values can cancel).
    As both runs start each step from the same state, one step's rounding differences cannot be
    amplified by the following steps (Adam/RMSprop turn the rounding noise of a zero gradient into
    a step of ~lr, which in fp32 AdaIN reaches the other weights by rounding)."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        a = build(approach, WORLD * BATCH)
        zero = ZeroGradientEntries(a)
        lr = max(g["lr"] for opt in (a.opt_g, a.opt_d) if opt is not None for g in opt.param_groups)
        stream = BatchStream(dataset(approach), WORLD * BATCH, seed=3)
        out = []
        for k in range(STEPS):
            x, y = next(stream)
            load_state(a, run["states"][k])
            before = flat_state(a, run["states"][k])
            losses = {key: v.item() for key, v in zero.step(x.double(), y).items()}
            got, want = flat_state(a, run["states"][k + 1]), flat_state(a, a.state_dict())
            skip = state_masks(zero.last, want)
            assert run["losses"][k].keys() == losses.keys()
            scales = run["loss_scales"][k]
            diffs = {"losses": max((abs(run["losses"][k][key] - v) / max(abs(v), scales[key], 1e-12), key)
                                   for key, v in losses.items())}
            grads = {key: v for key, v in state(a).items() if key.startswith("grad.")}
            diffs["grad."] = worst_diff(run["grads"][k], grads, "grad.", state_masks(zero.last, grads), relative=True)[:2]
            for prefix in ("param.", "buffer.", "opt."):
                diffs[prefix] = worst_diff(got, want, prefix, skip, relative=prefix == "opt.")[:2]
            assert got["step"] == want["step"] == k + 1
            diffs["moved"] = max(((run_[key] - before[key])[mask].abs().max().item() / lr, key)
                                 for key, mask in zero.last.items() for run_ in (got, want)) if zero.last else (0.0, "")
            out.append(diffs)
    finally:
        torch.set_default_dtype(dtype)
    return out, zero, lr


# One optimiser step moves an entry by at most 10 lr: RMSprop's lr |g| / sqrt(v) with
# v >= (1 - alpha) g^2, alpha 0.99; Adam's (betas 0.9, 0.999) by at most 7.3 lr (Cauchy-Schwarz on
# its moving averages; ~lr in its first 5 steps).
MAX_STEP_LR = 10


@pytest.mark.parametrize("approach", APPROACHES)
def test_one_iteration_gradients_match_one_process(ranks, float64, approach):
    """After one D + G iteration, every gradient on 2 ranks (4 images each) equals one process's on
    the 8 images arranged so that it forms the same pairs (R1 and synchronised BatchNorm included),
    and so do the weights after the update, but for the entries of zero gradient (rounding noise,
    which the optimiser's first step turns into ~lr: ZeroGradientEntries)."""
    a = build(approach, WORLD * BATCH)
    zero = ZeroGradientEntries(a)
    x, y = global_batch(approach)
    losses = zero.step(x, y)
    want, got = state(a), ranks[0][approach]["one"]
    # relative to each tensor's largest entry: FUNIT gradients reach ~60, where one fp32 rounding
    # flip in an instance norm would use up an absolute 1e-6
    diff, name, n = worst_diff(got, want, "grad.", relative=True)
    assert n >= 20 and diff <= 1e-6, f"{approach}: gradient {name} differs by {diff:.3g} ({n} gradients)"
    if approach != "naive":
        assert any(k.startswith("grad.dis.") for k in want)  # D's gradients (R1's included) are compared
    check_zero_gradient_entries(approach, zero)
    diff, name, _ = worst_diff(got, want, "param.", skip=zero.masks)
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


def worst_step(steps: list[dict], what: str) -> tuple[float, str]:
    """The largest difference `what` over the steps of `redo_steps`, and where (step and key)."""
    return max((d[what][0], f"step {k + 1}: {d[what][1]}") for k, d in enumerate(steps))


@pytest.mark.parametrize("approach", APPROACHES)
def test_five_steps_same_losses(ranks, approach):
    """Each of STEPS steps on 2 ranks through the sharded loader (across an epoch boundary) is one
    process's step on the global batch 8 (`redo_steps`: each step redone from the ranks' state
    before it): the same losses, gradients, weights (EMA included), BatchNorm running statistics
    and optimiser states (STEP_TOLERANCE).
    Left out: the entries whose gradient is 0 in exact arithmetic (`ZeroGradientEntries`: conv
    biases before an instance norm, and in the naive generator channels that a LeakyReLU passes
    linearly into AdaIN). Their computed gradient is rounding noise, ~1e-7 of the others, which
    Adam and RMSprop scale up to a step of ~lr whose size and sign depend on the summation order
    (the naive run moves such a bias by ~1e-3 in 5 steps; the ranks and one process differed by
    2.4e-5 on one machine). For them only what holds in any summation order is checked: each step
    moved them by at most MAX_STEP_LR x lr.
    Why step by step: in a 5-step comparison such a difference reaches the rest through rounding
    (the naive generator's AdaIN rounds to fp32; shifting two left-out naive adain_convs.0.bias
    entries by 1e-5 at the start changed the other weights by ~1e-3 and the losses by ~10% in 5
    steps), so it held within 1e-6 by luck. Here no step starts from another's rounding."""
    steps, zero, lr = redo_steps(approach, ranks[0][approach]["run"])
    check_zero_gradient_entries(approach, zero)
    for what, tol in STEP_TOLERANCE.items():
        diff, where = worst_step(steps, what)
        assert diff <= tol, f"{approach}: {what} differ by {diff:.3g} ({where}; at most {tol:g})"
    moved, where = worst_step(steps, "moved")
    assert moved <= MAX_STEP_LR, f"{approach}: a left-out entry moved by {moved:.3g} lr in one step ({where})"


def test_five_step_comparison_catches_a_sharding_error(ranks):
    """The comparison of test_five_steps_same_losses, zero-gradient entries left out as there, fails
    by far in every step when the ranks read the wrong images: both rank 0's shard
    (worker_equivalence's "naive_one_shard": the naive approach, whose left-out entries depend on
    the data)."""
    steps, _, _ = redo_steps("naive", ranks[0]["naive_one_shard"])
    for k, diffs in enumerate(steps):
        for what, tol in STEP_TOLERANCE.items():
            assert diffs[what][0] > 100 * tol, f"step {k + 1}: a wrong sharding passed: {what} {diffs[what]}"


def test_all_reduce_overlaps_backward(ranks):
    """In test_five_steps_same_losses' runs (4 KiB buckets) the buckets start during backward:
    every one of them in each step after the first (which checks the gradient layout first)."""
    for approach in APPROACHES:
        b = ranks[0][approach]["buckets"]
        assert b["total"] >= 8, b
        assert b["started_in_backward"] == (STEPS - 1) * b["total"], (approach, b)
        assert ranks[1][approach]["buckets"] == b


def differences(a, b, where: str = "") -> list[str]:
    """Where `a` and `b` (nested dicts, lists, tensors, numbers) differ, tensors compared bitwise."""
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return [d for k in a for d in differences(a[k], b[k], f"{where}[{k!r}]")]
    if isinstance(a, (list, tuple)) and type(a) is type(b) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if a.dtype == b.dtype and torch.equal(a, b) else [where]
    return [] if type(a) is type(b) and a == b else [where]


def test_ranks_stay_bitwise_identical(ranks):
    """The all-reduce hands every rank the same gradients, so their weights (and optimiser states,
    EMA, BatchNorm statistics, losses) never drift apart: rank 0's alone are compared elsewhere."""
    for approach in APPROACHES:
        for part in ("one", "run"):
            differ = differences(ranks[0][approach][part], ranks[1][approach][part])
            assert not differ, f"{approach} ({part}): the ranks differ in {len(differ)} places: {differ[:5]}"


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
