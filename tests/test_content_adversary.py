"""`content_adv_w`: the adversarial class classifier on the content code (issue 23,
`g2g_fast/reference/content_adversary.py`). It reads the code as the leakage probe does, learns
from detached codes after G's step, G learns to make it uncertain through its frozen weights (so
only the content encoder's gradient changes), it really removes a class signal that a fresh probe
would find, both approaches and both backends run it, and the trainer saves, resumes and shows it."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from g2g_fast import audit
from g2g_fast.backends import FastBackend, force_impl
from g2g_fast.config import config_from_dict
from g2g_fast.probes import Standardizer, code_features
from g2g_fast.reference.content_adversary import ContentAdversary, confusion_loss, pooled_size
from g2g_fast.reference.g2g import make_pairs
from g2g_fast.reference.steps import build_approach
from g2g_fast.train import main
from test_steps import TINY, assert_step_is_complete, batch
from test_train_cli import straight_and_resumed, tiny_args

ADV = {"content_adv_w": 1.0}


def _make(approach="funit2funit", backend=None, precision="fp32", **overrides):
    torch.manual_seed(0)
    cfg = config_from_dict(approach, {**TINY[approach], **ADV, **overrides})
    return build_approach(cfg, 3, backend=backend, precision=precision)


# ---------------------------------------------------------------- what it reads, what G minimises


@pytest.mark.parametrize("shape", [(6, 4, 8, 8), (5, 3, 4, 4), (7, 2, 2, 2)])
def test_features_are_the_leakage_probes_view_of_the_code(shape):
    """Pooled to at most 4x4 as probes.code_features (flattened pixel-major), standardised per
    feature over the images (here the step's and the memory's, there the probe's training set)."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randn(shape, generator=g) * 3 + 0.5
    adv = ContentAdversary(shape[1], min(4, shape[-1]), 3)
    probe = code_features(codes)
    side = min(4, shape[-1])
    want = Standardizer(probe)(probe).float().view(shape[0], shape[1], side, side).permute(0, 2, 3, 1).flatten(1)
    torch.testing.assert_close(adv.features(codes), want, rtol=1e-4, atol=1e-4)
    cl = codes.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(adv.features(cl), adv.features(codes), rtol=0, atol=0)
    assert pooled_size(32, 2) == 4 and pooled_size(32, 3) == 4 and pooled_size(16, 3) == 2


def test_confusion_is_least_when_the_adversary_cannot_tell():
    uniform = torch.zeros(5, 8)
    assert abs(confusion_loss(uniform).item() - math.log(8)) < 1e-6
    sure = torch.tensor([[6.0, 0, 0, 0]]).requires_grad_(True)
    loss = confusion_loss(sure)
    assert loss.item() > math.log(4) + 1
    loss.backward()
    assert sure.grad[0, 0] > 0 and (sure.grad[0, 1:] < 0).all()  # down the sure class, up the others


def test_its_logits_are_fp32_under_autocast():
    adv = ContentAdversary(4, 4, 3)
    codes = torch.randn(6, 4, 8, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert adv(codes).dtype == torch.float32


# ---------------------------------------------------------------- the training step


@pytest.mark.parametrize("approach", ["funit2funit", "cyclefunit"])
def test_step_reports_it_and_every_parameter_learns(approach):
    ap = _make(approach)
    assert isinstance(ap.adv, ContentAdversary) and isinstance(ap.opt_adv, torch.optim.Adam)
    losses = assert_step_is_complete(ap)
    assert {"g_content_adv", "adv_ce", "adv_acc"} <= set(losses)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ap.adv.parameters())
    plain = build_approach(config_from_dict(approach, TINY[approach]), 3)
    assert plain.adv is None and plain.opt_adv is None and "adv" not in plain.state_dict()


def test_the_adversary_learns_only_from_its_own_loss_on_detached_codes():
    """A's gradient after a step is exactly that of its cross-entropy on the content codes of
    the step's images: G's confusion term, backpropagated with A frozen, adds nothing to it."""
    ap = _make()
    before = copy.deepcopy(ap.adv)
    x, y = batch()
    x1, y1, x2, y2 = make_pairs(x, y)
    with torch.no_grad():  # G is not changed by the D step, so these are the G step's codes
        codes = ap.gen.encode_content(torch.cat([x1, x2]))
    want = torch.autograd.grad(F.cross_entropy(before(codes), torch.cat([y1, y2])), list(before.parameters()))
    ap.train_step(x, y)
    for got, w in zip((p.grad for p in ap.adv.parameters()), want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-7)


def test_g_gets_the_confusion_gradient_only_in_the_content_encoder():
    """From the same state, the step with the term and the step without differ in G's gradient
    exactly where the content code comes from; G, D and their optimisers draw the same weights
    with and without the adversary (it is built last)."""
    x, y = batch()
    grads = {}
    for w in (0.0, 1.0):
        ap = _make(content_adv_w=w)
        ap.g_step(x, y)
        grads[w] = {n: p.grad.clone() for n, p in ap.gen.named_parameters() if p.grad is not None}
    assert grads[0.0].keys() == grads[1.0].keys()
    content = [n for n in grads[0.0] if n.startswith("enc_content")]
    others = [n for n in grads[0.0] if not n.startswith("enc_content")]
    assert content and others
    for n in others:
        torch.testing.assert_close(grads[1.0][n], grads[0.0][n], rtol=0, atol=0)
    assert any((grads[1.0][n] - grads[0.0][n]).abs().max() > 1e-6 for n in content)


def _revealing_codes(n, classes, g, offset=0.8):
    """(n, 4, 2, 2) codes whose class moves their mean a little, under unit noise; labels."""
    y = torch.randint(0, classes, (n,), generator=g)
    means = torch.randn(classes, 16, generator=torch.Generator().manual_seed(9)) * offset
    return (means[y] + torch.randn(n, 16, generator=g)).view(n, 4, 2, 2), y


def test_with_its_memory_it_learns_the_class_from_a_few_images_a_step():
    """Batches of 8 images of 8 classes (the demo's), each class a small shift of the code's mean:
    from the memory it reads the class from fresh codes well above chance within 150 steps."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    adv = ContentAdversary(4, 2, 8, memory=512)
    opt = torch.optim.Adam(adv.parameters(), lr=1e-2, betas=(0.5, 0.999))
    for _ in range(150):
        codes, y = _revealing_codes(8, 8, g)
        seen = min(int(adv.mem_count), 512)
        logits, labels = adv.training_logits(codes, y)
        assert logits.shape[0] == labels.shape[0] == seen + 8  # the memory, then the step's codes
        opt.zero_grad()
        F.cross_entropy(logits, labels).backward()
        opt.step()
    codes, y = _revealing_codes(2048, 8, g)
    with torch.no_grad():
        acc = (adv(codes).argmax(1) == y).float().mean().item()
    assert acc > 0.6, acc  # chance 0.125


def test_memory_is_a_ring_buffer_saved_with_the_module():
    adv = ContentAdversary(4, 2, 3, memory=5)
    f = torch.arange(7 * 16, dtype=torch.float32).view(7, 16)
    adv.remember(f[:3], torch.tensor([0, 1, 2]))
    adv.remember(f[3:7], torch.tensor([0, 1, 2, 0]))
    rows, labels = adv.remembered()
    assert int(adv.mem_count) == 7 and rows.shape == (5, 16)
    torch.testing.assert_close(rows, torch.cat([f[5:7], f[2:5]]))  # rows 0, 1 overwritten by images 5, 6
    assert labels.tolist() == [2, 0, 2, 0, 1]
    copy_ = ContentAdversary(4, 2, 3, memory=5)
    copy_.load_state_dict(adv.state_dict())
    assert torch.equal(copy_.remembered()[0], rows) and int(copy_.mem_count) == 7
    assert ContentAdversary(4, 2, 3).remembered()[0].shape == (0, 16)


def test_fast_backend_tracks_the_reference():
    ref = _make()
    fast = _make(backend=FastBackend())
    force_impl(fast, "ref")  # the kernels have their own parity tests; this checks the wiring
    for step in range(2):
        fast.load_state_dict(copy.deepcopy(ref.state_dict()))
        x, y = batch()
        x = x + 0.01 * step
        lr, lf = ref.train_step(x, y), fast.train_step(x, y)
        assert {"g_content_adv", "adv_ce", "adv_acc"} <= set(lf)
        for k in lr:
            assert abs(lf[k].item() - lr[k].item()) <= 1e-3 * max(abs(lr[k].item()), 0.1), k
        for (n, a), b in zip(ref.adv.named_parameters(), fast.adv.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=n)


def test_bf16_step_runs_and_keeps_channels_last():
    """The layout and precision audit of one bf16 fast iteration with the adversary (its pool,
    standardisation and logits in fp32, on the channels_last code)."""
    a, x, y = audit.build("funit2funit", "fast", "bf16", batch=4, image_size=16,
                          arch={**audit.TINY["funit2funit"], **ADV})
    assert a.adv is not None
    x = x.contiguous(memory_format=a.backend.memory_format)
    tracer = audit.Tracer(audit.param_shapes(a), channels_last=True)
    with tracer, audit._anomaly():
        losses = a.train_step(x, y)
    assert torch.isfinite(losses["g_content_adv"]) and torch.isfinite(losses["adv_ce"])
    assert not tracer.findings, audit.format_findings(tracer)


# ---------------------------------------------------------------- state, resume, the trainer


def test_state_round_trips_exactly_and_a_checkpoint_without_it_is_refused():
    ap = _make()
    x, y = batch()
    ap.train_step(x, y)
    state = copy.deepcopy(ap.state_dict())
    assert {"adv", "opt_adv"} <= set(state)
    expected = ap.train_step(x, y)
    torch.manual_seed(5)
    resumed = build_approach(config_from_dict("funit2funit", {**TINY["funit2funit"], **ADV}), 3, init="resume")
    resumed.load_state_dict(copy.deepcopy(state))
    got = resumed.train_step(x, y)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)
    plain = build_approach(config_from_dict("funit2funit", TINY["funit2funit"]), 3).state_dict()
    with pytest.raises(ValueError, match="has no adv, opt_adv"):
        _make().load_state_dict(plain)


def test_trainer_resumes_exactly_shows_it_and_names_bad_values(tmp_path, capsys):
    extra = ("--set", "content_adv_w=0.5", "--set", "content_adv_hidden=8")
    a, b = straight_and_resumed(tmp_path, 3, 2, *extra)
    assert a["config"]["content_adv_w"] == 0.5 and a["config"]["content_adv_hidden"] == 8
    for part in ("gen", "adv"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert any("adv_acc" in r and "g_content_adv" in r for r in rows)
    capsys.readouterr()
    assert main(tiny_args("funit2funit", tmp_path / "dry", 1, *extra, "--dry-run")) == 0
    resolved = json.loads(capsys.readouterr().out)["config"]
    assert resolved["content_adv_w"] == 0.5 and resolved["content_adv_lr"] == 1e-3
    for bad, message in (("content_adv_w=-1", "content_adv_w must be >= 0"),
                         ("content_adv_lr=0", "content_adv_lr must be > 0"),
                         ("content_adv_hidden=2.5", "content_adv_hidden must be an integer")):
        assert main(tiny_args("funit2funit", tmp_path / "bad", 1, "--set", bad)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and len(err) == 1, err


def test_under_torchrun_its_update_goes_through_the_gradient_sync():
    """Approach._update hands every optimiser to the rank gradient sync (GradSync, tested with real
    ranks in test_distributed*.py): A's too, after G's, so the ranks' adversaries stay identical."""
    ap = _make()
    calls = []

    class Recorder:
        world_size = 1

        def begin(self, opt, average=True):
            calls.append(("begin", opt))

        def finish(self, opt):
            calls.append(("finish", opt))

    ap.grad_sync = Recorder()
    ap.train_step(*batch())
    opts = [opt for what, opt in calls if what == "finish"]
    assert opts == [ap.opt_d, ap.opt_g, ap.opt_adv]
