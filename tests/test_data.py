"""Data: synthetic rendering, folder/CelebA datasets, FUNIT transform, DataError, BatchStream."""
import io
import logging
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from g2g_fast.data import (BatchStream, CelebADataset, DataError, FolderDataset, SyntheticDataset,
                           build_dataset)
from g2g_fast.data.transforms import image_info

S = 32  # crop size of the file datasets; resize_to defaults to round(32 * 140 / 128) = 35
LEVEL = 1 / 127.5  # one 8-bit level in [-1, 1] units


# ---------------------------------------------------------------- synthetic


def test_synthetic_deterministic_across_instances():
    a, b = SyntheticDataset(image_size=32, per_class=4), SyntheticDataset(image_size=32, per_class=4)
    for i in (0, 5, 31):
        assert torch.equal(a.get(i, None)[0], b.get(i, None)[0])
        assert torch.equal(a.factors(i), b.factors(i))
    assert not torch.equal(a.get(0, None)[0], a.get(1, None)[0])
    other_seed = SyntheticDataset(image_size=32, per_class=4, seed=1)
    assert not torch.equal(a.get(0, None)[0], other_seed.get(0, None)[0])


def test_synthetic_get_ignores_rng():
    ds = SyntheticDataset(image_size=32, per_class=2)
    assert torch.equal(ds.get(3, torch.Generator().manual_seed(1))[0], ds.get(3, None)[0])


def test_synthetic_test_split_is_disjoint_with_same_classes():
    train = SyntheticDataset(image_size=32, per_class=16)
    test = SyntheticDataset(image_size=32, per_class=16, split="test")
    assert train.class_names == test.class_names and train.labels == test.labels
    ftrain = {tuple(train.factors(i).tolist()) for i in range(len(train))}
    ftest = {tuple(test.factors(i).tolist()) for i in range(len(test))}
    assert len(ftrain) == len(train) and len(ftest) == len(test)
    assert not ftrain & ftest
    assert not torch.equal(train.get(0, None)[0], test.get(0, None)[0])


@pytest.mark.parametrize("size", [32, 48, 64])
def test_synthetic_shape_and_range(size):
    ds = SyntheticDataset(image_size=size, num_classes=3, per_class=4)
    xs = torch.stack([ds.get(i, None)[0] for i in range(len(ds))])
    assert xs.shape == (len(ds), 3, size, size) and xs.dtype == torch.float32
    assert xs.min() >= -1 and xs.max() <= 1
    assert xs.min() < -0.5 and xs.max() > 0.5  # the range is actually used
    # 8-bit levels, like a decoded file: (x + 1) * 127.5 is an integer
    assert torch.allclose((xs + 1) * 127.5, ((xs + 1) * 127.5).round(), atol=1e-3)


def test_synthetic_labels_balanced():
    ds = SyntheticDataset(image_size=16, num_classes=5, per_class=7)
    assert len(ds) == 35 and ds.num_classes == 5 and len(ds.class_names) == 5
    assert Counter(ds.labels) == {c: 7 for c in range(5)}
    assert [ds.get(i, None)[1] for i in range(len(ds))] == ds.labels


def _mask_with(ds, c, factors):
    """Foreground mask of class c rendered with the given factors on a black background."""
    ds.factors = lambda index: torch.tensor(factors)
    img = ds.render(c)  # per_class=1: index c has label c
    return img.max(0).values > 20


def test_synthetic_shapes_differ():
    ds = SyntheticDataset(image_size=64, num_classes=12, per_class=1)
    assert len({name.split("/")[0] for name in ds.class_names}) == 12
    masks = [_mask_with(ds, c, [0.0, 0.0, 0.45, 0.3, 0.0, 0.0]) for c in range(12)]
    for c, m in enumerate(masks):
        assert 100 < m.sum() < 64 * 64 / 2, ds.class_names[c]
    for a in range(12):
        for b in range(a):
            diff = (masks[a] ^ masks[b]).float().mean()
            assert diff > 0.01, f"{ds.class_names[a]} and {ds.class_names[b]} look alike ({diff:.3f})"


def test_synthetic_classes_beyond_the_shape_list():
    ds = SyntheticDataset(image_size=32, num_classes=30, per_class=1)
    assert len(set(ds.class_names)) == 30
    f = [0.0, 0.0, 0.45, 0.3, 0.3, 0.0]
    ds.factors = lambda index: torch.tensor(f)
    imgs = [ds.render(c) for c in range(30)]
    for a in range(30):
        for b in range(a):
            assert not torch.equal(imgs[a], imgs[b]), (ds.class_names[a], ds.class_names[b])


