"""Model-level parity of the fast backend (fused kernels, channels_last, fused/foreach optimisers,
foreach EMA) with the reference (issue 5, (a)-(d)). On the CPU: a tiny configuration with the
Triton kernels in the interpreter; on CUDA the same tests at a larger size."""
import copy
import functools

import pytest
import torch

from g2g_fast.backends import FastBackend
from g2g_fast.config import config_from_dict
from g2g_fast.reference import funit as ref_funit
from g2g_fast.reference.g2g import g2g_forward, make_pairs
from g2g_fast.reference.ops import adain_ref
from g2g_fast.reference.steps import build_approach
from utils import LOWP_ATOL, assert_three_way

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SIZE = 64 if CUDA else 32
STEPS = 20 if CUDA else 3  # CPU: each step runs the Triton interpreter; 3 still compare trained states
ARCH = {
    "funit2funit": dict(nf=8, nf_mlp=16, latent_dim=8, dis_nf=8, dis_n_res_blks=4),
    "cyclefunit": dict(nf=8, nf_mlp=16, latent_dim=8, patch_nf=8),
    "naive": dict(code_dim=16, gen_channels=16, ema_beta=0.999),
}


def pair(approach="funit2funit", precision="fp32", **overrides):
    """(reference, fast) approaches with identical weights and optimiser states."""
    cfg = config_from_dict(approach, dict(image_size=SIZE, batch_size=4, **ARCH[approach], **overrides))
    torch.manual_seed(0)
    ref = build_approach(cfg, 3, DEVICE)
    fast = build_approach(cfg, 3, DEVICE, precision=precision, backend=FastBackend())
    fast.load_state_dict(copy.deepcopy(ref.state_dict()))
    return ref, fast


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(4, 3, SIZE, SIZE, generator=g) * 2 - 1).to(DEVICE)
    return x, torch.tensor([0, 1, 2, 1], device=DEVICE)


