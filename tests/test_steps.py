"""One D step + one G step per approach on a tiny synthetic batch (SPEC §2-§5)."""
import collections
import copy
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from g2g_fast.config import config_from_dict
from g2g_fast.reference.g2g import disassemble, make_pairs
from g2g_fast.reference.losses import r1_penalty
from g2g_fast.reference.naive import LordGenerator
from g2g_fast.reference.steps import build_approach, ema_update

TINY_FUNIT = dict(image_size=32, batch_size=4, nf=8, nf_mlp=16, latent_dim=8)
TINY = {
    "funit2funit": dict(TINY_FUNIT, dis_nf=8, dis_n_res_blks=4),
    "cyclefunit": dict(TINY_FUNIT, patch_nf=8),
    "naive": dict(image_size=32, batch_size=4, code_dim=16, ema_beta=0.999),
}


def batch(B=4, size=32, classes=3):
    x = (torch.rand(B, 3, size, size) * 2 - 1).requires_grad_(False)
    return x, torch.arange(B) % classes


def make(approach, num_classes=3, precision="fp32", **overrides):
    torch.manual_seed(0)
    return build_approach(config_from_dict(approach, {**TINY[approach], **overrides}), num_classes,
                          precision=precision)


def assert_step_is_complete(ap, frozen=()):
    x, y = batch()
    ema_before = copy.deepcopy(ap.gen_ema.state_dict()) if ap.gen_ema is not None else None
    losses = ap.train_step(x, y)
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    frozen_ids = {id(p) for m in frozen for p in m.parameters()}
    nets = [ap.gen] + ([ap.dis] if ap.dis is not None else [])
    for net in nets:
        for name, p in net.named_parameters():
            if id(p) in frozen_ids:
                assert p.grad is None and not p.requires_grad, f"frozen {name} got a gradient"
                continue
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name}: bad gradient"
    if ema_before is not None:
        moved = [k for k, v in ap.gen_ema.state_dict().items()
                 if v.is_floating_point() and not torch.equal(v, ema_before[k])]
        assert moved, "EMA did not move"
    assert ap.step == 1
    return losses


def test_funit2funit_step():
    losses = assert_step_is_complete(make("funit2funit"))
    assert {"d_real", "d_fake", "d_r1", "d_total", "g_adv", "g_short", "g_fm_rec", "g_fm_mix",
            "g_long", "g_fm_long", "g_fm_mix_rec", "g_total"} <= set(losses)
    assert losses["d_r1"] > 0


def test_cyclefunit_step_pixel_fallback():
    losses = assert_step_is_complete(make("cyclefunit"))
    assert {"d_real", "d_fake", "g_long", "g_short", "g_content_cycle", "g_class_cycle", "g_gan"} <= set(losses)


def test_cyclefunit_step_identity_encoder_and_vgg(id_file, vgg_file):
    ap = make("cyclefunit", class_encoder="identity", identity_weights=str(id_file[0]),
              vgg_weights=str(vgg_file[0]), delta_identity=0.5, identity_warmup_steps=4)
    assert ap.gen.enc_class_model is ap.id_net and ap.gen.mlp.model[0].fc.in_features == 2048
    losses = assert_step_is_complete(ap, frozen=[ap.id_net, ap.vgg])
    assert "g_identity" in losses and ap.vgg is not None
    assert ap.identity_weight() == pytest.approx(0.5 * 2 / 4)  # second step of a 4-step warm-up


