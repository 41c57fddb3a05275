"""Data-parallel training on 2 CPU ranks (gloo) against one process, in float64: one iteration's
gradients and five steps through the sharded loader (losses, gradients, weights, EMA, BatchNorm
statistics, optimiser states), the overlapped all-reduce, bitwise-identical ranks and the
non-finite skip. Reference: one process on the global batch (2 x 4 images), with the same pairs
(`StepPlan`). The rank processes and shared helpers: `dist_ranks.py`; fp16 and the fast backend:
test_distributed_amp.py; the pieces in one process: test_distributed_units.py; the trainer under
torchrun: test_distributed_cli.py.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn as nn

from dist_compare import RankResults, digest, float64, max_rel, worst_diff  # noqa: F401  (float64: a fixture)
from dist_ranks import (APPROACHES, BATCH, STEPS, WORLD, BatchStream, _one_thread,  # noqa: F401
                        build, dataset, global_batch, run_workers, state)
from g2g_fast.reference.funit import Conv2dBlock
from g2g_fast.reference.naive import LordGenerator
from g2g_fast.reference.patchgan import InstanceNorm


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


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The results of worker_equivalence on 2 ranks: `ranks[rank][key]` (rank 1's as digests)."""
    out = tmp_path_factory.mktemp("equivalence")
    for rank, (code, text, _) in enumerate(run_workers("equivalence", out)):
        assert code == 0, f"rank {rank} failed:\n{text[-3000:]}"
    return RankResults(out)


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
        for k in range(len(run["states"]) - 1):  # STEPS (naive_one_shard: 2)
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
    mine = ranks[0][approach]
    want, got = state(a), mine["one"]
    # relative to each tensor's largest entry: FUNIT gradients reach ~60, where one fp32 rounding
    # flip in an instance norm would use up an absolute 1e-6
    diff, name, n = worst_diff(got, want, "grad.", relative=True)
    assert n >= 20 and diff <= 1e-6, f"{approach}: gradient {name} differs by {diff:.3g} ({n} gradients)"
    if approach != "naive":
        assert any(k.startswith("grad.dis.") for k in want)  # D's gradients (R1's included) are compared
    check_zero_gradient_entries(approach, zero)
    diff, name, _ = worst_diff(got, want, "param.", skip=zero.masks)
    assert diff <= 1e-6, f"{approach}: after the update {name} differs by {diff:.3g}"
    assert max_rel(mine["losses"], {k: v.item() for k, v in losses.items()}, losses) <= 1e-6


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
        r0, r1 = ranks[0][approach], ranks[1][approach]
        for part in ("one", "run"):
            differ = differences(digest(r0[part]), r1[part])
            assert not differ, f"{approach} ({part}): the ranks differ in {len(differ)} places: {differ[:5]}"


def test_nonfinite_loss_on_one_rank_skips_everywhere(ranks):
    """--nan-policy skip: a NaN on rank 1 only skips the D and G updates on both ranks."""
    for r in range(WORLD):
        assert ranks[r]["skip"] == {"skipped": 2, "unchanged": True}, f"rank {r}: {ranks[r]['skip']}"
