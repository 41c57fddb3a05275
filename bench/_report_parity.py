"""gpu_report.py's `model_parity` section, with its markdown: the fast backend (fp32) against the
fp32 reference on FUNIT2FUNIT at 128^2, batch 8, TF32 off, with a float64 run of the reference
as the truth. Four sides start from identical weights and optimiser states (deep copies of the
reference's state_dict): fast; the reference as it is (NCHW, "ref32"); the reference with
channels_last weights and activations ("ref32cl": the convolution algorithms fast uses); the
reference in float64 with its norms in float64 too ("ref64").

Rule, per tensor (each G2G output m1 m2 s1 s2 r1 r2; after one g_step each, every G parameter's
gradient; after one d_step each from re-synchronised states, every D parameter's gradient, R1
included), on the L2 norm:

    ||fast - ref64|| <= FACTOR * max(||ref32 - ref64||, ||ref32cl - ref64||) + FLOOR * scale * sqrt(numel)

with scale = max(1, max|ref64|) over the tensor's layer (a conv bias in front of a norm has an
exact gradient of 0 that fp32 returns as noise, so it is judged on its layer's scale). The
yardstick is what the reference itself costs in fp32, run two ways: other convolution algorithms
(channels_last; TF32 or cuDNN's choices elsewhere) and, after a step, the L1 and hinge kinks that
rounding-level differences flip, move the gradients far more than rounding does (on the CPU a
channels_last reference is 3x further from float64 than the NCHW one in the class encoder's
gradients, and fast equals it exactly), so a flat bound, or the NCHW reference alone, fails
correct builds. It is tests/test_models_fast.py's three-way rule against float64 (the same
FACTOR and FLOOR) with the second fp32 run added. A wrong formula is off by orders of magnitude: a
worst ratio just above 1 is a marginal case to look at, not a verdict.
max|fast - ref32| / max|ref32| is recorded beside it (not judged), and so is ref32_far: the fp32
reference beyond 1e-3 of its scale from float64 somewhere (TF32 on, or many flipped kinks: the
rule is lax there).
"""
from __future__ import annotations

import contextlib
import copy
import functools

import torch

import _train as T

PARITY_VALUES = dict(image_size=128, batch_size=8)  # FUNIT widths (config defaults)
FACTOR, FLOOR, REF32_FAR = 2.0, 1e-6, 1e-3
OUTPUTS = ("m1", "m2", "s1", "s2", "r1", "r2")


def _scales(ref64: dict) -> dict:
    """Name -> max(1, max|ref64|) over its layer (the name without its last dotted part)."""
    layer: dict = {}
    for k, v in ref64.items():
        name = k.rsplit(".", 1)[0]
        layer[name] = max(layer.get(name, 1.0), v.detach().abs().max().item())
    return {k: layer[k.rsplit(".", 1)[0]] for k in ref64}


def three_way(fast: torch.Tensor, refs: list, ref64: torch.Tensor, scale: float) -> dict:
    """The rule above for one tensor; `refs`: the fp32 reference's runs (ref32 first)."""
    f, t = fast.detach().double(), ref64.detach().double()
    r = [x.detach().double() for x in refs]
    err, ref_errs = (f - t).norm().item(), [(x - t).norm().item() for x in r]
    bound = FACTOR * max(ref_errs) + FLOOR * scale * t.numel() ** 0.5
    rel = ((f - r[0]).abs().max() / r[0].abs().max().clamp_min(1e-30)).item()
    return dict(err=err, ref_errs=ref_errs, bound=bound, ratio=err / bound, rel_vs_ref32=rel,
                ref32_far=bool((r[0] - t).abs().max().item() > REF32_FAR * scale), ok=bool(err <= bound))


