"""The per-step collectives of a `torchrun` run (see `g2g_fast.distributed` for what a W-rank run
computes): the bucketed gradient all-reduce that overlaps backward (`GradSync`, `attach`), the
rank-wide finite check and loss mean, and SyncBatchNorm. Split from `distributed.py`, which keeps
the process group, the per-rank seeds and resuming on another world size; everything here reads
the process group through `distributed.context()`, so it is one process's no-op without torchrun.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .distributed import BUCKET_BYTES, DistributedError, collective, context

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
        t = torch.tensor([n, -n], dtype=torch.int64, device=context().device)
        collective("checking the gradient layout", dist.all_reduce, t, op=dist.ReduceOp.MAX, group=self.group)
        if int(t[0]) != n or int(-t[1]) != n:
            raise DistributedError(f"rank {context().rank}: {n} parameters have gradients here, between "
                                   f"{int(-t[1])} and {int(t[0])} on other ranks; every rank must run the same model")

    def all_true(self, flag: torch.Tensor) -> torch.Tensor:
        """The logical AND of a boolean tensor over the ranks (so skip/stop decisions agree)."""
        return all_true(flag, self.group)


def all_true(flag: torch.Tensor, group=None) -> torch.Tensor:
    """AND of a boolean tensor over the ranks; `flag` itself for one process."""
    if not context().enabled:
        return flag
    t = flag.detach().to(torch.int32).reshape(1)
    collective("agreeing on the non-finite check", dist.all_reduce, t, op=dist.ReduceOp.MIN, group=group)
    return t[0].bool()


def mean_losses(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each loss averaged over the ranks: the loss of the global batch (at log time only)."""
    if not context().enabled or not losses:
        return losses
    flat = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
    collective("averaging the losses", dist.all_reduce, flat)
    flat /= context().world_size
    return dict(zip(losses, flat.unbind()))


def attach(approach, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Make `approach` average its gradients over the ranks (nothing for one process)."""
    if context().enabled:
        approach.grad_sync = GradSync(context().world_size, bucket_bytes=bucket_bytes)


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
        if not (self.training and context().enabled):
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


__all__ = ["GradSync", "SyncBatchNorm2d", "all_true", "attach", "convert_sync_batchnorm", "mean_losses"]