def test_checkpoint_needs_no_pretrained_files(id_file, vgg_file, tmp_path):
    """A checkpoint holds G, CycleFUNIT's identity class encoder included: translating or
    evaluating it (init="inference") reads none of the pretrained files it was trained with, and
    resuming (init="resume") reads only the frozen loss networks' files."""
    id_copy, vgg_copy = tmp_path / "resnet50_ft.pth", tmp_path / "vgg16.pth"
    id_copy.write_bytes(id_file[0].read_bytes())
    vgg_copy.write_bytes(vgg_file[0].read_bytes())
    files = dict(class_encoder="identity", identity_weights=str(id_copy), vgg_weights=str(vgg_copy),
                 delta_identity=0.5)
    ap = make("cyclefunit", **files)
    x, y = batch()
    ap.train_step(x, y)
    state = copy.deepcopy(ap.state_dict())
    expected = ap.train_step(x, y)

    # Resuming needs only the VGG file: the identity net (class encoder and identity loss) is in G.
    id_copy.unlink()
    resumed = build_approach(config_from_dict("cyclefunit", {**TINY["cyclefunit"], **files}), 3, init="resume")
    resumed.load_state_dict(copy.deepcopy(state))
    got = resumed.train_step(x, y)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)
    # With FUNIT's own class encoder, the identity loss's net is not in the checkpoint: its file is read.
    loss_only = {**TINY["cyclefunit"], **files, "class_encoder": "funit"}
    with pytest.raises(ValueError, match="identity_weights .*: no such file"):
        build_approach(config_from_dict("cyclefunit", loss_only), 3, init="resume")
    assert build_approach(config_from_dict("cyclefunit", loss_only), 3, init="inference").id_net is None

    vgg_copy.unlink()
    infer = build_approach(config_from_dict("cyclefunit", {**TINY["cyclefunit"], **files}), 3, init="inference")
    infer.load_state_dict(state)
    assert infer.vgg is None and infer.gen.enc_class_model is infer.id_net
    ap.load_state_dict(state)
    with torch.no_grad():
        want, out = ap.gen_ema.eval()(x[:2], x[2:]), infer.gen_ema.eval()(x[:2], x[2:])
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    before = copy.deepcopy(infer.dis.state_dict())
    with pytest.raises(RuntimeError, match="init='inference'"):
        infer.train_step(x, y)
    assert all(torch.equal(v, infer.dis.state_dict()[k]) for k, v in before.items())  # no D update either
    assert torch.equal(infer.id_net.mean_rgb, ap.id_net.mean_rgb)


def test_resume_does_not_reread_the_initial_funit_file(tmp_path):
    ap = make("funit2funit")
    path = tmp_path / "gen.pt"
    torch.save({"gen": ap.gen.state_dict(), "gen_test": ap.gen.state_dict()}, path)
    ap = make("funit2funit", init_funit=str(path))
    x, y = batch()
    ap.train_step(x, y)
    state = copy.deepcopy(ap.state_dict())
    expected = ap.train_step(x, y)
    path.unlink()
    cfg = config_from_dict("funit2funit", {**TINY["funit2funit"], "init_funit": str(path)})
    with pytest.raises(ValueError, match="--init-funit .*: no such file"):
        build_approach(cfg, 3)
    resumed = build_approach(cfg, 3, init="resume")
    resumed.load_state_dict(state)
    got = resumed.train_step(x, y)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="init must be one of"):
        build_approach(cfg, 3, init="checkpoint")


def test_naive_step():
    losses = assert_step_is_complete(make("naive"))
    assert set(losses) == {"g_long", "g_content_cycle", "g_class_cycle", "g_total"}


def test_naive_default_has_no_ema_and_no_discriminator():
    ap = build_approach(config_from_dict("naive", dict(image_size=32, batch_size=4, code_dim=16)), 3)
    assert ap.gen_ema is None and ap.dis is None and ap.opt_d is None
    assert "gen_test" not in ap.state_dict()


def test_d_judges_each_mix_on_the_class_it_carries():
    """Bug fix (SPEC §3): m1 (class of x2) is judged on label y2, m2 on y1. The original code
    swapped these labels; this test fails on that behaviour."""
    ap = make("funit2funit", num_classes=4)
    x, y = batch(B=4, classes=4)   # 4 distinct labels so a swap is visible
    x1, y1, x2, y2 = make_pairs(x, y, "halves")
    with torch.no_grad():
        o = disassemble(ap.gen, x1, x2)
    seen = []
    forward = ap.dis.forward

    def recording(img, lab):
        seen.append((img.detach().clone(), lab.clone()))
        return forward(img, lab)

    ap.dis.forward = recording
    ap.d_step(x, y)
    labels_of = {}
    for img, lab in seen:
        for name, ref in (("m1", o.m1), ("m2", o.m2)):
            if img.shape == ref.shape and torch.allclose(img, ref):
                labels_of[name] = lab.tolist()
    assert labels_of == {"m1": y2.tolist(), "m2": y1.tolist()}


