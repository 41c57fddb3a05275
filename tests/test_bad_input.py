"""Every bad input a new user can give the CLIs is one `error:` line on stderr, exit code 2, no
traceback, and nothing written or overwritten (issue 13). One row per case, each run as a user
runs it: a fresh `python -m g2g_fast.<cli>` process."""
from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from test_train_cli import tiny_args

ROOT = Path(__file__).resolve().parents[1]


class NotAWeight:  # a class a weight file must not make us import
    pass


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_input")
    (d / "notes.txt").write_text("my notes, not weights\n")
    torch.save({"gen": {"w": torch.zeros(4000)}, "gen_test": {"w": torch.zeros(4000)}}, d / "whole.pt")
    (d / "truncated.pt").write_bytes((d / "whole.pt").read_bytes()[:3000])
    torch.save({"gen": NotAWeight()}, d / "objects.pt")
    (d / "plain.pkl").write_bytes(pickle.dumps({"gen": {"w": [1.0, 2.0]}}))
    (d / "empty_data").mkdir()
    one = d / "one_class" / "cat"
    one.mkdir(parents=True)
    from PIL import Image
    for i in range(3):
        Image.new("RGB", (40, 40), (40 * i, 0, 0)).save(one / f"{i}.png")
    lab = d / "lab_data"  # issue 24 #1: a mode no loader converts (PIL reads the TIFF by content)
    for k, cls in enumerate(("cat", "dog")):
        (lab / cls).mkdir(parents=True)
        Image.new("RGB", (40, 40), (0, 40 * k, 0)).save(lab / cls / "0.png")
    Image.new("LAB", (40, 40)).save(lab / "cat" / "lab.png", format="TIFF")
    (d / "bad.json").write_text('{"lr_gen": "abc"}')
    from g2g_fast.reference.funit import Generator
    torch.save({"gen_test": Generator().state_dict()}, d / "funit.pt")  # FUNIT's layout and widths
    # a finished run (naive, 2 steps) for the cases that need a checkpoint or an existing --out
    run = d / "run"
    proc = subprocess.run([sys.executable, "-m", "g2g_fast.train", *tiny_args("naive", run, 2)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (d / "torn.pt").write_bytes((run / "checkpoints" / "last.pt").read_bytes()[:2000])
    return d


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its content hash (to show nothing was written over)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


TRAIN = ("g2g_fast.train", "--device", "cpu", "--steps", "2", "--image-size", "32", "--batch-size", "4")
NEW = "{d}/new_out"  # an output path that must still not exist afterwards (made unique per case)
# (id, command, expected fragment of the one error line); {d}: the files fixture's folder
CASES = [
    # pretrained files passed by flag
    ("init-funit text file", (*TRAIN, "--init-funit", "{d}/notes.txt", "--out", NEW),
     "error: --init-funit {d}/notes.txt: not a readable FUNIT generator file (a text file starting"),
    ("init-funit truncated", (*TRAIN, "--init-funit", "{d}/truncated.pt", "--out", NEW),
     "error: --init-funit {d}/truncated.pt: not a readable FUNIT generator file (truncated"),
    ("init-funit pickled objects", (*TRAIN, "--init-funit", "{d}/objects.pt", "--out", NEW),
     "error: --init-funit {d}/objects.pt: refused: the FUNIT generator file holds pickled Python objects"),
    ("init-funit plain pickle", (*TRAIN, "--init-funit", "{d}/plain.pkl", "--out", NEW),
     "a plain Python pickle"),
    ("init-funit missing", (*TRAIN, "--init-funit", "{d}/nosuch.pt", "--out", NEW),
     "error: --init-funit {d}/nosuch.pt: no such file"),
    ("init-funit wrong layout", (*TRAIN, "--init-funit", "{d}/whole.pt", "--out", NEW),
     "error: --init-funit {d}/whole.pt [gen] is not a FUNIT generator state dict"),
    ("vgg_weights text file", (*TRAIN, "--approach", "cyclefunit", "--set", "vgg_weights={d}/notes.txt", "--out", NEW),
     "error: vgg_weights {d}/notes.txt: not a readable torchvision vgg16 weight file"),
    ("translate --funit text file", ("g2g_fast.translate", "--funit", "{d}/notes.txt", "--content", "a.png",
                                     "--class", "b.png", "--out", "{d}/new_out.png"),
     "error: --funit {d}/notes.txt: not a readable FUNIT generator file"),
    ("evaluate --funit text file", ("g2g_fast.evaluate", "--funit", "{d}/notes.txt", "--json", "{d}/new_out.json"),
     "error: --funit {d}/notes.txt: not a readable FUNIT generator file"),
    ("translate --device cuda", ("g2g_fast.translate", "--checkpoint", "{d}/run/checkpoints/last.pt", "--content",
                                 "a.png", "--class", "b.png", "--device", "cuda", "--out", "{d}/new_out.png"),
     "error: --device cuda: no CUDA GPU is available"),
    ("evaluate --device cuda", ("g2g_fast.evaluate", "--checkpoint", "{d}/run/checkpoints/last.pt",
                                "--device", "cuda"), "error: --device cuda: no CUDA GPU is available"),
    ("train --device cuda", ("g2g_fast.train", "--device", "cuda", "--out", NEW),
     "error: --device cuda: no CUDA GPU is available"),
    # typed settings: parsed and checked when resolved, --dry-run included
    ("--set lr_gen=abc", (*TRAIN, "--set", "lr_gen=abc", "--out", NEW),
     "error: --set lr_gen=abc: lr_gen must be a number, got 'abc'"),
    ("--set rl_w=abc --dry-run", (*TRAIN, "--set", "rl_w=abc", "--dry-run", "--out", NEW),
     "error: --set rl_w=abc: rl_w must be a number, got 'abc'"),
    ("--set nf=1.5", (*TRAIN, "--set", "nf=1.5", "--out", NEW), "error: --set nf=1.5: nf must be an integer, got 1.5"),
    ("--set r1_w=-1", (*TRAIN, "--set", "r1_w=-1", "--out", NEW), "error: --set r1_w=-1: r1_w must be >= 0"),
    ("--set steps=many", (*TRAIN, "--set", "steps=many", "--out", NEW), "steps must be an integer"),
    ("--set unknown key", (*TRAIN, "--set", "no_such_key=1", "--out", NEW), "error: --set no_such_key=1: unknown key"),
    ("--set without =", (*TRAIN, "--set", "lr_gen", "--out", NEW), "error: --set lr_gen: expected KEY=VALUE"),
    ("--config bad value", (*TRAIN, "--config", "{d}/bad.json", "--out", NEW),
     "error: --config {d}/bad.json: lr_gen must be a number, got 'abc'"),
    ("--config missing", (*TRAIN, "--config", "{d}/nosuch.json", "--out", NEW), "error: --config {d}/nosuch.json: no such file"),
    # data and shapes (these worked before; kept from regressing)
    ("data folder missing", (*TRAIN, "--data", "{d}/nosuch_data", "--out", NEW), "{d}/nosuch_data"),
    ("data folder empty", (*TRAIN, "--data", "{d}/empty_data", "--out", NEW), "{d}/empty_data"),
    ("one class", (*TRAIN, "--data", "{d}/one_class", "--out", NEW), "class"),
    ("odd batch", ("g2g_fast.train", "--device", "cpu", "--batch-size", "3", "--out", NEW), "batch_size must be even"),
    ("zero batch", ("g2g_fast.train", "--device", "cpu", "--batch-size", "0", "--out", NEW), "batch_size must be"),
    ("zero steps", ("g2g_fast.train", "--device", "cpu", "--steps", "0", "--out", NEW), "steps must be"),
    ("image size", ("g2g_fast.train", "--device", "cpu", "--image-size", "100", "--out", NEW), "image_size"),
    ("unknown flag", ("g2g_fast.train", "--stepz", "3"), "error: unrecognized arguments: --stepz 3"),
    ("fp16 on the CPU", (*TRAIN, "--precision", "fp16", "--out", NEW), "error: --precision fp16 on the CPU"),
    ("--loader dali on synthetic data", (*TRAIN, "--loader", "dali", "--out", NEW),
     "error: --loader dali"),
    ("--synthetic-family unknown", (*TRAIN, "--synthetic-family", "colour", "--out", NEW),
     "error: argument --synthetic-family: invalid choice: 'colour'"),
    ("--set synthetic_family unknown", (*TRAIN, "--set", "synthetic_family=colour", "--out", NEW),
     "error: synthetic_family must be one of scheme, shape, got 'colour'"),
    ("shape family beyond 12 classes", (*TRAIN, "--synthetic-family", "shape", "--set", "synthetic_classes=13",
                                        "--out", NEW),
     "error: --synthetic-classes 13 with --synthetic-family shape: a class is one of the 12 shapes; pass "
     "--synthetic-classes 12 or fewer"),
    # runs and checkpoints
    ("second run into an existing --out", (*TRAIN, "--out", "{d}/run"),
     "error: --out {d}/run already holds a run"),
    ("--overwrite with --resume", (*TRAIN, "--out", "{d}/run", "--resume", "--overwrite"),
     "error: --overwrite and --resume"),
    ("resume a torn checkpoint", (*TRAIN, "--resume", "{d}/torn.pt", "--out", NEW),
     "error: {d}/torn.pt: not a readable checkpoint (truncated"),
    ("resume nothing", (*TRAIN, "--resume", "--out", NEW), "no such checkpoint file"),
    ("resume with another approach", (*TRAIN, "--resume", "--out", "{d}/run", "--approach", "funit2funit"),
     "error: --resume: the checkpoint was trained with --approach naive"),
    # learning curves and the ablation
    ("plot: no such run folder", ("g2g_fast.plot", "{d}/nosuch_run"), "error: {d}/nosuch_run: no such run folder"),
    ("plot: a folder without metrics.jsonl", ("g2g_fast.plot", "{d}/empty_data"),
     "error: {d}/empty_data/metrics.jsonl: no such file"),
    ("ablate --seeds 0", ("g2g_fast.ablate", "--seeds", "0", "--device", "cpu", "--out", NEW),
     "error: --seeds must be a positive integer, got 0"),
    ("translate a checkpoint that is a text file", ("g2g_fast.translate", "--checkpoint", "{d}/notes.txt", "--content",
                                                   "a.png", "--class", "b.png", "--out", "{d}/new_out.png"),
     "error: {d}/notes.txt: not a readable checkpoint"),
    # inference (issue 16)
    ("translate --content missing image", ("g2g_fast.translate", "--checkpoint", "{d}/run/checkpoints/last.pt",
                                           "--content", "{d}/nosuch.png", "--class", "{d}/one_class/cat",
                                           "--grid", "{d}/new_out.png"),
     "error: --content {d}/nosuch.png: no such file or folder"),
    ("translate --class not an image", ("g2g_fast.translate", "--checkpoint", "{d}/run/checkpoints/last.pt",
                                        "--content", "{d}/one_class/cat/0.png", "--class", "{d}/notes.txt",
                                        "--grid", "{d}/new_out.png"),
     "error: --class {d}/notes.txt: not a readable image"),
    ("translate --content folder without images", ("g2g_fast.translate", "--checkpoint", "{d}/run/checkpoints/last.pt",
                                                   "--content", "{d}/empty_data", "--class", "{d}/one_class/cat/0.png",
                                                   "--out-dir", "{d}/new_out"),
     "error: --content {d}/empty_data: a folder with no images"),
    ("translate --k-shot above a class's images", ("g2g_fast.translate", "--checkpoint", "{d}/run/checkpoints/last.pt",
                                                   "--content", "{d}/one_class/cat/0.png", "--class", "{d}/one_class",
                                                   "--k-shot", "4", "--grid", "{d}/new_out.png"),
     "error: --k-shot 4: class 'cat' has only 3 image(s)"),
    ("translate --out with several images", ("g2g_fast.translate", "--checkpoint", "{d}/run/checkpoints/last.pt",
                                             "--content", "{d}/one_class/cat", "--class", "{d}/one_class/cat/0.png",
                                             "--out", "{d}/new_out.png"),
     "error: --out draws the G2G figure of one content and one class image"),
    ("evaluate --k-shot 0", ("g2g_fast.evaluate", "--checkpoint", "{d}/run/checkpoints/last.pt", "--k-shot", "0",
                             "--json", "{d}/new_out.json"),
     "error: --k-shot must be a positive integer, got 0"),
    # the layout and precision audit (issue 22)
    ("audit: unknown approach", ("g2g_fast.audit", "--approach", "bogus"),
     "error: argument --approach: invalid choice: 'bogus'"),
    ("audit: odd batch", ("g2g_fast.audit", "--batch", "3"), "error: --batch must be even and >= 2, got 3"),
    ("audit: image size", ("g2g_fast.audit", "--approach", "naive", "--image-size", "40"),
     "error: --approach naive: image_size must be a multiple of 32"),
    # issue 24 #1: image modes
    ("train: an image mode that cannot be converted", (*TRAIN, "--data", "{d}/lab_data", "--out", NEW),
     "error: --data {d}/lab_data: 1 image(s) cannot be converted to RGB: {d}/lab_data/cat/lab.png (mode LAB "
     "(CIELAB) is not converted"),
    ("translate: an image mode that cannot be converted", ("g2g_fast.translate", "--checkpoint",
                                                           "{d}/run/checkpoints/last.pt", "--content",
                                                           "{d}/lab_data/cat/lab.png", "--class", "{d}/one_class/cat",
                                                           "--grid", "{d}/new_out.png"),
     "error: --content {d}/lab_data/cat/lab.png: mode LAB (CIELAB) is not converted"),
    # issue 24 #2-#5: run-folder lock, disk full, --out a file, memory estimate
    ("train --image-size 100000", (*TRAIN, "--image-size", "100000", "--out", NEW),
     "error: --image-size 100000 with --batch-size 4 (funit2funit) needs about "),
    ("translate --image-size 100000", ("g2g_fast.translate", "--funit", "{d}/funit.pt", "--content",
                                       "{d}/one_class/cat/0.png", "--class", "{d}/one_class/cat/1.png",
                                       "--image-size", "100000", "--out", "{d}/new_out.png"),
     "error: --image-size 100000 needs about "),
    ("translate --image-size FUNIT does not take",
     ("g2g_fast.translate", "--funit", "{d}/funit.pt", "--content", "{d}/one_class/cat/0.png", "--class",
      "{d}/one_class/cat/1.png", "--image-size", "100", "--out", "{d}/new_out.png"),
     "error: --image-size 100: this generator takes multiples of 16"),
    ("evaluate --json a folder", ("g2g_fast.evaluate", "--checkpoint", "{d}/run/checkpoints/last.pt", "--json",
                                  "{d}/empty_data"),
     "error: --json {d}/empty_data: is a folder; give a file name, e.g. {d}/empty_data/metrics.json"),
    ("evaluate --json under a file", ("g2g_fast.evaluate", "--checkpoint", "{d}/run/checkpoints/last.pt", "--json",
                                      "{d}/notes.txt/m.json"),
     "error: --json {d}/notes.txt/m.json: {d}/notes.txt is a file, not a folder"),
    ("translate --grid under a file", ("g2g_fast.translate", "--checkpoint", "{d}/run/checkpoints/last.pt",
                                       "--content", "{d}/one_class/cat/0.png", "--class", "{d}/one_class/cat",
                                       "--grid", "{d}/notes.txt/g.png"),
     "error: --grid {d}/notes.txt/g.png: {d}/notes.txt is a file, not a folder"),
    ("translate --out-dir under a file", ("g2g_fast.translate", "--checkpoint", "{d}/run/checkpoints/last.pt",
                                          "--content", "{d}/one_class/cat/0.png", "--class", "{d}/one_class/cat",
                                          "--out-dir", "{d}/notes.txt/sub"),
     "error: --out-dir {d}/notes.txt/sub: {d}/notes.txt is a file, not a folder"),
    ("train --out a file", (*TRAIN, "--out", "{d}/notes.txt"),
     "error: --out {d}/notes.txt is a file, not a folder; choose another --out"),
    ("train --out under a file", (*TRAIN, "--out", "{d}/notes.txt/run"),
     "error: --out {d}/notes.txt/run: {d}/notes.txt is a file, not a folder"),
    ("train --dry-run --out a file", (*TRAIN, "--dry-run", "--out", "{d}/notes.txt"),
     "error: --out {d}/notes.txt is a file, not a folder"),
    ("ablate --out a file", ("g2g_fast.ablate", "--device", "cpu", "--steps", "1", "--out", "{d}/notes.txt"),
     "error: --out {d}/notes.txt is a file, not a folder; choose another --out"),
    # issue 24 #6 and #8: messages, plot
    ("translate --image-size the naive generator does not take",
     ("g2g_fast.translate", "--checkpoint", "{d}/run/checkpoints/last.pt", "--content", "{d}/one_class/cat/0.png",
      "--class", "{d}/one_class/cat/1.png", "--image-size", "64", "--out", "{d}/new_out.png"),
     "error: --image-size 64: this generator takes only 32"),
    ("init-funit a folder", (*TRAIN, "--init-funit", "{d}/empty_data", "--out", NEW),
     "error: --init-funit {d}/empty_data: is a folder; pass the FUNIT generator file itself"),
    ("resume past --steps", ("g2g_fast.train", "--device", "cpu", "--resume", "--out", "{d}/run", "--steps", "1"),
     "error: --resume: the run is already at step 2, past --steps 1; pass --steps above 2 to train further"),
    ("resume a finished run", ("g2g_fast.train", "--device", "cpu", "--resume", "--out", "{d}/run"),
     "error: --resume: the run is already at step 2, which is its --steps 2 (from the checkpoint): nothing to train"),
    ("train --resume a run folder", ("g2g_fast.train", "--device", "cpu", "--resume", "{d}/run", "--out", "{d}/run",
                                     "--steps", "5"), "error: {d}/run is a folder; pass {d}/run/checkpoints/last.pt"),
    ("translate --checkpoint a run folder", ("g2g_fast.translate", "--checkpoint", "{d}/run", "--content", "a.png",
                                             "--class", "b.png", "--out-mix", "{d}/new_out.png"),
     "error: {d}/run is a folder; pass {d}/run/checkpoints/last.pt"),
    ("evaluate --checkpoint a checkpoints folder", ("g2g_fast.evaluate", "--checkpoint", "{d}/run/checkpoints",
                                                    "--json", "{d}/new_out.json"),
     "error: {d}/run/checkpoints is a folder; pass {d}/run/checkpoints/last.pt"),
    ("train --device cuda --dry-run", ("g2g_fast.train", "--device", "cuda", "--dry-run", "--out", NEW),
     "error: --device cuda: no CUDA GPU is available"),
    ("--keep-snapshots -1", (*TRAIN, "--keep-snapshots", "-1", "--out", NEW),
     "error: --keep-snapshots must be >= 0 (0 = no step_*.pt copies), got -1"),
    ("--workers -3", (*TRAIN, "--workers", "-3", "--out", NEW),
     "error: --workers must be >= 0, or -1 for the default"),
    ("--set synthetic_per_class=0", (*TRAIN, "--set", "synthetic_per_class=0", "--out", NEW),
     "error: --set synthetic_per_class: synthetic_per_class must be a positive integer, got 0"),
    ("translate --image-size 0", ("g2g_fast.translate", "--checkpoint", "{d}/run/checkpoints/last.pt", "--content",
                                  "{d}/one_class/cat/0.png", "--class", "{d}/one_class/cat/1.png", "--image-size", "0",
                                  "--out", "{d}/new_out.png"), "error: --image-size must be a positive integer, got 0"),
    ("evaluate --image-size -3", ("g2g_fast.evaluate", "--checkpoint", "{d}/run/checkpoints/last.pt",
                                  "--image-size", "-3", "--json", "{d}/new_out.json"),
     "error: --image-size must be a positive integer, got -3"),
    ("plot --out a folder", ("g2g_fast.plot", "{d}/run", "--out", "{d}/empty_data"),
     "error: --out {d}/empty_data: is a folder; give a PNG file name, e.g. {d}/empty_data/curves.png"),
    ("plot --losses none without evaluation rows", ("g2g_fast.plot", "{d}/run", "--losses", "none", "--out",
                                                    "{d}/new_out.png"),
     "error: --losses none: no run has evaluation rows, so nothing is left to draw"),
    # issue 24 #11: FID/KID
    ("evaluate --fid-weights missing", ("g2g_fast.evaluate", "--checkpoint", "{d}/run/checkpoints/last.pt",
                                        "--fid-weights", "{d}/nosuch.pth", "--json", "{d}/new_out.json"),
     "error: --fid-weights {d}/nosuch.pth: no such file; download torch-fidelity's InceptionV3 weight file"),
    ("evaluate --fid-weights text file", ("g2g_fast.evaluate", "--checkpoint", "{d}/run/checkpoints/last.pt",
                                          "--fid-weights", "{d}/notes.txt", "--json", "{d}/new_out.json"),
     "error: --fid-weights {d}/notes.txt: not a readable feature extractor weight file (a text file"),
    ("evaluate --fid-weights other weights", ("g2g_fast.evaluate", "--checkpoint", "{d}/run/checkpoints/last.pt",
                                              "--fid-weights", "{d}/whole.pt", "--json", "{d}/new_out.json"),
     "error: --fid-weights {d}/whole.pt: neither torch-fidelity's InceptionV3 weights"),
    ("evaluate --fid-samples alone", ("g2g_fast.evaluate", "--checkpoint", "{d}/run/checkpoints/last.pt",
                                      "--fid-samples", "64", "--json", "{d}/new_out.json"),
     "error: --fid-samples needs --fid-weights PATH"),
    ("evaluate --fid-samples 0", ("g2g_fast.evaluate", "--checkpoint", "{d}/run/checkpoints/last.pt",
                                  "--fid-weights", "{d}/whole.pt", "--fid-samples", "0", "--json", "{d}/new_out.json"),
     "error: --fid-samples must be a positive integer, got 0"),
    ("ablate --fid-weights missing", ("g2g_fast.ablate", "--out", NEW, "--steps", "1", "--fid-weights",
                                      "{d}/nosuch.pth"),
     "error: --fid-weights {d}/nosuch.pth: no such file"),
]


@pytest.fixture(scope="module")
def results(files):
    """Every case run once, two processes at a time (each is mostly interpreter start-up), with
    the files before and after all of them."""
    d = str(files)
    before = snapshot(files)

    def run(i, command):
        argv = [a.format(d=d).replace("new_out", f"new_out_{i}") for a in command]
        return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        procs = list(pool.map(lambda ic: run(*ic), enumerate(c[1] for c in CASES)))
    return {case[0]: proc for case, proc in zip(CASES, procs)}, before, snapshot(files)


@pytest.mark.parametrize("case, command, expected", CASES, ids=[c[0] for c in CASES])
def test_one_error_line(files, results, case, command, expected):
    if "--device cuda" in case and torch.cuda.is_available():
        pytest.skip("CUDA is available here: --device cuda is not an error")
    proc, d = results[0][case], str(files)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert expected.format(d=d).replace("new_out", f"new_out_{CASES.index((case, command, expected))}") in lines[0], \
        lines[0]
    assert "Traceback" not in proc.stderr and "weights_only=False" not in proc.stderr


def test_nothing_was_written(results):
    """No case wrote a file or changed one: the finished run in the second-run and resume cases
    is intact, and no output path of any case exists."""
    _, before, after = results
    assert after == before, sorted(set(after.items()) ^ set(before.items()))
