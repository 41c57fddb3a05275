"""`python -m g2g_fast.ablate` on a tiny configuration: every variant trains with the same data and
seed, gets its loss weights, is evaluated, reported and, on a second run, evaluated only."""
import json
import re

import pytest
import torch

from g2g_fast import ablate as A
from g2g_fast import ablate_report as R
from g2g_fast import welch as W
from g2g_fast.checkpoint import load_checkpoint
from g2g_fast.config import Funit2FunitConfig
from g2g_fast.metrics import METRIC_KEYS

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
    # A checkpoint saved before a setting existed (no key for it) counts as that setting's default.
    from g2g_fast.checkpoint import save_checkpoint
    ckpt = load_checkpoint(out / "all_on" / "checkpoints" / "last.pt")
    del ckpt["config"]["class_shots"], ckpt["trainer"]["synthetic_family"]
    save_checkpoint(out / "all_on" / "checkpoints" / "last.pt", ckpt)
    assert ablate(tmp_path) == 0
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
    (["--seeds", "0"], TRAIN_FLAGS, "--seeds must be a positive integer, got 0"),
    (["--approach", "naive"], TRAIN_FLAGS, "--approach naive: the loss ablation switches FUNIT2FUNIT's losses off"),
    (["--approaches", "--approach", "naive"], [], "--approach with --approaches"),
    (["--approaches", "--sweep", "nf=8,16"], TRAIN_FLAGS, "not allowed with argument"),
    (["--approaches", "--variants", "naive,funit2funit2"], [], "--variants .*funit2funit2.*choose from funit2funit, "
                                                             "cyclefunit, naive"),
    (["--sweep", "content_dim"], TRAIN_FLAGS, "--sweep content_dim: expected KEY=V1,V2"),
    (["--sweep", "content_dim=2,2"], TRAIN_FLAGS, "--sweep content_dim=2,2: expected KEY=V1,V2,... with distinct"),
    (["--sweep", "class_shots=4+class_encoder"], TRAIN_FLAGS, "expected KEY=V.KEY2=W .one value each."),
    (["--sweep", "class_shots=1,4+class_encoder=coco"], TRAIN_FLAGS, "expected KEY=V.KEY2=W .one value each."),
    (["--sweep", "class_shots=0,4", "--sweep", "class_shots=4"], TRAIN_FLAGS, "variant class_shots_4 is already swept"),
    (["--sweep", "class_shots=0", "--sweep", "class_shots=4+no_such=1"], TRAIN_FLAGS,
     "variant class_shots_4.no_such_1: --set no_such=1: unknown key 'no_such'"),
    (["--sweep", "no_such=1,2"], TRAIN_FLAGS, "variant no_such_1: --set no_such=1: unknown key 'no_such'"),
    (["--sweep", "content_dim=-1"], TRAIN_FLAGS,
     "variant content_dim_-1: --set content_dim=-1: content_dim must be >= 0"),
    (["--approaches"], ["--set", "nf=8"], "variant naive: --set nf=8: unknown key 'nf'"),
])
def test_bad_input_is_one_line_before_any_training(tmp_path, capsys, extra, train_flags, pattern):
    args = ["--out", str(tmp_path / "abl"), "--device", "cpu", *extra, "--", *train_flags]
    try:
        code = A.main(args)
    except SystemExit as e:  # argparse's own errors (one line too: OneLineErrorParser)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and re.search(pattern, err), err
    assert not (tmp_path / "abl").exists()


# ---- the report: statistics over seeds and the plain-words answer, from given numbers ------------

def fake_report(swap: dict, content: dict | None = None) -> dict:
    """A report whose variants' runs have the given swap accuracies (and content errors) per seed."""
    variants = {}
    for v, values in swap.items():
        runs = {str(i): {"status": "ok", "train_s": 100.0 + i, "final_losses": {"g_long": 0.5},
                         "metrics": {**{k: 0.2 for k in METRIC_KEYS}, "swap_acc": a, "swap_kept_acc": 0.01,
                                     "content_error": (content or {}).get(v, [0.3] * len(values))[i],
                                     "content_mae": {"cx": float(i)}}}
                for i, a in enumerate(values)}
        variants[v] = {"off": A.VARIANTS.get(v, []), "approach": "funit2funit", "set": [], "runs": runs,
                       "status": "ok", "train_s": 100.0}
        variants[v]["metrics"], variants[v]["stats"], variants[v]["final_losses"] = R.variant_stats(runs)
    n = len(next(iter(swap.values())))
    return {"mode": "losses", "steps": 10, "seed": 0, "seeds": list(range(n)), "data": "synthetic",
            "image_size": 32, "heldout": "test", "samples": 16, "variants": variants}


