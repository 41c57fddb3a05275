"""`dec_norm="none"` (issue 23): FUNIT's decoder with its upsampling blocks' instance norm removed,
so that a content map's per-channel level (a global colour, a background grey) reaches the image.
Same keys and initial weights as FUNIT's decoder; the fast generator computes the reference's
numbers (forward and every gradient, both layouts, the sub-pixel decoder too, bf16); both
approaches train, resume and load with it; a pretrained FUNIT file is refused with it."""
import json
from types import SimpleNamespace

import pytest
import torch

from g2g_fast import audit
from g2g_fast.config import config_from_dict
from g2g_fast.models import Generator
from g2g_fast.reference import funit as ref_funit
from g2g_fast.train import main as train_main
from g2g_fast.translate import load_generator
from test_coco import _images
from test_models_fast import ARCH, CL, assert_three_way_parity
from test_steps import TINY, assert_step_is_complete
from g2g_fast.reference.steps import build_approach

NONE = dict(ARCH, dec_norm="none")


def test_keys_init_and_what_it_changes():
    torch.manual_seed(0)
    funit = ref_funit.Generator(**ARCH)
    torch.manual_seed(0)
    gen = ref_funit.Generator(**NONE)
    a, b = funit.state_dict(), gen.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)  # IN has no parameters
    ups = [m for m in gen.dec.model if isinstance(m, ref_funit.Conv2dBlock) and m.conv.out_channels != 3]
    assert ups and all(m.norm_kind == "none" for m in ups)
    # what IN removed: a content code shifted per channel changes FUNIT's upsampling blocks' output
    # only through the non-linearities before them; without IN, the level passes to the image
    x, y = _images(1), _images(2)
    with torch.no_grad():
        content, code = gen.encode_content(x), gen.encode_class(y)
        assert not torch.allclose(gen.decode(content, code), funit.decode(content, code))


@pytest.mark.parametrize("impl,channels_last,subpixel", [("ref", False, False), ("ref", True, False),
                                                         ("triton", True, False), ("triton", True, True)],
                         ids=["ref-nchw", "ref-nhwc", "triton-nhwc", "triton-nhwc-subpixel"])
def test_fp32_parity_outputs_and_every_gradient(impl, channels_last, subpixel):
    """test_models_fast's three-way rule against float64, odd image sizes, every parameter."""
    torch.manual_seed(0)
    ref = ref_funit.Generator(**NONE)
    torch.manual_seed(0)
    fast = Generator(**NONE, impl=impl, subpixel=subpixel)
    if channels_last:
        ref, fast = ref.to(memory_format=CL), fast.to(memory_format=CL)
    xs, ys = _images(1, channels_last=channels_last), _images(2, channels_last=channels_last)
    got = assert_three_way_parity(ref, fast, xs, ys)
    if channels_last:
        for k in ("content", "decode", "forward", "grad_x", "grad_y"):
            assert got[k].is_contiguous(memory_format=CL), f"{k} lost channels_last"


def test_bf16_autocast_three_way():
    torch.manual_seed(0)
    ref = ref_funit.Generator(**NONE).to(memory_format=CL)
    fast = Generator(**NONE, impl="triton").to(memory_format=CL)
    fast.load_state_dict(ref.state_dict(), strict=True)
    x, y = _images(1, channels_last=True), _images(2, channels_last=True)
    with torch.no_grad():
        ref32 = ref(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref16, fast16 = ref(x, y), fast(x, y)
    assert fast16.dtype == torch.bfloat16 and fast16.is_contiguous(memory_format=CL)
    err_fast = (fast16.float() - ref32).abs().max().item()
    err_ref = (ref16.float() - ref32).abs().max().item()
    assert err_fast <= 2 * err_ref + 1e-2, f"bf16 fast err {err_fast:.3g} vs ref err {err_ref:.3g}"


def test_fast_iteration_keeps_channels_last():
    """The layout and precision audit of one bf16 fast FUNIT2FUNIT iteration with it."""
    a, x, y = audit.build("funit2funit", "fast", "bf16", batch=4, image_size=16,
                          arch={**audit.TINY["funit2funit"], "dec_norm": "none"})
    x = x.contiguous(memory_format=a.backend.memory_format)
    tracer = audit.Tracer(audit.param_shapes(a), channels_last=True)
    with tracer, audit._anomaly():
        a.train_step(x, y)
    assert not tracer.findings, audit.format_findings(tracer)


@pytest.mark.parametrize("approach", ["funit2funit", "cyclefunit"])
def test_both_approaches_train_every_parameter(approach):
    torch.manual_seed(0)
    ap = build_approach(config_from_dict(approach, {**TINY[approach], "dec_norm": "none"}), 3)
    assert ap.gen.dec.model[2].norm_kind == "none"
    assert_step_is_complete(ap)


@pytest.mark.parametrize("values, match", [
    ({"dec_norm": "ln"}, "dec_norm must be 'in' or 'none', got 'ln'"),
    ({"dec_norm": "none", "init_funit": "animal149_gen.pt"}, "dec_norm='none' removes the instance norm"),
])
def test_bad_values_name_the_field(values, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict("funit2funit", values)


def test_trains_resumes_shows_and_loads_through_the_cli(tmp_path, capsys):
    args = ["--device", "cpu", "--image-size", "32", "--batch-size", "4", "--out", str(tmp_path), "--log-every", "1",
            "--set", "nf=8", "--set", "nf_mlp=16", "--set", "latent_dim=8", "--set", "dis_nf=8",
            "--set", "dis_n_res_blks=4", "--set", "dec_norm=none"]
    assert train_main(args + ["--steps", "1"]) == 0
    assert train_main(args + ["--steps", "2", "--resume"]) == 0
    capsys.readouterr()
    assert train_main(["--dry-run", "--device", "cpu", "--set", "dec_norm=none"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["dec_norm"] == "none"
    gen, _ = load_generator(SimpleNamespace(funit=None, checkpoint=str(tmp_path / "checkpoints" / "last.pt"),
                                            raw=False, image_size=None))
    assert gen.dec.model[2].norm_kind == "none"
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert gen(x, x.flip(0)).shape == (2, 3, 32, 32)
