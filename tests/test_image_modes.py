"""Every PIL mode the loaders accept becomes RGB by its real range (issue 24 #1): a gradient image in
each mode round-trips, within the mode's quantisation, through the folder loader (and the GPU
cache's decode), the API (`g2g_fast.load(...).images`, paths and PIL images), translate's loader
and DALI in its CPU-only mode. Modes that cannot be converted are one clear error naming the file.

One table, `ROWS`: a mode's image, how it is stored (a file the loaders read, or only a PIL image
handed to the API), the RGB it must give and the tolerance in 8-bit levels.
"""
from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

import g2g_fast
from g2g_fast.data import BatchStream, DataError, FolderDataset, StepPlan
from g2g_fast.data.dali import dali_available
from g2g_fast.data.transforms import SUPPORTED_MODES, to_rgb
from g2g_fast.translate import main as translate_main

from test_inference import tiny_checkpoint

N = 32  # the tiny checkpoint's image size; files are stored at it, so no loader resamples
y, x = np.mgrid[0:N, 0:N]
G = (x + N * y) / (N * N - 1)                              # every 8-bit level, 0 to 1 inclusive
A = y / (N - 1)                                            # alpha ramp, transparent to opaque
COL = np.stack([G, 1 - G, x / (N - 1)], -1)                # a colour gradient
needs_dali = pytest.mark.skipif(not dali_available(), reason='NVIDIA DALI is not installed (pip install -e ".[dali]")')


def u8(a) -> np.ndarray:
    return np.round(a).astype(np.uint8)


def u16(a) -> np.ndarray:
    return np.round(a * 65535).astype(np.uint16)


def grey(a) -> np.ndarray:
    return np.repeat(np.asarray(a, dtype=np.float64)[..., None], 3, -1)


def write_png(path: Path, samples: np.ndarray, bits: int, colour: int, trns: tuple[int, ...] | None = None) -> None:
    """A PNG PIL cannot write (16-bit RGB/RGBA/grey+alpha, 2-bit grey, a 16-bit tRNS key), by hand.
    colour: PNG colour type (0 grey, 2 RGB, 4 grey+alpha, 6 RGBA); samples (H, W[, C]) in the bit
    depth's range."""
    h, w = samples.shape[:2]
    rows = samples.reshape(h, -1).astype(np.int64)
    if bits == 16:
        raw = [r.astype(">u2").tobytes() for r in rows]
    elif bits == 8:
        raw = [r.astype(np.uint8).tobytes() for r in rows]
    else:  # packed, most significant bits first
        per = 8 // bits
        shifts = (8 - bits) - bits * np.arange(per)
        raw = [(np.pad(r, (0, -len(r) % per)).reshape(-1, per) << shifts).sum(1).astype(np.uint8).tobytes()
               for r in rows]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bits, colour, 0, 0, 0))
    if trns is not None:
        png += chunk(b"tRNS", b"".join(struct.pack(">H", v) for v in trns))
    path.write_bytes(png + chunk(b"IDAT", zlib.compress(b"".join(b"\0" + r for r in raw))) + chunk(b"IEND", b""))


def pil_saver(fmt: str | None = None, **kw) -> Callable[[Image.Image, Path], None]:
    return lambda img, path: img.save(path, format=fmt, **kw)


def hand_png(bits: int, colour: int, samples: np.ndarray, trns=None) -> Callable[[Image.Image, Path], None]:
    return lambda img, path: write_png(path, samples, bits, colour, trns)


# ---- the table -----------------------------------------------------------------------------------

L8, A8, COL8 = u8(G * 255), u8(A * 255), u8(COL * 255)
PALETTE = np.stack([np.arange(256), 255 - np.arange(256), (np.arange(256) * 7) % 256], -1).astype(np.uint8)


def _palette_image(alpha: np.ndarray | None = None) -> Image.Image:
    img = Image.fromarray(L8, "L").convert("P")  # indices = L8 (PIL's L -> P keeps the values) ...
    img.putpalette(PALETTE.tobytes())             # ... looked up in a colour palette
    if alpha is not None:
        img.info["transparency"] = alpha.tobytes()
    return img


def _keyed(img: Image.Image, key) -> Image.Image:
    img.info["transparency"] = key  # a transparent colour, as PIL opens a PNG's tRNS (and saves it)
    return img


