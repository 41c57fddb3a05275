"""Inference as FUNIT users expect it (issue 16): `translate` with many content images and K-shot
classes (--grid, --out-dir), the Python API (`g2g_fast.load`), and the docs' example run as is."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import g2g_fast
from g2g_fast.api import read_generator
from g2g_fast.checkpoint import save_checkpoint
from g2g_fast.config import config_from_dict, config_to_dict
from g2g_fast.reference.funit import Generator
from g2g_fast.reference.steps import build_approach
from g2g_fast.samples import load_image
from g2g_fast.translate import main, unique_names

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


def tiny_checkpoint(path: Path) -> Path:
    """A FUNIT2FUNIT checkpoint at 32 px with small widths, written without training (~1 s)."""
    cfg = config_from_dict("funit2funit", dict(image_size=SIZE, nf=8, nf_mlp=16, latent_dim=8, dis_nf=8,
                                               dis_n_res_blks=4))
    torch.manual_seed(3)
    approach = build_approach(cfg, 4, init="inference")
    with torch.no_grad():  # an EMA generator unlike the raw one, so --raw has something to show
        for p in approach.gen_ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(path, {"config": config_to_dict(cfg), "trainer": {}, "num_classes": 4, **approach.state_dict()})
    return path


def photo(path: Path, seed: int, size=(50, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inference")
    ckpt = tiny_checkpoint(d / "tiny.pt")
    contents = [photo(d / "content" / f"c{i}.png", i) for i in range(3)]
    cat = [photo(d / "classes" / "cat" / f"{i}.png", 10 + i) for i in range(3)]
    dog = [photo(d / "classes" / "dog" / f"{i}.png", 20 + i, (40, 60)) for i in range(2)]
    return d, ckpt, contents, cat, dog


def u8(img: torch.Tensor) -> np.ndarray:
    return ((img.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64)


@torch.no_grad()
def reference_mix(gen, content: Path, class_images: list[Path]) -> np.ndarray:
    """G(E_A(content), mean of E_B over the class images, each encoded alone), as uint8 pixels."""
    code = torch.stack([gen.encode_class(load_image(p, SIZE))[0] for p in class_images]).mean(0, keepdim=True)
    return u8(gen.decode(gen.encode_content(load_image(content, SIZE)), code)[0])


def test_grid_and_out_dir_of_k_shot_classes(files, tmp_path, capsys):
    """The issue's command: 3 content images x a folder of class sub-folders (3-shot cat, 2-shot
    dog). Every mix is G(E_A(content), mean of the single-shot class codes); the grid holds the
    same pixels as --out-dir's files, with the inputs along its edges."""
    d, ckpt, contents, cat, dog = files
    grid, out = tmp_path / "g.png", tmp_path / "mixes"
    assert main(["--checkpoint", str(ckpt), "--content", *map(str, contents), "--class", str(d / "classes"),
                 "--grid", str(grid), "--out-dir", str(out), "--device", "cpu", "--batch-size", "4"]) == 0
    gen, _ = read_generator(ckpt, "checkpoint")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"c{i}__{c}.png" for i in range(3) for c in ("cat", "dog")] + ["mixes.json"])
    side = json.loads(grid.with_suffix(".json").read_text())
    assert side["rows"] == [str(p) for p in contents]
    assert [(c["name"], c["images"]) for c in side["columns"]] == [("cat", list(map(str, cat))),
                                                                   ("dog", list(map(str, dog)))]
    g = read(grid)
    (x0, y0), (px, py) = side["first_mix_xy"], side["mix_pitch_xy"]
    assert g.shape == (y0 + 3 * py - 2, x0 + 2 * px - 2, 3)
    for i, c in enumerate(contents):
        for j, (name, images) in enumerate((("cat", cat), ("dog", dog))):
            ref = reference_mix(gen, c, images)
            got = read(out / f"c{i}__{name}.png")
            assert np.abs(got - ref).max() <= 1, (i, j)  # same computation, batched: one rounding step
            np.testing.assert_array_equal(g[y0 + i * py:y0 + i * py + SIZE, x0 + j * px:x0 + j * px + SIZE], got)
        # the content image down the left, its label under it (dark pixels in the label band)
        np.testing.assert_array_equal(g[y0 + i * py:y0 + i * py + SIZE, :SIZE], u8(load_image(c, SIZE)[0]))
        assert g[y0 + i * py + SIZE:y0 + i * py + SIZE + 12, :SIZE].min() < 128
    # each class's first image across the top, its name under it
    np.testing.assert_array_equal(g[:SIZE, x0:x0 + SIZE], u8(load_image(cat[0], SIZE)[0]))
    np.testing.assert_array_equal(g[:SIZE, x0 + px:x0 + px + SIZE], u8(load_image(dog[0], SIZE)[0]))
    assert g[y0 - 6 - 12:y0 - 6, x0:x0 + SIZE].min() < 128
    index = json.loads((out / "mixes.json").read_text())["mixes"]
    assert index[1] == {"file": "c0__dog.png", "content": str(contents[0]), "class": "dog",
                        "class_images": list(map(str, dog))}
    # K-shot matters: the 3-shot cat mix is not the 1-shot mix of the cat's first image
    assert np.abs(read(out / "c0__cat.png") - reference_mix(gen, contents[0], cat[:1])).max() > 8
    assert "wrote" in capsys.readouterr().err


