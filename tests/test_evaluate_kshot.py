"""`evaluate --k-shot K` (issue 16): stage-1 class codes averaged over K held-out images of the class."""
import json

import pytest
import torch

from g2g_fast import evaluate as E
from g2g_fast import metrics as M
from test_inference import tiny_checkpoint


def test_kshot_indices():
    y = torch.arange(5).repeat_interleave(6)[torch.randperm(30, generator=torch.Generator().manual_seed(1))]
    idx = torch.tensor([0, 7, 7, 29, 12])
    rows = M.kshot_indices(y, idx, 4, seed=3)
    assert rows.shape == (5, 4) and torch.equal(rows[:, 0], idx)
    assert all(len(set(r.tolist())) == 4 and (y[r] == y[r[0]]).all() for r in rows)  # K distinct, one class
    assert torch.equal(rows, M.kshot_indices(y, idx, 4, seed=3))
    assert not torch.equal(rows, M.kshot_indices(y, idx, 4, seed=4))
    assert torch.equal(M.kshot_indices(y, idx, 1, seed=3), idx[:, None])
    with pytest.raises(ValueError, match="--k-shot 7: class .* has only 6 held-out images"):
        M.kshot_indices(y, idx, 7, seed=3)


class Shift:
    """Content code = the image, class code = a tenth of its mean colour, decode = image + code: the
    short reconstruction's error is exactly the |class code| used."""

    def encode_content(self, x):
        return x

    def encode_class(self, x):
        return x.mean((2, 3)) * 0.1

    def decode(self, content, class_code):
        return content + class_code[:, :, None, None]


class ZeroProbes:
    regressor = None

    def classify(self, x):
        return torch.zeros(len(x), dtype=torch.int64)


def test_evaluate_model_uses_the_k_shot_mean():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 8, 8, generator=g) - 0.5
    x += torch.rand(32, 3, 1, 1, generator=g) - 0.5  # each image its own mean colour
    x = x.clamp(-0.8, 0.8)
    held = M.ImageSet(x, torch.arange(4).repeat(8))
    codes = Shift().encode_class(x)

    def short_l1(k):
        m = M.evaluate_model(Shift(), held, held, ZeroProbes(), 4, samples=24, seed=2, batch=5, leak_train=32,
                             k_shot=k)
        return m["recon_short_l1"]

    i1, i2 = M.pair_indices(held.y, 24, 2)
    assert short_l1(1) == pytest.approx(torch.cat([codes[i1], codes[i2]]).abs().mean().item(), abs=1e-7)
    b1, b2 = (codes[M.kshot_indices(held.y, i, 3, 2 + j)].mean(1) for j, i in enumerate((i1, i2)))
    assert short_l1(3) == pytest.approx(torch.cat([b1, b2]).abs().mean().item(), abs=1e-7)
    assert abs(short_l1(3) - short_l1(1)) > 1e-3


def test_cli_k_shot(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    base = ["--checkpoint", str(ckpt), "--samples", "16", "--probe-train", "64", "--probe-steps", "20",
            "--probe-cache", str(tmp_path / "cache"), "--device", "cpu"]
    assert E.main(base + ["--json", str(tmp_path / "k1.json")]) == 0
    assert E.main(base + ["--json", str(tmp_path / "k3.json"), "--k-shot", "3"]) == 0
    k1, k3 = (json.loads((tmp_path / f).read_text()) for f in ("k1.json", "k3.json"))
    assert k1["k_shot"] == 1 and k3["k_shot"] == 3
    assert set(k3["metrics"]) == set(M.METRIC_KEYS)
    assert k3["metrics"]["recon_short_l1"] != k1["metrics"]["recon_short_l1"]
    # leakage uses per-image codes: the same with and without K-shot
    assert k3["metrics"]["leak_class_from_content_acc"] == k1["metrics"]["leak_class_from_content_acc"]
    capsys.readouterr()
    # 64 held-out images over 8 classes: 8 per class
    assert E.main(base + ["--k-shot", "9", "--json", str(tmp_path / "k9.json")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: --k-shot 9: class ") and "has only 8 held-out images" in err[-1]
    assert not (tmp_path / "k9.json").exists()
