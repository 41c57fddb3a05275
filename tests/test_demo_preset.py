"""`--preset demo` (issue 15): the preset resolves for every approach, flags override it, --resume
takes the checkpoint's settings, and a short demo run gives curves through `g2g_fast.plot`."""
import json
import logging

import pytest

from g2g_fast import plot as PL
from g2g_fast import probes as P
from g2g_fast.options import PRESETS, build_parser, resolve
from g2g_fast.train import main as train_main


def resolved(*argv):
    return resolve(build_parser().parse_args(list(argv)), None, cuda_available=False)


@pytest.mark.parametrize("approach", ["funit2funit", "cyclefunit", "naive"])
def test_demo_preset_resolves_for_every_approach(approach):
    cfg, opts, preset = resolved("--preset", "demo", "--approach", approach)
    assert preset == "demo" and cfg.image_size == 32 and cfg.batch_size == 8
    assert opts.eval_every > 0 and opts.steps == PRESETS["demo"]["trainer"]["steps"]
    assert opts.steps % opts.eval_every == 0  # the last evaluation is at the last step
    for key, value in PRESETS["demo"][approach].items():
        assert getattr(cfg, key) == value


def test_flags_override_the_preset_and_default_is_per_device():
    cfg, opts, preset = resolved("--preset", "demo", "--steps", "10", "--image-size", "64", "--set", "nf=16")
    assert (opts.steps, cfg.image_size, cfg.nf, opts.eval_every) == (10, 64, 16, 200)
    assert resolved()[2] == "cpu" and resolved("--preset", "gpu")[0].image_size == 128
    assert resolve(build_parser().parse_args([]), None, cuda_available=True)[2] == "gpu"


def test_unknown_preset_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--preset", "tiny"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--preset: invalid choice: 'tiny'" in err


def test_a_short_demo_run_resumes_and_plots(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(P, "PROBE_STEPS", 20)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = tmp_path / "demo"
    args = ["--preset", "demo", "--device", "cpu", "--out", str(run), "--batch-size", "4", "--eval-every", "2",
            "--log-every", "1", "--set", "synthetic_classes=4", "--set", "synthetic_per_class=16"]
    assert train_main(args + ["--steps", "2"]) == 0
    with caplog.at_level(logging.INFO, logger="g2g_fast"):
        assert train_main(args + ["--steps", "4", "--resume"]) == 0
    assert "--preset demo with --resume: the checkpoint's settings replace the preset" in caplog.text
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["image_size"] == 32 and config["trainer"]["steps"] == 4
    evals = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    assert evals == [2, 4]
    pytest.importorskip("matplotlib")
    assert PL.main([str(run)]) == 0 and (run / "curves.png").is_file()


def test_demo_paper_is_the_demo_with_single_image_class_codes():
    """issue 23: the demo adopts K-shot class codes, r_w 10 and the decoder without IN in its
    upsampling blocks; the paper's configuration at the demo's scale stays reachable as --preset
    demo-paper (issue 15's demo)."""
    demo, _, _ = resolved("--preset", "demo")
    paper, opts, preset = resolved("--preset", "demo-paper")
    assert preset == "demo-paper" and (demo.class_shots, paper.class_shots) == (4, 0)
    assert (demo.r_w, paper.r_w) == (10.0, 3.0) and (demo.dec_norm, paper.dec_norm) == ("none", "in")
    differ = {k for k in vars(demo) if getattr(demo, k) != getattr(paper, k)}
    assert differ == {"class_shots", "r_w", "dec_norm"} and opts.steps == 2400