def test_r1_reaches_discriminator_weights():
    """The R1 term is differentiated twice: switching its weight off changes D's gradients."""
    x, y = batch()
    grads = []
    for r1_w in (10.0, 0.0):
        ap = make("funit2funit", r1_w=r1_w)
        ap.d_step(x, y)
        grads.append(ap.dis.cnn_f[0].conv.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_g_step_leaves_discriminator_gradients_alone():
    ap = make("funit2funit")
    x, y = batch()
    ap.d_step(x, y)
    before = {n: p.grad.clone() for n, p in ap.dis.named_parameters()}
    ap.g_step(x, y)
    for n, p in ap.dis.named_parameters():
        assert torch.equal(p.grad, before[n]), n
        assert p.requires_grad


def test_ema_update_formula():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.999 * pa.detach() + 0.001 * pb.detach() for pa, pb in zip(a.parameters(), b.parameters())]
    ema_update(a, b, 0.999)
    for pa, e in zip(a.parameters(), expected):
        torch.testing.assert_close(pa.detach(), e)


def test_lord_generator_reaches_dark_pixels():
    """Bug fix (SPEC §5): the output ends in tanh, so images in [-1, 1] can be reproduced; the
    original sigmoid could never go below 0."""
    g = LordGenerator(image_size=32, code_dim=16)
    with torch.no_grad():
        g.last_conv_layers[-1].bias.fill_(-10.0)
    out = g(torch.randn(2, 16), torch.randn(2, 16))
    assert out.min() >= -1 and out.max() < -0.99


def test_init_from_official_funit_file(tmp_path, caplog):
    """As the original FUNIT2FUNIT code: G continues from the file's "gen", the EMA from its
    "gen_test" (init_funit_key "auto"); a file with one generator, or an explicit key, gives both."""
    ap = make("funit2funit")
    rand = lambda: {k: torch.randn_like(v) if v.is_floating_point() else v  # noqa: E731
                    for k, v in ap.gen.state_dict().items()}
    gen, gen_test = rand(), rand()
    both, only_test = tmp_path / "both.pt", tmp_path / "only_test.pt"
    torch.save({"gen": gen, "gen_test": gen_test}, both)
    torch.save({"gen_test": gen_test}, only_test)

    def loaded(path, **kw):
        with caplog.at_level("INFO", logger="g2g_fast"):
            caplog.clear()
            a = make("funit2funit", init_funit=str(path), **kw)
        return a.gen.state_dict(), a.gen_ema.state_dict(), caplog.text

    def same(got, want):
        return all(torch.equal(got[k], v) for k, v in want.items())

    g, e, text = loaded(both)
    assert same(g, gen) and same(e, gen_test)
    assert "[gen], its EMA from [gen_test]" in text
    g, e, text = loaded(only_test)
    assert same(g, gen_test) and same(e, gen_test)
    assert "[gen_test] (its EMA starts as a copy)" in text
    for key, want in (("gen", gen), ("gen_test", gen_test)):
        g, e, _ = loaded(both, init_funit_key=key)
        assert same(g, want) and same(e, want)
    with pytest.raises(ValueError, match="has no 'gen' generator"):
        make("funit2funit", init_funit=str(only_test), init_funit_key="gen")


@pytest.mark.parametrize("approach", ["funit2funit", "naive"])
def test_state_dict_round_trip_continues_identically(approach):
    x, y = batch()
    ap = make(approach)
    ap.train_step(x, y)
    state = copy.deepcopy(ap.state_dict())
    expected = ap.train_step(x, y)
    ap2 = make(approach, seed=1)
    ap2.load_state_dict(state)
    got = ap2.train_step(x, y)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="num_classes|2 classes"):
        build_approach(config_from_dict("naive", TINY["naive"]), num_classes=1)
    with pytest.raises(ValueError, match="identity_weights"):
        config_from_dict("cyclefunit", dict(TINY["cyclefunit"], class_encoder="identity"))


# --- precision: losses and statistics in fp32 under autocast, fp16 R1 (issue 22) ----------------

