"""`class_encoder="coco"`: COCO-FUNIT's content-conditioned class encoder (Saito et al. 2020, issue
23). FUNIT's class encoder, its code conditioned at decode time on the content code being decoded:
mlp(mlp_style([code | style_bias]) * mlp_content(mean of the content code)). `coco_bias_dim=0`
keeps FUNIT's generator exactly; the reference and the fast generator share keys, initial weights
and numbers; both approaches with a FUNIT generator train, resume and load with it, and the fast
iteration keeps channels_last throughout (the layout audit)."""
import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from g2g_fast import audit
from g2g_fast.backends import FastBackend, force_impl
from g2g_fast.config import config_from_dict
import g2g_fast.models.funit as fast_funit
from g2g_fast.models import Generator
from g2g_fast.reference import funit as ref_funit
from g2g_fast.reference.steps import build_approach
from g2g_fast.train import main as train_main
from g2g_fast.translate import load_generator
from test_fast_parity import GRAD_TOL_EACH, GRAD_TOL_TOTAL, batch, grad_errors, pair, rel_err
from test_models_fast import ARCH, CL, assert_three_way_parity
from test_steps import TINY, assert_step_is_complete

BIAS = 12  # a small style bias for the tiny models (COCO-FUNIT's is 1024, the default)
COCO_KEYS = ["coco.style_bias"] + [f"coco.{m}.model.{i}.fc.{p}" for m in ("mlp_content", "mlp_style")
                                   for i in (0, 1) for p in ("weight", "bias")]


