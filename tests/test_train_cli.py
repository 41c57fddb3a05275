"""`python -m g2g_fast.train` end to end on tiny configurations (CPU)."""
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from g2g_fast.checkpoint import load_checkpoint
from g2g_fast.train import main

ROOT = Path(__file__).resolve().parents[1]
TINY_SETS = {
    "funit2funit": ["nf=8", "nf_mlp=16", "latent_dim=8", "dis_nf=8", "dis_n_res_blks=4"],
    "cyclefunit": ["nf=8", "nf_mlp=16", "latent_dim=8", "patch_nf=8"],
    "naive": ["code_dim=16"],
}


def tiny_args(approach, out, steps=3, *extra):
    args = ["--approach", approach, "--device", "cpu", "--image-size", "32", "--batch-size", "4",
            "--steps", str(steps), "--out", str(out), "--log-every", "1", "--sample-every", "2",
            "--ckpt-every", "2"]
    for s in TINY_SETS[approach]:
        args += ["--set", s]
    return args + list(extra)


def straight_and_resumed(tmp_path, steps, stop_at, *extra, approach="funit2funit"):
    """One run trained straight to `steps`, one stopped at `stop_at` and resumed (`--resume` alone:
    its settings come from the checkpoint) -> both last checkpoints, for an exact-resume test."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(tiny_args(approach, straight, steps, *extra)) == 0
    assert main(tiny_args(approach, split, stop_at, *extra)) == 0
    assert main(tiny_args(approach, split, steps, "--resume")) == 0
    return tuple(load_checkpoint(p / "checkpoints" / "last.pt") for p in (straight, split))


@pytest.mark.parametrize("approach", ["funit2funit", "cyclefunit", "naive"])
def test_each_approach_trains_through_the_cli(approach, tmp_path):
    assert main(tiny_args(approach, tmp_path)) == 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["config"]["approach"] == approach and cfg["config"]["image_size"] == 32
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all("g_total" in r and r["img_per_s"] > 0 and "sec_G" in r for r in lines)
    assert all(torch.isfinite(torch.tensor(v)) for r in lines for k, v in r.items() if isinstance(v, float))
    assert all(r["backend"] == "reference" and r["precision"] == "fp32" for r in lines)
    assert (tmp_path / "samples" / "step_0000002.png").is_file()
    assert (tmp_path / "samples" / "step_0000003.png").is_file()
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["step"] == 3 and ckpt["config"]["approach"] == approach
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.pt")) == \
        ["step_0000002.pt", "step_0000003.pt"]


def test_resume_is_exact(tmp_path):
    a, b = straight_and_resumed(tmp_path, 4, 2)
    assert a["step"] == b["step"] == 4 and a["data"] == b["data"]
    for part in ("gen", "gen_test", "dis"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    for part in ("opt_g", "opt_d"):
        for pid, st in a[part]["state"].items():
            for k, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(b[part]["state"][pid][k]))


def test_checkpoint_outlives_its_pretrained_files(tmp_path, caplog):
    """After the --init-funit file is gone, the run still resumes and its checkpoint still
    translates: the checkpoint holds G, so neither reads that file again."""
    from g2g_fast.config import config_from_dict
    from g2g_fast.reference.steps import build_approach
    from g2g_fast.translate import main as translate
    from PIL import Image
    values = dict(s.split("=") for s in TINY_SETS["funit2funit"])
    gen = build_approach(config_from_dict("funit2funit", {k: int(v) for k, v in values.items()}), 3).gen
    init = tmp_path / "funit_gen.pt"
    torch.save({"gen": gen.state_dict(), "gen_test": gen.state_dict()}, init)
    out = tmp_path / "run"
    caplog.set_level("INFO", logger="g2g_fast")
    assert main(tiny_args("funit2funit", out, 2, "--init-funit", str(init))) == 0
    assert "G initialised from" in caplog.text
    caplog.clear()
    init.unlink()
    assert main(tiny_args("funit2funit", out, 3, "--resume")) == 0
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 3
    assert "resumed from" in caplog.text and "initialised" not in caplog.text  # no claim of a fresh start
    Image.new("RGB", (40, 36), (200, 30, 60)).save(tmp_path / "a.png")
    assert translate(["--checkpoint", str(out / "checkpoints" / "last.pt"), "--content", str(tmp_path / "a.png"),
                      "--class", str(tmp_path / "a.png"), "--out", str(tmp_path / "t.png"), "--device", "cpu"]) == 0
    assert (tmp_path / "t.png").is_file()


def run_cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "g2g_fast.train", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300, **kw)


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    assert main(tiny_args("naive", tmp_path, 2)) == 0
    ckpt_dir = tmp_path / "checkpoints"
    before = load_checkpoint(ckpt_dir / "last.pt")
    proc = subprocess.Popen([sys.executable, "-m", "g2g_fast.train", *tiny_args("naive", tmp_path, 4, "--resume")],
                            cwd=ROOT, env={**os.environ, "G2G_TEST_SAVE_DELAY": "60"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not list(ckpt_dir.glob(".last.pt.*.tmp")):  # the new file is written, not yet renamed
            assert proc.poll() is None and time.time() < deadline, "trainer ended before saving"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    after = load_checkpoint(ckpt_dir / "last.pt")
    assert after["step"] == before["step"] == 2
    # ... and training resumes from it.
    assert main(tiny_args("naive", tmp_path, 3, "--resume")) == 0
    assert load_checkpoint(ckpt_dir / "last.pt")["step"] == 3


def test_nonfinite_loss_stops_and_keeps_last_good(tmp_path, capsys):
    args = tiny_args("naive", tmp_path, 4, "--set", "lr=1e30")
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1 and "non-finite loss at step" in err and "g_" in err
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt") if (tmp_path / "checkpoints" / "last.pt").exists() else None
    assert ckpt is None or all(torch.isfinite(v).all() for v in ckpt["gen"].values() if v.is_floating_point())


def test_nan_policy_skip_keeps_training(tmp_path):
    assert main(tiny_args("naive", tmp_path, 4, "--set", "lr=1e30", "--nan-policy", "skip")) == 0
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 4 and lines[-1].get("skipped_updates", 0) > 0


def one_line_error(capsys, code, pattern):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_class = tmp_path / "one" / "cat"
    one_class.mkdir(parents=True)
    from PIL import Image
    Image.new("RGB", (40, 40), (200, 10, 10)).save(one_class / "a.png")
    Image.new("RGB", (40, 40), (10, 200, 10)).save(one_class / "b.png")
    cases = [
        (["--data", str(tmp_path / "missing")], "missing"),
        (["--data", str(empty)], "empty"),
        (["--data", str(tmp_path / "one")], "class"),
        (["--batch-size", "5"], "batch_size"),
        (["--set", "bogus=1"], "bogus"),
        (["--set", "bogus"], "KEY=VALUE"),
        (["--set", "precision=fp8"], "precision"),
        (["--resume", str(tmp_path / "nothing.pt")], "nothing.pt"),
    ]
    for extra, pattern in cases:
        one_line_error(capsys, main(["--device", "cpu", *extra]), pattern)
    with pytest.raises(SystemExit) as e:
        main(["--no-such-flag"])
    assert e.value.code == 2


def test_checkpoint_of_another_approach_or_shape(tmp_path, capsys):
    assert main(tiny_args("funit2funit", tmp_path, 2)) == 0
    ckpt = str(tmp_path / "checkpoints" / "last.pt")
    one_line_error(capsys, main(tiny_args("naive", tmp_path, 3, "--resume", ckpt)), "approach funit2funit")
    one_line_error(capsys, main(tiny_args("funit2funit", tmp_path, 3, "--resume", ckpt, "--set", "nf=16")),
                   r"last\.pt.*shape")


def test_funit_file_with_wrong_keys(tmp_path, capsys):
    bad = tmp_path / "bad_funit.pt"
    torch.save({"gen_test": {"enc_content.model.0.conv.weight": torch.zeros(1)}}, bad)
    one_line_error(capsys, main(tiny_args("funit2funit", tmp_path, 1, "--init-funit", str(bad))),
                   r"bad_funit\.pt.*missing")


def test_unknown_flag_and_dry_run_in_a_real_process(tmp_path):
    r = run_cli("--no-such-flag")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("--dry-run", "--device", "cpu", "--set", "rl_w=0.1")
    assert r.returncode == 0, r.stderr
    resolved = json.loads(r.stdout)
    assert resolved["preset"] == "cpu" and resolved["config"]["rl_w"] == 0.1
    assert resolved["config"]["image_size"] == 64 and resolved["config"]["batch_size"] == 8


def test_config_file_and_help(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"rl_w": 0.5, "steps": 7}))
    assert main(["--dry-run", "--device", "cpu", "--config", str(cfg)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["rl_w"] == 0.5 and out["trainer"]["steps"] == 7
    cfg.write_text(json.dumps({"unknown_key": 1}))
    one_line_error(capsys, main(["--dry-run", "--device", "cpu", "--config", str(cfg)]), "unknown_key")
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--approach", "--data", "--data-format", "--image-size", "--batch-size", "--steps", "--out",
                 "--device", "--precision", "--backend", "--resume", "--init-funit", "--config", "--set",
                 "--seed", "--dry-run", "--sample-every", "--ckpt-every", "--log-every", "--nan-policy"):
        assert flag in help_text


def test_tensorboard_gets_scalars_and_samples(tmp_path, monkeypatch):
    """TensorBoard is optional; when present it receives every metric and the sample grids."""
    calls = []

    class FakeWriter:
        def add_scalar(self, tag, value, step):
            calls.append(("scalar", tag, step))

        def add_image(self, tag, img, step):
            calls.append(("image", tag, step, tuple(img.shape)))

        def close(self):
            calls.append(("close",))

    import g2g_fast.train as train_mod
    monkeypatch.setattr(train_mod, "open_tensorboard", lambda out, start_step=0: FakeWriter())
    assert main(tiny_args("naive", tmp_path, 2, "--set", "synthetic_per_class=4", "--set", "synthetic_classes=3")) == 0
    tags = {c[1] for c in calls if c[0] == "scalar"}
    assert {"g_total", "g_long", "img_per_s"} <= tags
    images = [c for c in calls if c[0] == "image"]
    assert [c[2] for c in images] == [2] and images[0][3][0] == 3
    assert calls[-1] == ("close",)


def test_fast_backend_trains_through_the_cli(tmp_path):
    """--backend fast on the CPU: fused kernels through the Triton interpreter, channels_last,
    fused/foreach optimisers; the run records what ran."""
    assert main(tiny_args("funit2funit", tmp_path, 1, "--backend", "fast")) == 0  # 1 step: the interpreter is slow
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["backend"] == "fast" and lines[-1]["kernels"] == "adain:triton"
    assert lines[-1]["memory_format"] == "channels_last"
    assert torch.isfinite(torch.tensor(lines[-1]["g_total"]))
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    from g2g_fast.reference.funit import Generator
    Generator(nf=8, nf_mlp=16, latent_dim=8).load_state_dict(ckpt["gen"], strict=True)  # same keys


def test_nonfinite_check_window_never_saves_a_bad_state(tmp_path, capsys):
    """Checked every 3 steps, the error names the window; a checkpoint step always checks first,
    so the non-finite state of step 2 is never written."""
    code = main(tiny_args("naive", tmp_path / "a", 6, "--set", "lr=1e30", "--nan-check-every", "3",
                          "--ckpt-every", "100"))
    assert code == 1 and "non-finite loss at steps 1-3" in capsys.readouterr().err
    code = main(tiny_args("naive", tmp_path / "b", 6, "--set", "lr=1e30", "--nan-check-every", "3",
                          "--ckpt-every", "2"))
    assert code == 1 and "non-finite loss at step" in capsys.readouterr().err
    assert not (tmp_path / "b" / "checkpoints" / "last.pt").exists()
