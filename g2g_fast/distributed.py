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

Gradients are averaged by an explicit bucketed all-reduce that starts during backward
(`g2g_fast.grad_sync`, with the finite check, the loss mean and SyncBatchNorm; `GradSync`:
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


__all__ = ["DistContext", "DistributedError", "broadcast_state", "context", "gather_rng", "init_from_env",
           "resume_batch_size", "seed_rank", "teardown"]