def _images(seed, shape=(3, 3, 40, 24), channels_last=False):
    """Shifted, non-unit-variance images of an odd size: a 5x3 content code, a 3x2 class map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.7 + 0.1
    return x.to(memory_format=CL) if channels_last else x


def test_keys_init_and_funits_layout():
    torch.manual_seed(0)
    ref = ref_funit.Generator(**ARCH, coco_bias_dim=BIAS)
    torch.manual_seed(0)
    fast = Generator(**ARCH, coco_bias_dim=BIAS, impl="ref")
    torch.manual_seed(0)
    funit = ref_funit.Generator(**ARCH)
    rsd, fsd, usd = ref.state_dict(), fast.state_dict(), funit.state_dict()
    assert list(fsd) == list(rsd) and [n for n, _ in fast.named_modules()] == [n for n, _ in ref.named_modules()]
    assert list(rsd) == list(usd) + COCO_KEYS  # FUNIT's keys first, in FUNIT's order
    for k in rsd:  # same construction order: one seed, the same weights; FUNIT's parts as FUNIT's
        assert torch.equal(fsd[k], rsd[k]), k
        if k in usd:
            assert torch.equal(rsd[k], usd[k]), k
    ref.load_state_dict(fast.state_dict(), strict=True)
    fast.load_state_dict(ref.state_dict(), strict=True)
    # style dims = the class code's (latent_dim 8), hidden nf_mlp 16, content 64 = 8 * 2**3 channels
    shapes = {k: tuple(rsd[k].shape) for k in COCO_KEYS[:2] + ["coco.mlp_style.model.0.fc.weight",
                                                              "coco.mlp_style.model.1.fc.weight"]}
    assert shapes == {"coco.style_bias": (1, BIAS), "coco.mlp_content.model.0.fc.weight": (16, 64),
                      "coco.mlp_style.model.0.fc.weight": (16, 8 + BIAS), "coco.mlp_style.model.1.fc.weight": (8, 16)}
    assert ref.mlp.model[0].fc.in_features == 8  # FUNIT's MLP still takes a class code
    # Init: FUNIT's kaiming for the linears (zero biases), randn for the style bias.
    assert all(not rsd[k].any() for k in COCO_KEYS if k.endswith(".bias") and "fc" in k)
    assert rsd["coco.style_bias"].std() > 0.3
    # 0 (the default) is FUNIT: no module, its 58 keys.
    default = ref_funit.Generator()
    assert default.coco is None and len(default.state_dict()) == 58
    assert list(ref_funit.Generator(coco_bias_dim=0).state_dict()) == list(default.state_dict())
    assert Generator(coco_bias_dim=0).coco is None
    assert list(ref_funit.Generator(**ARCH, content_dim=3, coco_bias_dim=BIAS).state_dict())[-len(COCO_KEYS):] == \
        COCO_KEYS
    # A replacement class encoder: the style dims follow its out_dim.
    enc = ref_funit.ClassEncoder(3, 4, 5)
    custom = Generator(**ARCH, class_encoder=enc, coco_bias_dim=BIAS, impl="ref")
    assert custom.coco.mlp_style.model[0].fc.in_features == 5 + BIAS
    assert custom.coco.mlp_content.model[1].fc.out_features == 5


def test_official_funit_files_still_load_and_coco_refuses_them(tmp_path):
    path = tmp_path / "funit_gen.pt"
    torch.save({"gen_test": ref_funit.Generator().state_dict()}, path)
    ref_funit.load_official_generator(ref_funit.Generator(), path)  # strict
    ref_funit.load_official_generator(Generator(), path)
    with pytest.raises(ValueError, match="coco.style_bias"):
        ref_funit.load_official_generator(ref_funit.Generator(coco_bias_dim=16), path)


def test_the_formula_and_that_it_depends_on_the_content():
    torch.manual_seed(1)
    gen = ref_funit.Generator(**ARCH, coco_bias_dim=BIAS)
    x = _images(3)
    content, code = gen.encode_content(x), gen.encode_class(_images(4))
    assert torch.equal(code, gen.enc_class_model(_images(4)))  # the swapped code is E_B's output
    coco = gen.coco

    def mlp2(m, v):  # both layers ReLU'd (NVIDIA's COCO-FUNIT MLPs activate their output too)
        return F.relu(F.linear(F.relu(F.linear(v, m.model[0].fc.weight, m.model[0].fc.bias)),
                               m.model[1].fc.weight, m.model[1].fc.bias))

    c = mlp2(coco.mlp_content, content.mean((2, 3)))
    s = mlp2(coco.mlp_style, torch.cat([code, coco.style_bias.expand(3, BIAS)], 1))
    torch.testing.assert_close(coco(content, code), s * c)
    # the AdaIN parameters of two content codes with the same class code differ (FUNIT's do not)
    other = gen.encode_content(_images(5))
    p1, p2 = gen.mlp(coco(content, code)), gen.mlp(coco(other, code))
    assert (p1 - p2).abs().max() > 1e-3 * p1.abs().max()
    torch.testing.assert_close(gen.decode(content, code), gen.dec(content, p1))  # decode goes through it


@pytest.mark.parametrize("impl,channels_last", [("ref", False), ("ref", True), ("triton", True)],
                         ids=["ref-nchw", "ref-nhwc", "triton-nhwc"])
def test_fp32_parity_outputs_and_every_gradient(impl, channels_last):
    """test_models_fast's three-way rule against float64, odd image sizes, every parameter."""
    torch.manual_seed(0)
    ref = ref_funit.Generator(**ARCH, coco_bias_dim=BIAS)
    torch.manual_seed(0)
    fast = Generator(**ARCH, coco_bias_dim=BIAS, impl=impl)
    if channels_last:
        ref, fast = ref.to(memory_format=CL), fast.to(memory_format=CL)
    xs, ys = _images(1, channels_last=channels_last), _images(2, channels_last=channels_last)
    got = assert_three_way_parity(ref, fast, xs, ys)
    assert all(f"grad {k}" in got for k in COCO_KEYS) and got["content"].shape == (3, 64, 5, 3)
    if channels_last:
        for k in ("content", "decode", "forward", "grad_x", "grad_y"):
            assert got[k].is_contiguous(memory_format=CL), f"{k} lost channels_last"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_bf16_autocast_three_way(channels_last):
    torch.manual_seed(0)
    ref = ref_funit.Generator(**ARCH, coco_bias_dim=BIAS)
    fast = Generator(**ARCH, coco_bias_dim=BIAS, impl="triton")
    fast.load_state_dict(ref.state_dict(), strict=True)
    if channels_last:
        ref, fast = ref.to(memory_format=CL), fast.to(memory_format=CL)
    x, y = _images(1, channels_last=channels_last), _images(2, channels_last=channels_last)
    with torch.no_grad():
        ref32 = ref(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref16, fast16 = ref(x, y), fast(x, y)
            pooled = fast.coco.pool(fast.encode_content(x))
    assert fast16.dtype == ref16.dtype == torch.bfloat16 and pooled.dtype == torch.float32  # an fp32 statistic
    if channels_last:
        assert fast16.is_contiguous(memory_format=CL)
    err_fast = (fast16.float() - ref32).abs().max().item()
    err_ref = (ref16.float() - ref32).abs().max().item()
    assert err_fast <= 2 * err_ref + 1e-2, f"bf16 fast err {err_fast:.3g} vs ref err {err_ref:.3g}"


@pytest.mark.parametrize("approach", ["funit2funit", "cyclefunit"])
def test_training_step_on_both_backends_and_the_state_round_trips(approach):
    cfg = config_from_dict(approach, {**TINY[approach], "class_encoder": "coco", "style_bias_dim": BIAS})
    assert cfg.arch_kwargs()["coco_bias_dim"] == BIAS
    def build(backend, **kw):
        torch.manual_seed(0)
        ap = build_approach(cfg, 3, **({"backend": backend} if backend else {}), **kw)
        for net in (ap.gen, ap.dis):  # the fast networks' ref impl: the interpreter is tested elsewhere here
            if hasattr(net, "impl"):
                net.impl = "ref"
        return ap

    for backend in (None, FastBackend()):
        ap = build(backend)
        assert type(ap.gen.coco) is (fast_funit.ContentConditioning if backend else ref_funit.ContentConditioning)
        assert isinstance(ap.gen.enc_class_model, ref_funit.ClassEncoder)  # FUNIT's, trained
        assert getattr(ap, "id_net", None) is None
        assert_step_is_complete(ap)  # every parameter, coco's included, gets a gradient
        state = copy.deepcopy(ap.state_dict())
        x, y = batch(seed=1)
        expected = ap.train_step(x, y)
        resumed = build(backend, init="resume")
        resumed.load_state_dict(copy.deepcopy(state))
        assert list(resumed.gen.state_dict()) == list(state["gen"])
        got = resumed.train_step(x, y)
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)