def _pa() -> Image.Image:
    img = _palette_image().convert("PA")
    img.putalpha(Image.fromarray(A8, "L"))
    return img


KEY8 = int(L8[5, 7])            # the transparent grey of the keyed rows (several pixels have it)
KEY16 = int(u16(G)[5, 7])       # a 16-bit key: that one pixel only
ALPHA_PER_INDEX = np.arange(256, dtype=np.uint8)[::-1].copy()  # palette alpha: index 0 opaque ... 255 clear


class Row(NamedTuple):
    name: str
    mode: str                       # PIL's mode of the image as the loaders see it
    image: Callable[[], Image.Image] | None  # None: a PNG written by hand (`write_png`), not by PIL
    save: Callable[[Image.Image | None, Path], None] | None  # None: a PIL image only (no file format holds it)
    ext: str                        # the file name's extension (PIL reads by content: a TIFF may be "x.png")
    want: np.ndarray                # (N, N, 3) the RGB it must give, in 8-bit levels (floats)
    tol: float                      # levels


def _premultiplied(rgb, alpha) -> np.ndarray:
    return np.asarray(rgb, dtype=np.float64) * np.asarray(alpha, dtype=np.float64)[..., None] / 255


ROWS = [
    Row("1 (bilevel)", "1", lambda: Image.fromarray(G > 0.5), pil_saver("PNG"), "png", grey((G > 0.5) * 255.0), 0),
    Row("L", "L", lambda: Image.fromarray(L8, "L"), pil_saver("PNG"), "png", grey(L8), 0),
    Row("L 2-bit PNG", "L", None, hand_png(2, 0, np.round(G * 3)), "png",
        grey(np.round(G * 3) * 85), 0),
    Row("L with a transparent grey", "L", lambda: _keyed(Image.fromarray(L8, "L"), KEY8), pil_saver("PNG"), "png",
        grey(np.where(L8 == KEY8, 0, L8)), 0),
    Row("P", "P", _palette_image, pil_saver("PNG"), "png", PALETTE[L8].astype(float), 0),
    Row("P with per-index alpha", "P", lambda: _palette_image(ALPHA_PER_INDEX), pil_saver("PNG"), "png",
        _premultiplied(PALETTE[L8], ALPHA_PER_INDEX[L8]), 1),
    Row("P BMP", "P", _palette_image, pil_saver("BMP"), "bmp", PALETTE[L8].astype(float), 0),
    Row("PA", "PA", _pa, None, "", _premultiplied(PALETTE[L8], A8), 1),
    Row("RGB", "RGB", lambda: Image.fromarray(COL8), pil_saver("PNG"), "png", COL8.astype(float), 0),
    Row("RGB BMP", "RGB", lambda: Image.fromarray(COL8), pil_saver("BMP"), "bmp", COL8.astype(float), 0),
    Row("RGB with a transparent colour", "RGB", lambda: _keyed(Image.fromarray(COL8), tuple(map(int, COL8[5, 7]))),
        pil_saver("PNG"), "png",
        np.where((COL8 == COL8[5, 7]).all(-1, keepdims=True), 0, COL8).astype(float), 0),
    Row("RGB 16-bit PNG", "RGB", None, hand_png(16, 2, u16(COL)), "png", COL * 255, 1.01),
    Row("RGBX", "RGBX", lambda: Image.fromarray(COL8).convert("RGBX"), None, "", COL8.astype(float), 0),
    Row("RGBA", "RGBA", lambda: Image.fromarray(np.dstack([COL8, A8]), "RGBA"), pil_saver("PNG"), "png",
        _premultiplied(COL8, A8), 1),
    Row("RGBA WebP (lossless)", "RGBA", lambda: Image.fromarray(np.dstack([COL8, A8]), "RGBA"),
        pil_saver("WEBP", lossless=True), "webp", _premultiplied(COL8, A8), 1),
    Row("RGBA 16-bit PNG", "RGBA", None, hand_png(16, 6, np.dstack([u16(COL), u16(A)])),
        "png", COL * A[..., None] * 255, 2),
    Row("RGBa (premultiplied)", "RGBa", lambda: Image.fromarray(np.dstack([COL8, A8]), "RGBA").convert("RGBa"), None,
        "", _premultiplied(COL8, A8), 1),
    Row("LA", "LA", lambda: Image.fromarray(np.dstack([L8, A8]), "LA"), pil_saver("PNG"), "png",
        grey(_premultiplied(grey(L8), A8)[..., 0]), 1),
    Row("LA 16-bit PNG", "RGBA", None, hand_png(16, 4, np.dstack([u16(G), u16(A)])), "png",
        grey(G * A * 255), 2),
    Row("La (premultiplied)", "La", lambda: Image.fromarray(np.dstack([L8, A8]), "LA").convert("La"), None, "",
        grey(_premultiplied(grey(L8), A8)[..., 0]), 1),
    Row("I;16 (16-bit grey PNG)", "I;16", lambda: Image.fromarray(u16(G)), pil_saver("PNG"), "png", grey(G * 255),
        1.01),
    Row("I;16 with a transparent grey", "I;16", None, hand_png(16, 0, u16(G), (KEY16,)),
        "png", grey(np.where(u16(G) == KEY16, 0, G * 255)), 1.01),
    Row("I;16B", "I;16B", lambda: Image.frombytes("I;16B", (N, N), u16(G).astype(">u2").tobytes()),
        pil_saver("TIFF"), "png", grey(G * 255), 1.01),
    Row("I;16L", "I;16L", lambda: Image.frombytes("I;16L", (N, N), u16(G).astype("<u2").tobytes()), None, "",
        grey(G * 255), 1.01),
    Row("I;16N", "I;16N", lambda: Image.frombytes("I;16N", (N, N), u16(G).astype("=u2").tobytes()), None, "",
        grey(G * 255), 1.01),
    Row("I (16-bit grey in 32 bits)", "I", lambda: Image.fromarray(u16(G).astype(np.int32)), pil_saver("TIFF"), "png",
        grey(G * 255), 1.01),
    Row("F (float, 0-1)", "F", lambda: Image.fromarray(G.astype(np.float32)), pil_saver("TIFF"), "png",
        grey(G * 255), 0.51),
    Row("CMYK JPEG", "CMYK", lambda: Image.fromarray(COL8).convert("CMYK"), pil_saver("JPEG", quality=100), "jpg",
        COL8.astype(float), 2),
    Row("YCbCr", "YCbCr", lambda: Image.fromarray(COL8).convert("YCbCr"), None, "", COL8.astype(float), 3),
    Row("HSV", "HSV", lambda: Image.fromarray(COL8).convert("HSV"), None, "", COL8.astype(float), 7),
]
FILE_ROWS = [r for r in ROWS if r.save is not None]