def judge(fast: dict, refs: list, ref64: dict) -> dict:
    """three_way per name of ref64 (a name missing from `fast` fails); the worst ratio, the failures."""
    scale = _scales(ref64)
    per = {k: three_way(fast[k], [r[k] for r in refs], ref64[k], scale[k]) for k in ref64 if fast.get(k) is not None}
    missing = [k for k in ref64 if fast.get(k) is None]
    worst = max(per, key=lambda k: per[k]["ratio"], default=None)
    return dict(tensors=per, n=len(per), failed=[k for k, v in per.items() if not v["ok"]], missing=missing,
                worst=worst, worst_ratio=per[worst]["ratio"] if worst else None,
                ref32_far=[k for k, v in per.items() if v["ref32_far"]],
                ok=bool(per) and not missing and all(v["ok"] for v in per.values()))


@contextlib.contextmanager
def _float64_norms():
    """The reference FUNIT's norms in their input's dtype (adain_ref upcasts to fp32 by default,
    which would make the float64 run an fp32 one in every norm)."""
    from g2g_fast.reference import funit as ref_funit
    saved = ref_funit.adain_ref
    ref_funit.adain_ref = functools.partial(saved, upcast=False)
    try:
        yield
    finally:
        ref_funit.adain_ref = saved


def _float64_twin(cfg, ref, device):
    """The reference approach in float64 with `ref`'s weights (optimiser states cast on loading)."""
    from g2g_fast.reference.steps import build_approach
    twin = build_approach(cfg, T.NUM_CLASSES, device)
    for net in (twin.gen, twin.dis, twin.gen_ema):
        if net is not None:
            net.double()
    twin.load_state_dict(copy.deepcopy(ref.state_dict()))
    return twin


def _grads(net) -> dict:
    return {n: p.grad for n, p in net.named_parameters()}


def _phase(sides: dict, inputs: dict, y, phase: str) -> dict:
    """One `phase` step ("g" or "d") on each side; the rule on every gradient of that network,
    and the losses' relative differences (fast vs ref32, recorded)."""
    losses, grads = {}, {}
    for side, ap in sides.items():
        with _float64_norms() if side == "ref64" else contextlib.nullcontext():
            losses[side] = getattr(ap, f"{phase}_step")(inputs[side], y)
        grads[side] = _grads(ap.gen if phase == "g" else ap.dis)
    want = {k: v for k, v in grads["ref64"].items() if v is not None}
    res = judge(grads["fast"], [grads["ref32"], grads["ref32cl"]], want)
    lr, lf = losses["ref32"], losses["fast"]
    res["loss_max_rel_err"] = max(abs(lf[k].item() - lr[k].item()) / max(abs(lr[k].item()), 1e-12) for k in lr)
    return res


