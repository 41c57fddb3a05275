"""FUNIT reference networks: parameter counts, shapes and the official state-dict layout (SPEC §2)."""
import pytest
import torch

from g2g_fast.reference.funit import Generator, load_official_generator
from g2g_fast.reference.funit_dis import Discriminator


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def official_generator_shapes(nf=64, latent=64, nf_mlp=256):
    """The official 58-key FUNIT generator layout (animal-faces config), written out independently."""
    s = {}

    def conv(name, cin, cout, k, bias=True):
        s[f"{name}.weight"] = (cout, cin, k, k)
        if bias:
            s[f"{name}.bias"] = (cout,)

    conv("enc_class_model.model.0.conv", 3, nf, 7)
    conv("enc_class_model.model.1.conv", nf, 2 * nf, 4)
    conv("enc_class_model.model.2.conv", 2 * nf, 4 * nf, 4)
    conv("enc_class_model.model.3.conv", 4 * nf, 4 * nf, 4)
    conv("enc_class_model.model.4.conv", 4 * nf, 4 * nf, 4)
    conv("enc_class_model.model.6", 4 * nf, latent, 1)
    conv("enc_content.model.0.conv", 3, nf, 7)
    for i, (cin, cout) in enumerate([(nf, 2 * nf), (2 * nf, 4 * nf), (4 * nf, 8 * nf)], start=1):
        conv(f"enc_content.model.{i}.conv", cin, cout, 4)
    for r in (0, 1):
        for c in (0, 1):
            conv(f"enc_content.model.4.model.{r}.model.{c}.conv", 8 * nf, 8 * nf, 3)
            conv(f"dec.model.0.model.{r}.model.{c}.conv", 8 * nf, 8 * nf, 3)
            s[f"dec.model.0.model.{r}.model.{c}.norm.running_mean"] = (8 * nf,)
            s[f"dec.model.0.model.{r}.model.{c}.norm.running_var"] = (8 * nf,)
    conv("dec.model.2.conv", 8 * nf, 4 * nf, 5)
    conv("dec.model.4.conv", 4 * nf, 2 * nf, 5)
    conv("dec.model.6.conv", 2 * nf, nf, 5)
    conv("dec.model.7.conv", nf, 3, 7)
    for i, (cin, cout) in enumerate([(latent, nf_mlp), (nf_mlp, nf_mlp), (nf_mlp, 4 * 2 * 8 * nf)]):
        s[f"mlp.model.{i}.fc.weight"] = (cout, cin)
        s[f"mlp.model.{i}.fc.bias"] = (cout,)
    return s


def test_generator_counts_match_spec():
    g = Generator()
    assert n_params(g) == 29_866_435
    assert n_params(g.enc_content) == 12_202_112
    assert n_params(g.enc_class_model) == 2_779_328
    assert n_params(g.dec) == 13_749_891
    assert sum(b.numel() for b in g.buffers()) == 4_096


def test_discriminator_counts_match_spec():
    d = Discriminator(119)
    assert n_params(d) == 54_252_599
    sd = d.state_dict()
    assert len(sd) == 48
    assert "cnn_f.0.conv.weight" in sd and "cnn_c.0.conv.weight" in sd
    assert sd["cnn_f.2.conv_s.conv.weight"].shape == (128, 64, 1, 1)
    assert "cnn_f.2.conv_s.conv.bias" not in sd


def test_official_layout_loads_strict_and_saves_back(tmp_path):
    shapes = official_generator_shapes()
    assert len(shapes) == 58
    g = Generator()
    assert {k: tuple(v.shape) for k, v in g.state_dict().items()} == shapes
    sd = {k: torch.randn(v) for k, v in shapes.items()}
    path = tmp_path / "animal_gen.pt"
    torch.save({"gen": sd, "gen_test": {k: v * 2 for k, v in sd.items()}}, path)
    load_official_generator(g, path)  # gen_test by default
    out = g.state_dict()
    assert sorted(out) == sorted(shapes)
    for k in shapes:
        torch.testing.assert_close(out[k], sd[k] * 2, rtol=0, atol=0)