class Bad(NamedTuple):
    name: str
    image: Callable[[], Image.Image]
    message: str


BAD = [
    Bad("LAB", lambda: Image.fromarray(COL8).convert("LAB"), "mode LAB (CIELAB) is not converted"),
    Bad("F of 0-255", lambda: Image.fromarray((G * 255).astype(np.float32)),
        "mode F (32-bit float) pixels span [0, 255]; g2g reads mode F as 0 = black, 1 = white"),
    Bad("F with NaN", lambda: Image.fromarray(np.where(G > 0.5, np.nan, G).astype(np.float32)),
        "mode F (32-bit float) has NaN or infinite pixels"),
    Bad("I beyond 16 bits", lambda: Image.fromarray((u16(G).astype(np.int32) - 1)),
        "mode I (32-bit integer) pixels span [-1, 65534]; g2g reads mode I as 16-bit"),
]


def file_name(row: Row) -> str:
    return "".join(c if c.isalnum() else "_" for c in row.name) + "." + row.ext


def levels(t: torch.Tensor) -> np.ndarray:
    """(3, N, N) in [-1, 1] -> (N, N, 3) 8-bit levels as floats."""
    return ((t.detach().cpu().double() + 1) * 127.5).permute(1, 2, 0).numpy()


def off(row: Row, got: np.ndarray, where: str) -> list[str]:
    """[] when `got` is the row's RGB within its tolerance, else the one line saying by how much."""
    err = np.abs(got - row.want).max()
    return [] if err <= row.tol + 1e-3 else [f"{row.name} via {where}: off by {err:.2f} levels (tolerance {row.tol})"]


