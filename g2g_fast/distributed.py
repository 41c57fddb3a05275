"""Data-parallel training under `torchrun` (torch.distributed), without DDP.

What a W-rank run with `--batch-size B` computes (halves pairing, the default): exactly one step
of one process with batch W*B. Rank r reads pairs [r*B/2, (r+1)*B/2) of the global batch (its
first half from the global first half, its second half from the global second half;
`g2g_fast.data.StepPlan`, shared by every loader), so the ranks form the pairs one process would.
Every loss is a mean over the pairs of equal-size per-rank batches, so the mean of the ranks'
gradients is the one-process gradient. Two exceptions, handled here:
- FUNIT's R1 squares the gradient of a batch mean and scales as 1/n^3 in the n images of a call,
  not 1/n: `Approach` divides each rank's penalty by W^2 (`GradSync.world_size`).
- BatchNorm (the naive approach's encoders) normalises with batch statistics: per rank by default,
  over the whole global batch with `--sync-bn` (`SyncBatchNorm2d`, which then matches one process).
"chain" pairing cannot be split exactly (one process would also chain across rank boundaries):
each rank chains its own B images and the result is the mean of the ranks' chain losses.

Gradients are averaged by an explicit bucketed all-reduce that starts during backward (`GradSync`:
post-accumulate-grad hooks start each complete bucket, in a fixed order), not DDP:
the D step's R1 term uses `torch.autograd.grad(create_graph=True)`, which DDP does not support,
and the G2G wiring calls the generator several times per step. All ranks end every collective
with bitwise-identical gradients, hence identical parameters. Every collective runs under the
process group's timeout and turns a failure into one `DistributedError` line.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

log = logging.getLogger("g2g_fast")

BUCKET_BYTES = 16 << 20  # gradient all-reduce bucket: big enough to amortise latency, small enough to cache


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank died or hangs. One line, names the rank."""


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    timeout_s: float = 600.0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CTX = DistContext()
_JOINED = False  # whether this process ever joined a process group (see `joined`)


def context() -> DistContext:
    """The active context: rank 0 of 1 unless `init_from_env` started a process group."""
    return _CTX


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError("RANK/WORLD_SIZE/LOCAL_RANK must be integers (launch with torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK {rank} is not in [0, WORLD_SIZE {world}) (launch with torchrun)")
    return rank, world, local


def init_from_env(device: torch.device, timeout_s: float = 600.0) -> DistContext:
    """Join the process group torchrun describes (no-op for a single process) -> the context.

    CUDA: NCCL, one GPU per local rank (`cuda:LOCAL_RANK`). CPU: gloo. Every collective (and the
    rendezvous) gives up after `timeout_s`, so a dead or stuck rank ends the job instead of hanging.
    """
    global _CTX, _JOINED
    rank, world, local = env_world()
    if world == 1:
        _CTX = DistContext(device=device, timeout_s=timeout_s)
        return _CTX
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) "
                             f"are visible: use torchrun --nproc_per_node <= {torch.cuda.device_count()}")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    try:
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    except Exception as e:
        raise DistributedError(f"rank {rank}/{world}: joining the process group failed "
                               f"({_first_line(e)}); check MASTER_ADDR/MASTER_PORT or the rendezvous "
                               f"settings of torchrun, or raise --dist-timeout") from None
    _JOINED = True
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    _CTX = DistContext(rank, world, local, local_world, device, timeout_s)
    if rank != 0:
        # Rank 0 logs; the others only warn (a line per rank per step would be noise).
        log.setLevel(logging.WARNING)
    return _CTX


def teardown(clean: bool = True) -> None:
    """Leave the process group (safe to call when none was started). After a failure
    (`clean=False`) the group is only dropped: destroying it could wait on the dead rank, and
    the process is about to exit anyway. No barrier: after training rank 0 alone still writes
    (checkpoint, final evaluation) and runs no collective, while a barrier there would be bounded
    by --dist-timeout (under NCCL its watchdog would abort the waiting ranks)."""
    global _CTX
    if clean and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CTX = DistContext(device=_CTX.device, timeout_s=_CTX.timeout_s)


