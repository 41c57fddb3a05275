"""Configs: SPEC defaults, validation with named fields, a comment on every default."""
import dataclasses
import inspect

import pytest

from g2g_fast.config import CONFIGS, config_from_dict, config_to_dict


def test_spec_defaults():
    f = config_from_dict("funit2funit")
    assert (f.gan_w, f.r_w, f.fm_rec_w, f.fm_w, f.rl_w, f.fml_w, f.fml_mix_rec_w, f.r1_w) == \
        (1.0, 0.1, 1.0, 1.0, 0.01, 0.1, 0.1, 10.0)
    assert (f.lr_gen, f.lr_dis, f.weight_decay, f.rms_alpha, f.rms_eps, f.ema_beta) == \
        (1e-4, 1e-4, 1e-4, 0.99, 1e-8, 0.999)
    assert (f.nf, f.n_res_blks, f.nf_mlp, f.latent_dim, f.n_mlp_blks, f.n_downs_content, f.n_downs_class) == \
        (64, 2, 256, 64, 3, 3, 4)
    assert f.pairing == "halves" and f.image_size == 128
    # the original FUNIT2FUNIT's batch_size 4 draws two loaders of 4 (4 pairs); CycleFUNIT's splits one
    assert (f.batch_size, config_from_dict("cyclefunit").batch_size, config_from_dict("naive").batch_size) == (8, 4, 32)
    assert f.init_funit_key == "auto"
    c = config_from_dict("cyclefunit")
    assert (c.alpha_long, c.alpha_short, c.gamma_content, c.gamma_class, c.delta_gan, c.lr) == \
        (1.0, 1.0, 1.0, 1.0, 1.0, 2e-4)
    n = config_from_dict("naive")
    assert (n.gamma, n.lr, n.code_dim) == (0.4, 2e-4, 256)


def test_every_default_has_a_comment():
    for cls in CONFIGS.values():
        for klass in cls.__mro__:
            if not dataclasses.is_dataclass(klass):
                continue
            src = inspect.getsource(klass)
            for field in dataclasses.fields(klass):
                lines = [ln for ln in src.splitlines() if ln.strip().startswith(f"{field.name}:")]
                for ln in lines:
                    assert "#" in ln, f"{klass.__name__}.{field.name} has no comment"


@pytest.mark.parametrize("values, match", [
    ({"no_such_key": 1}, "unknown config key.*no_such_key"),
    ({"batch_size": 5}, "batch_size"),
    ({"pairing": "triples"}, "pairing"),
    ({"ema_beta": 1.0}, "ema_beta"),
    ({"image_size": 100}, "image_size"),
    ({"nf": 1.5}, "nf must be an integer, got 1.5"),
    ({"lr_gen": "abc"}, "lr_gen must be a number"),
    ({"rl_w": -0.1}, "rl_w must be >= 0"),
    ({"lr_dis": 0}, "lr_dis must be > 0"),
    ({"r1_w": float("nan")}, "r1_w must be a finite number"),
    ({"dis_n_res_blks": 3}, "dis_n_res_blks must be >= 2 and even"),
    ({"n_downs_class": 1}, "n_downs_class must be >= 2"),
    ({"init_funit": 3}, "init_funit must be a string"),
    ({"init_funit_key": "ema"}, "init_funit_key must be"),
    ({"batch_size": True}, "batch_size must be an integer"),
])
def test_validation_names_the_field(values, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict("funit2funit", values)


def test_values_are_normalised_to_their_type():
    cfg = config_from_dict("funit2funit", {"nf": 16.0, "rl_w": 1, "init_funit": None})
    assert type(cfg.nf) is int and type(cfg.rl_w) is float and cfg.init_funit is None


def test_unknown_approach_and_round_trip():
    with pytest.raises(ValueError, match="unknown approach"):
        config_from_dict("funit3funit")
    cfg = config_from_dict("cyclefunit", {"alpha_long": 2.0})
    d = config_to_dict(cfg)
    assert d["approach"] == "cyclefunit" and d["alpha_long"] == 2.0
    assert config_from_dict(d.pop("approach"), d) == cfg
