"""`python -m g2g_fast.ablate` on a tiny configuration: every variant trains with the same data and
seed, gets its loss weights, is evaluated, reported and, on a second run, evaluated only."""
import json
import re

import pytest
import torch

from g2g_fast import ablate as A
from g2g_fast.checkpoint import load_checkpoint
from g2g_fast.config import Funit2FunitConfig
from g2g_fast.evaluate import METRIC_KEYS

TRAIN_FLAGS = ["--image-size", "32", "--batch-size", "4", "--log-every", "1", "--set", "nf=8", "--set", "nf_mlp=16",
               "--set", "latent_dim=8", "--set", "dis_nf=8", "--set", "dis_n_res_blks=4",
               "--set", "synthetic_classes=4", "--set", "synthetic_per_class=16"]


def ablate(tmp_path, *extra, variants="all_on,no_long_rec", train_flags=TRAIN_FLAGS):
    return A.main(["--out", str(tmp_path / "abl"), "--steps", "2", "--variants", variants, "--device", "cpu",
                   "--samples", "16", "--probe-train", "64", "--probe-steps", "20",
                   "--probe-cache", str(tmp_path / "cache"), *extra, "--", *train_flags])


def lines(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_variants_train_evaluate_report_and_resume(tmp_path, capsys):
    assert ablate(tmp_path) == 0
    out = tmp_path / "abl"
    report = json.loads((out / "ablation.json").read_text())
    assert list(report["variants"]) == ["all_on", "no_long_rec"] and report["steps"] == 2
    on, off = report["variants"]["all_on"], report["variants"]["no_long_rec"]
    d = Funit2FunitConfig()
    assert on["weights"] == {"rl_w": d.rl_w, "fml_w": d.fml_w, "fml_mix_rec_w": d.fml_mix_rec_w}
    assert off["weights"] == {"rl_w": 0, "fml_w": d.fml_w, "fml_mix_rec_w": d.fml_mix_rec_w}
    assert json.loads((out / "no_long_rec" / "config.json").read_text())["config"]["rl_w"] == 0
    for v in (on, off):
        assert v["status"] == "ok" and set(v["metrics"]) == set(METRIC_KEYS)
        assert all(v["metrics"][k] is not None for k in METRIC_KEYS)
        assert {"g_long", "g_fm_long", "g_fm_mix_rec"} <= set(v["final_losses"])
    # Same data and seed: step 1 starts from the same weights on the same batch, so D's loss and the
    # (unweighted) long term agree, and G's totals differ by exactly rl_w * g_long.
    a, b = lines(out / "all_on" / "metrics.jsonl")[0], lines(out / "no_long_rec" / "metrics.jsonl")[0]
    assert a["d_total"] == b["d_total"] and a["g_long"] == b["g_long"]
    assert a["g_total"] - b["g_total"] == pytest.approx(d.rl_w * a["g_long"], rel=1e-3)
    ca = load_checkpoint(out / "all_on" / "checkpoints" / "last.pt")
    cb = load_checkpoint(out / "no_long_rec" / "checkpoints" / "last.pt")
    assert any(not torch.equal(ca["gen"][k], cb["gen"][k]) for k in ca["gen"])
    table = (out / "ablation.md").read_text()
    assert "| all_on | - |" in table and "| no_long_rec | rl_w |" in table
    assert table.splitlines()[2] in capsys.readouterr().out
    assert (out / "samples" / "all_on.png").is_file() and (out / "samples" / "no_long_rec.png").is_file()
    assert (out / "samples.png").is_file()
    # Run again: the finished variants are evaluated, not retrained, with the same metrics.
    stamp = (out / "all_on" / "checkpoints" / "last.pt").stat().st_mtime_ns
    assert ablate(tmp_path) == 0
    assert (out / "all_on" / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp
    assert len(lines(out / "all_on" / "metrics.jsonl")) == 2
    again = json.loads((out / "ablation.json").read_text())
    for v in ("all_on", "no_long_rec"):
        assert again["variants"][v]["metrics"] == report["variants"][v]["metrics"]
    # Other settings into the same folder are refused, naming the variant and the fix.
    assert ablate(tmp_path, train_flags=TRAIN_FLAGS[:-2] + ["--set", "synthetic_per_class=12"]) == 2
    err = capsys.readouterr().err
    assert "variant all_on was trained with other settings" in err and "--out" in err


@pytest.mark.parametrize("extra, train_flags, pattern", [
    (["--variants", "all_on,no_such"], TRAIN_FLAGS, "--variants .*no_such"),
    ([], ["--out", "elsewhere"], "--out after `--`"),
    ([], ["--steps=5"], "--steps after `--`"),
    ([], ["--no-such-flag"], "trainer flags after `--`: unrecognized arguments: --no-such-flag"),
    ([], ["--set", "no_such_key=1"], "no_such_key"),
    (["--samples", "0"], TRAIN_FLAGS, "--samples"),
])
def test_bad_input_is_one_line_before_any_training(tmp_path, capsys, extra, train_flags, pattern):
    args = ["--out", str(tmp_path / "abl"), "--device", "cpu", *extra, "--", *train_flags]
    assert A.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and re.search(pattern, err), err
    assert not (tmp_path / "abl").exists()
