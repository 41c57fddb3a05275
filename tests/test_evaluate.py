"""`g2g_fast.evaluate`: metrics on constructed models (a perfect swapper from the synthetic ground
truth, the identity), determinism, and the CLI on a tiny trained checkpoint."""
import json

import pytest
import torch

from g2g_fast import evaluate as E
from g2g_fast import metrics as M
from g2g_fast.data import SyntheticDataset

SIZE, CLASSES = 32, 6


def render(ds: SyntheticDataset, label: int, factors: torch.Tensor) -> torch.Tensor:
    """The image SyntheticDataset would render for (label, factors), in [-1, 1]: its own `render`
    run on a one-image stand-in whose label and factors are the given ones."""
    class One:
        image_size = ds.image_size
        labels = [label]

        @staticmethod
        def factors(i):
            return factors

    return SyntheticDataset.render(One, 0).float().div_(127.5).sub_(1.0)


class PerfectSwapper:
    """Looks every image up in a table of (label, factors): content code = factors, class code =
    one-hot label, decode = render. Decoded images are added to the table (for the second stage)."""

    def __init__(self, ds, sets):
        self.ds, self.table = ds, {}
        for s in sets:
            for x, y, f in zip(s.x, s.y, s.factors):
                self.table[x.numpy().tobytes()] = (int(y), f)

    def _look(self, x):
        return [self.table[xi.numpy().tobytes()] for xi in x]

    def encode_content(self, x):
        return torch.stack([f for _, f in self._look(x)])

    def encode_class(self, x):
        return torch.nn.functional.one_hot(torch.tensor([y for y, _ in self._look(x)]), CLASSES).float()

    def decode(self, content, class_code):
        out = []
        for f, c in zip(content, class_code):
            img = render(self.ds, int(c.argmax()), f)
            self.table[img.numpy().tobytes()] = (int(c.argmax()), f)
            out.append(img)
        return torch.stack(out)


class Identity:
    def encode_content(self, x):
        return x

    def encode_class(self, x):
        return torch.zeros(x.shape[0], 4)

    def decode(self, content, class_code):
        return content


class ClassImage:
    """Every mix is the image that gave the class code: m1 = x2, all of its factors from x2."""
    def encode_content(self, x):
        return x

    def encode_class(self, x):
        return x

    def decode(self, content, class_code):
        return class_code


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cache = tmp_path_factory.mktemp("probes")
    train, held, C, identity, _ = E.prepare_data("synthetic", image_size=SIZE, synthetic_classes=CLASSES,
                                                 synthetic_per_class=64, samples=48, probe_train=288)
    probes = M.build_probes(train, identity, cache)
    ds = SyntheticDataset(image_size=SIZE, num_classes=CLASSES, per_class=64, split="test")
    return train, held, C, probes, ds, identity, cache


def test_render_helper_matches_the_dataset(setup):
    ds = setup[4]
    assert torch.equal(render(ds, ds.labels[70], ds.factors(70)), ds.get(70)[0])


def test_perfect_swapper_scores_full_swap_and_no_content_error(setup):
    train, held, C, probes, ds, _, _ = setup
    m = M.evaluate_model(PerfectSwapper(ds, [held, train]), train, held, probes, C, samples=48, leak_train=192)
    assert m["probe_class_acc"] >= 0.9
    assert m["swap_acc"] >= 0.9 and m["swap_kept_acc"] <= 0.1
    # The mixes are real renders of (x2's class, x1's factors): the probe errs on them as on real images.
    assert m["content_error"] <= m["probe_content_error"] * 1.5 + 0.02
    assert m["content_error"] < 0.3
    assert m["recon_long_l1"] < 1e-6 and m["recon_short_l1"] < 1e-6 and m["recon_long_psnr"] == M.PSNR_CAP
    # content codes = factors carry no class; class codes = one-hot labels carry no factors
    assert m["leak_class_from_content_acc"] <= 1 / C + 0.15
    assert m["leak_factors_from_class_r2"] < 0.1


def test_identity_scores_chance_swap_and_exact_reconstruction(setup):
    train, held, C, probes, _, _, _ = setup
    m = M.evaluate_model(Identity(), train, held, probes, C, samples=48, leak_train=192)
    assert m["swap_acc"] <= 1 / C + 0.1 and m["swap_kept_acc"] >= 0.9
    assert m["recon_short_l1"] == 0 and m["recon_long_l1"] == 0 and m["recon_short_psnr"] == M.PSNR_CAP
    # m1 = x1: the content is intact (the swap is what fails)
    assert m["content_error"] == pytest.approx(m["probe_content_error"], abs=0.1)
    assert m["leak_class_from_content_acc"] >= 0.8  # the content code is the image itself