def test_synthetic_factors():
    ds = SyntheticDataset(image_size=64, num_classes=2, per_class=8)
    assert ds.factor_names[:5] == ["cx", "cy", "scale", "rotation", "background"]
    f = ds.factors(3)
    assert f.shape == (len(ds.factor_names),) and f.dtype == torch.float32
    with pytest.raises(IndexError):
        ds.factors(len(ds))
    # The factors are what is drawn: the centroid of a circle (class 0) sits at (cx, cy).
    for i in range(4):
        cx, cy, scale = ds.factors(i)[:3].tolist()
        mask = _mask_with(ds, 0, [cx, cy, scale, 0.0, 0.0, 0.0]).float()
        ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        centre = ((xs * mask).sum() / mask.sum(), (ys * mask).sum() / mask.sum())
        assert abs(centre[0] - ((cx + 1) * 32 - 0.5)) < 0.5 and abs(centre[1] - ((cy + 1) * 32 - 0.5)) < 0.5


# ---------------------------------------------------------------- files


def _save(img, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _noise(w, h, seed, mode="RGB"):
    r = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(r.integers(0, 256, shape, dtype=np.uint8), mode)


def _ramp(w, h):
    """Horizontal ramp, brighter to the right, so a flip is visible."""
    row = np.linspace(0, 255, w).astype(np.uint8)
    return Image.fromarray(np.repeat(np.tile(row, (h, 1))[..., None], 3, axis=2))


@pytest.fixture
def animals(tmp_path):
    """cat: rgb png, jpeg ramp, grey png, a 20x16 image (smaller than the crop), uppercase ext;
    dog: RGBA, grey jpeg, palette, a garbage .jpg; fox: two jpegs and a truncated one."""
    root = tmp_path / "animals"
    _save(_noise(40, 52, 0), root / "cat/a.png")
    _save(_ramp(48, 40), root / "cat/b.jpg", quality=95)
    _save(Image.new("L", (44, 44), 128), root / "cat/c.png")
    _save(_noise(20, 16, 1), root / "cat/d_small.PNG")
    _save(Image.new("RGBA", (40, 40), (200, 100, 50, 128)), root / "dog/a.png")
    _save(_noise(40, 40, 2, "L"), root / "dog/b.jpg")
    pal = Image.new("P", (36, 36), 3)
    pal.putpalette([0, 0, 0] * 3 + [10, 250, 40] + [0, 0, 0] * 252)
    _save(pal, root / "dog/c.png")
    (root / "dog/bad.jpg").write_bytes(b"this is not an image" * 20)
    _save(_noise(40, 40, 3), root / "fox/a.jpg")
    _save(_noise(50, 40, 4), root / "fox/b.jpg")
    buf = io.BytesIO()
    _noise(64, 64, 5).save(buf, format="JPEG", quality=95)
    (root / "fox/trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "fox/notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    return root


def _index(ds, name):
    return next(i for i, p in enumerate(ds.paths) if p.endswith(name))


def test_folder_dataset(animals, caplog):
    with caplog.at_level(logging.WARNING, logger="g2g_fast"):
        ds = FolderDataset(animals, image_size=S)
    assert ds.class_names == ["cat", "dog", "fox"] and ds.num_classes == 3
    assert len(ds) == 9 and ds.labels == [0] * 4 + [1] * 3 + [2] * 2
    # A truncated file passes PIL's header parse; the end-marker check catches it up front.
    assert ds.skipped == [str(animals / "dog/bad.jpg"), str(animals / "fox/trunc.jpg")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "bad.jpg" in warnings[0] and "trunc.jpg" in warnings[0] and " 2 " in warnings[0]
    g = torch.Generator().manual_seed(0)
    for i in range(len(ds)):
        x, y = ds.get(i, g)
        assert x.shape == (3, S, S) and x.dtype == torch.float32 and y == ds.labels[i]
        assert x.min() >= -1 and x.max() <= 1


def test_mode_conversion(animals):
    ds = FolderDataset(animals, image_size=S)
    grey = ds.get(_index(ds, "cat/c.png"), None)[0]
    assert torch.allclose(grey, torch.full_like(grey, 128 / 127.5 - 1), atol=1e-6)
    # RGBA is composited on black: alpha 128 halves the colour (a plain convert would keep 200,100,50).
    rgba = ds.get(_index(ds, "dog/a.png"), None)[0]
    want = torch.tensor([200, 100, 50]) * 128 / 255 / 127.5 - 1
    assert (rgba - want.view(3, 1, 1)).abs().max() <= 1.5 * LEVEL
    pal = ds.get(_index(ds, "dog/c.png"), None)[0]
    want = (torch.tensor([10.0, 250, 40]) / 127.5 - 1).view(3, 1, 1).expand(3, S, S)
    assert torch.allclose(pal, want, atol=1e-6)
    grey_jpeg = ds.get(_index(ds, "dog/b.jpg"), None)[0]
    assert torch.equal(grey_jpeg[0], grey_jpeg[1]) and torch.equal(grey_jpeg[1], grey_jpeg[2])


def test_small_image_resized_up_then_center_cropped(animals):
    ds = FolderDataset(animals, image_size=S)
    src = Image.open(animals / "cat/d_small.PNG").convert("RGB")  # 20x16 -> 43x35 -> crop at (6, 2)
    want = np.asarray(src.resize((43, 35), Image.Resampling.BILINEAR).crop((6, 2, 6 + S, 2 + S)))
    got = ds.get(_index(ds, "d_small.PNG"), None)[0]
    assert torch.equal(got, torch.from_numpy(want.copy()).permute(2, 0, 1).float() / 127.5 - 1)


def test_random_flip_and_crop_come_from_the_generator_only(animals):
    ds = FolderDataset(animals, image_size=S)
    i = _index(ds, "d_small.PNG")
    src = Image.open(animals / "cat/d_small.PNG").convert("RGB")
    variants = [src, src.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    resized = [torch.from_numpy(np.asarray(v.resize((43, 35), Image.Resampling.BILINEAR)).copy())
               .permute(2, 0, 1).float() / 127.5 - 1 for v in variants]
    seen = set()
    for seed in range(24):
        torch.manual_seed(seed)  # the global RNG must not matter ...
        x = ds.get(i, torch.Generator().manual_seed(seed))
        torch.manual_seed(seed + 100)
        assert torch.equal(ds.get(i, torch.Generator().manual_seed(seed))[0], x[0])
        hits = [(f, t, l) for f in range(2) for t in range(35 - S + 1) for l in range(43 - S + 1)
                if torch.equal(resized[f][:, t:t + S, l:l + S], x[0])]
        assert hits, f"seed {seed}: output is not a crop of the (flipped) resized image"
        seen.add(hits[0])
    assert {f for f, _, _ in seen} == {0, 1}  # both flips occur
    assert len({(t, l) for _, t, l in seen}) > 5  # crops vary
    state = torch.get_rng_state()
    ds.get(i, torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())  # ... and is not consumed


def test_flip_mirrors_the_image(animals):
    ds = FolderDataset(animals, image_size=S)
    i = _index(ds, "cat/b.jpg")  # a ramp, brighter to the right
    slopes = set()
    for seed in range(16):
        x = ds.get(i, torch.Generator().manual_seed(seed))[0]
        slopes.add(bool(x[:, :, -1].mean() > x[:, :, 0].mean()))
    assert slopes == {True, False}
    x = ds.get(i, None)[0]
    assert x[:, :, -1].mean() > x[:, :, 0].mean()  # evaluation never flips


def test_image_info_end_markers(tmp_path):
    img = _noise(30, 20, 7)
    for fmt, name in (("JPEG", "a.jpg"), ("PNG", "a.png")):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        data = buf.getvalue()
        (tmp_path / name).write_bytes(data)
        assert image_info(str(tmp_path / name)) == (30, 20, "RGB")
        (tmp_path / name).write_bytes(data + b"\0" * 16)  # padding after the end marker is fine
        assert image_info(str(tmp_path / name)) is not None
        (tmp_path / name).write_bytes(data[: len(data) * 2 // 3])
        assert image_info(str(tmp_path / name)) is None


def test_undecodable_file_replaced_in_get(animals, caplog, monkeypatch):
    """A file that passes the up-front check but fails to decode later is replaced by the next
    index's image (deterministically, with the same augmentation generator), logged once."""
    import g2g_fast.data.folder as folder
    ds = FolderDataset(animals, image_size=S)
    i = _index(ds, "fox/b.jpg")
    assert i == len(ds) - 1
    real = folder.load_rgb
    monkeypatch.setattr(folder, "load_rgb", lambda p: (_ for _ in ()).throw(OSError("broken"))
                        if p.endswith("fox/b.jpg") else real(p))
    with caplog.at_level(logging.WARNING, logger="g2g_fast"):
        x, y = ds.get(i, None)
        ds.get(i, None)
    warnings = [r.getMessage() for r in caplog.records if "fox/b.jpg" in r.getMessage()]
    assert len(warnings) == 1  # once per file
    x0, y0 = ds.get(0, None)  # the next index, wrapping around
    assert torch.equal(x, x0) and y == y0 == 0
    assert ds.skipped[-1].endswith("fox/b.jpg") and len(ds.skipped) == 3


def test_list_file(animals, caplog):
    (animals / "train_list.txt").write_text("dog/b.jpg\ncat/a.png\n\nfox/a.jpg\ndog/c.png\n")
    ds = build_dataset(str(animals), image_size=S)
    assert isinstance(ds, FolderDataset)
    assert ds.class_names == ["cat", "dog", "fox"] and len(ds) == 4
    assert ds.labels == [1, 0, 2, 1]  # list order kept
    with caplog.at_level(logging.WARNING, logger="g2g_fast"):
        test = build_dataset(str(animals), image_size=S, split="test")  # no test_list.txt: scan
    assert len(test) == 9 and "test_list.txt" in caplog.text
    (animals / "two.txt").write_text("cat/a.png\ncat/c.png\n")
    with pytest.raises(DataError, match="found 1 class"):
        FolderDataset(animals, image_size=S, list_file=animals / "two.txt")


@pytest.fixture
def celeba(tmp_path):
    """9 images; identities 10 (1-3), 2 (4-6), 7 (7-9); train 1,2,4,5,7,8; test 3,6; val 9."""
    root = tmp_path / "celeba"
    ident = {1: 10, 2: 10, 3: 10, 4: 2, 5: 2, 6: 2, 7: 7, 8: 7, 9: 7}
    part = {1: 0, 2: 0, 3: 2, 4: 0, 5: 0, 6: 2, 7: 0, 8: 0, 9: 1}
    for k in ident:
        _save(_noise(36, 44, k), root / f"img_align_celeba/{k:06d}.jpg")
    (root / "identity_CelebA.txt").write_text("".join(f"{k:06d}.jpg {v}\n" for k, v in ident.items()))
    (root / "list_eval_partition.txt").write_text("".join(f"{k:06d}.jpg {v}\n" for k, v in part.items()))
    return root


def test_celeba(celeba):
    train = build_dataset(str(celeba), image_size=S)
    assert isinstance(train, CelebADataset)
    assert train.class_names == ["2", "7", "10"]  # numeric order, not "10" < "2"
    assert [p[-10:] for p in train.paths] == [f"{k:06d}.jpg" for k in (1, 2, 4, 5, 7, 8)]
    assert train.labels == [2, 2, 0, 0, 1, 1]
    x, y = train.get(0, torch.Generator().manual_seed(0))
    assert x.shape == (3, S, S) and y == 2
    test = CelebADataset(celeba, image_size=S, split="test")
    assert test.class_names == ["2", "10"] and test.labels == [1, 0]
    with pytest.raises(DataError, match="found 1 class"):
        CelebADataset(celeba, image_size=S, split="val")


# ---------------------------------------------------------------- errors


def test_errors(tmp_path, animals, celeba):
    with pytest.raises(DataError, match="nowhere: does not exist"):
        build_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        build_dataset(str(tmp_path / "empty"))
    _save(_noise(8, 8, 0), tmp_path / "loose/a.png")
    with pytest.raises(DataError, match="1 images lie directly in it"):
        build_dataset(str(tmp_path / "loose"))
    _save(_noise(8, 8, 0), tmp_path / "one/cat/a.png")
    with pytest.raises(DataError, match=r"found 1 class sub-folder with images \(cat\)"):
        build_dataset(str(tmp_path / "one"))
    with pytest.raises(DataError, match="found 1 class"):
        build_dataset("synthetic", synthetic_classes=1)
    with pytest.raises(DataError, match="--data-format 'lmdb'"):
        build_dataset(str(animals), data_format="lmdb")
    with pytest.raises(DataError, match="resize_to 30 is smaller than the crop image_size 32"):
        FolderDataset(animals, image_size=32, resize_to=30)
    (celeba / "list_eval_partition.txt").unlink()
    with pytest.raises(DataError, match="CelebA file.*missing: list_eval_partition.txt"):
        build_dataset(str(celeba))
    with pytest.raises(DataError, match="missing: img_align_celeba, identity_CelebA.txt, list_eval"):
        build_dataset(str(animals), data_format="celeba")
    (animals / "train_list.txt").write_text("cat/a.png\ncat/nope1.jpg\ndog/nope2.jpg\n")
    with pytest.raises(DataError, match="2 listed file.*missing.*cat/nope1.jpg, dog/nope2.jpg"):
        build_dataset(str(animals))
    with pytest.raises(DataError, match="list file gone.txt: does not exist"):
        FolderDataset(animals, list_file="gone.txt")
    with pytest.raises(DataError, match="has 3 images, fewer than the batch size 4"):
        BatchStream(SyntheticDataset(image_size=8, num_classes=3, per_class=1), 4)


def test_all_files_of_a_class_bad(tmp_path, caplog):
    _save(_noise(8, 8, 0), tmp_path / "d/cat/a.png")
    (tmp_path / "d/dog/a.png").parent.mkdir()
    (tmp_path / "d/dog/a.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="found 1 class"):
        FolderDataset(tmp_path / "d", image_size=8)
    assert "dog/a.png" in caplog.text


# ---------------------------------------------------------------- BatchStream


class IndexDataset:
    """get -> (image holding the index and one draw from the augmentation generator, label)."""

    def __init__(self, n):
        self.labels = [i % 3 for i in range(n)]

    def __len__(self):
        return len(self.labels)

    def get(self, index, rng):
        noise = float(torch.rand((), generator=rng))
        return torch.tensor([float(index), noise]).view(2, 1, 1).expand(2, 2, 2), self.labels[index]


def _take(stream, k):
    return [next(stream) for _ in range(k)]


def test_stream_batches():
    ds = SyntheticDataset(image_size=16, num_classes=2, per_class=6)
    stream = BatchStream(ds, 4)
    x, y = next(stream)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    assert y.shape == (4,) and y.dtype == torch.int64
    assert stream.step == 1 and stream.batches_per_epoch == 3 and stream.epoch == 0


@pytest.mark.parametrize("n,batch,drop_last,per_epoch",
                         [(12, 4, True, 3), (10, 4, True, 2), (10, 4, False, 3)])
def test_stream_epochs(n, batch, drop_last, per_epoch):
    stream = BatchStream(IndexDataset(n), batch, seed=3, drop_last=drop_last)
    assert stream.batches_per_epoch == per_epoch
    epochs = []
    for e in range(3):
        assert stream.epoch == e
        batches = _take(stream, per_epoch)
        idx = torch.cat([x[:, 0, 0, 0] for x, _ in batches]).long()
        labels = torch.cat([y for _, y in batches])
        assert torch.equal(labels, idx % 3)
        want = n if not drop_last else per_epoch * batch
        assert len(idx) == want and len(set(idx.tolist())) == want  # each image at most once ...
        if not drop_last:
            assert [len(y) for _, y in batches] == [4, 4, 2]  # ... and all of them without drop_last
        # the documented order: randperm seeded seed * 1_000_003 + epoch
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(3 * 1_000_003 + e))
        assert torch.equal(idx, perm[:want])
        epochs.append(batches)
    assert not torch.equal(epochs[0][0][0], epochs[1][0][0])  # reshuffled every epoch


def test_stream_augmentation_differs_per_epoch():
    stream = BatchStream(IndexDataset(8), 8)
    (a, _), (b, _) = _take(stream, 2)
    noise_a = dict(zip(a[:, 0, 0, 0].tolist(), a[:, 1, 0, 0].tolist()))
    noise_b = dict(zip(b[:, 0, 0, 0].tolist(), b[:, 1, 0, 0].tolist()))
    assert all(noise_a[i] != noise_b[i] for i in noise_a)
    assert len(set(noise_a.values())) == 8  # and per sample


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
def test_stream_resume_is_exact(k):
    ds = IndexDataset(10)  # 2 batches of 4 per epoch: k = 2, 3, 5 start in later epochs
    fresh = _take(BatchStream(ds, 4, seed=7), k + 3)
    resumed = BatchStream(ds, 4, seed=7, start_step=k)
    assert resumed.step == k and resumed.epoch == k // 2
    for want, got in zip(fresh[k:], _take(resumed, 3)):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert resumed.step == k + 3


def test_stream_workers_give_the_same_batches(animals):
    ds = FolderDataset(animals, image_size=S)
    plain = _take(BatchStream(ds, 4, seed=1), 4)
    stream = BatchStream(ds, 4, seed=1, num_workers=2)
    workers = _take(stream, 4)
    stream.close()
    for a, b in zip(plain, workers):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(plain[0][0], _take(BatchStream(ds, 4, seed=2), 1)[0][0])