def test_official_loader_names_the_mismatch(tmp_path):
    sd = {k: torch.zeros(v) for k, v in official_generator_shapes().items()}
    sd["mlp.model.0.fc.weightX"] = sd.pop("mlp.model.0.fc.weight")
    path = tmp_path / "bad.pt"
    torch.save({"gen_test": sd}, path)
    with pytest.raises(ValueError, match=r"bad\.pt.*mlp\.model\.0\.fc\.weight"):
        load_official_generator(Generator(), path)
    torch.save({"something": sd}, path)
    with pytest.raises(ValueError, match="not a FUNIT generator file"):
        load_official_generator(Generator(), path)


@pytest.mark.parametrize("size", [128, 64])
def test_shapes(size):
    g = Generator(nf=16, nf_mlp=32, latent_dim=8)
    d = Discriminator(5, nf=16)
    x = torch.randn(2, 3, size, size)
    a, b = g.encode_content(x), g.encode_class(x)
    assert a.shape == (2, 128, size // 8, size // 8)
    assert b.shape == (2, 8)
    y = g.decode(a, b)
    assert y.shape == x.shape and y.abs().max() <= 1
    resp, feat = d(x, torch.tensor([0, 4]))
    assert resp.shape == (2, size // 16, size // 16)
    assert feat.shape == (2, 512, size // 16, size // 16)  # nf 16 doubles 5 times


def test_discriminator_selects_each_samples_class_and_features_are_activated():
    d = Discriminator(6, nf=8, n_res_blks=4)
    x = torch.randn(3, 3, 32, 32)
    y = torch.tensor([5, 0, 2])
    resp, feat = d(x, y)
    full = d.cnn_c[0].conv(feat)
    for i in range(3):
        torch.testing.assert_close(resp[i], full[i, y[i]])
    # feat = lrelu(cnn_f(x)): negative entries are exactly 0.2 x the pre-activation.
    pre = d.cnn_f(x)
    torch.testing.assert_close(feat, torch.nn.functional.leaky_relu(pre, 0.2))
    assert (pre < 0).any()


def test_identity_shortcut_block_adds_activated_input():
    """SPEC §2: an identity-shortcut ActFirstResBlock computes lrelu(x) + residual(x)."""
    from g2g_fast.reference.funit_dis import ActFirstResBlock
    blk = ActFirstResBlock(4, 4)
    x = torch.randn(2, 4, 6, 6)
    residual = blk.conv_1(blk.conv_0(x))
    torch.testing.assert_close(blk(x), torch.nn.functional.leaky_relu(x, 0.2) + residual)
    learned = ActFirstResBlock(4, 8)
    torch.testing.assert_close(learned(x), learned.conv_s.conv(x) + learned.conv_1(learned.conv_0(x)))


def test_decoder_takes_style_explicitly_and_slices_bias_then_weight():
    g = Generator(nf=8, nf_mlp=16, latent_dim=4)
    assert g.dec.num_adain_params() == 4 * 2 * 64
    params = torch.randn(2, g.dec.num_adain_params())
    styles = g.dec.split_adain_params(params)
    assert len(styles) == 4
    weight0, bias0 = styles[0]
    torch.testing.assert_close(bias0, params[:, :64])
    torch.testing.assert_close(weight0, params[:, 64:128])
    torch.testing.assert_close(styles[1][1], params[:, 128:192])
    # No module state is mutated by a decode: two different styles in a row give independent results.
    c = torch.randn(2, 64, 4, 4)
    y1 = g.dec(c, params)
    g.dec(c, torch.randn_like(params))
    torch.testing.assert_close(g.dec(c, params), y1)


def test_kaiming_init_and_zero_bias():
    g = Generator(nf=16, nf_mlp=32, latent_dim=8)
    w = g.enc_content.model[1].conv.weight
    fan_in = w.shape[1] * w.shape[2] * w.shape[3]
    assert abs(w.std().item() - (2.0 / fan_in) ** 0.5) < 0.1 * (2.0 / fan_in) ** 0.5
    assert all(m.bias.abs().sum() == 0 for m in g.modules() if isinstance(m, torch.nn.Conv2d))
