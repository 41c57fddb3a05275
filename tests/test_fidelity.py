"""FID/KID of the mixes per target class (g2g_fast/fidelity.py, issue 24 #11): the formulas against
independent computations (closed-form Gaussian FID, scipy's sqrtm, a brute-force MMD loop, and
torch-fidelity's own functions when it imports), the per-class grouping, and evaluate / ablate end
to end with the small random-weight extractor, which goes through the same code path as
torch-fidelity's InceptionV3 (a weight file given by --fid-weights)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from g2g_fast import ablate_report as R
from g2g_fast import evaluate as E
from g2g_fast import fidelity as FID
from g2g_fast.metrics import ImageSet, format_table
from test_evaluate import ClassImage, Identity  # mixes = the class image / the content image

try:
    import torch_fidelity  # noqa: F401
    TF_ERROR = None
except Exception as e:  # noqa: BLE001 - PyPI's torchvision beside another torch raises RuntimeError
    TF_ERROR = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
# Not a CUDA/DALI skip: torch-fidelity is an optional extra whose import needs a matching torchvision.
needs_tf = pytest.mark.skipif(TF_ERROR is not None, reason=f"torch-fidelity does not import ({TF_ERROR}); "
                                                           f"{FID.INSTALL} with a torchvision matching torch")
without_tf = pytest.mark.skipif(TF_ERROR is None, reason="torch-fidelity imports here")


# ---- formulas -------------------------------------------------------------------------------------

def test_fid_matches_the_closed_form_of_two_gaussians():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    # diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2, a, b = rng.normal(size=5), rng.normal(size=5), rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert FID.fid_from_statistics(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    # full covariances, against the textbook sqrtm form tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)
    m1, m2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(6), m2 @ m2.T + 0.1 * np.eye(6)
    r1 = scipy_linalg.sqrtm(s1).real
    want = np.trace(s1 + s2 - 2 * scipy_linalg.sqrtm(r1 @ s2 @ r1).real)
    assert FID.fid_from_statistics(np.zeros(6), s1, np.zeros(6), s2) == pytest.approx(want, rel=1e-8)
    # from samples: the sample statistics (N - 1 covariance) approach the distributions' FID
    x = rng.multivariate_normal(np.zeros(6), s1, 200_000)
    y = rng.multivariate_normal(np.ones(6), s2, 200_000)
    assert FID.fid(x, y) == pytest.approx(want + 6, rel=0.02)
    assert FID.fid(x[:50], x[:50]) == pytest.approx(0, abs=1e-8)


def brute_mmd2(x, y):
    """The unbiased MMD^2 with KID's kernel, term by term."""
    d, m = x.shape[1], len(x)
    k = lambda u, v: (float(np.dot(u, v)) / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd_over_torch_fidelitys_subsets():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.5, 1.0, size=(12, 5))
    mean, std = FID.kid(x, y)  # 12 < the subset size: every subset is the whole set
    assert mean == pytest.approx(brute_mmd2(x, y), rel=1e-10) and std == pytest.approx(0, abs=1e-12)
    # subsets of 6, drawn as torch-fidelity draws them (RandomState(2020), x's then y's per subset)
    x2 = rng.normal(size=(15, 5))
    r = np.random.RandomState(FID.KID_RNG_SEED)
    mmds = [brute_mmd2(x2[r.choice(15, 6, replace=False)], y[r.choice(12, 6, replace=False)]) for _ in range(7)]
    assert FID.kid(x2, y, subsets=7, subset_size=6) == pytest.approx((np.mean(mmds), np.std(mmds)), rel=1e-10)
    same = FID.kid(rng.normal(size=(300, 5)), rng.normal(size=(300, 5)), subsets=10, subset_size=100)[0]
    assert abs(same) < 0.2 * FID.kid(x2, y + 1.0, subset_size=12)[0]
    with pytest.raises(FID.FidelityError, match="at least 2 images"):
        FID.kid(x[:1], y)


@needs_tf
def test_fid_and_kid_equal_torch_fidelitys_own_functions():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    rng = np.random.default_rng(2)
    a, b = torch.tensor(rng.normal(size=(60, 16))), torch.tensor(rng.normal(1, 2, size=(50, 16)))
    theirs = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), False)
    assert FID.fid(a.numpy(), b.numpy()) == pytest.approx(theirs["frechet_inception_distance"], rel=1e-12)
    k = kid_features_to_metric(a, b, kid_subsets=FID.KID_SUBSETS, kid_subset_size=40, verbose=False)
    assert FID.kid(a.numpy(), b.numpy(), subset_size=40) == pytest.approx(
        (k["kernel_inception_distance_mean"], k["kernel_inception_distance_std"]), rel=1e-12)


# ---- extractors -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_file(tmp_path_factory):
    return FID.write_random_extractor(tmp_path_factory.mktemp("fid") / "random_conv.pt")


