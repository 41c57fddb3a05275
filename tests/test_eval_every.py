"""`python -m g2g_fast.train --eval-every N`: evaluation records in metrics.jsonl, and a run's
training (losses, weights, RNG streams) is the same with and without them."""
import json

import pytest
import torch

import g2g_fast.train as train_mod
from g2g_fast import probes as P
from g2g_fast.checkpoint import load_checkpoint
from g2g_fast.metrics import METRIC_KEYS
from g2g_fast.train import main

TINY = {"funit2funit": ["nf=8", "nf_mlp=16", "latent_dim=8", "dis_nf=8", "dis_n_res_blks=4"],
        "naive": ["code_dim=16", "gen_channels=16"]}


@pytest.fixture(autouse=True)
def quick_probes(monkeypatch, tmp_path):
    """A short probe recipe, and a probe cache inside the test's folder."""
    monkeypatch.setattr(P, "PROBE_STEPS", 20)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def run(approach, out, *extra):
    args = ["--approach", approach, "--device", "cpu", "--image-size", "32", "--batch-size", "4", "--steps", "4",
            "--out", str(out), "--log-every", "1", "--sample-every", "4", "--ckpt-every", "4",
            "--set", "synthetic_classes=4", "--set", "synthetic_per_class=16"]
    for s in TINY[approach]:
        args += ["--set", s]
    assert main(args + list(extra)) == 0
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [{k: v for k, v in r.items() if k.startswith(("g_", "d_"))} for r in records if "eval" not in r]
    evals = [r for r in records if "eval" in r]
    return losses, evals, load_checkpoint(out / "checkpoints" / "last.pt")


@pytest.mark.parametrize("approach", ["funit2funit", "naive"])
def test_eval_records_and_unchanged_training(approach, tmp_path, monkeypatch):
    """naive has no EMA: its evaluation puts the trained generator itself (BatchNorm) in eval mode,
    so a mode left unrestored would change the following steps' losses."""
    scalars = []

    class FakeWriter:
        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def add_image(self, *a):
            pass

        def close(self):
            pass

    monkeypatch.setattr(train_mod, "open_tensorboard", lambda out, start_step=0: FakeWriter())
    plain_losses, plain_evals, plain = run(approach, tmp_path / "plain")
    losses, evals, ckpt = run(approach, tmp_path / "eval", "--eval-every", "2")
    assert plain_evals == [] and len(losses) == 4
    assert losses == plain_losses  # exactly: evaluation does not touch the training streams
    for part in ("gen", "gen_test", "dis"):
        for k in plain.get(part, {}):
            assert torch.equal(plain[part][k], ckpt[part][k]), f"{part}.{k}"
    assert torch.equal(plain["rng"]["torch"], ckpt["rng"]["torch"])
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert set(r["eval"]) == set(METRIC_KEYS) and r["sec_eval"] > 0
        assert all(r["eval"][k] is not None for k in METRIC_KEYS)  # synthetic: every metric
    assert ("eval/swap_acc", 2) in scalars and ("eval/content_error", 4) in scalars
    if approach == "funit2funit":
        # Deterministic: another run evaluating only at step 4 gets the same numbers.
        _, only_last, _ = run(approach, tmp_path / "last", "--eval-every", "4")
        assert [r["step"] for r in only_last] == [4]
        assert only_last[0]["eval"] == evals[1]["eval"]


def test_probes_are_trained_once(tmp_path, monkeypatch):
    calls = []
    real = P.train_image_probe
    monkeypatch.setattr(P, "train_image_probe", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    run("naive", tmp_path / "a", "--eval-every", "1")
    assert sorted(calls) == ["class", "regress"]  # 4 evaluations, one probe training each
    run("naive", tmp_path / "b", "--eval-every", "2")
    assert sorted(calls) == ["class", "regress"]  # a second run loads them from the cache


def test_bad_eval_every_is_one_line(capsys):
    assert main(["--device", "cpu", "--eval-every", "-1", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--eval-every" in err and len(err.splitlines()) == 1
