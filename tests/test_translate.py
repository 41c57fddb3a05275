"""`python -m g2g_fast.translate` against the reference forward pass."""
import numpy as np
import pytest
import torch
from PIL import Image

from g2g_fast.reference.funit import Generator
from g2g_fast.samples import load_image
from g2g_fast.translate import main


@pytest.fixture(scope="module")
def funit_file(tmp_path_factory):
    """An official-layout generator file ({'gen', 'gen_test'}) with random weights."""
    torch.manual_seed(1)
    gen = Generator()
    path = tmp_path_factory.mktemp("funit") / "animal_gen.pt"
    torch.save({"gen": Generator().state_dict(), "gen_test": gen.state_dict()}, path)
    return path, gen


def photo(path, seed, size=(150, 130)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_mix_equals_reference_decode(funit_file, tmp_path):
    path, gen = funit_file
    a, b = photo(tmp_path / "a.png", 0), photo(tmp_path / "b.png", 1)
    grid, mix = tmp_path / "grid.png", tmp_path / "mix.png"
    assert main(["--funit", str(path), "--content", str(a), "--class", str(b), "--out", str(grid),
                 "--out-mix", str(mix), "--device", "cpu"]) == 0
    xa, xb = load_image(a, 128), load_image(b, 128)
    with torch.no_grad():
        ref = gen.eval().decode(gen.encode_content(xa), gen.encode_class(xb))[0]
    ref_u8 = ((ref.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()
    got = np.asarray(Image.open(mix)).astype(np.float64)
    assert got.shape == (128, 128, 3)
    assert np.abs(got - ref_u8).max() <= 1  # same computation; at most one rounding step apart
    g = np.asarray(Image.open(grid))
    assert g.shape == (3 * 128 + 4, 2 * 128 + 2, 3)
    np.testing.assert_array_equal(g[128 + 2:256 + 2, :128], np.asarray(Image.open(mix)))


def test_bad_inputs(funit_file, tmp_path, capsys):
    path, _ = funit_file
    a = photo(tmp_path / "a.png", 0)
    assert main(["--funit", str(path), "--content", str(tmp_path / "nope.png"), "--class", str(a)]) == 2
    assert "nope.png" in capsys.readouterr().err
    assert main(["--checkpoint", str(path), "--content", str(a), "--class", str(a)]) == 2
    assert "not a g2g-fast training checkpoint" in capsys.readouterr().err