def test_content_error_to_class_says_which_image_the_factors_follow(setup):
    """The per-factor errors against the content and the class image tell a mix that keeps its
    content (Identity: m1 = x1) from one that follows the class image (ClassImage: m1 = x2)."""
    train, held, C, probes, ds, _, _ = setup
    keep = M.evaluate_model(Identity(), train, held, probes, C, samples=48, leak_train=192)
    follow = M.evaluate_model(ClassImage(), train, held, probes, C, samples=48, leak_train=192)
    for m in (keep, follow):
        assert m["content_error"] == pytest.approx(sum(m["content_factor_error"].values()) / 5, rel=1e-5)
        assert m["content_error_to_class"] == pytest.approx(sum(m["content_factor_error_to_class"].values()) / 5,
                                                            rel=1e-5)
        assert set(m["content_factor_error"]) == set(M.CONTENT_FACTORS)
    assert keep["content_error"] < 0.3 < 0.6 < keep["content_error_to_class"]
    assert follow["content_error_to_class"] < 0.3 < 0.6 < follow["content_error"]
    assert follow["content_error_to_class"] == pytest.approx(keep["content_error"], abs=0.05)  # both real images
    for f in ("cx", "cy", "background"):  # factors the probe reads well: each follows the right image
        assert keep["content_factor_error"][f] < 0.5 < keep["content_factor_error_to_class"][f]
        assert follow["content_factor_error_to_class"][f] < 0.5 < follow["content_factor_error"][f]
    swapper = M.evaluate_model(PerfectSwapper(ds, [held, train]), train, held, probes, C, samples=48, leak_train=192)
    assert swapper["content_error_to_class"] > 0.6
    assert "vs content image / vs class image" in M.format_table(follow)


def test_content_error_detects_wrong_content(setup):
    """A swapper that renders x2's class with x2's content (= returns x2) has a large content error."""
    train, held, C, probes, _, _, _ = setup
    i1, i2 = M.pair_indices(held.y, 48, 0)
    wrong, _ = M.content_error(probes, held.x[i2], held.factors[i1])
    right, _ = M.content_error(probes, held.x[i1], held.factors[i1])
    assert wrong > 0.6 and right < 0.3


def test_metrics_are_deterministic_and_probes_cached(setup):
    train, held, C, probes, ds, identity, cache = setup
    assert len(list(cache.iterdir())) == 2
    again = M.build_probes(train, identity, cache)  # loaded from the cache
    x = held.x[:16]
    assert torch.equal(again.classifier.predict(x), probes.classifier.predict(x))
    assert torch.equal(again.regressor.predict(x), probes.regressor.predict(x))
    # retraining from scratch (a short recipe, to keep the test quick) gives the same probes
    small = train.subset(torch.arange(0, len(train), 4))
    p1, p2 = (M.build_probes(small, None, None, steps=15) for _ in range(2))
    assert torch.equal(p1.classifier.predict(x), p2.classifier.predict(x))
    assert torch.equal(p1.regressor.predict(x), p2.regressor.predict(x))
    a = M.evaluate_model(Identity(), train, held, p1, C, samples=24, seed=3, leak_train=96)
    b = M.evaluate_model(Identity(), train, held, p2, C, samples=24, seed=3, leak_train=96)
    assert json.dumps(a) == json.dumps(b)