def model_parity(ctx, out: dict) -> None:
    from g2g_fast.backends import FastBackend
    from g2g_fast.config import config_from_dict
    from g2g_fast.reference.g2g import g2g_forward, make_pairs
    from g2g_fast.reference.steps import build_approach
    values = T.SMOKE_VALUES["funit2funit"] if ctx.smoke else PARITY_VALUES
    out.update(approach="funit2funit", config=values, factor=FACTOR, floor=FLOOR, rule=(
        f"per tensor: ||fast - ref64|| <= {FACTOR:g} * max(||ref32 - ref64||, ||ref32cl - ref64||) + {FLOOR:g} "
        "* layer scale * sqrt(numel) (L2 norms; ref32 / ref32cl: the reference NCHW / channels_last in fp32; "
        "ref64: in float64) for the six G2G outputs, then every G gradient after one g_step and every D gradient "
        "(R1 included) after one d_step from identical states; fp32, TF32 off"))
    sides = {}
    try:
        with T.numerics("reference-fp32"):  # the fp32 sides true fp32
            cfg = config_from_dict("funit2funit", values)
            torch.manual_seed(0)
            ref = sides["ref32"] = build_approach(cfg, T.NUM_CLASSES, ctx.dev)
            # Deep copies: loading the reference's own tensors would alias the optimiser states.
            for side, backend in (("fast", FastBackend()), ("ref32cl", T.ChannelsLastReference())):
                sides[side] = build_approach(cfg, T.NUM_CLASSES, ctx.dev, backend=backend)
                sides[side].load_state_dict(copy.deepcopy(ref.state_dict()))
            fast = sides["fast"]
            if ctx.model_impl:
                T.force_impl(fast, ctx.model_impl)
            sides["ref64"] = _float64_twin(cfg, ref, ctx.dev)
            out["describe"] = fast.backend.describe(fast)
            if ctx.model_impl:
                out["describe"]["kernels"] = f"adain:{ctx.model_impl} (forced)"
            x, y = T.make_batch(cfg, ctx.dev)
            xc = x.contiguous(memory_format=torch.channels_last)
            inputs = {"fast": xc, "ref32": x, "ref32cl": xc, "ref64": x.double()}
            outs = {}
            with torch.no_grad():
                for side, ap in sides.items():
                    x1, _, x2, _ = make_pairs(inputs[side], y, cfg.pairing)
                    with _float64_norms() if side == "ref64" else contextlib.nullcontext():
                        o = g2g_forward(ap.gen, x1, x2, short=True)
                    outs[side] = {k: getattr(o, k) for k in OUTPUTS}
            out["outputs"] = judge(outs["fast"], [outs["ref32"], outs["ref32cl"]], outs["ref64"])
            del outs, o
            ctx.flush()
            out["g_step"] = _phase(sides, inputs, y, "g")
            ctx.flush()
            for side in ("fast", "ref32cl", "ref64"):  # identical states again for D: ref32's after its G step
                sides[side].load_state_dict(copy.deepcopy(ref.state_dict()))
            out["d_step"] = _phase(sides, inputs, y, "d")
    finally:
        out["all_pass"] = all(out.get(k, {}).get("ok", False) for k in ("outputs", "g_step", "d_step"))
        sides.clear()
        ref = fast = None
        ctx.free()


def markdown(mp: dict) -> list:
    if not mp:
        return []
    L = [f"## Model parity (fast fp32 vs the fp32 reference NCHW and channels_last vs the reference in float64, "
         f"{mp.get('approach', '-')} {mp.get('config', '')}): {'all pass' if mp.get('all_pass') else 'NOT all pass'}",
         "", f"Rule: {mp.get('rule', '-')}", f"Fast backend: {describe(mp.get('describe'))}", "",
         "| quantity | tensors | worst tensor | \\|\\|fast - f64\\|\\| | bound | ratio | failed | pass |",
         "|---|---|---|---|---|---|---|---|"]
    for key, what in (("outputs", "G2G outputs"), ("g_step", "G gradients after one g_step"),
                      ("d_step", "D gradients after one d_step")):
        o = mp.get(key)
        if not o:
            continue
        w = o["tensors"].get(o["worst"], {})
        bad = ", ".join(o["failed"][:3] + [f"no fast grad: {m}" for m in o["missing"][:3]]) or "-"
        loss = f" (losses {o['loss_max_rel_err']:.1e})" if "loss_max_rel_err" in o else ""
        L.append(f"| {what}{loss} | {o['n']} | {o['worst']} | {_num(w.get('err'))} | {_num(w.get('bound'))} "
                 f"| {_num(o['worst_ratio'])} | {bad} | {'ok' if o['ok'] else 'FAIL'} |")
        if o.get("ref32_far"):
            L.append(f"| (the fp32 reference is > {REF32_FAR:g} of its scale from float64 at "
                     f"{', '.join(o['ref32_far'][:3])}: flipped kinks after a step, or TF32; the rule is lax there) "
                     "| | | | | | | |")
    if "error" in mp:
        L.append(f"\nerror: {mp['error']}")
    return L + [""]


def _num(v) -> str:
    return "-" if v is None else f"{v:.2e}"


def describe(d: dict | None) -> str:
    if not d:
        return "-"
    keys = ("generator", "kernels", "optimizer", "precision", "memory_format", "compiled", "tf32")
    return ", ".join(f"{k}={d[k]}" for k in keys if k in d)