def answer_of(report, mode="losses"):
    report["comparison"] = R.comparison(report, mode)
    return R.answer(report, mode, A.ABLATED, {v: e["off"] for v, e in report["variants"].items()})


def test_statistics_over_seeds():
    s = R.summarize([0.5, 0.6, 0.7, None])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)  # sample std (n - 1)
    assert (s["min"], s["max"], s["n"]) == (0.5, 0.7, 3)
    assert R.summarize([0.4])["std"] is None and R.summarize([None]) is None
    report = fake_report({"all_on": [0.5, 0.6, 0.7]})
    entry = report["variants"]["all_on"]
    assert entry["metrics"]["swap_acc"] == pytest.approx(0.6) and entry["metrics"]["content_mae"] == {"cx": 1.0}
    assert entry["stats"]["swap_acc"]["std"] == pytest.approx(0.1) and "content_mae" not in entry["stats"]
    assert entry["final_losses"] == {"g_long": 0.5}


def test_factor_table_gives_mean_and_std_over_the_seeds_per_factor():
    report = fake_report({"all_on": [0.5, 0.6], "all_off": [0.4, 0.5]})
    assert R.factor_table(report) == []  # no per-factor numbers: no table
    for v, entry in report["variants"].items():
        for i, run in entry["runs"].items():
            # all_off's data has one more factor (another synthetic family): a column of its own
            extra = {"hue": 0.25} if v == "all_off" else {}
            run["metrics"]["content_factor_error"] = {"cx": 0.1 + int(i), "light": 0.5, **extra}
            run["metrics"]["content_factor_error_to_class"] = {"cx": 1.0, "light": 0.2 * (int(i) + 1), **extra}
        entry["metrics"], entry["stats"], _ = R.variant_stats(entry["runs"])
    stats = report["variants"]["all_on"]["stats"]
    assert stats["content_factor_error.cx"]["std"] == pytest.approx(2 ** -0.5)
    assert stats["content_factor_error_to_class.light"]["mean"] == pytest.approx(0.3)
    lines = R.factor_table(report)
    assert "| variant | cx | light | hue |" in lines
    assert "| all_on | 0.60 ± 0.71 / 1.00 ± 0.00 | 0.50 ± 0.00 / 0.30 ± 0.14 | - / - |" in lines
    assert ("| all_off | 0.60 ± 0.71 / 1.00 ± 0.00 | 0.50 ± 0.00 / 0.30 ± 0.14 | 0.25 ± 0.00 / 0.25 ± 0.00 |"
            in R.format_report(report))
    one = fake_report({"all_on": [0.5]})  # one seed: means only
    for run in one["variants"]["all_on"]["runs"].values():
        run["metrics"]["content_factor_error"] = run["metrics"]["content_factor_error_to_class"] = {"cx": 0.4}
    entry = one["variants"]["all_on"]
    entry["metrics"], entry["stats"], _ = R.variant_stats(entry["runs"])
    assert "| all_on | 0.40 / 0.40 |" in R.factor_table(one)


