"""The pieces of data-parallel training, in this process: the step plan's shards, resuming on
another world size, SyncBatchNorm in one process, torchrun's variables."""
from __future__ import annotations

import copy

import pytest
import torch

from dist_ranks import _one_thread  # noqa: F401
from g2g_fast import distributed, grad_sync


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
    assert grad_sync.convert_sync_batchnorm(net) == 2
    assert isinstance(net[1], grad_sync.SyncBatchNorm2d) and isinstance(net[3][0], grad_sync.SyncBatchNorm2d)
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
