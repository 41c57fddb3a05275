"""What the loader benchmark (`test_bench_loaders.py`) and `gpu_report.py` share: a JPEG folder
written on the fly, the loaders to measure, and img/s of a loader alone and of training fed by it.

The folder: `n` JPEGs (quality 90) in 16 class folders, about 170x150 px with widths varying from
150 to 190 (so the resize to 140 on the shorter side takes several shapes), smooth random colour
fields plus mild noise, like natural images to a JPEG codec.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _report_common import verdict
from _shapes import sync
from g2g_fast.data import FolderDataset, build_stream
from g2g_fast.data.dali import dali_available

LOADERS = ("torch", "gpu-cache", "dali")
CLASSES = 16


def write_jpeg_folder(root: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = 150 + int(rng.integers(0, 41)), 150
        small = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        noisy = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
        path = root / f"class_{i % CLASSES:02d}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(path, quality=90)
    return root


def skip_reason(name: str) -> str | None:
    if name == "dali" and not dali_available():
        return 'NVIDIA DALI is not installed (pip install -e ".[dali]")'
    return None


def open_loader(name: str, root: Path, image_size: int, batch: int, device, workers: int, shots: int = 0):
    """(dataset, stream, setup seconds, first batch on the CPU): the setup includes the file check
    and, for gpu-cache, decoding every image once. Every loader's first batch (seed 0, step 0) is
    the same images with the same flips and crops, so comparing them checks the loader on this
    device (`parity`). `shots` K > 0: each batch also brings K other images per sample (K-shot class
    codes in training, `class_shots`)."""
    t = time.perf_counter()
    ds = FolderDataset(root, image_size=image_size)
    stream = build_stream(name, ds, batch, seed=0, device=device, workers=workers, shots=shots)
    x, y, *_ = next(stream)  # DALI builds and prefetches, the torch workers start, on the first batch
    sync(device)
    return ds, stream, time.perf_counter() - t, (x.cpu(), y.cpu())


def parity(batch, ref) -> dict:
    """A loader's first batch against the torch loader's, in 8-bit levels."""
    (x, y), (xr, yr) = batch, ref
    diff = (x.float() - xr.float()).abs() * 127.5
    return dict(labels_equal=bool(torch.equal(y, yr)), max_level_diff=round(diff.max().item(), 2),
                mean_level_diff=round(diff.mean().item(), 4), frac_pixels_differ=round((diff > 0.5).float().mean().item(), 4))


def loader_img_per_s(stream, batches: int, device) -> float:
    """Training images (the batch's B, not its K-shot images) per second of `batches` batches, each
    moved to `device` (already there for the GPU loaders) and waited for."""
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        x, _, *shots = next(stream)
        x = x.to(device, non_blocking=True)
        if shots:
            shots[0].to(device, non_blocking=True)
        n += x.shape[0]
    sync(device)
    return n / (time.perf_counter() - t)


def train_img_per_s(run, steps: int, device, stream=None) -> float:
    """Images per second of `steps` training iterations of a bench/_train.py `Run`, on its fixed
    on-device batch (stream None: the synthetic upper bound) or on batches from `stream`."""
    t = time.perf_counter()
    n = 0
    for _ in range(steps):
        if stream is None:
            x, y = run.x, run.y
        else:
            x, y = next(stream)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        run.ap.train_step(x, y)
        n += x.shape[0]
    sync(device)
    return n / (time.perf_counter() - t)


# ------------------------------------------------------------------------------------------
# gpu_report.py's "loaders" section (its Ctx supplies dev, smoke, scale, model_impl, error()).
# ------------------------------------------------------------------------------------------
LOADER_TARGETS = {"loader_vs_trainer": 3.0, "fed_vs_synthetic": 0.95}


def report_section(ctx, out: dict) -> None:
    """img/s of every loader; then the fast FUNIT2FUNIT trainer on a fixed on-device batch against
    the same trainer fed by the loader `--loader auto` picks, and issue 6's targets: that loader
    delivers >= 3x the trainer's img/s, and the fed trainer reaches >= 95% of the fixed-batch one."""
    import tempfile

    import _train as T
    from g2g_fast.data import choose_loader

    n, batch, size, batches, steps = (24, 4, 32, 2, 1) if ctx.smoke else (2048, 64, 128, 32, 12)
    workers = min(8, __import__("os").cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_jpeg_folder(Path(tmp), n)
        auto, why = choose_loader("auto", FolderDataset(root, image_size=size), ctx.dev)
        out.update(images=n, batch_size=batch, image_size=size, workers=workers, auto=auto, auto_why=why,
                   targets=LOADER_TARGETS, rows=[])
        first = {}
        for name in LOADERS:
            row, stream = {"loader": name}, None
            out["rows"].append(row)
            if skip_reason(name):
                row["skipped"] = skip_reason(name)
                continue
            try:
                _, stream, setup_s, first[name] = open_loader(name, root, size, batch, ctx.dev, workers)
                row.update(setup_s=round(setup_s, 2), img_per_s=loader_img_per_s(stream, batches, ctx.dev))
                if "torch" in first:  # torch runs first: the reference for the others
                    row["parity_vs_torch"] = parity(first[name], first["torch"])
            except Exception as e:
                row["error"] = ctx.error(f"loaders {name}", e)
            finally:
                if stream is not None:
                    stream.close()
        values = dict(T.SCALES[ctx.scale]["funit2funit"], image_size=size, batch_size=batch)
        # Feed the trainer from the loader auto picks, or, if that one failed here, from the
        # fastest one that worked (said in the table).
        rates = {r["loader"]: r["img_per_s"] for r in out["rows"] if r.get("img_per_s")}
        fed_by = auto if auto in rates else max(rates, key=rates.get, default=None)
        stream = None
        try:
            with T.numerics("fast"):
                run = T.prepare("funit2funit", "fast", ctx.dev, values, count=False, adain_impl=ctx.model_impl)
                train_img_per_s(run, 1 if ctx.smoke else 3, ctx.dev)  # warm-up (autotuning, allocator)
                synthetic = train_img_per_s(run, steps, ctx.dev)  # measured before any loader can fail
                out["train"] = dict(loader=fed_by, steps=steps, synthetic_img_per_s=synthetic, fed_img_per_s=None,
                                    fed_vs_synthetic=None, loader_vs_trainer=None)
                if fed_by is None:
                    raise RuntimeError("no loader produced batches (see the rows)")
                _, stream, _, _ = open_loader(fed_by, root, size, batch, ctx.dev, workers)
                fed = train_img_per_s(run, steps, ctx.dev, stream)
            out["train"].update(fed_img_per_s=fed, fed_vs_synthetic=fed / synthetic,
                                loader_vs_trainer=rates[fed_by] / synthetic)
            out["verdicts"] = {k: (None if out["train"][k] is None else bool(out["train"][k] >= t))
                               for k, t in LOADER_TARGETS.items()}
        except Exception as e:
            out["train_error"] = ctx.error("loaders train", e)
        finally:
            if stream is not None:
                stream.close()


def report_markdown(sec: dict, fmt) -> list:
    """Markdown lines of the section; `fmt(value, spec)` formats a possibly-missing number."""
    L = ["", f"## Loaders ({sec.get('image_size', '-')}^2 crops of {sec.get('images', '-')} generated JPEGs, "
         f"batch {sec.get('batch_size', '-')}, {sec.get('workers', '-')} workers)", "",
         f"--loader auto picks **{sec.get('auto', '-')}**: {sec.get('auto_why', '-')}", "",
         "First batch against the torch loader's (same images, flips and crops): gpu-cache must be "
         "equal (0 levels); dali within its resampler/decoder tolerance (data/dali.py).", "",
         "| loader | img/s | setup s | labels equal | max / mean level diff | note |", "|---|---|---|---|---|---|"]
    for r in sec.get("rows", []):
        par = r.get("parity_vs_torch", {})
        L.append(f"| {r['loader']} | {fmt(r.get('img_per_s'), '.0f')} | {fmt(r.get('setup_s'), '.2f')} "
                 f"| {par.get('labels_equal', '-')} | {fmt(par.get('max_level_diff'), '.1f')} / "
                 f"{fmt(par.get('mean_level_diff'), '.3f')} | {r.get('skipped') or r.get('error') or ''} |")
    tr, v = sec.get("train"), sec.get("verdicts", {})
    if tr:
        L += ["", f"Fast FUNIT2FUNIT trainer, {tr['steps']} steps: {fmt(tr['synthetic_img_per_s'], '.1f')} img/s on a "
              f"fixed on-device batch, {fmt(tr['fed_img_per_s'], '.1f')} img/s fed by {tr['loader']}"
              + ("" if tr["loader"] == sec.get("auto") else f" (auto's pick, {sec.get('auto')}, failed here)") + ".", "",
              "| target | measured | verdict |", "|---|---|---|",
              f"| loader img/s >= 3x the trainer's | {fmt(tr['loader_vs_trainer'], '.2f')}x "
              f"| {verdict(v.get('loader_vs_trainer'))} |",
              f"| training fed by the loader >= 95% of fixed-batch img/s | {fmt(tr['fed_vs_synthetic'], '.0%')} "
              f"| {verdict(v.get('fed_vs_synthetic'))} |"]
    if "train_error" in sec:
        L.append(f"\ntraining error: {sec['train_error']}")
    return L