# Forward reductions that must not return bf16/fp16 (batch norms: their saved mean and invstd).
REDUCTIONS = {"mean", "sum", "nansum", "prod", "amax", "amin", "var", "std", "var_mean", "std_mean",
              "norm", "linalg_vector_norm", "logsumexp", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss"}
BATCH_NORMS = {"native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training"}
# Low-precision reductions allowed, by the name of a Python function on the stack, each with its reason.
ALLOWED = {
    "adaptive_avg_pool2d": "FUNIT's class encoder pools its last map to 1x1, which aten computes as a mean: an "
                           "activation (accumulated in fp32 inside the kernel, rounded once), not a statistic, and "
                           "its only use is a 1x1 conv that autocast runs in that same low precision",
}


class LowPrecisionReductions(TorchDispatchMode):
    """Records each forward reduction with a bf16/fp16 result: op, dtype, shape and the g2g_fast
    frames that ran it. Backward ops (autograd's node is set) are not recorded: their reductions
    are gradients (the bias gradient of an autocast linear layer), not losses or statistics."""

    def __init__(self):
        super().__init__()
        self.bad, self.allowed, self.seen = [], collections.Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if torch._C._current_autograd_node() is not None or name not in REDUCTIONS | BATCH_NORMS:
            return out
        self.seen += 1
        results = out[1:] if name in BATCH_NORMS else out if isinstance(out, (tuple, list)) else (out,)
        if all(r.dtype not in (torch.bfloat16, torch.float16) for r in results if isinstance(r, torch.Tensor)):
            return out
        stack = traceback.extract_stack()
        reason = next((f.name for f in stack if f.name in ALLOWED), None)
        if reason is not None:
            self.allowed[reason] += 1
            return out
        frames = " <- ".join(f"{f.filename.split('g2g_fast/')[-1]}:{f.lineno} {f.name}"
                             for f in reversed(stack) if "/g2g_fast/" in f.filename)
        self.bad.append(f"{func} -> {results[0].dtype} {tuple(results[0].shape)} at {frames}")
        return out


@pytest.mark.parametrize("approach,precision", [("funit2funit", "bf16"), ("funit2funit", "fp16"),
                                                ("cyclefunit", "bf16"), ("naive", "bf16")])
def test_autocast_step_reduces_losses_and_statistics_in_fp32(approach, precision, id_file, vgg_file):
    """One training step under autocast: no forward reduction (loss term, feature mean, R1 sum,
    norm statistics) returns bf16/fp16, except ALLOWED. CycleFUNIT with its VGG perceptual loss and
    the identity loss. Before issue 22 FUNIT2FUNIT's step had 18 scalar bf16 means (hinge, R1,
    feature matching) and 16 bf16 (B, C) feature means."""
    extra = dict(vgg_weights=str(vgg_file[0]), identity_weights=str(id_file[0]), delta_identity=0.5) \
        if approach == "cyclefunit" else {}
    ap = make(approach, precision=precision, **extra)
    x, y = batch()
    rec = LowPrecisionReductions()
    with rec:
        losses = ap.train_step(x, y)
    assert not rec.bad, f"{len(rec.bad)} low-precision reductions:\n" + "\n".join(rec.bad)
    assert rec.seen >= 10 and all(v.dtype == torch.float32 for v in losses.values())
    assert set(rec.allowed) <= set(ALLOWED)
    if approach != "naive":  # FUNIT's class encoder (naive: BatchNorm encoders, no pooling)
        assert rec.allowed["adaptive_avg_pool2d"] > 0


def _r1_grads(ap, x, y):
    """D's parameter gradients after one D step (unscaled by the GradScaler under fp16)."""
    ap.d_step(x, y)
    return {n: p.grad.float().clone() for n, p in ap.dis.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("quiet", [1e-5, 3e-6])
def test_fp16_r1_underflow_is_not_lost(quiet):
    """D's output scaled by `quiet` (its last conv): the R1 gradient is ~1e-11 per pixel, below
    fp16's smallest subnormal (6e-8). In fp16 the first-order pass flushes it to exactly 0 (the
    penalty 0: checked here), and scaling that pass by the loss scale does not save D's weight
    gradient: the second-order pass runs at the unscaled size (13.6% and 100% off at these
    scales when it was tried, issue 22's review). The fp16 step runs R1 in fp32
    (`Approach.r1_autocast`): its d_r1 and D's weight gradients (only R1 reaches them: gan_w=0)
    are the fp32 step's."""
    x, y = batch()
    ap16, ap32 = make("funit2funit", precision="fp16", gan_w=0.0), make("funit2funit", gan_w=0.0)  # same seed
    for ap in (ap16, ap32):
        with torch.no_grad():
            ap.dis.cnn_c[0].conv.weight.mul_(quiet)
    xi = x[:2].clone().requires_grad_(True)
    with ap16.autocast():  # what an fp16 R1 pass gives
        assert r1_penalty(ap16.dis(xi, y[:2])[0], xi).item() == 0
    got, ref = _r1_grads(ap16, x, y), _r1_grads(ap32, x, y)
    assert set(got) == set(ref)
    for n in ref:
        err = (got[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)
        assert err < 1e-2, (n, err.item())
    d16, d32 = ap16.d_step(x, y)["d_r1"], ap32.d_step(x, y)["d_r1"]
    assert d32.item() > 0 and d16.item() == pytest.approx(d32.item(), rel=1e-2)
