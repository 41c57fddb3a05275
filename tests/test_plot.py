"""`python -m g2g_fast.plot`: metrics.jsonl -> learning-curve PNGs. Runs are written by hand here
(the trainer's line format: loss rows, and `{"step", "eval": {...}, "sec_eval"}` rows), so every
plotted value is known; bad input is one `error:` line, exit code 2."""
import json
import sys

import pytest
from PIL import Image

from g2g_fast import plot as PL
from g2g_fast.metrics import METRIC_KEYS


def write_run(folder, swap, steps=(10, 20, 30), losses=(1.0, 2.0, 3.0, 4.0), extra_lines=()):
    """A run folder with loss rows every 5 steps and eval rows at `steps` (swap_acc from `swap`)."""
    folder.mkdir(parents=True)
    lines = []
    for i, g in enumerate(losses):
        lines.append({"step": 5 * (i + 1), "epoch": 0, "g_total": g, "g_long": g / 10, "d_total": -g,
                      "img_per_s": 10.0, "sec_G": 0.1, "backend": "reference"})
    for s, a in zip(steps, swap):
        ev = {k: 0.5 for k in METRIC_KEYS}
        ev.update(swap_acc=a, swap_chance=0.125, content_mae=None, probe_content_mae={"cx": 0.1},
                  leak_factors_from_class_r2_per_factor=None, content_error=None if a is None else 1 - a)
        lines.append({"step": s, "eval": ev, "sec_eval": 1.0})
    text = "\n".join(json.dumps(r) for r in lines) + "\n" + "".join(extra_lines)
    (folder / "metrics.jsonl").write_text(text)
    return folder


def lines_by_label(fig):
    return {ln.get_label(): ln for ax in fig.axes for ln in ax.get_lines() if not ln.get_label().startswith("_")}


def test_read_run_splits_eval_and_loss_rows(tmp_path):
    run = PL.read_run(write_run(tmp_path / "r", [0.1, 0.2, 0.3], extra_lines=['{"step": 40, "g_to']))
    assert [r["step"] for r in run.evals] == [10, 20, 30] and [r["swap_acc"] for r in run.evals] == [0.1, 0.2, 0.3]
    assert "content_mae" not in run.evals[0] and "probe_content_mae" not in run.evals[0]  # not numbers
    assert [r["g_total"] for r in run.losses] == [1.0, 2.0, 3.0, 4.0]
    assert set(run.losses[0]) == {"step", "g_total", "g_long", "d_total"}  # img/s, sec_*, strings left out
    assert run.skipped == 1  # a line cut by a killed run
    assert PL.loss_keys([run]) == ["g_total", "g_long", "d_total"]


def test_labels_and_default_output(tmp_path):
    paths = [tmp_path / "abl" / v / f"seed_{s}" for v in ("all_on", "no_long_rec") for s in (0, 1)]
    assert PL.default_labels(paths) == ["all_on/seed_0", "all_on/seed_1", "no_long_rec/seed_0", "no_long_rec/seed_1"]
    assert PL.default_labels([tmp_path / "a", tmp_path / "b"]) == ["a", "b"]
    assert PL.default_out(paths) == tmp_path / "abl" / "curves.png"
    assert PL.default_out([tmp_path / "a"]) == tmp_path / "a" / "curves.png"


