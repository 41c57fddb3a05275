"""The synthetic families (issue 23): "scheme" (class = shape + texture + colour, the default, pinned
to its rendering before the shape family existed) and "shape" (class = the shape alone; hue and
texture per image as two more content factors), the --synthetic-family flag, and the metrics that
score hue and texture."""
import colorsys
import hashlib
import json
import math

import pytest
import torch

from g2g_fast import evaluate as E
from g2g_fast import metrics as M
from g2g_fast import probes as P
from g2g_fast.data import DataError, SyntheticDataset, build_dataset
from g2g_fast.data.synthetic import SHAPES, TEXTURES
from g2g_fast.train import main as train_main

# Rendered before the shape family was added (seed 5, 32x32, 12 classes x 2): index -> (class name,
# sha256[:16] of the uint8 image, its sum, factors). Hashes only where the renderer uses exact IEEE
# operations (sqrt, products, max, round); the others use torch's sin/atan2, whose last bit may
# differ between CPUs, so only their sums are pinned, to a few levels.
PINNED = {
    ("train", 0): ("circle/plain/h0.05", "53bb7e70031c1d0b", 140277,
                   [0.2440023422241211, 0.24635262787342072, 0.40306511521339417, -1.345849633216858,
                    0.14426881074905396, -0.7328149080276489]),
    ("train", 2): ("square/stripes/h0.67", None, 151075,
                   [-0.03822844475507736, -0.11808422952890396, 0.34241706132888794, -3.053535223007202,
                    0.16775283217430115, 3.0819356441497803]),
    ("train", 4): ("triangle/checker/h0.29", None, 386769, None),
    ("train", 6): ("star/dots/h0.90", None, 425071, None),
    ("train", 14): ("hexagon/dots/h0.38", "2c9078a4cb3a8f32", 415374,
                    [-0.3646254539489746, 0.13833245635032654, 0.49773091077804565, 0.0013472179416567087,
                     0.519555926322937, -2.7632110118865967]),
    ("train", 16): ("pentagon/plain/h0.99", "b49d872ff50a6d39", 382898, None),
    ("train", 22): ("semicircle/dots/h0.85", "6e0986dc4381a319", 304314, None),
    ("val", 0): ("circle/plain/h0.05", "02b85374072951df", 297488,
                 [0.21936334669589996, -0.02342185378074646, 0.439176082611084, 1.9888646602630615,
                  0.36207160353660583, 0.10867537558078766]),
    ("val", 22): ("semicircle/dots/h0.85", "f431495ae21ee2a8", 443148, None),
}


@pytest.mark.parametrize("family", [None, "scheme"])
def test_scheme_family_renders_as_before(family):
    kw = {} if family is None else {"family": family}  # the default is the scheme family
    sets = {split: SyntheticDataset(image_size=32, num_classes=12, per_class=2, seed=5, split=split, **kw)
            for split in ("train", "val")}
    for (split, i), (name, sha, total, factors) in PINNED.items():
        ds = sets[split]
        img = ds.render(i)
        assert ds.class_names[ds.labels[i]] == name
        assert ds.factor_names == ["cx", "cy", "scale", "rotation", "background", "light"]
        if sha is not None:
            assert hashlib.sha256(img.numpy().tobytes()).hexdigest()[:16] == sha, (split, i)
            assert int(img.sum()) == total
        else:
            assert abs(int(img.sum()) - total) <= 16, (split, i, int(img.sum()))
        if factors is not None:
            assert ds.factors(i).tolist() == factors
    many = SyntheticDataset(image_size=16, num_classes=50, per_class=1)
    assert [many.class_names[c] for c in (0, 13, 49)] == ["circle/plain/h0.05", "square/checker/h0.08",
                                                          "square/stripes/h0.33"]