def joined() -> bool:
    """Whether this process joined a process group. The entry point then leaves with os._exit once
    its files are written: the backend's threads (gloo's wait on a dead peer after a failure, and
    rarely even after a clean destroy_process_group) can call std::terminate while the interpreter
    shuts down, turning exit code 0 or 1 into SIGABRT, which torchrun reports as a failed job."""
    return _JOINED


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def collective(what: str, fn, *args, **kwargs):
    """Run one torch.distributed call; a failure becomes one DistributedError line."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        c = _CTX
        raise DistributedError(
            f"rank {c.rank}/{c.world_size}: {what} failed ({_first_line(e)}); another rank probably "
            f"crashed (see its error) or has not answered within --dist-timeout {c.timeout_s:g} s") from None


# --- data: resuming on another number of ranks ------------------------------------------------

def resume_batch_size(ckpt: dict, batch_size: int, explicit: bool = False) -> int:
    """Per-rank batch when resuming `ckpt` on this world size: the saved global batch split over the
    ranks (so steps keep reading the same images), unless the user set the batch size (`explicit`)."""
    data = ckpt.get("data", {})
    saved_world = int(data.get("world_size", 1))
    saved_batch = int(ckpt["config"]["batch_size"])
    world = _CTX.world_size
    if saved_world == world or explicit:
        return batch_size
    total = int(data.get("global_batch", saved_batch * saved_world))
    if total % world or (total // world) % 2:
        raise ValueError(f"--resume: the checkpoint's global batch {total} ({saved_world} ranks x {saved_batch}) "
                         f"does not split into an even batch on each of {world} ranks; pass --batch-size "
                         f"(the data schedule then changes) or use another number of ranks")
    log.info("resuming a %d-rank run on %d rank(s): batch %d per rank keeps the global batch %d",
             saved_world, world, total // world, total)
    return total // world


# --- state: identical start, per-rank seeds -----------------------------------------------------

@torch.no_grad()
def broadcast_state(*modules: nn.Module | None) -> None:
    """Copy rank 0's parameters and buffers to every rank (identical start even if initialisation
    differed, e.g. another CPU kernel), one flattened broadcast per dtype."""
    if not _CTX.enabled:
        return
    tensors = [t for m in modules if m is not None for t in (*m.parameters(), *m.buffers())]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, group in by_dtype.items():
        flat = torch.cat([t.detach().reshape(-1).to(_CTX.device) for t in group])
        collective("broadcasting rank 0's weights", dist.broadcast, flat, src=0)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()


def rank_seed(seed: int, rank: int) -> int:
    """The global-RNG seed of `rank`: distinct per rank, a function of the run's seed."""
    return (seed * 1_000_003 + 7919 * rank) % 2**63


def seed_rank(seed: int, ckpt: dict | None) -> None:
    """Seed this rank's torch RNGs for anything random after initialisation (weights are
    identical on every rank, from the shared seed and `broadcast_state`): its state from the
    checkpoint when that run had as many ranks, else a fresh per-rank seed."""
    if not _CTX.enabled:
        return
    states = (ckpt or {}).get("rng_ranks")
    if states is not None and len(states) == _CTX.world_size:
        from .checkpoint import set_rng_state
        set_rng_state(states[_CTX.rank], _CTX.device)
        return
    torch.manual_seed(rank_seed(seed, _CTX.rank))


def gather_rng(state: dict) -> list[dict] | None:
    """Every rank's RNG state, on rank 0 (None elsewhere and for one rank)."""
    if not _CTX.enabled:
        return None
    out = [None] * _CTX.world_size if _CTX.is_main else None
    collective("gathering RNG states", dist.gather_object, state, out, dst=0)
    return out


# --- the step: gradients, finite flags, losses ---------------------------------------------------

class _Bucket:
    """Parameters whose gradients are all-reduced together (one device and dtype)."""

    def __init__(self, params: list):
        self.params, self.ready, self.work, self.flat, self.grads = params, 0, None, None, []


