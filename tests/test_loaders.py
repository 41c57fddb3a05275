"""The loaders (`--loader torch | gpu-cache | dali`) give the same batches, shard by rank, resume
exactly, skip bad files, and `--loader auto` picks and explains. DALI runs in its CPU-only mode.

Tolerances, DALI vs the reference (PIL) loader, both decoding on the CPU:
- images already at the stored size (shorter side = resize_to, so no resampling): exact, PNG and
  JPEG (DALI's CPU decoder and PIL are both libjpeg-turbo);
- resampled images (smooth content): DALI's antialiased linear resize differs from PIL's bilinear
  by at most 2 levels, on average under 0.5 level (the module docstring of g2g_fast/data/dali.py).
The GPU cache is exact everywhere (it stores PIL's resize and replays the flip/crop on the device).
"""
import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from g2g_fast.data import (BatchStream, CachedStream, DataError, FolderDataset, StepPlan, SyntheticDataset,
                           build_stream, choose_loader)
from g2g_fast.data import select
from g2g_fast.data.dali import dali_available
from g2g_fast.data.gpu_cache import ImageCache, placement
from g2g_fast.train import main

from conftest import requires_cuda

S = 24                  # crop; resize_to defaults to round(24 * 140 / 128) = 26
R = 26
LEVEL = 1 / 127.5       # one 8-bit level in [-1, 1] units
needs_dali = pytest.mark.skipif(not dali_available(), reason='NVIDIA DALI is not installed (pip install -e ".[dali]")')


def _smooth(w, h, seed, mode="RGB"):
    """Low-frequency colour image: upsampled noise, so resamplers agree to about a level."""
    small = np.random.default_rng(seed).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    return img.convert(mode)