@pytest.mark.parametrize("approach", ["funit2funit", "cyclefunit"])
def test_fast_g_step_matches_the_reference(approach):
    ref, fast = pair(approach, class_encoder="coco", style_bias_dim=BIAS)
    force_impl(fast, "ref")  # the fused kernels with coco: test_fp32_parity_outputs_and_every_gradient
    x, y = batch()
    lr, lf = ref.g_step(x, y), fast.g_step(x.contiguous(memory_format=torch.channels_last), y)
    for k in lr:
        assert rel_err(lf[k], lr[k]) <= 1e-4, f"{k}: {lf[k].item()} vs {lr[k].item()}"
    per, total = grad_errors(fast.gen, ref.gen)
    assert all(k in per for k in COCO_KEYS)
    assert total <= GRAD_TOL_TOTAL and max(per.values()) <= GRAD_TOL_EACH, (total, max(per, key=per.get))


def test_fast_iteration_keeps_channels_last():
    """The layout audit (tests/test_audit.py) of one bf16 fast FUNIT2FUNIT iteration with the
    conditioning and K-shot class codes (class_shots; its shot images' batched E_B call and mean):
    no NCHW activation or gradient, no low-precision statistic (the reference's pool gives four NCHW
    gradients here). CycleFUNIT's generator is the same module; its other networks are audited in
    tests/test_audit.py. Small (batch 4, 16 px): the Triton interpreter makes each op slow."""
    a, x, y = audit.build("funit2funit", "fast", "bf16", batch=4, image_size=16,
                          arch={**audit.TINY["funit2funit"], "class_encoder": "coco", "style_bias_dim": BIAS,
                                "class_shots": 2})
    assert a.gen.coco is not None
    x = x.contiguous(memory_format=a.backend.memory_format)
    shots = torch.rand(2 * x.shape[0], *x.shape[1:], generator=torch.Generator().manual_seed(2)) * 2 - 1
    tracer = audit.Tracer(audit.param_shapes(a), channels_last=True)
    with tracer, audit._anomaly():
        a.train_step(x, y, shots=shots)
    assert tracer.ops["convolution"].calls
    assert not tracer.findings, audit.format_findings(tracer)


@pytest.mark.parametrize("approach, values, match", [
    ("funit2funit", {"class_encoder": "coco", "init_funit": "animal149_gen.pt"},
     "class_encoder='coco' adds COCO-FUNIT's style bias"),
    ("cyclefunit", {"class_encoder": "coco", "init_funit": "animal149_gen.pt"},
     "class_encoder='coco' adds COCO-FUNIT's style bias"),
    ("funit2funit", {"class_encoder": "identity"}, "class_encoder must be one of 'funit', 'coco'"),
    ("funit2funit", {"class_encoder": "coco", "style_bias_dim": 0}, "style_bias_dim must be >= 1"),
])
def test_bad_values_name_the_field(approach, values, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict(approach, values)


def test_dry_run_shows_it(capsys):
    assert train_main(["--dry-run", "--device", "cpu", "--set", "class_encoder=coco"]) == 0
    resolved = json.loads(capsys.readouterr().out)["config"]
    assert resolved["class_encoder"] == "coco" and resolved["style_bias_dim"] == 1024
    assert train_main(["--dry-run", "--device", "cpu", "--approach", "cyclefunit", "--set", "class_encoder=coco",
                       "--set", "style_bias_dim=64"]) == 0
    resolved = json.loads(capsys.readouterr().out)["config"]
    assert resolved["class_encoder"] == "coco" and resolved["style_bias_dim"] == 64


def test_trains_resumes_and_loads_through_the_cli(tmp_path):
    args = ["--device", "cpu", "--image-size", "32", "--batch-size", "4", "--out", str(tmp_path), "--log-every", "1",
            "--set", "nf=8", "--set", "nf_mlp=16", "--set", "latent_dim=8", "--set", "dis_nf=8",
            "--set", "dis_n_res_blks=4", "--set", "class_encoder=coco", "--set", f"style_bias_dim={BIAS}"]
    assert train_main(args + ["--steps", "1"]) == 0
    assert train_main(args + ["--steps", "2", "--resume"]) == 0
    gen, _ = load_generator(SimpleNamespace(funit=None, checkpoint=str(tmp_path / "checkpoints" / "last.pt"),
                                            raw=False, image_size=None))
    assert gen.coco is not None and gen.coco.style_bias.shape == (1, BIAS)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert gen(x, x.flip(0)).shape == (2, 3, 32, 32)