def rel_err(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


def grad_errors(fast_net, ref_net):
    """Per parameter ||g_fast - g_ref|| / max(||g_ref||, 1e-3 x the largest gradient norm of the
    network), and the same over all parameters together. The floor covers gradients that are 0
    in exact arithmetic (a conv bias in front of an instance norm), which fp32 returns as noise."""
    ref = {n: p.grad for n, p in ref_net.named_parameters() if p.grad is not None}
    fast = dict(fast_net.named_parameters())
    floor = 1e-3 * max(g.norm().item() for g in ref.values())
    per = {}
    for n, g in ref.items():
        assert fast[n].grad is not None, f"{n}: no gradient on the fast side"
        per[n] = (fast[n].grad.float() - g.float()).norm().item() / max(g.norm().item(), floor)
    total = torch.cat([(fast[n].grad.float() - g.float()).flatten() for n, g in ref.items()]).norm() / \
        torch.cat([g.flatten().float() for g in ref.values()]).norm()
    return per, total.item()


# Model-level tolerances. Each fused op matches its reference to ~1e-6 relative (test_instance_norm);
# through a whole G2G step, rounding-level differences flip a few ReLU masks (a pre-activation
# within ~1e-6 of 0: measured, 4 flips in one tiny FUNIT2FUNIT forward), and the instance-norm
# backward spreads each flip over its (b, c) plane, so parameter gradients differ by up to a few
# percent. The fp32 reference differs from a float64 run in the same way. A wrong formula or
# wiring gives errors of order 1.
GRAD_TOL_EACH, GRAD_TOL_TOTAL = 0.15, 0.1


def float64_outputs(gen, x1, x2, monkeypatch):
    """The reference generator in float64 (its norms too): the exact value to measure against."""
    monkeypatch.setattr(ref_funit, "adain_ref", functools.partial(adain_ref, upcast=False))
    with torch.no_grad():
        out = g2g_forward(copy.deepcopy(gen).double(), x1.double(), x2.double(), short=True)
    monkeypatch.undo()
    return out


def test_a_forward_of_every_network_and_g2g_output(monkeypatch):
    """Fast vs reference within 1e-4 relative. After the second stage (~30 norms through tiny
    random networks) fp32 itself is ~1e-4 away from the exact value, so there the rule is: the
    fast output may be at most twice as far from the float64 result as the fp32 reference."""
    ref, fast = pair()
    x, y = batch()
    x1, y1, x2, y2 = make_pairs(x, y, "halves")
    o64 = float64_outputs(ref.gen, x1, x2, monkeypatch)
    with torch.no_grad():
        o_ref = g2g_forward(ref.gen, x1, x2, short=True)
        xf1, xf2 = (t.contiguous(memory_format=torch.channels_last) for t in (x1, x2))
        o_fast = g2g_forward(fast.gen, xf1, xf2, short=True)
        for name in ("a1", "b1", "m1", "m2", "s1", "s2", "am1", "bm2", "r1", "r2"):
            got, want, exact = getattr(o_fast, name), getattr(o_ref, name), getattr(o64, name)
            allowed = max(1e-4, 2 * rel_err(want, exact))
            assert rel_err(got, want) <= 1e-4 or rel_err(got, exact) <= allowed, \
                f"{name}: {rel_err(got, want):.3g} from fp32 ref, {rel_err(got, exact):.3g} from exact (allowed {allowed:.3g})"
        assert o_fast.m1.is_contiguous(memory_format=torch.channels_last)
        for img, lab in ((x1, y1), (o_ref.m1, y2)):
            resp_r, feat_r = ref.dis(img, lab)
            resp_f, feat_f = fast.dis(img.contiguous(memory_format=torch.channels_last), lab)
            assert rel_err(resp_f, resp_r) <= 1e-4 and rel_err(feat_f, feat_r) <= 1e-4


@pytest.mark.parametrize("approach", ["funit2funit", "cyclefunit", "naive"])
def test_b_gradients_after_one_d_step_and_one_g_step(approach):
    """Each phase from identical weights: after a D step the optimisers have moved D (RMSprop's
    first step is ~10 x lr x sign(g), so rounding-level gradient differences flip whole steps),
    which would make a G step after it compare two different discriminators."""
    x, y = batch()
    phases = ["g"] + (["d"] if approach != "naive" else [])
    for phase in phases:
        ref, fast = pair(approach)
        lr = getattr(ref, f"{phase}_step")(x, y)
        lf = getattr(fast, f"{phase}_step")(x.contiguous(memory_format=torch.channels_last), y)
        for k in lr:
            assert rel_err(lf[k], lr[k]) <= 1e-4, f"{phase} step {k}: {lf[k].item()} vs {lr[k].item()}"
        nets = (fast.gen, ref.gen) if phase == "g" else (fast.dis, ref.dis)  # D: R1 included
        per, total = grad_errors(*nets)
        worst = max(per, key=per.get)
        # D has no ReLU in front of a norm: its gradients agree to rounding.
        tol_total, tol_each = (GRAD_TOL_TOTAL, GRAD_TOL_EACH) if phase == "g" else (1e-4, 1e-3)
        assert total <= tol_total and per[worst] <= tol_each, \
            f"{phase} step: all-parameter error {total:.3g}, worst {worst} {per[worst]:.3g}"


@pytest.mark.parametrize("approach", ["funit2funit", "cyclefunit", "naive"])
def test_c_training_steps_track_the_reference(approach):
    """STEPS training iterations (D step with R1, G step, EMA, real optimisers). Before each
    step the fast run is re-synchronised to the reference's state, so every step is compared
    from the same, progressively trained weights and optimiser states.

    Free-running trajectories cannot be compared: RMSprop's and Adam's early steps are
    ~lr x sign(g) per element, so the few-percent gradient differences of flipped ReLU masks
    (see GRAD_TOL_*) flip whole updates and any two fp32 implementations part ways within a few
    steps."""
    ref, fast = pair(approach)
    for step in range(STEPS):
        fast.load_state_dict(copy.deepcopy(ref.state_dict()))  # a copy: optimiser states would alias
        x, y = batch(seed=step)
        lr, lf = ref.train_step(x, y), fast.train_step(x, y)
        for k in lr:
            # Floor 0.1: g_adv = -mean(D) is a difference of O(1) values that nearly cancel.
            assert abs(lf[k].item() - lr[k].item()) <= 1e-3 * max(abs(lr[k].item()), 0.1), \
                f"step {step} {k}: fast {lf[k].item()} vs reference {lr[k].item()}"
        # D's gradients agree to rounding, so its updated weights do too. G's first RMSprop/Adam
        # updates are ~sign(g): its weights are compared through the EMA (a 1e-3 share of the
        # update) and, update by update, in test_fused_optimisers_and_foreach_ema_match_...
        for part in ("gen_ema", "dis"):
            if getattr(ref, part) is None:
                continue
            a = torch.cat([p.detach().flatten() for p in getattr(ref, part).parameters()])
            b = torch.cat([p.detach().flatten() for p in getattr(fast, part).parameters()])
            # 1e-3: the conv biases in front of an instance norm have an exactly-zero gradient,
            # which fp32 returns as noise, and Adam's first step moves them by +-lr either way.
            assert ((a - b).norm() / a.norm()).item() <= 1e-3, f"step {step}: {part} parameters differ"


@pytest.mark.parametrize("approach", ["funit2funit", "cyclefunit", "naive"])
def test_fused_optimisers_and_foreach_ema_match_the_reference(approach):
    """Given identical gradients, the fast backend's optimisers (foreach RMSprop, fused Adam) and
    its foreach EMA produce the reference's parameters."""
    ref, fast = pair(approach)
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        for ap in (ref, fast):
            g.manual_seed(step)
            for net in (ap.gen, ap.dis):
                for p in (net.parameters() if net is not None else ()):
                    if p.requires_grad:
                        p.grad = torch.randn(p.shape, generator=g).to(p.device)
            ap.opt_g.step()
            if ap.opt_d is not None:
                ap.opt_d.step()
            ap.backend.ema_update(ap.gen_ema, ap.gen, 0.9)
    for part in ("gen", "gen_ema", "dis"):
        if getattr(ref, part) is None:
            continue
        for (n, p), q in zip(getattr(ref, part).named_parameters(), getattr(fast, part).parameters()):
            torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6, msg=f"{part}.{n}")


def test_d_bf16_against_fp32_reference_three_way():
    ref, fast = pair(precision="bf16")
    x, y = batch()
    x1, _, x2, _ = make_pairs(x, y, "halves")
    with torch.no_grad():
        o32 = g2g_forward(ref.gen, x1, x2, short=True)
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            o_lp = g2g_forward(ref.gen, x1, x2, short=True)
        with fast.autocast():
            o_fast = g2g_forward(fast.gen, *(t.contiguous(memory_format=torch.channels_last) for t in (x1, x2)),
                                 short=True)
    for name in ("m1", "m2", "s1", "r1", "r2"):
        assert_three_way(getattr(o_fast, name), getattr(o32, name), getattr(o_lp, name),
                         LOWP_ATOL[torch.bfloat16], name)
