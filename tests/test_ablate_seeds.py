"""`python -m g2g_fast.ablate --seeds N` and `--sweep`, end to end on tiny configurations: runs
land in their folders with their seeds and settings, and the report's statistics are those of the
runs' own evaluations. (`--approaches`: test_ablate_approaches.py.)"""
import json
import statistics

import pytest
import torch

from g2g_fast import ablate as A
from g2g_fast import evaluate as E
from g2g_fast import probes as P
from g2g_fast.checkpoint import load_checkpoint
from g2g_fast.metrics import METRIC_KEYS
from test_ablate import TRAIN_FLAGS

PROBE_FLAGS = ["--samples", "16", "--probe-train", "64", "--probe-steps", "20"]
SMALL_DATA = ["--set", "synthetic_classes=4", "--set", "synthetic_per_class=16"]


@pytest.fixture(autouse=True)
def quick_probes(monkeypatch, tmp_path):
    """The trainer's --eval-every probes: a short recipe, cached inside the test's folder."""
    monkeypatch.setattr(P, "PROBE_STEPS", 20)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_seeds_give_runs_statistics_and_one_curve_per_variant(tmp_path, capsys):
    out = tmp_path / "abl"
    argv = ["--out", str(out), "--steps", "2", "--seeds", "2", "--seed", "3", "--variants", "all_on,no_long_rec",
            "--device", "cpu", *PROBE_FLAGS, "--probe-cache", str(tmp_path / "cache"),
            "--", *TRAIN_FLAGS, "--eval-every", "2"]
    assert A.main(argv) == 0
    report = json.loads((out / "ablation.json").read_text())
    assert report["seeds"] == [3, 4] and report["mode"] == "losses"
    for v in ("all_on", "no_long_rec"):
        entry = report["variants"][v]
        assert list(entry["runs"]) == ["3", "4"]
        for seed, run in entry["runs"].items():
            folder = out / v / f"seed_{seed}"
            assert run["dir"] == str(folder) and run["status"] == "ok"
            assert json.loads((folder / "config.json").read_text())["config"]["seed"] == int(seed)
            assert json.loads((folder / "eval.json").read_text()) == run["metrics"]
            assert set(run["metrics"]) == set(METRIC_KEYS)
        values = [r["metrics"]["swap_acc"] for r in entry["runs"].values()]
        stats = entry["stats"]["leak_class_from_content_acc"]
        leak = [r["metrics"]["leak_class_from_content_acc"] for r in entry["runs"].values()]
        assert entry["metrics"]["swap_acc"] == pytest.approx(statistics.mean(values))
        assert stats["mean"] == pytest.approx(statistics.mean(leak))
        assert stats["std"] == pytest.approx(statistics.stdev(leak))
        assert (stats["min"], stats["max"], stats["n"]) == (min(leak), max(leak), 2)
    # the seeds are different runs (weights and data order), the variants differ only in rl_w
    a = load_checkpoint(out / "all_on" / "seed_3" / "checkpoints" / "last.pt")
    b = load_checkpoint(out / "all_on" / "seed_4" / "checkpoints" / "last.pt")
    assert any(not torch.equal(a["gen"][k], b["gen"][k]) for k in a["gen"])
    assert json.loads((out / "no_long_rec" / "seed_4" / "config.json").read_text())["config"]["rl_w"] == 0
    rows = report["comparison"]["rows"]
    assert report["comparison"]["baseline"] == "all_on" and {r["variant"] for r in rows} == {"no_long_rec"}
    on, off = report["variants"]["all_on"]["stats"], report["variants"]["no_long_rec"]["stats"]
    for r in rows:
        assert r["delta"] == pytest.approx(off[r["metric"]]["mean"] - on[r["metric"]]["mean"])
        assert r["spread"] == pytest.approx(max(off[r["metric"]]["std"], on[r["metric"]]["std"]))
        assert r["exceeds"] == (abs(r["delta"]) > r["spread"])
    table = (out / "ablation.md").read_text()
    assert " ± " in table and report["answer"][0] in table and "Issue-23 demo targets, scheme family" in table
    # Welch's t-test of no_long_rec against all_on: every headline metric and factor (test_ablate_welch.py)
    tested = {t["metric"] for t in report["comparison"]["tests"]}
    assert {"swap_acc", "recon_long_psnr", "content_factor_error.cx", "content_factor_error_to_class.light"} \
        <= tested
    assert ("Welch's t-test of each variant against all_on" in table) == report["comparison"]["p_values"]
    assert ("Yes: removing" in report["answer"][0]) == any(r["exceeds"] for r in rows)
    if report["figure"]:  # matplotlib installed (the plot extra)
        assert (out / "curves.png").is_file() and "![learning curves](curves.png)" in table
    else:
        pytest.importorskip("matplotlib")
        pytest.fail("matplotlib is installed but no curves.png was written")
    assert (out / "samples" / "all_on.png").is_file() and (out / "samples.png").is_file()
    # a rerun evaluates only, to the same numbers
    stamp = (out / "all_on" / "seed_4" / "checkpoints" / "last.pt").stat().st_mtime_ns
    assert A.main(argv) == 0
    assert (out / "all_on" / "seed_4" / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp
    again = json.loads((out / "ablation.json").read_text())
    assert again["variants"]["no_long_rec"]["stats"] == report["variants"]["no_long_rec"]["stats"]
    assert again["trained_now"] == [] and report["trained_now"] == [
        "all_on/seed_3", "all_on/seed_4", "no_long_rec/seed_3", "no_long_rec/seed_4"]


def evaluate_cli(tmp_path, ckpt, *flags) -> dict:
    """`python -m g2g_fast.evaluate --checkpoint ckpt` with ablate's PROBE_FLAGS (else defaults) -> its JSON."""
    out = tmp_path / f"eval_{len(list(tmp_path.glob('eval_*.json')))}.json"
    assert E.main(["--checkpoint", str(ckpt), *PROBE_FLAGS, "--probe-cache", str(tmp_path / "cache"),
                   "--device", "cpu", "--json", str(out), *flags]) == 0
    return json.loads(out.read_text())


def test_evaluate_gives_the_ablation_rows_numbers_on_the_same_data(tmp_path, capsys):
    """Every run is judged on the held-out data of one data seed (0), whatever seed it trained with,
    in ablate and in evaluate alike: evaluate's defaults give a row's numbers; --data-seed moves both."""
    out = tmp_path / "abl"
    argv = ["--out", str(out), "--steps", "1", "--seeds", "2", "--seed", "1", "--variants", "all_on",
            "--device", "cpu", *PROBE_FLAGS, "--probe-cache", str(tmp_path / "cache"), "--", *TRAIN_FLAGS]
    assert A.main(argv) == 0
    report = json.loads((out / "ablation.json").read_text())
    assert (report["data_seed"], report["eval_seed"]) == (0, 0)
    assert "Held-out data: data seed 0 for every run" in (out / "ablation.md").read_text()
    for seed in ("1", "2"):
        run = report["variants"]["all_on"]["runs"][seed]
        assert (run["seed"], run["data_seed"], run["eval_seed"]) == (int(seed), 0, 0)
        cli = evaluate_cli(tmp_path, out / "all_on" / f"seed_{seed}" / "checkpoints" / "last.pt")
        assert cli["metrics"] == run["metrics"]  # identical, not close: the same images, pairs and probes
        assert (cli["data_seed"], cli["train_seed"], cli["seed"]) == (0, int(seed), 0)
    assert "data seed 0 (the checkpoint trained with seed 2); pairs and probes seed 0" in capsys.readouterr().out
    # another data seed: both CLIs move to it together (the runs are evaluated, not retrained)
    assert A.main(argv[:-len(TRAIN_FLAGS) - 1] + ["--data-seed", "1", "--", *TRAIN_FLAGS]) == 0
    moved = json.loads((out / "ablation.json").read_text())
    run = moved["variants"]["all_on"]["runs"]["2"]
    assert moved["trained_now"] == [] and run["data_seed"] == 1
    assert run["metrics"] != report["variants"]["all_on"]["runs"]["2"]["metrics"]
    cli = evaluate_cli(tmp_path, out / "all_on" / "seed_2" / "checkpoints" / "last.pt", "--data-seed", "1")
    assert cli["metrics"] == run["metrics"] and cli["data_seed"] == 1


def test_sweep_of_the_content_code_size(tmp_path):
    out = tmp_path / "sweep"
    assert A.main(["--sweep", "content_dim=0,2", "--out", str(out), "--steps", "1", "--device", "cpu", *PROBE_FLAGS,
                   "--probe-cache", str(tmp_path / "cache"), "--", *TRAIN_FLAGS]) == 0
    report = json.loads((out / "ablation.json").read_text())
    assert list(report["variants"]) == ["content_dim_0", "content_dim_2"] and report["mode"] == "sweep"
    assert report["variants"]["content_dim_2"]["set"] == ["content_dim=2"]
    small = load_checkpoint(out / "content_dim_2" / "checkpoints" / "last.pt")
    full = load_checkpoint(out / "content_dim_0" / "checkpoints" / "last.pt")
    cfg = small["config"]   # the content encoder's width: nf * 2^n_downs_content (the preset's)
    width, last = cfg["nf"] * 2 ** cfg["n_downs_content"], cfg["n_downs_content"] + 2
    assert cfg["content_dim"] == 2 and small["gen"]["dec.content_in.weight"].shape == (width, 2, 1, 1)
    assert set(small["gen"]) - set(full["gen"]) == {f"enc_content.model.{last}.weight", f"enc_content.model.{last}.bias",
                                                    "dec.content_in.weight", "dec.content_in.bias"}
    assert report["variants"]["content_dim_2"]["metrics"]["leak_class_from_content_acc"] is not None
    assert "| content_dim_2 | funit2funit, content_dim=2 |" in (out / "ablation.md").read_text()