def test_cli_on_a_tiny_checkpoint(tmp_path, capsys):
    from g2g_fast.train import main as train_main
    run = tmp_path / "run"
    assert train_main(["--approach", "funit2funit", "--device", "cpu", "--image-size", "32", "--batch-size", "4",
                       "--steps", "2", "--out", str(run), "--log-every", "1", "--sample-every", "2",
                       "--ckpt-every", "2", "--set", "nf=8", "--set", "nf_mlp=16", "--set", "latent_dim=8",
                       "--set", "dis_nf=8", "--set", "dis_n_res_blks=4", "--set", "synthetic_classes=4",
                       "--set", "synthetic_per_class=16"]) == 0
    out = tmp_path / "m.json"
    args = ["--checkpoint", str(run / "checkpoints" / "last.pt"), "--samples", "16", "--probe-train", "64", "--probe-steps", "20",
            "--probe-cache", str(tmp_path / "cache"), "--json", str(out), "--device", "cpu"]
    assert E.main(args) == 0
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == set(M.METRIC_KEYS)
    assert report["num_classes"] == 4 and report["image_size"] == 32
    # the held-out data of data seed 0, whatever seed the run trained with (test_ablate_seeds.py: ablate's too)
    assert (report["data_seed"], report["train_seed"], report["seed"]) == (0, 0, 0)
    assert all(report["metrics"][k] is not None for k in M.METRIC_KEYS)
    assert "class swap accuracy" in capsys.readouterr().out
    out2 = tmp_path / "m2.json"
    assert E.main(args[:-3] + [str(out2), "--device", "cpu"]) == 0   # probes from the cache
    assert json.loads(out2.read_text())["metrics"] == report["metrics"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert E.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.pt" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        E.main([])
    assert e.value.code == 2


def make_folder(root, classes=3, per_class=12, size=40):
    """Class sub-folders of PNGs: a colour per class plus per-image noise (every image distinct)."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            img = torch.full((size, size, 3), 40, dtype=torch.int64)
            img[..., c] = 200
            img += torch.randint(0, 50, (size, size, 3), generator=g)
            Image.fromarray(img.clamp(0, 255).to(torch.uint8).numpy()).save(root / f"class_{c}" / f"{i:02d}.png")


def test_folder_dataset_holds_out_images_and_evaluates(tmp_path, capsys):
    data = tmp_path / "data"
    make_folder(data)
    train, held, C, identity, where = E.prepare_data(str(data), image_size=32, samples=8, probe_train=64)
    assert C == 3 and train.factors is None and held.factors is None
    assert len(held) == 36 // 5 and len(train) == 36 - len(held) and "held out of the training split" in where
    assert sorted(set(held.y.tolist())) == [0, 1, 2]  # balanced over classes
    seen = {x.numpy().tobytes() for x in train.x}
    assert not any(x.numpy().tobytes() in seen for x in held.x)  # the probes never see a held-out image
    assert identity["n_heldout"] == len(held)
    from g2g_fast.train import main as train_main
    run = tmp_path / "run"
    assert train_main(["--data", str(data), "--device", "cpu", "--image-size", "32", "--batch-size", "4",
                       "--steps", "2", "--out", str(run), "--log-every", "1", "--set", "nf=8", "--set", "nf_mlp=16",
                       "--set", "latent_dim=8", "--set", "dis_nf=8", "--set", "dis_n_res_blks=4"]) == 0
    out = tmp_path / "m.json"
    assert E.main(["--checkpoint", str(run / "checkpoints" / "last.pt"), "--samples", "8", "--probe-steps", "20",
                   "--probe-cache", str(tmp_path / "cache"), "--json", str(out), "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["data"] == str(data) and report["num_classes"] == 3 and "held out" in report["heldout"]
    m = report["metrics"]
    for k in ("recon_short_l1", "recon_long_psnr", "swap_acc", "probe_class_acc", "leak_class_from_content_acc"):
        assert m[k] is not None and m[k] == m[k], k  # present and not NaN
    assert m["content_error"] is None and m["leak_factors_from_class_r2"] is None  # no ground-truth factors
    captured = capsys.readouterr()
    table = captured.out
    assert "class swap accuracy" in table and "| content error (std units) | mixes / probe on real | n/a / n/a |" in table
    # issue 24 #6: how few images the pairs come from is said, and warned about (36 images hold out 7)
    n = report["distinct_images"]
    assert 2 <= n <= len(held) == 7 and f"evaluated 8 pairs from {n} distinct held-out images" in captured.err
    assert (f"[g2g] warning: the 8 pairs come from only {n} distinct held-out images (fewer than 32): the metrics say "
            "more about these images than about the model; the held-out set has 7 images, a fifth of the "
            "dataset's; a dataset of 160 images or more gives 32") in captured.err.splitlines()


def test_distinct_held_out_images_and_the_floor():
    y = torch.arange(200) % 4
    n, warning = E.distinct_pair_images(y, 256, 0, synthetic=True)
    assert n == len(set(M.pair_indices(y, 256, 0)[0].tolist()) | set(M.pair_indices(y, 256, 0)[1].tolist()))
    assert n >= E.MIN_DISTINCT_IMAGES and warning is None
    n, warning = E.distinct_pair_images(y, 8, 0, synthetic=True)  # few pairs of many images
    assert n <= 16 and warning.endswith(f"pass --samples {E.MIN_DISTINCT_IMAGES} or more")
    n, warning = E.distinct_pair_images(y[:12], 256, 0, synthetic=True)  # 256 pairs of 12 images
    assert n == 12 and "only 12 distinct held-out images" in warning and "--synthetic-per-class" in warning


class FirstImage(Identity):
    """Draws the batch's first content image whatever it is asked for: its short reconstructions
    keep no factor of their own image."""
    def decode(self, content, class_code):
        return content[:1].expand_as(content)


def test_short_reconstruction_factor_errors_bound_what_a_mix_can_keep(setup):
    train, held, C, probes, _, _, _ = setup
    exact = M.evaluate_model(Identity(), train, held, probes, C, samples=48, leak_train=192)
    lost = M.evaluate_model(FirstImage(), train, held, probes, C, samples=48, leak_train=192)
    for f, probe_err in exact["probe_content_factor_error"].items():
        # s_i = x_i: the reconstructions' errors are the probe's own on real images
        assert exact["recon_short_factor_error"][f] == pytest.approx(probe_err, abs=0.1), f
    for f in ("cx", "cy", "background"):
        assert lost["recon_short_factor_error"][f] > 0.5 > exact["recon_short_factor_error"][f], f
    assert exact["probe_content_error"] == pytest.approx(
        sum(exact["probe_content_factor_error"].values()) / len(exact["probe_content_factor_error"]), rel=1e-5)
    row = "| short reconstructions per factor (std units) | vs own image / probe on real | cx "
    assert row in M.format_table(exact)