def check(row: Row, got: np.ndarray, where: str) -> None:
    assert not off(row, got, where), off(row, got, where)[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Each file row's image saved into a class folder of its own (the loaders need 2+ classes), a
    tiny checkpoint, and the bad images as TIFFs under .png names (the only way such modes reach
    the loaders: PIL reads files by content)."""
    d = tmp_path_factory.mktemp("image_modes")
    paths = {}
    for k, row in enumerate(FILE_ROWS):
        path = d / "data" / f"c{k:02d}" / file_name(row)
        path.parent.mkdir(parents=True)
        row.save(row.image and row.image(), path)
        paths[row.name] = path
    bad = {}
    for b in BAD:
        path = d / "bad" / f"{b.name.replace(' ', '_')}.png"
        path.parent.mkdir(exist_ok=True)
        b.image().save(path, format="TIFF")
        bad[b.name] = path
    return d, paths, bad, tiny_checkpoint(d / "tiny.pt")


# ---- the round trips -----------------------------------------------------------------------------


def test_the_table_covers_every_supported_mode(files):
    """Each mode `to_rgb` accepts has a row, and every file row opens in the mode it claims."""
    assert set(SUPPORTED_MODES) <= {r.mode for r in ROWS}
    _, paths, _, _ = files
    for row in FILE_ROWS:
        with Image.open(paths[row.name]) as img:
            assert img.mode == row.mode, (row.name, img.mode)
    for row in ROWS:
        if row.save is None:
            assert row.image().mode == row.mode, row.name


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_to_rgb(files, row):
    """The one conversion, on the image as PIL opens the file (or the PIL-only image)."""
    img = Image.open(files[1][row.name]) if row.save is not None else row.image()
    check(row, np.asarray(to_rgb(img), dtype=np.float64), "to_rgb")
    assert img.mode == row.mode  # the caller's image is left as it was


def test_folder_loader_and_gpu_cache_decode(files):
    d, paths, _, _ = files
    ds = FolderDataset(d / "data", image_size=N, resize_to=N)
    assert len(ds) == len(FILE_ROWS) and not ds.skipped
    by_path = {str(p): name for name, p in paths.items()}
    rows, wrong = {r.name: r for r in ROWS}, []
    for i, path in enumerate(ds.paths):
        row = rows[by_path[path]]
        wrong += off(row, levels(ds.get(i, None)[0]), "the folder loader")
        j, stored = ds.stored(i)  # what the GPU cache holds: the same decode, before flip and crop
        assert j == i and np.array_equal(stored.numpy(), np.rint(levels(ds.get(i, None)[0])).astype(np.uint8))
    assert not wrong, "\n".join(wrong)


def test_samples_load_image_and_image_to_tensor(files):
    """`samples.load_image` (a file) and `image_to_tensor` (a PIL image of any mode) decode as the
    loaders do: they called convert("RGB"), which clips 16-bit values to white."""
    from g2g_fast.samples import image_to_tensor, load_image
    _, paths, _, _ = files
    wrong = []
    for row in FILE_ROWS:
        wrong += off(row, levels(load_image(paths[row.name], N)[0]), "samples.load_image")
        with Image.open(paths[row.name]) as img:
            wrong += off(row, levels(image_to_tensor(img, N)[0]), "samples.image_to_tensor")
    assert not wrong, "\n".join(wrong)


def test_api_paths_and_pil_images(files):
    _, paths, _, ckpt = files
    model = g2g_fast.load(ckpt, device="cpu")
    assert model.image_size == N
    wrong = []
    for row in FILE_ROWS:
        wrong += off(row, levels(model.images(paths[row.name])[0]), "the API (a path)")
        with Image.open(paths[row.name]) as img:
            wrong += off(row, levels(model.images(img)[0]), "the API (the PIL image of the file)")
    for row in ROWS:
        if row.image is not None:  # made in memory, never saved
            wrong += off(row, levels(model.images(row.image())[0]), "the API (a PIL image)")
    assert not wrong, "\n".join(wrong)


def test_translate_loader(files, tmp_path):
    """The content column of `translate --grid` is the loaded content images; `--out`'s figure
    (one pair) starts with the content image."""
    d, paths, _, ckpt = files
    grid = tmp_path / "grid.png"
    some = paths[FILE_ROWS[0].name]
    assert translate_main(["--checkpoint", str(ckpt), "--content", *map(str, paths.values()), "--class", str(some),
                           "--grid", str(grid), "--device", "cpu"]) == 0
    side = json.loads(grid.with_suffix(".json").read_text())
    (_, y0), (_, py) = side["first_mix_xy"], side["mix_pitch_xy"]
    table = np.asarray(Image.open(grid).convert("RGB"), dtype=np.float64)
    rows = {str(paths[r.name]): r for r in FILE_ROWS}
    assert sorted(side["rows"]) == sorted(rows)
    wrong = [line for i, path in enumerate(side["rows"])
             for line in off(rows[path], table[y0 + i * py:y0 + i * py + N, :N], "translate --grid")]
    assert not wrong, "\n".join(wrong)
    row = next(r for r in ROWS if r.mode == "I;16")  # the case, through the one-pair figure
    out = tmp_path / "pair.png"
    assert translate_main(["--checkpoint", str(ckpt), "--content", str(paths[row.name]), "--class", str(some),
                           "--out", str(out), "--device", "cpu"]) == 0
    check(row, np.asarray(Image.open(out).convert("RGB"), dtype=np.float64)[:N, :N], "translate --out")


@needs_dali
def test_dali_cpu_decodes_every_mode_as_the_reference(files):
    """DALI gets 8-bit RGB/grey files as they are and the rest re-encoded from `load_rgb`; either
    way each image equals the reference loader's (so the table's RGB, up to its random flip)."""
    from g2g_fast.data.dali import DaliStream
    d, _, _, _ = files
    ds = FolderDataset(d / "data", image_size=N, resize_to=N)
    ref, dali = BatchStream(ds, len(ds), seed=1), DaliStream(ds, len(ds), seed=1, threads=2)
    (x1, y1), (x2, y2) = next(ref), next(dali)
    dali.close()
    assert torch.equal(y1, y2)
    plan = StepPlan(len(ds), len(ds), seed=1)
    seen, wrong = set(), []
    for b, (_, i) in enumerate(plan.keys(0)):
        seen.add(i)
        if not torch.equal(x1[b], x2[b]):
            wrong.append(f"{ds.paths[i]}: DALI differs by {(x1[b] - x2[b]).abs().max() * 127.5:.0f} levels")
    assert not wrong, "\n".join(wrong)
    assert seen == set(range(len(ds)))
    assert 0 < len(dali._reencoded) < len(ds)  # both paths taken


# ---- what cannot be converted --------------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD, ids=[b.name for b in BAD])
def test_unconvertible_images_are_one_clear_error(files, bad):
    d, paths, bad_paths, ckpt = files
    path = bad_paths[bad.name]
    with pytest.raises(DataError, match="a PIL image: " + re.escape(bad.message)):
        to_rgb(bad.image(), "a PIL image")
    model = g2g_fast.load(ckpt, device="cpu")
    for item, name in ((path, str(path)), (bad.image(), "a PIL image")):
        with pytest.raises(ValueError, match=re.escape(f"{name}: {bad.message}")):
            model.images(item)
    # a dataset with the file: refused up front, naming it, not trained on as black or white
    root = d / f"with_{path.stem}"
    for k, src in enumerate([paths[FILE_ROWS[0].name], path]):
        (root / f"c{k}").mkdir(parents=True)
        (root / f"c{k}" / src.name).write_bytes(src.read_bytes())
    with pytest.raises(DataError, match=re.escape(f"cannot be converted to RGB: {root}/c1/{path.name} ({bad.message}")):
        FolderDataset(root, image_size=N, resize_to=N)


def test_translate_refuses_an_unconvertible_image_up_front(files, tmp_path, capsys):
    _, paths, bad_paths, ckpt = files
    lab = bad_paths["LAB"]
    out = tmp_path / "grid.png"
    assert translate_main(["--checkpoint", str(ckpt), "--content", str(paths[FILE_ROWS[0].name]), "--class", str(lab),
                           "--grid", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --class {lab}: mode LAB (CIELAB) is not converted: that needs a white point and colour "
                   f"profile g2g cannot guess; re-save the image as RGB"]
    assert not out.exists()