def _circle_pixels(ds, i):
    """(hue, saturation) of the pixels well inside the shape of image i (a circle: class 0)."""
    cx, cy, scale = ds.factors(i)[:3].tolist()
    img = ds.render(i).float() / 255
    n = ds.image_size
    c = (torch.arange(n) + 0.5) * (2.0 / n) - 1.0
    inside = ((c.view(1, n) - cx) ** 2 + (c.view(n, 1) - cy) ** 2).sqrt() < 0.6 * scale
    rgb = img[:, inside].T.tolist()
    return [colorsys.rgb_to_hsv(*p)[:2] for p in rgb]


def test_shape_family_class_is_the_shape_and_hue_texture_are_content():
    ds = SyntheticDataset(image_size=96, num_classes=4, per_class=24, seed=1, family="shape")
    assert ds.class_names == SHAPES[:4] and ds.identity(3) == "star"
    assert ds.factor_names == ["cx", "cy", "scale", "rotation", "background", "light", "hue", "texture"]
    f = torch.stack([ds.factors(i) for i in range(24)])  # class 0: circles
    assert f.shape == (24, 8) and set(f[:, 7].tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert len(set(f[:, 7].tolist())) >= 3 and f[:, 6].max() - f[:, 6].min() > 0.5  # they vary in a class
    assert ((f[:, 6] >= 0) & (f[:, 6] < 1)).all()
    for i in range(24):
        px = _circle_pixels(ds, i)
        hue, texture = f[i, 6].item(), TEXTURES[int(f[i, 7])]
        # the base colour (the most saturated pixels) has the factor's hue; the light gradient
        # scales all channels, which keeps the hue
        h = max(px, key=lambda p: p[1])[0]
        assert min(abs(h - hue), 1 - abs(h - hue)) < 0.02, (i, h, hue)
        # the texture's second colour is a paler one: none in plain, about a quarter of the area in
        # dots, about half in stripes and checker
        pale = sum(s < 0.6 for _, s in px) / len(px)
        if texture == "plain":
            assert pale == 0, (i, pale)
        elif texture == "dots":
            assert 0.2 < pale < 0.42, (i, pale)
        else:
            assert 0.45 < pale < 0.65, (i, texture, pale)


def test_shape_family_same_class_same_outline_other_colours():
    """Two images of one class with the same pose have the same outline (mask) but other colours;
    another class has another outline."""
    ds = SyntheticDataset(image_size=64, num_classes=6, per_class=1, family="shape")
    pose = [0.0, 0.0, 0.45, 0.3, 0.0, 0.0]

    def render(c, hue, texture):
        ds.factors = lambda index: torch.tensor(pose + [hue, float(texture)])
        return ds.render(c)  # per_class=1: index c has label c

    a, b = render(3, 0.1, 0), render(3, 0.6, 2)
    assert not torch.equal(a, b)
    assert torch.equal(a.max(0).values > 20, b.max(0).values > 20)
    other = render(4, 0.1, 0)
    assert (other.max(0).values > 20).ne(a.max(0).values > 20).float().mean() > 0.01


def test_shape_family_deterministic_and_shares_the_pose_stream():
    a, b = (SyntheticDataset(image_size=32, num_classes=3, per_class=4, family="shape") for _ in range(2))
    scheme = SyntheticDataset(image_size=32, num_classes=3, per_class=4)
    for i in (0, 5, 11):
        assert torch.equal(a.render(i), b.render(i)) and torch.equal(a.factors(i), b.factors(i))
        assert torch.equal(a.factors(i)[:6], scheme.factors(i))  # the first six draws are the scheme's
    other = SyntheticDataset(image_size=32, num_classes=3, per_class=4, seed=1, family="shape")
    assert not torch.equal(a.factors(0), other.factors(0))
    # the textures are drawn uniformly
    big = SyntheticDataset(image_size=8, num_classes=2, per_class=400, family="shape")
    counts = torch.bincount(torch.tensor([int(big.factors(i)[7]) for i in range(len(big))]), minlength=4)
    assert counts.min() > 150, counts


def test_shape_family_class_count_and_family_errors():
    SyntheticDataset(image_size=8, num_classes=12, per_class=1, family="shape")  # every shape: fine
    with pytest.raises(DataError, match=r"--synthetic-classes 13 with --synthetic-family shape.*"
                                        r"--synthetic-classes 12 or fewer"):
        build_dataset("synthetic", image_size=8, synthetic_classes=13, synthetic_family="shape")
    with pytest.raises(DataError, match="--synthetic-family 'colour' is unknown; use one of scheme, shape"):
        build_dataset("synthetic", image_size=8, synthetic_family="colour")
    assert build_dataset("synthetic", image_size=8, synthetic_classes=13, synthetic_per_class=1).num_classes == 13


def test_train_flag_in_the_dry_run(tmp_path, capsys):
    assert train_main(["--synthetic-family", "shape", "--dry-run", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["trainer"]["synthetic_family"] == "shape"
    assert train_main(["--dry-run", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["trainer"]["synthetic_family"] == "scheme"
    assert E.build_parser().parse_args(["--checkpoint", "x.pt", "--synthetic-family", "shape"]).synthetic_family == "shape"


# ---- metrics ------------------------------------------------------------------------------------

def _shape_factors(n, seed=0):
    ds = SyntheticDataset(image_size=8, num_classes=4, per_class=n // 4, seed=seed, family="shape")
    return torch.stack([ds.factors(i) for i in range(len(ds))]), torch.tensor(ds.labels)


def test_metrics_score_hue_and_texture_on_the_shape_family():
    f, _ = _shape_factors(2000)
    scheme = f[:, :6]
    assert M.content_factors(scheme) == M.CONTENT_FACTORS and M.factor_targets(scheme).shape == (2000, 6)
    assert M.content_factors(f) == M.CONTENT_FACTORS + ["hue", "texture"]
    t = M.factor_targets(f)
    assert t.shape == (2000, 12) and torch.equal(t[:, :6], M.factor_targets(scheme))
    probes = M.Probes(None, scales=M.factor_scales(f))
    # exact predictions: every error 0
    mean, mae, std_units = M.factor_errors(probes, t, f)
    assert set(mae) == set(std_units) == {"cx", "cy", "scale", "background", "light", "hue", "texture"}
    assert mean == pytest.approx(0, abs=1e-5) and std_units["texture"] == 0 and std_units["hue"] < 1e-5
    # an unrelated image's factors (another permutation): ~1 std unit for texture, ~0.87 for hue
    # (the mean circular error of a uniform guess, pi/2 of pi/sqrt(3), as for light)
    other = t[torch.randperm(2000, generator=torch.Generator().manual_seed(0))]
    _, mae, std_units = M.factor_errors(probes, other, f)
    assert std_units["texture"] == pytest.approx(1.0, abs=0.08) and mae["texture"] == pytest.approx(0.75, abs=0.06)
    assert std_units["hue"] == pytest.approx(math.sqrt(3) / 2, abs=0.08)
    assert mae["hue"] == pytest.approx(0.25, abs=0.03)  # in turns of the hue circle
    # a hue off by a tenth of a turn either way: 0.1 in factor units
    hue = 2 * math.pi * (f[:, 6] + 0.1)
    shifted = t.clone()
    shifted[:, 6], shifted[:, 7] = torch.cos(hue), torch.sin(hue)
    assert M.factor_errors(probes, shifted, f)[1]["hue"] == pytest.approx(0.1, abs=1e-4)


def test_leakage_names_every_target_of_the_shape_family():
    f, y = _shape_factors(200)
    s = M.ImageSet(torch.zeros(len(y), 1), y, f)
    codes = (torch.randn(len(y), 8, generator=torch.Generator().manual_seed(1)),
             torch.randn(len(y), 8, generator=torch.Generator().manual_seed(2)))
    r = M.leakage_metrics(codes, s, codes, s, 4)
    assert list(r["leak_factors_from_class_r2_per_factor"]) == \
        ["cx", "cy", "scale", "background", "light_cos", "light_sin", "hue_cos", "hue_sin",
         "texture_plain", "texture_stripes", "texture_checker", "texture_dots"]


def test_evaluation_on_the_shape_family(tmp_path):
    """prepare_data, the probes (a 12-output regressor) and evaluate_model end to end, tiny: the
    per-factor dicts have hue and texture; the probe cache key differs between the families."""
    kw = dict(image_size=16, synthetic_classes=3, synthetic_per_class=8, samples=4, probe_train=24)
    train, held, classes, identity, _ = E.prepare_data("synthetic", synthetic_family="shape", **kw)
    scheme_identity = E.prepare_data("synthetic", **kw)[3]
    assert identity["family"] == "shape" and scheme_identity["family"] == "scheme"
    assert P.cache_key(identity) != P.cache_key(scheme_identity)
    assert classes == 3 and train.factors.shape[1] == 8
    probes = M.build_probes(train, identity, tmp_path, steps=2)
    assert probes.regressor.out_dim == 12 and len(probes.scales) == 7
    assert len(list(tmp_path.glob("factors_*.pt"))) == 1

    class Identity:
        encode_content = encode_class = staticmethod(lambda x: x)
        decode = staticmethod(lambda content, class_code: content)

    m = M.evaluate_model(Identity(), train, held, probes, classes, samples=4, leak_train=24)
    for key in ("content_mae", "probe_content_mae", "content_factor_error", "content_factor_error_to_class"):
        assert list(m[key]) == M.SHAPE_CONTENT_FACTORS, key
    assert "texture_dots" in m["leak_factors_from_class_r2_per_factor"]
    table = M.format_table(m)
    assert "hue " in table and "texture " in table


def test_a_shape_family_run_is_evaluated_on_its_family(tmp_path, monkeypatch, capsys):
    """--eval-every and `evaluate --checkpoint` take the family from the run; a flag overrides it."""
    monkeypatch.setattr(P, "PROBE_STEPS", 10)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert train_main(["--approach", "naive", "--device", "cpu", "--image-size", "32", "--batch-size", "4",
                       "--steps", "2", "--out", str(run), "--log-every", "1", "--sample-every", "2",
                       "--ckpt-every", "2", "--eval-every", "2", "--synthetic-family", "shape",
                       "--set", "code_dim=16", "--set", "gen_channels=16", "--set", "synthetic_classes=4",
                       "--set", "synthetic_per_class=16"]) == 0
    evals = [json.loads(ln)["eval"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    assert len(evals) == 1 and list(evals[0]["content_factor_error"]) == M.SHAPE_CONTENT_FACTORS
    args = ["--checkpoint", str(run / "checkpoints" / "last.pt"), "--samples", "8", "--probe-train", "64",
            "--probe-steps", "10", "--device", "cpu"]
    for extra, factors in (([], M.SHAPE_CONTENT_FACTORS), (["--synthetic-family", "scheme"], M.CONTENT_FACTORS)):
        out = tmp_path / f"m{len(extra)}.json"
        assert E.main(args + extra + ["--json", str(out)]) == 0
        assert list(json.loads(out.read_text())["metrics"]["content_factor_error"]) == factors
    capsys.readouterr()


def test_the_ablation_factor_table_shows_hue_and_texture():
    from g2g_fast.ablate_report import factor_table
    own = dict(zip(M.SHAPE_CONTENT_FACTORS, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]))
    report = {"variants": {"all_on": {"metrics": {"content_factor_error": own,
                                                  "content_factor_error_to_class": {k: 1.0 for k in own}}}}}
    lines = factor_table(report)
    assert "| hue | texture |" in lines[3] and lines[-1].endswith("| 0.60 / 1.00 | 0.70 / 1.00 |")
