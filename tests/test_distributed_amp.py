"""fp16 loss scaling and the fast backend on 2 CPU ranks against one process (the workers:
`dist_ranks.worker_amp_fast`)."""
from __future__ import annotations

import pytest
import torch

from dist_compare import float64, worst_diff  # noqa: F401  (float64: a fixture)
from dist_ranks import (AMP_STEPS, BATCH, WORLD, _one_thread, amp_state, build_fast, build_fp16,  # noqa: F401
                        global_batch, poison_d_gradient, state, worker_results)


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