class GradSync:
    """Averages gradients over the ranks between backward and the optimiser step.

    `begin(opt)` before backward, `finish(opt)` after it. The optimiser's parameters are split once
    into buckets of about `bucket_bytes` (per device and dtype, in reverse registration order, the
    order backward tends to produce them). During backward a post-accumulate-grad hook counts each
    bucket's gradients, and a bucket whose gradients are all there is packed and its all-reduce
    started asynchronously, overlapping the rest of backward. Buckets start strictly in order, so
    every rank issues the same collectives in the same order. `finish` starts what is left (buckets
    with a parameter that got no gradient), waits, divides by the world size (not under fp16 loss
    scaling, where each rank backpropagated loss / W instead: `Approach._update`) and copies back
    (any memory format).

    The hooks only see gradients accumulated into `.grad`, so R1's `autograd.grad(create_graph=True)`
    passes through untouched and the penalty's gradient is reduced with the rest. The set of
    parameters with a gradient must be the same on every rank: the first `finish` per optimiser
    checks it before any of its collectives (that step does not overlap)."""

    def __init__(self, world_size: int, group=None, bucket_bytes: int = BUCKET_BYTES):
        self.world_size, self.group, self.bucket_bytes = world_size, group, bucket_bytes
        self._buckets: dict[int, list[_Bucket]] = {}
        self._armed: dict[int, bool] = {}      # id(opt) -> whether its hooks start buckets now
        self._next: dict[int, int] = {}        # id(opt) -> index of the next bucket to start
        self._average: dict[int, bool] = {}
        self._checked: set[int] = set()
        self.started_in_backward = 0           # buckets started by the hooks (for tests and logs)

    def begin(self, opt: torch.optim.Optimizer, average: bool = True) -> None:
        """Before backward. `average=False`: sum only (the caller already divided its loss by W)."""
        key = id(opt)
        if key not in self._buckets:
            self._buckets[key] = self._plan(opt)
        for b in self._buckets[key]:
            b.ready, b.work, b.flat, b.grads = 0, None, None, []
        self._next[key], self._average[key] = 0, average
        self._armed[key] = key in self._checked

    def finish(self, opt: torch.optim.Optimizer) -> None:
        """After backward: every gradient is the ranks' mean (or sum) when this returns."""
        key = id(opt)
        self._armed[key] = False
        buckets = self._buckets[key]
        if key not in self._checked:
            self._check_same_params(sum(p.grad is not None for b in buckets for p in b.params))
            self._checked.add(key)
        while self._next[key] < len(buckets):
            self._start(key, buckets[self._next[key]])
        for b in buckets:
            if b.work is None:
                continue
            collective("the gradient all-reduce", b.work.wait)
            if self._average[key]:
                b.flat.div_(self.world_size)
            offset = 0
            for g in b.grads:
                g.copy_(b.flat[offset:offset + g.numel()].view(g.shape))
                offset += g.numel()
            b.work, b.flat, b.grads = None, None, []

    def _plan(self, opt) -> list[_Bucket]:
        params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        buckets, current, size = [], [], 0
        for p in reversed(params):
            if current and ((p.device, p.dtype) != (current[0].device, current[0].dtype)
                            or size >= self.bucket_bytes):
                buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(p)
            size += p.numel() * p.element_size()
        if current:
            buckets.append(_Bucket(current))
        key = id(opt)
        for b in buckets:
            for p in b.params:
                p.register_post_accumulate_grad_hook(self._hook(key, b))
        return buckets

    def _hook(self, key: int, bucket: _Bucket):
        def on_grad(_param):
            if not self._armed.get(key):
                return
            bucket.ready += 1
            buckets = self._buckets[key]
            # Start every complete bucket from the next one on, in order.
            while self._next[key] < len(buckets):
                b = buckets[self._next[key]]
                if b.ready < len(b.params):
                    break
                self._start(key, b)
                self.started_in_backward += 1
        return on_grad

    def _start(self, key: int, b: _Bucket) -> None:
        self._next[key] += 1
        b.grads = [p.grad for p in b.params if p.grad is not None]
        if not b.grads:
            return
        b.flat = torch.cat([g.reshape(-1) for g in b.grads])
        b.work = collective("the gradient all-reduce", dist.all_reduce, b.flat, group=self.group, async_op=True)

    def _check_same_params(self, n: int) -> None:
        t = torch.tensor([n, -n], dtype=torch.int64, device=_CTX.device)
        collective("checking the gradient layout", dist.all_reduce, t, op=dist.ReduceOp.MAX, group=self.group)
        if int(t[0]) != n or int(-t[1]) != n:
            raise DistributedError(f"rank {_CTX.rank}: {n} parameters have gradients here, between "
                                   f"{int(-t[1])} and {int(t[0])} on other ranks; every rank must run the same model")

    def all_true(self, flag: torch.Tensor) -> torch.Tensor:
        """The logical AND of a boolean tensor over the ranks (so skip/stop decisions agree)."""
        return all_true(flag, self.group)