def test_groups_are_the_mean_with_a_min_max_band():
    steps, mean, lo, hi = PL._group([{1: 0.0, 2: 1.0, 3: 5.0}, {1: 2.0, 2: 3.0}])
    assert steps == [1, 2] and mean == [1.0, 2.0] and lo == [0.0, 1.0] and hi == [2.0, 3.0]
    assert PL._smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_figure_draws_each_groups_mean(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [PL.read_run(write_run(tmp_path / n, sw)) for n, sw in
            (("a0", [0.1, 0.2, 0.3]), ("a1", [0.3, 0.4, 0.5]), ("b", [0.9, 0.8, 0.7]))]
    fig = PL.make_figure(runs, ["a", "a", "b"], ["g_total", "d_total"])
    assert len([ax for ax in fig.axes if ax.get_visible()]) == len(PL.EVAL_PANELS) + 2
    lines = lines_by_label(fig)
    assert list(lines["a: swap_acc"].get_xdata()) == [10, 20, 30]
    assert list(lines["a: swap_acc"].get_ydata()) == pytest.approx([0.2, 0.3, 0.4])  # mean of a0, a1
    assert list(lines["b: swap_acc"].get_ydata()) == pytest.approx([0.9, 0.8, 0.7])
    assert list(lines["b: content_error"].get_ydata()) == pytest.approx([0.1, 0.2, 0.3])
    assert list(lines["b: g_total"].get_ydata()) == [1.0, 2.0, 3.0, 4.0]  # 4 rows: window 1
    assert "a: g_long" not in lines  # not asked for
    # the chance line of the swap panel
    swap_ax = fig.axes[0]
    assert any(list(ln.get_ydata()) == [0.125, 0.125] for ln in swap_ax.get_lines())


def test_cli_writes_png_next_to_the_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run", [0.1, 0.5, 0.2])
    assert PL.main([str(run)]) == 0
    with Image.open(run / "curves.png") as im:
        assert im.format == "PNG" and im.width > 800
    assert "wrote" in capsys.readouterr().err
    other = write_run(tmp_path / "sub" / "other", [0.3, 0.3, 0.3])
    out = tmp_path / "figs" / "cmp.png"
    assert PL.main([str(run), str(other), "--out", str(out), "--labels", "x,y", "--losses", "none"]) == 0
    assert out.is_file() and not (tmp_path / "figs" / ".cmp.png.tmp").exists()
    assert PL.main([str(tmp_path / "sub" / "other"), str(run), "--group", "parent", "--out", str(out)]) == 0


@pytest.mark.parametrize("make, args, pattern", [
    (lambda d: None, ["{d}/nosuch"], "error: {d}/nosuch: no such run folder"),
    (lambda d: (d / "empty").mkdir(), ["{d}/empty"], "error: {d}/empty/metrics.jsonl: no such file"),
    (lambda d: write_run(d / "noeval", []), ["{d}/noeval", "--losses", "none"],
     "error: --losses none: no run has evaluation rows, so nothing is left to draw"),
    (lambda d: write_run(d / "none", [], losses=()), ["{d}/none"], "error: {d}/none/metrics.jsonl: no loss or evaluation rows"),
    (lambda d: write_run(d / "r", [0.1]), ["{d}/r", "--out", "{d}/r"],
     "error: --out {d}/r: is a folder; give a PNG file name, e.g. {d}/r/curves.png"),
    (lambda d: write_run(d / "r", [0.1]), ["{d}/r", "--out", "{d}/r/metrics.jsonl/c.png"],
     "error: --out {d}/r/metrics.jsonl/c.png: {d}/r/metrics.jsonl is a file, not a folder"),
    (lambda d: write_run(d / "r", [0.1]), ["{d}/r", "--losses", "g_nosuch"], "error: --losses: no run has g_nosuch"),
    (lambda d: write_run(d / "r", [0.1]), ["{d}/r", "--labels", "a,b"], "error: --labels: 2 labels for 1 run"),
    (lambda d: write_run(d / "r", [0.1]), ["{d}/r", "--labels", "a", "--group", "parent"],
     "error: --labels and --group parent"),
])
def test_bad_input_is_one_line(tmp_path, capsys, make, args, pattern):
    make(tmp_path)
    assert PL.main([a.format(d=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(pattern.format(d=tmp_path)), err
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.tmp"))


def test_a_run_without_evaluation_rows_gets_its_loss_curves(tmp_path, capsys):
    """Issue 24 #8: every run has loss rows; the evaluation panels come only with --eval-every."""
    pytest.importorskip("matplotlib")
    bare = write_run(tmp_path / "bare", [])
    run = PL.read_run(bare)
    assert run.evals == [] and len(run.losses) == 4
    fig = PL.make_figure([run], ["bare"], ["g_total", "d_total"], evals=False)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["loss g_total (moving average)", "loss d_total (moving average)"]
    assert PL.main([str(bare)]) == 0
    with Image.open(bare / "curves.png") as im:
        assert im.format == "PNG"
    err = capsys.readouterr().err
    assert f"{bare}: no evaluation rows, loss curves only (train with --eval-every N" in err and "wrote" in err
    # beside a run with evaluation rows: the evaluation panels (its curves) and both runs' losses
    evald = write_run(tmp_path / "evald", [0.1, 0.2, 0.3])
    fig = PL.make_figure([run, PL.read_run(evald)], ["bare", "evald"], ["g_total"])
    lines = lines_by_label(fig)
    assert "evald: swap_acc" in lines and "bare: swap_acc" not in lines
    assert "bare: g_total" in lines and "evald: g_total" in lines
    assert PL.main([str(bare), str(evald), "--out", str(tmp_path / "both.png")]) == 0


def test_a_failed_write_leaves_no_temp_file(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run", [0.1])

    def full(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(PL.os, "replace", full)
    assert PL.main([str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out {run / 'curves.png'}: cannot write (No space left on device)", err
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_without_matplotlib_one_line_names_the_extra(tmp_path, capsys, monkeypatch):
    run = write_run(tmp_path / "run", [0.1])
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert PL.main([str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and 'pip install -e ".[plot]"' in err, err
    assert not (run / "curves.png").exists()