@pytest.fixture
def photos(tmp_path):
    """3 classes of smooth images, PNG and JPEG, some at the stored size (shorter side 26, no
    resampling), some larger, one smaller than the crop; greyscale, RGBA and palette files (DALI gets
    these re-encoded), a garbage file and a truncated JPEG (skipped up front)."""
    root = tmp_path / "photos"
    files = {
        "cat/a.png": _smooth(R, 31, 0), "cat/b.jpg": _smooth(33, R, 1), "cat/c.png": _smooth(40, 52, 2),
        "cat/d.jpg": _smooth(45, 37, 3), "cat/e.png": _smooth(20, 16, 4),
        "dog/a.png": _smooth(R, R, 5, "L"), "dog/b.png": _smooth(30, R, 6, "RGBA"),
        "dog/c.jpg": _smooth(R, 29, 7), "dog/d.png": _smooth(38, 44, 8).convert("P"),
        "fox/a.jpg": _smooth(50, 40, 9), "fox/b.png": _smooth(R, 27, 10), "fox/c.jpg": _smooth(29, 35, 11),
    }
    for name, img in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / name, quality=95) if name.endswith(".jpg") else img.save(root / name)
    (root / "dog/bad.jpg").write_bytes(b"not an image" * 30)
    buf = io.BytesIO()
    _smooth(40, 40, 12).save(buf, format="JPEG", quality=95)
    (root / "fox/trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return root


def _take(stream, k):
    return [next(stream) for _ in range(k)]


def _synthetic():
    return SyntheticDataset(image_size=16, num_classes=3, per_class=5)


# ---------------------------------------------------------------- the shared schedule


@pytest.mark.parametrize("world", [1, 2, 3])
def test_plan_shards_are_disjoint_and_cover_each_epoch(world):
    n, batch = 23, 3
    plans = [StepPlan(n, batch, seed=5, rank=r, world_size=world) for r in range(world)]
    per_epoch = plans[0].per_epoch
    assert per_epoch == n // (batch * world)
    for epoch in range(2):
        shards = [[k for s in range(epoch * per_epoch, (epoch + 1) * per_epoch) for k in p.keys(s)] for p in plans]
        assert all({e for e, _ in shard} == {epoch} for shard in shards)
        indices = [[i for _, i in shard] for shard in shards]
        for shard in indices:
            assert len(shard) == len(set(shard)) == per_epoch * batch  # each image at most once per rank
        union = [i for shard in indices for i in shard]
        assert len(set(union)) == len(union)  # ranks are disjoint ...
        order = torch.randperm(n, generator=torch.Generator().manual_seed(5 * 1_000_003 + epoch)).tolist()
        assert sorted(union) == sorted(order[:per_epoch * batch * world])  # ... and cover the epoch
    # An odd per-rank batch: the ranks' contiguous slices, concatenated in rank order, are the batch
    # of one process with world*batch (even batches interleave halves to keep G2G's pairs:
    # tests/test_distributed_units.py).
    single = StepPlan(n, batch * world, seed=5)
    for step in range(3):
        assert [k for p in plans for k in p.keys(step)] == single.keys(step)


def test_plan_errors():
    with pytest.raises(DataError, match="fewer than the batch size 8 .2 ranks x 4."):
        StepPlan(7, 4, world_size=2)
    with pytest.raises(DataError, match="rank 2 is not in"):
        StepPlan(20, 4, rank=2, world_size=2)


# ---------------------------------------------------------------- GPU cache


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("data", ["folder", "synthetic"])
def test_cache_equals_torch_loader_bitwise(photos, data, world):
    ds = FolderDataset(photos, image_size=S) if data == "folder" else _synthetic()
    cache = ImageCache(ds, "cpu")  # built once, shared by the ranks
    for rank in range(world):
        ref = BatchStream(ds, 2, seed=3, rank=rank, world_size=world)
        fast = CachedStream(ds, 2, seed=3, rank=rank, world_size=world, cache=cache)
        steps = 2 * ref.batches_per_epoch + 1  # crosses two epoch boundaries
        for k, ((x1, y1), (x2, y2)) in enumerate(zip(_take(ref, steps), _take(fast, steps))):
            assert torch.equal(x1, x2) and torch.equal(y1, y2), f"rank {rank} step {k}"
            assert x2.dtype == torch.float32 and y2.dtype == torch.int64
        assert fast.step == steps and fast.epoch == 2


def test_cache_gather_equals_slices(photos):
    """The two crop paths (one gather on a GPU, per-sample copies in host memory) agree on
    images of several sizes, every crop position, flipped or not."""
    ds = FolderDataset(photos, image_size=S)
    cache = ImageCache(ds, "cpu")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, (w, h) in enumerate(cache.sizes):
        for _ in range(4):
            rows.append((i, int(torch.randint(0, h - S + 1, (), generator=g)),
                         int(torch.randint(0, w - S + 1, (), generator=g)), len(rows) % 2))
    assert len({(w, h) for w, h in cache.sizes}) > 1 and any(r[1] or r[2] for r in rows)
    meta = torch.tensor(rows, dtype=torch.int64)
    assert torch.equal(cache.crops(meta, S, gather=True), cache.crops(meta, S, gather=False))


def test_cache_flip_and_crop_vary(photos):
    """Not a constant: the equality above must be about real augmentation."""
    ds = FolderDataset(photos, image_size=S)
    stream = CachedStream(ds, len(ds), seed=0)
    a, b = _take(stream, 2)
    assert not torch.equal(a[0], b[0])


def test_cache_resume_is_exact(photos):
    ds = FolderDataset(photos, image_size=S)
    cache = ImageCache(ds, "cpu")
    fresh = _take(CachedStream(ds, 4, seed=9, cache=cache), 6)
    resumed = CachedStream(ds, 4, seed=9, start_step=4, cache=cache)
    for want, got in zip(fresh[4:], _take(resumed, 2)):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_cache_replaces_an_undecodable_file_like_the_reference(photos, monkeypatch):
    import g2g_fast.data.folder as folder
    real = folder.load_rgb
    monkeypatch.setattr(folder, "load_rgb", lambda p: (_ for _ in ()).throw(OSError("broken"))
                        if p.endswith("cat/c.png") else real(p))
    ds = FolderDataset(photos, image_size=S)
    cache = ImageCache(ds, "cpu")
    i = next(k for k, p in enumerate(ds.paths) if p.endswith("cat/c.png"))
    assert cache.source[i] == i + 1 and str(photos / "cat/c.png") in ds.skipped
    for (x1, y1), (x2, y2) in zip(_take(BatchStream(ds, 5, seed=1), 4), _take(CachedStream(ds, 5, seed=1, cache=cache), 4)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_cache_placement():
    cuda = torch.device("cuda")
    assert placement(10, torch.device("cpu"))[0] == "host"
    assert placement(100, cuda, budget=200) == ("device", "0 MiB fits in the GPU budget of 0 MiB")
    where, why = placement(300 * 2**20, cuda, budget=200 * 2**20)
    assert where == "host" and "300 MiB does not fit" in why and "pinned host memory" in why


# ---------------------------------------------------------------- DALI (CPU-only mode)


def _stored_size(info):
    return min(info.width, info.height) == R


@needs_dali
def test_dali_reencoded_cache_is_bounded(photos, monkeypatch, caplog):
    """Non-RGB files are re-encoded as PNG and cached up to REENCODED_CACHE_BYTES; past it they
    are re-encoded on each read, with the same pixels."""
    import g2g_fast.data.dali as dali_mod
    ds = FolderDataset(photos, image_size=S)
    reencoded = [i for i, info in enumerate(ds.infos) if info.mode not in dali_mod._DIRECT_MODES]
    assert len(reencoded) >= 2
    one = len(dali_mod._png_bytes(ds.paths[reencoded[0]]))
    unbounded = dali_mod.DaliStream(ds, 2, seed=4, threads=2)
    monkeypatch.setattr(dali_mod, "REENCODED_CACHE_BYTES", one)
    caplog.set_level("INFO", logger="g2g_fast")
    bounded = dali_mod.DaliStream(ds, 2, seed=4, threads=2)
    for _ in range(3 * bounded.batches_per_epoch):
        (x1, y1), (x2, y2) = next(unbounded), next(bounded)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert len(unbounded._reencoded) >= 2  # read more than the bounded cache holds
    assert 0 < bounded._reencoded_bytes <= one and set(bounded._reencoded) < set(unbounded._reencoded)
    assert "re-encoded on every read" in caplog.text
    unbounded.close()
    bounded.close()


@needs_dali
@pytest.mark.parametrize("world", [1, 2])
def test_dali_equals_torch_loader(photos, world):
    from g2g_fast.data.dali import DaliStream
    ds = FolderDataset(photos, image_size=S)
    exact_files = {i for i, info in enumerate(ds.infos) if _stored_size(info)}
    assert len(exact_files) >= 5  # PNG and JPEG, RGB, grey and RGBA among them
    seen_exact = seen_resampled = 0
    for rank in range(world):
        ref = BatchStream(ds, 2, seed=4, rank=rank, world_size=world)
        dali = DaliStream(ds, 2, seed=4, rank=rank, world_size=world, threads=2)
        steps = ref.batches_per_epoch + 1
        plan = StepPlan(len(ds), 2, seed=4, rank=rank, world_size=world)
        for k in range(steps):
            (x1, y1), (x2, y2) = next(ref), next(dali)
            assert torch.equal(y1, y2), f"labels differ at rank {rank} step {k}"
            assert x2.shape == x1.shape and x2.dtype == torch.float32
            for b, (_, i) in enumerate(plan.keys(k)):
                err = (x1[b] - x2[b]).abs()
                if i in exact_files:
                    assert torch.equal(x1[b], x2[b]), f"{ds.paths[i]} (stored size) differs"
                    seen_exact += 1
                else:
                    assert err.max() <= 2 * LEVEL + 1e-6, f"{ds.paths[i]}: {err.max() / LEVEL:.1f} levels"
                    assert err.mean() <= 0.5 * LEVEL
                    seen_resampled += 1
        dali.close()
    assert seen_exact and seen_resampled


@needs_dali
def test_dali_resume_is_exact_and_skips_bad_files(photos, caplog):
    from g2g_fast.data.dali import DaliStream
    with caplog.at_level(logging.WARNING, logger="g2g_fast"):
        ds = FolderDataset(photos, image_size=S)
    # Reported, not fed to DALI (a truncated JPEG would abort the whole pipeline).
    assert sorted(p.split("/")[-1] for p in ds.skipped) == ["bad.jpg", "trunc.jpg"]
    assert "bad.jpg" in caplog.text and "trunc.jpg" in caplog.text
    fresh = _take(DaliStream(ds, 3, seed=2, threads=1), 2 * 3 + 2)  # two whole epochs and more
    resumed = DaliStream(ds, 3, seed=2, start_step=5, threads=1)
    for want, got in zip(fresh[5:], _take(resumed, 3)):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


@needs_dali
@pytest.mark.parametrize("layout", ["celeba", "list_file"])
def test_dali_reads_celeba_and_list_files(tmp_path, photos, layout):
    """The other two file layouts: the CelebA identity file (identities relabelled) and a FUNIT
    list file. Images at the stored size, so DALI must equal the reference loader exactly."""
    from g2g_fast.data import build_dataset
    from g2g_fast.data.dali import DaliStream
    if layout == "celeba":
        root = tmp_path / "celeba"
        ident = {1: 10, 2: 10, 3: 2, 4: 2, 5: 7, 6: 7}
        for k in ident:
            path = root / f"img_align_celeba/{k:06d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            _smooth(R, R + k, k).save(path, quality=95)
        (root / "identity_CelebA.txt").write_text("".join(f"{k:06d}.jpg {v}\n" for k, v in ident.items()))
        (root / "list_eval_partition.txt").write_text("".join(f"{k:06d}.jpg 0\n" for k in ident))
    else:
        root = photos
        (root / "train_list.txt").write_text("cat/a.png\ndog/a.png\nfox/b.png\ncat/b.jpg\ndog/c.jpg\n")
    ds = build_dataset(str(root), image_size=S)
    assert all(_stored_size(info) for info in ds.infos)
    ref, dali = BatchStream(ds, 2, seed=6), DaliStream(ds, 2, seed=6, threads=1)
    for _ in range(2 * ref.batches_per_epoch):
        (x1, y1), (x2, y2) = next(ref), next(dali)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    if layout == "celeba":
        assert sorted(set(ds.labels)) == [0, 1, 2] and ds.class_names == ["2", "7", "10"]


@needs_dali
def test_dali_refuses_synthetic_data():
    from g2g_fast.data.dali import DaliStream
    with pytest.raises(DataError, match="synthetic data has none; use --loader gpu-cache"):
        DaliStream(_synthetic(), 2)


# ---------------------------------------------------------------- on a GPU


@requires_cuda
@pytest.mark.parametrize("data", ["folder", "synthetic"])
def test_cache_on_cuda_equals_torch_loader(photos, data):
    """The device gather (and, for synthetic data, rendering on the GPU) against the reference:
    folder data bit for bit; synthetic within one level (the GPU's transcendental functions may
    round a pixel differently, data/synthetic.py)."""
    ds = FolderDataset(photos, image_size=S) if data == "folder" else _synthetic()
    ref, fast = BatchStream(ds, 2, seed=3), CachedStream(ds, 2, seed=3, device="cuda")
    assert fast.cache.on_device
    for (x1, y1), (x2, y2) in zip(_take(ref, 5), _take(fast, 5)):
        assert x2.is_cuda and y2.is_cuda and torch.equal(y1, y2.cpu())
        err = (x1 - x2.cpu()).abs().max()
        assert err == 0 if data == "folder" else err <= LEVEL + 1e-6


@requires_cuda
@needs_dali
def test_dali_on_cuda_equals_torch_loader(photos):
    """nvJPEG + DALI's GPU resize against the reference: labels exact, pixels within the resampler /
    decoder tolerance (a few levels; nvJPEG is not bit-exact with libjpeg-turbo)."""
    from g2g_fast.data.dali import DaliStream
    ds = FolderDataset(photos, image_size=S)
    ref, dali = BatchStream(ds, 2, seed=4), DaliStream(ds, 2, seed=4, device="cuda", threads=2)
    for (x1, y1), (x2, y2) in zip(_take(ref, 5), _take(dali, 5)):
        assert x2.is_cuda and torch.equal(y1, y2.cpu())
        err = (x1 - x2.cpu()).abs()
        assert err.max() <= 4 * LEVEL + 1e-6 and err.mean() <= 0.5 * LEVEL


# ---------------------------------------------------------------- choosing


def test_choose_loader(photos, monkeypatch):
    ds, syn = FolderDataset(photos, image_size=S), _synthetic()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_loader("auto", ds, cpu)[0] == "torch"
    assert choose_loader("gpu-cache", ds, cpu) == ("gpu-cache", "requested")
    assert choose_loader("auto", syn, cuda)[0] == "gpu-cache"
    monkeypatch.setattr(select, "dali_available", lambda: True)
    assert choose_loader("auto", ds, cuda) == ("dali", "DALI is installed: GPU decoding")
    with pytest.raises(DataError, match="synthetic data has none"):
        choose_loader("dali", syn, cpu)
    monkeypatch.setattr(select, "dali_available", lambda: False)
    with pytest.raises(DataError, match=r'--loader dali: NVIDIA DALI is not installed; pip install -e "\.\[dali\]"'):
        choose_loader("dali", ds, cpu)
    monkeypatch.setattr(select, "placement", lambda nbytes, device: ("device", "fits"))
    name, why = choose_loader("auto", ds, cuda)
    assert name == "gpu-cache" and "DALI is not installed" in why
    monkeypatch.setattr(select, "placement", lambda nbytes, device: ("host", "too big; pinned"))
    assert choose_loader("auto", ds, cuda) == ("torch", 'DALI is not installed (pip install -e ".[dali]"  '
                                                        '(the nvidia-dali-cuda130 wheel)) and the decoded data too big')
    with pytest.raises(DataError, match="--loader 'x' is unknown"):
        choose_loader("x", ds, cpu)


def test_build_stream_logs_the_choice(photos, caplog):
    with caplog.at_level(logging.INFO, logger="g2g_fast"):
        stream = build_stream("auto", _synthetic(), 2, device="cpu")
    assert isinstance(stream, BatchStream) and "loader torch: training on cpu" in caplog.text


# ---------------------------------------------------------------- through the trainer


def _train_args(out, loader, data, steps=2):
    return ["--device", "cpu", "--image-size", "32", "--batch-size", "4", "--steps", str(steps),
            "--out", str(out), "--log-every", "1", "--sample-every", "100", "--ckpt-every", "100",
            "--data", str(data), "--loader", loader,
            "--set", "nf=8", "--set", "nf_mlp=16", "--set", "latent_dim=8", "--set", "dis_nf=8",
            "--set", "dis_n_res_blks=4"]


def _losses(out):
    return [{k: v for k, v in json.loads(line).items() if k.endswith(("total", "step"))}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loader", ["gpu-cache", pytest.param("dali", marks=needs_dali)])
def test_training_with_each_loader_matches_torch(photos, tmp_path, loader):
    assert main(_train_args(tmp_path / "torch", "torch", photos)) == 0
    assert main(_train_args(tmp_path / loader, loader, photos)) == 0
    ref, got = _losses(tmp_path / "torch"), _losses(tmp_path / loader)
    assert [r["step"] for r in got] == [1, 2]
    cfg = json.loads((tmp_path / loader / "config.json").read_text())
    assert cfg["trainer"]["loader"] == loader and cfg["run"]["loader"] == loader
    if loader == "gpu-cache":
        assert ref == got  # same batches bit for bit, so the same losses
    else:  # inputs differ by a level or two (the resampler): the first step's losses by ~1%;
        # later steps drift further apart, as any perturbation of a GAN does
        a, b = ref[0], got[0]
        assert all(abs(a[k] - b[k]) <= 0.02 * abs(a[k]) for k in a if k != "step"), (a, b)


def test_dali_flag_without_dali_is_one_line(photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(select, "dali_available", lambda: False)
    assert main(_train_args(tmp_path, "dali", photos)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ('error: --loader dali: NVIDIA DALI is not installed; pip install -e ".[dali]"  '
                       '(the nvidia-dali-cuda130 wheel)')