def test_answer_says_which_loss_changes_what_beyond_the_spread():
    report = fake_report({"all_on": [0.5, 0.6, 0.7], "no_long_rec": [0.9, 0.95, 1.0], "no_long_fm": [0.55, 0.65, 0.7]},
                         content={"no_long_fm": [0.3, 0.9, 1.8]})
    lines = answer_of(report)
    rows = {(r["variant"], r["metric"]): r for r in report["comparison"]["rows"]}
    big, small = rows["no_long_rec", "swap_acc"], rows["no_long_fm", "swap_acc"]
    assert big["delta"] == pytest.approx(0.35) and big["spread"] == pytest.approx(0.1) and big["exceeds"]
    assert small["delta"] == pytest.approx(1.9 / 3 - 0.6) and not small["exceeds"]
    # content error: +0.7 on average, but the spread of no_long_fm's seeds (0.755) is larger
    assert rows["no_long_fm", "content_error"]["delta"] == pytest.approx(0.7)
    assert rows["no_long_fm", "content_error"]["spread"] == pytest.approx(0.57 ** 0.5)
    assert not rows["no_long_fm", "content_error"]["exceeds"]
    assert lines[0].startswith("**Does any of G2G's three losses change swap accuracy, content error or leakage")
    assert "Yes: removing long reconstruction L1 (no_long_rec) changes swap acc." in lines[0]
    assert "no_long_fm" not in lines[0]
    # p: Welch's t-test (tests/test_ablate_welch.py), where scipy is installed
    p = ", p 0.67" if W.have_scipy() else ""
    effects = (f"- without long feature matching (fml_w), no_long_fm vs all_on: swap acc +0.033 (spread 0.100: "
               f"within{p}); content err +0.700 (spread 0.755: within{', p 0.25' if p else ''})")
    assert any(ln.startswith(effects) for ln in lines), lines
    for entry in report["variants"].values():  # the per-factor targets: background and scale met
        for run in entry["runs"].values():
            run["metrics"]["content_factor_error"] = {"background": 0.3, "scale": 0.4}
    table = R.format_report({**report, "answer": lines, "targets": R.targets(report)})
    assert "| all_on | - | 0.2000 ± 0.0000 |" in table and "0.6000 ± 0.1000" in table
    assert "no_long_rec 3/3 (3 within 10 min)" in table and "all_on 0/3" in table  # swap >= 0.9 and fast


def test_answer_no_and_not_answered():
    report = fake_report({"all_on": [0.5, 0.6, 0.7], "no_long_rec": [0.55, 0.6, 0.65]})
    assert "No: every difference from all_on is within the spread." in answer_of(report)[0]
    one = fake_report({"all_on": [0.5], "no_long_rec": [0.9]})
    lines = answer_of(one)
    assert lines[0].startswith("Not answered: the seed-to-seed spread needs at least 2 seeds")
    assert "swap acc +0.400 (under 2 seeds: no spread)" in lines[1]
    assert answer_of(fake_report({"no_long_rec": [0.5, 0.6]}))[0].startswith("Not answered: the comparison needs")
    sweep = fake_report({"content_dim_0": [0.1, 0.2], "content_dim_2": [0.8, 0.9]})
    lines = answer_of(sweep, "sweep")
    assert lines[0] == ("**Differences from content_dim_0 beyond the seed-to-seed spread:** content_dim_2 "
                        "(marked below).")


def test_repeated_sweeps_add_variants_and_bundles_set_several_keys():
    args = A.build_parser().parse_args(["--sweep", "class_shots=0,4", "--sweep", "class_shots=4+class_encoder=coco"])
    variants = A.build_variants(args)
    assert list(variants) == ["class_shots_0", "class_shots_4", "class_shots_4+class_encoder_coco"]
    assert variants["class_shots_4+class_encoder_coco"].sets == ["class_shots=4", "class_encoder=coco"]
    assert variants["class_shots_0"].sets == ["class_shots=0"]


def test_targets_follow_the_synthetic_family_and_read_single_factors():
    good = {"swap_acc": 0.92, "swap_kept_acc": 0.01, "content_error": 0.3, "leak_class_from_content_acc": 0.2,
            "content_factor_error": {"background": 0.3, "scale": 0.4}}
    scale_off = {**good, "content_factor_error": {"background": 0.3, "scale": 0.9}}
    runs = {"0": {"status": "ok", "metrics": good, "train_s": 500}, "1": {"status": "ok", "metrics": scale_off,
                                                                         "train_s": 700}}
    report = {"variants": {"v": {"runs": runs}}, "synthetic_family": "scheme"}
    assert R.targets(report)["v"] == {"metrics_met": 1, "metrics_and_time_met": 1, "runs": 2}
    assert R.targets({**report, "synthetic_family": "shape"})["v"]["metrics_met"] == 2  # swap and kept only
    assert R.metric_value(good, "content_factor_error.scale") == 0.4 and R.metric_value(good, "nope.x") is None
    shape = fake_report({"v": [0.85, 0.9]})
    shape["synthetic_family"] = "shape"
    text = R.format_report({**shape, "targets": R.targets(shape)})
    assert "v 2/2 (2 within 10 min)" in text
    assert "Issue-23 demo targets, shape family (swap_acc >= 0.8, swap_kept_acc <= 0.05;" in text