def test_random_extractor_file_is_loaded_by_the_same_path(random_file):
    ext = FID.load_extractor(random_file)
    assert ext.dim == 32 and not ext.comparable and "test extractor" in ext.name
    x = torch.rand(5, 3, 24, 24) * 2 - 1
    f = ext.features(x, batch=2)
    assert f.shape == (5, 32) and f.dtype == np.float64
    assert np.array_equal(f, FID.load_extractor(random_file).features(x, batch=2))  # the file fixes the weights
    assert np.array_equal(f, ext.features(FID.to_uint8(x).float() / 127.5 - 1, batch=2))  # uint8 pixels, as PNGs


def test_missing_or_foreign_weight_files_are_one_clear_error(tmp_path):
    with pytest.raises(FID.FidelityError) as e:
        FID.load_extractor(tmp_path / "nosuch.pth")
    assert "--fid-weights" in str(e.value) and "no such file" in str(e.value) and FID.INCEPTION_FILE in str(e.value)
    assert "\n" not in str(e.value)
    torch.save({"w": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(FID.FidelityError, match="neither torch-fidelity's InceptionV3 weights"):
        FID.load_extractor(tmp_path / "other.pt")


@without_tf
def test_inception_weights_without_torch_fidelity_name_the_extra(tmp_path):
    torch.save({k: torch.zeros(1) for k in FID.INCEPTION_KEYS}, tmp_path / "inception.pth")
    with pytest.raises(FID.FidelityError) as e:
        FID.load_extractor(tmp_path / "inception.pth")
    assert FID.INSTALL in str(e.value) and "torchvision" in str(e.value) and "\n" not in str(e.value)


@needs_tf
def test_torch_fidelity_inception_through_the_same_path(tmp_path, monkeypatch):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3 as Inception
    with monkeypatch.context() as m:  # random weights: build it without a weight file, then write one
        m.setattr(Inception, "load_state_dict", lambda self, state, strict=True: None)
        m.setattr(torch, "load", lambda *a, **k: {})
        net = Inception("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    ext = FID.load_extractor(tmp_path / "inception.pth")
    assert ext.dim == 2048 and not ext.comparable and "another sha256" in ext.notes[0]
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert np.allclose(ext.features(x), net(FID.to_uint8(x))[0].double().numpy(), rtol=1e-5, atol=1e-6)
    state = net.state_dict()
    state.pop("fc.bias")
    torch.save(state, tmp_path / "torn.pth")
    with pytest.raises(FID.FidelityError, match="not torch-fidelity's InceptionV3 weights"):
        FID.load_extractor(tmp_path / "torn.pth")


# ---- per target class -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def held():
    return E.prepare_data("synthetic", image_size=32, synthetic_classes=4, synthetic_per_class=16, samples=16,
                          probe_train=8)[1]


class Recorder:
    """Codes are the images' one-hot labels (looked up); records (content labels, class codes) per
    decode: which images each class's mixes are made of."""

    def __init__(self, s: ImageSet):
        self.labels = {x.numpy().tobytes(): int(y) for x, y in zip(s.x, s.y)}
        self.calls = []

    def _one_hot(self, x):
        return torch.nn.functional.one_hot(torch.tensor([self.labels[i.numpy().tobytes()] for i in x]), 4).float()

    encode_content = encode_class = _one_hot

    def decode(self, content, class_code):
        self.calls.append((content.argmax(1), class_code))
        return torch.zeros(len(content), 3, 32, 32)


def test_mixes_of_a_class_are_its_class_codes_on_other_classes_contents(held, random_file):
    ext = FID.load_extractor(random_file)
    for k in (1, 3):
        rec = Recorder(held)
        m, info = FID.per_class(rec, held, ext, samples=10, k_shot=k, batch=64)
        assert [int(b.argmax(1)[0]) for _, b in rec.calls] == [0, 1, 2, 3]  # one call per class, in order
        for (content, b), c in zip(rec.calls, range(4)):
            assert len(content) == 10 and (content != c).all()          # content from the other classes
            assert torch.equal(b, torch.nn.functional.one_hot(torch.full((10,), c), 4).float())  # K of class c
        assert info["n_fake"] == {str(c): 10 for c in range(4)} and info["n_real"] == {str(c): 16 for c in range(4)}
        assert info["kid_subset_size"] == {str(c): 10 for c in range(4)} and info["k_shot"] == k


def test_real_images_of_the_target_class_score_zero_fid_and_others_do_not(held, random_file):
    ext = FID.load_extractor(random_file)
    notes = []
    own, info = FID.per_class(ClassImage(), held, ext, log=notes.append)
    other, _ = FID.per_class(Identity(), held, ext)
    assert set(own["fid_per_class"]) == {"0", "1", "2", "3"}
    # the default count is the class's real images, each used once: the same statistics, FID 0
    assert all(abs(v) < 1e-6 for v in own["fid_per_class"].values())
    assert all(v > 1e-3 for v in other["fid_per_class"].values())
    assert min(other["kid_per_class"].values()) > max(own["kid_per_class"].values())
    assert own["fid_mean"] == pytest.approx(np.mean(list(own["fid_per_class"].values())))
    assert other["kid_mean"] == pytest.approx(np.mean(list(other["kid_per_class"].values())))
    # 16 real images per class, 32 feature dimensions: FID is biased, KID is the one to read (said once)
    assert any("KID's estimate is unbiased" in n for n in notes) and notes == [f"warning: {n}" for n in info["notes"]]
    again, _ = FID.per_class(Identity(), held, ext)
    assert again == other  # seeded


def test_folder_data_and_too_few_images(tmp_path, random_file):
    from test_evaluate import make_folder
    make_folder(tmp_path / "data")
    held = E.prepare_data(str(tmp_path / "data"), image_size=32, samples=8, probe_train=64)[1]
    m, info = FID.per_class(Identity(), held, FID.load_extractor(random_file), samples=4)
    assert len(m["fid_per_class"]) == 3 and all(np.isfinite(v) for v in m["kid_per_class"].values())
    assert info["n_real"] == {str(c): int(n) for c, n in enumerate(torch.bincount(held.y))}
    one = ImageSet(held.x[:3], torch.tensor([0, 0, 1]))
    with pytest.raises(FID.FidelityError, match="class 1 has 1 held-out image"):
        FID.per_class(Identity(), one, FID.load_extractor(random_file))


def test_tables_show_fid_and_kid_only_when_computed():
    m = {"fid_mean": 12.5, "kid_mean": 0.0123, "fid_per_class": {"0": 10.0, "1": 15.0},
         "kid_per_class": {"0": 0.01, "1": 0.0146}, "kid_std_per_class": {"0": 0.001, "1": 0.002}}
    table = format_table(m)
    assert "| FID of mixes vs real images of their target class | mean over classes / per class | " \
           "12.50 / 0: 10.00, 1: 15.00 |" in table and "| KID of mixes" in table
    assert "FID" not in format_table({})
    runs = {str(s): {"status": "ok", "metrics": {"fid_mean": v, "kid_mean": v / 1000}} for s, v in ((0, 10.0), (1, 14.0))}
    metrics, stats, _ = R.variant_stats(runs)
    report = {"variants": {"all_on": {"metrics": metrics, "stats": stats}, "all_off": {"metrics": {}}},
              "fidelity": {"classes": 4, "extractor": "x", "notes": ["few images"]}}
    lines = FID.report_lines(report)
    assert "| all_on | 12.00 ± 2.8284 | 0.0120 ± 0.0028 |" in lines and not any("all_off" in ln for ln in lines)
    assert "Note: few images." in lines
    assert FID.report_lines({"variants": {"a": {"metrics": {"swap_acc": 1.0}}}}) == []


# ---- the CLIs end to end --------------------------------------------------------------------------

def test_evaluate_cli_reports_fid_and_kid(tmp_path, random_file, capsys):
    from test_train_cli import tiny_args
    from g2g_fast.train import main as train_main
    run = tmp_path / "run"
    assert train_main(tiny_args("funit2funit", run, 2, "--set", "synthetic_classes=4",
                                "--set", "synthetic_per_class=16")) == 0
    capsys.readouterr()
    base = ["--checkpoint", str(run / "checkpoints" / "last.pt"), "--samples", "16", "--probe-train", "64",
            "--probe-steps", "5", "--probe-cache", str(tmp_path / "cache"), "--device", "cpu"]
    out = tmp_path / "m.json"
    assert E.main(base + ["--json", str(out), "--fid-weights", str(random_file), "--fid-samples", "12"]) == 0
    captured = capsys.readouterr()
    report = json.loads(out.read_text())
    assert set(FID.KEYS) <= set(report["metrics"]) and len(report["metrics"]["fid_per_class"]) == 4
    fid = report["fidelity"]
    assert fid["n_fake"] == {str(c): 12 for c in range(4)} and fid["n_real"] == {str(c): 16 for c in range(4)}
    assert fid["extractor"].startswith("random-conv") and fid["comparable"] is False
    assert "| FID of mixes vs real images of their target class |" in captured.out
    assert "warning: random-weight test extractor" in captured.err
    # a missing weight file: one line, before the probes train
    assert E.main(base + ["--fid-weights", str(tmp_path / "nosuch.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --fid-weights") and len(err.strip().splitlines()) == 1 and "probe" not in err


def test_ablate_reports_fid_and_kid_when_asked(tmp_path, random_file, capsys):
    from test_ablate import ablate
    assert ablate(tmp_path, "--fid-weights", str(random_file), variants="all_on") == 0
    out = tmp_path / "abl"
    report = json.loads((out / "ablation.json").read_text())
    run = report["variants"]["all_on"]
    assert run["metrics"]["fid_mean"] is not None and len(run["metrics"]["kid_per_class"]) == 4
    assert report["fidelity"]["extractor"].startswith("random-conv")
    table = (out / "ablation.md").read_text()
    assert "| variant | FID | KID |" in table and "| all_on | " in table.split("| variant | FID | KID |")[1]
    assert json.loads((out / "all_on" / "eval.json").read_text())["fid_mean"] == run["metrics"]["fid_mean"]