def test_k_shot_code_is_the_mean_of_single_shot_codes(files):
    d, ckpt, contents, cat, dog = files
    model = g2g_fast.load(ckpt, device="cpu", batch_size=2)   # batches that split the classes
    singles = torch.cat([model.encode_class(p) for p in cat])
    assert singles.shape == (3, 8)
    k = model.encode_class(cat, k_shot=True)
    torch.testing.assert_close(k, singles.mean(0, keepdim=True), rtol=0, atol=1e-6)
    both = model.encode_classes([d / "classes" / "cat", dog, dog[1]])
    torch.testing.assert_close(both[0], k[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(both[1], torch.cat([model.encode_class(p) for p in dog]).mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(both[2], model.encode_class(dog[1])[0], rtol=0, atol=1e-6)
    assert not torch.allclose(k, singles[:1], atol=1e-3)


def test_api_inputs_agree(files):
    """Paths, PIL images and tensors give the same mixes; pairwise and table forms agree (to float
    rounding: other batches, other summation orders in the convolutions)."""
    d, ckpt, contents, cat, dog = files
    model = g2g_fast.load(ckpt, device="cpu", batch_size=3)
    x = model.images(contents)
    assert x.shape == (3, 3, SIZE, SIZE)
    by_path = model.mix(contents, cat)
    by_pil = model.mix([Image.open(p) for p in contents], [Image.open(p) for p in cat])
    by_tensor = model.mix(x, model.images(cat))
    torch.testing.assert_close(by_pil, by_path, rtol=0, atol=0)
    torch.testing.assert_close(by_tensor, by_path, rtol=0, atol=1e-4)
    table = model.mix_table(d / "content", [cat, d / "classes" / "dog", cat[2]])
    assert table.shape == (3, 3, 3, SIZE, SIZE)
    torch.testing.assert_close(table[:, 0], by_path, rtol=0, atol=1e-4)
    pairwise = model.mix(contents, [cat[2], dog[0], cat[2]], k_shot=False)
    torch.testing.assert_close(pairwise[0], table[0, 2], rtol=0, atol=1e-4)
    torch.testing.assert_close(pairwise[2], table[2, 2], rtol=0, atol=1e-4)
    assert model.to_pil(by_path[0]).size == (SIZE, SIZE) and len(model.to_pil(by_path)) == 3
    with pytest.raises(ValueError, match="no images"):
        model.mix(contents, d)   # a folder without images directly in it
    with pytest.raises(ValueError, match="3 content codes and 2 class codes"):
        model.mix(contents, cat[:2], k_shot=False)
    raw = g2g_fast.load(ckpt, device="cpu", raw=True)
    assert not torch.allclose(raw.mix(contents[:1], cat), by_path[:1], atol=1e-3)


def test_load_tells_a_funit_file_from_a_checkpoint(tmp_path, files):
    contents, cat = files[2], files[3]
    torch.manual_seed(5)
    gen = Generator(nf=8, nf_mlp=16, latent_dim=8)
    path = tmp_path / "funit_gen.pt"
    torch.save({"gen": gen.state_dict(), "gen_test": gen.state_dict()}, path)
    with pytest.raises(ValueError, match="shape mismatches"):   # the official architecture is nf 64
        g2g_fast.load(path, device="cpu")
    full = Generator()
    torch.save({"gen_test": full.state_dict()}, path)
    model = g2g_fast.load(path, device="cpu", image_size=SIZE)
    assert model.image_size == SIZE and isinstance(model.generator, Generator)
    with torch.no_grad():
        ref = full.eval().decode(full.encode_content(load_image(contents[0], SIZE)),
                                 full.encode_class(load_image(cat[0], SIZE)))
    torch.testing.assert_close(model.mix(contents[0], cat[0]), ref, rtol=0, atol=1e-5)
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ValueError, match="notes.txt: not a readable generator file"):
        g2g_fast.load(tmp_path / "notes.txt")
    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither a g2g-fast training checkpoint nor an official FUNIT"):
        g2g_fast.load(tmp_path / "other.pt")


def test_funit_file_grid(files, tmp_path):
    """--funit (an official generator file, FUNIT's architecture) through the same table path."""
    d, _, contents, cat, dog = files
    torch.manual_seed(6)
    gen = Generator()
    path = tmp_path / "animal_gen.pt"
    torch.save({"gen": Generator().state_dict(), "gen_test": gen.state_dict()}, path)
    out = tmp_path / "mixes"
    assert main(["--funit", str(path), "--image-size", str(SIZE), "--content", *map(str, contents[:2]),
                 "--class", *map(str, dog), "--out-dir", str(out), "--grid", str(tmp_path / "g.png"),
                 "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["c0__0.png", "c1__0.png"]
    assert np.abs(read(out / "c1__0.png") - reference_mix(gen.eval(), contents[1], dog)).max() <= 1
    assert read(tmp_path / "g.png").shape[1] == 2 * SIZE + 6


def test_class_groups_k_shot_and_names(files, tmp_path):
    """Repeated --class groups are one class each; --k-shot keeps the first K; out-dir names stay
    distinct when stems repeat."""
    d, ckpt, contents, cat, dog = files
    twin = photo(tmp_path / "other" / "c0.png", 99)          # the same stem as contents[0]
    out, grid = tmp_path / "mixes", tmp_path / "t.png"
    assert main(["--checkpoint", str(ckpt), "--content", str(contents[0]), str(twin), "--class", *map(str, cat),
                 "--class", str(d / "classes" / "dog"), "--class", str(dog[1]), "--k-shot", "2",
                 "--out-dir", str(out), "--grid", str(grid), "--device", "cpu"]) == 2  # dog[1]: 1 image < K
    assert not out.exists() and not grid.exists()
    assert main(["--checkpoint", str(ckpt), "--content", str(contents[0]), str(twin), "--class", *map(str, cat),
                 "--class", str(d / "classes" / "dog"), "--k-shot", "2", "--out-dir", str(out), "--grid", str(grid),
                 "--device", "cpu"]) == 0
    cols = json.loads(grid.with_suffix(".json").read_text())["columns"]
    assert cols == [{"name": "0", "images": list(map(str, cat[:2]))}, {"name": "dog", "images": list(map(str, dog))}]
    assert sorted(p.name for p in out.glob("*.png")) == ["c0-2__0.png", "c0-2__dog.png", "c0__0.png", "c0__dog.png"]
    gen, _ = read_generator(ckpt, "checkpoint")
    assert np.abs(read(out / "c0-2__0.png") - reference_mix(gen, twin, cat[:2])).max() <= 1
    assert unique_names(["a__b", "a__b", "x y/z", "..", "a__b-2"]) == ["a__b", "a__b-2", "x_y_z", "image", "a__b-2-2"]


def test_single_pair_keeps_the_g2g_figure(files, tmp_path, monkeypatch, capsys):
    d, ckpt, contents, cat, dog = files
    monkeypatch.chdir(tmp_path)
    assert main(["--checkpoint", str(ckpt), "--content", str(contents[0]), "--class", str(cat[0]),
                 "--device", "cpu"]) == 0
    assert read("translation.png").shape == (3 * SIZE + 4, 2 * SIZE + 2, 3)   # the old default output
    # several images and no output flag: the table goes to translation.png instead
    assert main(["--checkpoint", str(ckpt), "--content", str(contents[0]), "--class", str(cat[0]), str(cat[1]),
                 "--device", "cpu"]) == 0
    assert Path("translation.json").exists()
    # --out-mix alone is the only output (issue 24 #6: it overwrote ./translation.png too)
    for name in ("translation.png", "translation.json"):
        Path(name).unlink()
    assert main(["--checkpoint", str(ckpt), "--content", str(contents[0]), "--class", str(cat[0]), str(cat[1]),
                 "--out-mix", "mix.png", "--device", "cpu"]) == 0
    assert main(["--checkpoint", str(ckpt), "--content", str(contents[0]), "--class", str(cat[0]),
                 "--out-mix", "mix1.png", "--device", "cpu"]) == 0
    assert sorted(os.listdir()) == ["mix.png", "mix1.png"] and read("mix.png").shape == (SIZE, SIZE, 3)
    gen, _ = read_generator(ckpt, "checkpoint")
    assert np.abs(read("mix.png") - reference_mix(gen, contents[0], cat[:2])).max() <= 1
    assert np.abs(read("mix1.png") - reference_mix(gen, contents[0], cat[:1])).max() <= 1


def bad_cases(d: Path, contents, cat):
    (d / "bad").mkdir(exist_ok=True)
    (d / "bad" / "notes.png").write_text("not an image")
    (d / "bad" / "empty").mkdir(exist_ok=True)
    torn = d / "bad" / "torn_class"
    torn.mkdir(exist_ok=True)
    (torn / "a.png").write_bytes(cat[0].read_bytes())
    (torn / "b.png").write_bytes(cat[1].read_bytes()[:300])
    c, k = str(contents[0]), str(cat[0])
    return [
        ("missing content", ["--content", str(d / "nope.png"), "--class", k], f"--content {d}/nope.png: no such file"),
        ("not an image", ["--content", c, "--class", str(d / "bad" / "notes.png")],
         f"--class {d}/bad/notes.png: not a readable image"),
        ("folder without images", ["--content", str(d / "bad" / "empty"), "--class", k],
         f"--content {d}/bad/empty: a folder with no images"),
        ("class folder without images", ["--content", c, "--class", str(d / "bad" / "empty")],
         f"--class {d}/bad/empty: a folder with no images"),
        ("truncated image in a class folder", ["--content", c, "--class", str(torn)],
         f"--class {torn}/b.png: not a readable image"),
        ("--k-shot above a class's images", ["--content", c, "--class", k, "--k-shot", "2"],
         "--k-shot 2: class '0' has only 1 image(s)"),
        ("--out with several contents", ["--content", c, c, "--class", k, "--out", str(d / "o.png")],
         "--out draws the G2G figure of one content and one class image"),
        ("--image-size 0", ["--content", c, "--class", k, "--image-size", "0"],  # was read as "the default"
         "--image-size must be a positive integer, got 0"),
    ]


def test_bad_inputs_are_one_error_line(files, tmp_path, capsys):
    d, ckpt, contents, cat, dog = files
    for name, argv, expected in bad_cases(tmp_path, contents, cat):
        grid = tmp_path / f"grid_{name.replace(' ', '_')}.png"
        assert main(["--checkpoint", str(ckpt), *argv, "--grid", str(grid), "--device", "cpu"]) == 2, name
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (name, err)
        assert not grid.exists(), name


def test_a_folder_as_the_checkpoint_names_the_file_to_pass(files, tmp_path, capsys):
    """Issue 24 #6: a run folder or its checkpoints/ folder given to --checkpoint said 'no such
    checkpoint file'."""
    d, ckpt, contents, cat, dog = files
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(ckpt.read_bytes())
    for folder in (run, run / "checkpoints"):
        assert main(["--checkpoint", str(folder), "--content", str(contents[0]), "--class", str(cat[0]),
                     "--out-mix", str(tmp_path / "m.png"), "--device", "cpu"]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: {folder} is a folder; pass {run / 'checkpoints' / 'last.pt'}"]
    assert not (tmp_path / "m.png").exists()


def test_bad_input_in_a_fresh_process(files, tmp_path):
    """As a user runs it: one line, exit code 2, no traceback, nothing written."""
    d, ckpt, contents, cat, dog = files
    (tmp_path / "notes.png").write_text("not an image")
    proc = subprocess.run([sys.executable, "-m", "g2g_fast.translate", "--checkpoint", str(ckpt), "--content",
                           str(contents[0]), "--class", str(tmp_path / "notes.png"), "--grid", str(tmp_path / "g.png")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: --class {tmp_path}/notes.png: not a readable image (jpg, png, bmp, webp; complete)"], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.png"]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def run_example(code: str, files, where: Path) -> dict:
    """Run a documentation example in a folder holding the files it names."""
    d, ckpt = files[0], files[1]
    (where / "runs" / "g2g" / "checkpoints").mkdir(parents=True)
    (where / "runs" / "g2g" / "checkpoints" / "last.pt").write_bytes(ckpt.read_bytes())
    for name, seed in (("photos/dog.jpg", 1), ("photos/fox.jpg", 2), ("classes/cat/1.jpg", 3),
                       ("classes/cat/2.jpg", 4), ("classes/cat/3.jpg", 5), ("classes/dog/1.jpg", 6),
                       ("classes/dog/2.jpg", 7)):
        photo(where / name, seed)
    cwd = os.getcwd()
    os.chdir(where)
    try:
        ns: dict = {}
        exec(compile(code, "<docs example>", "exec"), ns)
    finally:
        os.chdir(cwd)
    return ns


def test_the_docs_example_runs(files, tmp_path, capsys):
    blocks = [b for b in python_blocks((ROOT / "docs" / "inference.md").read_text()) if "g2g_fast.load(" in b]
    assert len(blocks) == 1
    ns = run_example(blocks[0], files, tmp_path)
    assert (tmp_path / "dog_as_cat.png").exists()
    assert ns["mixes"].shape == (2, 3, SIZE, SIZE) and ns["table"].shape == (2, 2, 3, SIZE, SIZE)
    assert ns["cat"].shape == (1, 8) and ns["each"].shape == (3, 8)
    torch.testing.assert_close(ns["cat"], ns["each"].mean(0, keepdim=True), rtol=0, atol=1e-6)
    torch.testing.assert_close(ns["again"], ns["mixes"][:1], rtol=0, atol=1e-4)
    torch.testing.assert_close(ns["table"][:, 0], ns["mixes"], rtol=0, atol=1e-4)
    assert "Translator(" in capsys.readouterr().out


def test_the_readme_example_runs(files, tmp_path):
    """The README's inference example, once it has one (the same code as the docs' first lines)."""
    blocks = [b for b in python_blocks((ROOT / "README.md").read_text()) if "g2g_fast.load(" in b]
    if not blocks:
        pytest.skip("README.md has no g2g_fast.load example yet")
    for i, block in enumerate(blocks):
        run_example(block, files, tmp_path / str(i))
        assert (tmp_path / str(i) / "dog_as_cat.png").exists()