def all_true(flag: torch.Tensor, group=None) -> torch.Tensor:
    """AND of a boolean tensor over the ranks; `flag` itself for one process."""
    if not _CTX.enabled:
        return flag
    t = flag.detach().to(torch.int32).reshape(1)
    collective("agreeing on the non-finite check", dist.all_reduce, t, op=dist.ReduceOp.MIN, group=group)
    return t[0].bool()


def mean_losses(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each loss averaged over the ranks: the loss of the global batch (at log time only)."""
    if not _CTX.enabled or not losses:
        return losses
    flat = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
    collective("averaging the losses", dist.all_reduce, flat)
    flat /= _CTX.world_size
    return dict(zip(losses, flat.unbind()))


def attach(approach, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Make `approach` average its gradients over the ranks (nothing for one process)."""
    if _CTX.enabled:
        approach.grad_sync = GradSync(_CTX.world_size, bucket_bytes=bucket_bytes)


# --- SyncBatchNorm ------------------------------------------------------------------------------

class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the backward sums the incoming gradients over ranks too
    (each rank's statistics feed every rank's loss)."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        collective("the SyncBatchNorm all-reduce", dist.all_reduce, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        g = grad.contiguous().clone()
        collective("the SyncBatchNorm backward all-reduce", dist.all_reduce, g)
        return g


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole global batch (every rank's
    images): two-pass mean and biased variance in fp32 from all-reduced sums, running statistics
    updated like BatchNorm2d's (unbiased variance). Same parameters, buffers and state-dict keys as
    BatchNorm2d; runs on any device and backend (torch's SyncBatchNorm needs a GPU). Eval mode and
    a single process use plain BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _CTX.enabled):
            return super().forward(x)
        self._check_input_dim(x)
        dims = (0, 2, 3)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 statistics (fp64 stays fp64)
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=xf.dtype)
        s = _AllReduceSum.apply(torch.cat([xf.sum(dims), count]))
        n = s[-1].detach()
        mean = s[:-1] / n
        centred = xf - mean.view(1, -1, 1, 1)
        var = _AllReduceSum.apply(centred.pow(2).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * (n / (n - 1)), m)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> int:
    """Swap every BatchNorm2d in `module` for a SyncBatchNorm2d sharing its parameters and buffers
    (optimisers keep working); returns how many were swapped."""
    count = 0
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats, device="meta")
            for key, p in child._parameters.items():
                new._parameters[key] = p
            for key, b in child._buffers.items():
                new._buffers[key] = b
            new.train(child.training)
            setattr(module, name, new)
            count += 1
        else:
            count += convert_sync_batchnorm(child)
    return count


__all__ = ["DistContext", "DistributedError", "GradSync", "SyncBatchNorm2d", "all_true", "attach",
           "broadcast_state", "context", "convert_sync_batchnorm", "gather_rng", "init_from_env",
           "mean_losses", "resume_batch_size", "seed_rank", "teardown"]
