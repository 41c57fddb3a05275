"""Welch's t-test in `python -m g2g_fast.ablate`'s report: the numbers against scipy's
ttest_ind(equal_var=False) (pinned, so the test does not check scipy against itself), the cases
without spread, the report's p tables, and the report without scipy (one line saying how to get
p-values, nothing fails)."""
import json
import sys

import pytest

from g2g_fast import ablate_report as R
from g2g_fast import welch as W
from test_ablate import answer_of, fake_report

# scipy.stats.ttest_ind(b, a, equal_var=False), computed once (scipy 1.17): (t, df, p)
PINNED = [([0.79, 0.91, 0.94], [0.85, 0.89, 0.93], (0.19487094073848948, 2.9543195266272213, 0.8581234008758012)),
          ([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0], (1.1338934190276817, 3.234718826405868, 0.33382370007750106)),
          ([0.3, 0.3, 0.3], [0.5, 0.7], (3.0, 1.0, 0.20483276469913342))]  # one side without spread


@pytest.mark.parametrize("a, b, expected", PINNED)
def test_t_and_df_are_welchs(a, b, expected):
    t, df, _ = expected
    test = W.welch(R.summarize(a), R.summarize(b))  # no scipy needed for t and df
    assert test["t"] == pytest.approx(t, rel=1e-12) and test["df"] == pytest.approx(df, rel=1e-12)
    assert test["delta"] == pytest.approx(sum(b) / len(b) - sum(a) / len(a)) and test["p"] is None


@pytest.mark.parametrize("a, b, expected", PINNED)
def test_p_is_two_sided_welch(a, b, expected):
    pytest.importorskip("scipy")
    test = W.welch(R.summarize(a), R.summarize(b), W.t_sf())
    assert test["p"] == pytest.approx(expected[2], rel=1e-9)
    assert W.welch(R.summarize(b), R.summarize(a), W.t_sf())["p"] == pytest.approx(expected[2], rel=1e-9)


def test_no_spread_and_too_few_seeds_give_numbers_not_nan():
    sf = lambda t, df: pytest.fail("no t distribution without spread")  # noqa: E731 (stands in for scipy's)
    same = W.welch(R.summarize([0.2, 0.2, 0.2]), R.summarize([0.2, 0.2, 0.2]), sf)
    assert (same["t"], same["p"], same["note"]) == (0.0, 1.0, W.IDENTICAL) and W.fmt_p(same) == "1, identical"
    # the float mean of equal values is a rounding step off them; summarize keeps them exact
    assert R.summarize([0.1, 0.1, 0.1]) == {"mean": 0.1, "std": 0.0, "min": 0.1, "max": 0.1, "n": 3}
    exact = W.welch(R.summarize([0.2, 0.2]), R.summarize([0.3, 0.3, 0.3]), sf)
    assert (exact["t"], exact["p"], exact["note"]) == (None, 0.0, W.EXACT) and W.fmt_p(exact) == "0, no spread"
    few = W.welch(R.summarize([0.2]), R.summarize([0.3, 0.4]), sf)
    assert few["p"] is None and few["t"] is None and few["delta"] == pytest.approx(0.15) and W.fmt_p(few) == "-"
    assert W.welch(None, R.summarize([0.3, 0.4]))["p"] is None
    for test in (same, exact, few):
        json.dumps(test, allow_nan=False)


def seeded_report(factors=True):
    report = fake_report({"all_on": [0.79, 0.91, 0.94], "no_long_rec": [0.85, 0.89, 0.93], "all_off": [0.3, 0.3, 0.3]})
    if factors:
        for v, entry in report["variants"].items():
            for i, run in entry["runs"].items():
                run["metrics"]["content_factor_error"] = {"cx": 0.1 * int(i),
                                                          "background": 0.5 if v == "all_off" else 1.0}
                run["metrics"]["content_factor_error_to_class"] = {"cx": 1.0, "background": 0.2 + 0.1 * int(i)
                                                                   + (0.5 if v == "all_off" else 0)}
            entry["metrics"], entry["stats"], _ = R.variant_stats(entry["runs"])
    report["answer"] = answer_of(report)
    return report


def test_report_has_p_for_every_headline_metric_and_factor():
    pytest.importorskip("scipy")
    report = seeded_report()
    cmp = report["comparison"]
    assert cmp["p_values"] is True and "Welch" in cmp["test"]
    tests = {(t["variant"], t["metric"]): t for t in cmp["tests"]}
    for v in ("no_long_rec", "all_off"):
        for _, k in R.P_METRICS:
            assert (v, k) in tests
        for k in R.FACTOR_KEYS:
            assert {(v, f"{k}.cx"), (v, f"{k}.background")} <= set(tests)
    assert tests["no_long_rec", "swap_acc"]["p"] == pytest.approx(PINNED[0][2][2], rel=1e-9)
    assert tests["no_long_rec", "content_factor_error.background"]["note"] == W.IDENTICAL
    assert tests["all_off", "content_factor_error.background"]["note"] == W.EXACT  # 1.0 vs 0.5 in every seed
    shifted = tests["all_off", "content_factor_error_to_class.background"]  # +0.5, both spreads 0.1
    assert shifted["t"] == pytest.approx(0.5 / (2 * 0.01 / 3) ** 0.5) and shifted["df"] == pytest.approx(4)
    json.dumps(report, allow_nan=False)  # ablation.json: no NaN or infinity anywhere
    table = R.format_report(report)
    assert "Welch's t-test of each variant against all_on" in table
    head = "| variant | swap acc | kept acc | content err | leak class<-content | leak factors<-class R2 | long PSNR |"
    assert head in table
    assert "| no_long_rec | +0.010 (p 0.86) | +0.000 (p 1, identical) |" in table
    # cx: the same three values in both (t = 0, p = 1); to the class image cx and background: no spread
    assert "| variant | cx | background |" in table
    assert "| no_long_rec | 1.00 / 1, identical | 1, identical / 1.00 |" in table
    assert f"| all_off | 1.00 / 1, identical | 0, no spread / {W.fmt_p(shifted)} |" in table
    assert "swap acc +0.010 (spread 0.079: within, p 0.86)" in table  # the plain-words answer has p too
    assert W.HINT not in table


def test_without_scipy_the_report_says_how_to_get_p_once(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # `from scipy.stats import t` raises ImportError
    assert not W.have_scipy()
    report = seeded_report()
    cmp = report["comparison"]
    assert cmp["p_values"] is False and W.INSTALL in cmp["test"]
    swap = next(t for t in cmp["tests"] if t["variant"] == "no_long_rec" and t["metric"] == "swap_acc")
    assert swap["p"] is None and swap["t"] == pytest.approx(PINNED[0][2][0])  # t and df need no scipy
    table = R.format_report(report)
    assert table.count('pip install -e ".[stats]"') == 1 and W.HINT in table.splitlines()
    assert "Welch's t-test of each variant" not in table and ", p " not in table
    json.dumps(report, allow_nan=False)


def test_one_seed_has_no_p_and_no_hint():
    report = fake_report({"all_on": [0.5], "no_long_rec": [0.9]})
    report["answer"] = answer_of(report)
    assert all(t["p"] is None for t in report["comparison"]["tests"])
    table = R.format_report(report)
    assert "Welch" not in table and W.HINT not in table
