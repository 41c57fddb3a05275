"""`--loader gpu-cache`: every image decoded once, kept as uint8 on the GPU, augmented on the device.

At training time the only host work per batch is drawing the flip/crop decisions (the same draws as
the reference loader, `sample_augment`); the crop, flip and scaling to [-1, 1] are one gather and
one elementwise op on the device. The cache holds each image resized (shorter side `resize_to`) but
not flipped: a flip commutes exactly with PIL's bilinear resize, so the result equals the reference
loader's tensor bit for bit. Synthetic images are rendered on the device directly.

Storage: one flat uint8 buffer of HWC images with per-image offsets, on the GPU when the data takes
at most `GPU_FRACTION` of the free GPU memory, else in pinned host memory (logged), where the
gather runs on the CPU and the batch is copied asynchronously.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .loader import Stream, nhwc_to_unit_range, plan_for, sample_augment, stored_sizes
from .transforms import DataError

log = logging.getLogger("g2g_fast")

# The training step needs the rest of the GPU memory: the cache may take half of what is free.
GPU_FRACTION = 0.5


def cache_bytes(dataset) -> int:
    return sum(w * h * 3 for w, h in stored_sizes(dataset))


def placement(nbytes: int, device: torch.device, budget: int | None = None) -> tuple[str, str]:
    """("device" | "host", why): where a cache of `nbytes` lives for training on `device`."""
    if device.type != "cuda":
        return "host", f"training on {device}"
    if budget is None:
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * GPU_FRACTION)
    if nbytes <= budget:
        return "device", f"{nbytes / 2**20:.0f} MiB fits in the GPU budget of {budget / 2**20:.0f} MiB"
    return "host", (f"{nbytes / 2**20:.0f} MiB does not fit in the GPU budget of {budget / 2**20:.0f} MiB "
                    f"(half the free GPU memory); kept in pinned host memory, cropped on the CPU")


class ImageCache:
    """All images of `dataset` as uint8 HWC in one flat buffer, with offsets/sizes/labels."""

    def __init__(self, dataset, device: str | torch.device = "cpu", budget: int | None = None,
                 threads: int | None = None):
        self.device = torch.device(device)
        sizes = stored_sizes(dataset)
        n = len(sizes)
        numel = [w * h * 3 for w, h in sizes]
        self.nbytes = sum(numel)
        where, self.why = placement(self.nbytes, self.device, budget)
        self.on_device = where == "device"
        store = self.device if self.on_device else torch.device("cpu")
        pin = self.device.type == "cuda" and not self.on_device
        t0 = time.perf_counter()
        # Synthetic images on a GPU are rendered straight into device memory; files are decoded into
        # host memory (pinned when the cache stays there) and moved once at the end.
        synthetic_on_gpu = not dataset.augmented and store.type == "cuda"
        buf = (torch.empty(self.nbytes, dtype=torch.uint8, device=store) if synthetic_on_gpu
               else torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin))
        offsets = [0] * n
        for i in range(1, n):
            offsets[i] = offsets[i - 1] + numel[i - 1]
        # Index `i` is served by `source[i]`: itself, or the next decodable index when its file fails
        # to decode (the reference loader's replacement, see FolderDataset._decode).
        source = list(range(n))

        def fill(i: int) -> None:
            j, img = dataset.stored(i, store if synthetic_on_gpu else "cpu")
            source[i] = j
            if j == i:
                if tuple(img.shape) != (sizes[i][1], sizes[i][0], 3):
                    raise DataError(f"{getattr(dataset, 'paths', ['?'] * n)[i]}: decoded to {tuple(img.shape)}, "
                                    f"its header said {sizes[i][0]}x{sizes[i][1]}; re-save the file")
                buf[offsets[i]:offsets[i] + numel[i]].copy_(img.reshape(-1))

        if dataset.augmented and n > 1:  # PIL decodes and resizes with the GIL released
            with ThreadPoolExecutor(max_workers=threads or min(16, os.cpu_count() or 1)) as pool:
                list(pool.map(fill, range(n)))
        else:
            for i in range(n):
                fill(i)
        self.buffer = buf.to(store)  # a no-op when it is already there
        self.source = source
        self.sizes = sizes
        self._offsets = offsets  # host copy for the per-sample path
        self.offsets = torch.tensor(offsets, dtype=torch.int64, device=store)
        self.widths = torch.tensor([w for w, _ in sizes], dtype=torch.int64, device=store)
        self.labels = torch.tensor(dataset.labels, dtype=torch.int64, device=store)
        self.seconds = time.perf_counter() - t0

    def crops(self, meta: torch.Tensor, size: int, gather: bool | None = None) -> torch.Tensor:
        """uint8 (B, size, size, 3) on the storage device. `meta` (B, 4) int64 on that device holds,
        per sample, the image index, the crop's top and left, and the flip flag. `gather`: one
        indexing op for the batch (default on a GPU: one kernel, no per-sample launches); else one
        strided copy per sample (default in host memory: ~9x faster there than the gather's
        per-pixel index arithmetic)."""
        if gather is None:
            gather = self.buffer.device.type == "cuda"
        return self._gather(meta, size) if gather else self._slices(meta, size)

    def _gather(self, meta: torch.Tensor, size: int) -> torch.Tensor:
        store = self.buffer.device
        idx, top, left, flip = meta.unbind(1)
        width = self.widths[idx]
        r = torch.arange(size, device=store)
        rows = top[:, None] + r                                   # (B, S)
        # Column x of the crop of the flipped image is column W-1-(left+x) of the stored one.
        cols = torch.where(flip[:, None].bool(), width[:, None] - 1 - left[:, None] - r, left[:, None] + r)
        # One index per pixel (not per byte): the buffer viewed as (pixels, 3) rows; every image
        # starts on a pixel boundary (its offset is a multiple of 3).
        pixel = ((self.offsets[idx] // 3).view(-1, 1, 1)
                 + rows.view(-1, size, 1) * width.view(-1, 1, 1) + cols.view(-1, 1, size))
        return self.buffer.view(-1, 3)[pixel]

    def _slices(self, meta: torch.Tensor, size: int) -> torch.Tensor:
        out = torch.empty(len(meta), size, size, 3, dtype=torch.uint8, device=self.buffer.device)
        for b, (i, top, left, flip) in enumerate(meta.tolist()):
            w, h = self.sizes[i]
            off = self._offsets[i]
            img = self.buffer[off:off + h * w * 3].view(h, w, 3)
            if flip:  # the same columns as _gather: stored W-1-left-x for crop column x
                out[b] = img[top:top + size, w - left - size:w - left].flip(1)
            else:
                out[b] = img[top:top + size, left:left + size]
        return out


class CachedStream(Stream):
    """The GPU-cache loader: same batches as `BatchStream` for the same arguments, on `device`."""

    name = "gpu-cache"

    def __init__(self, dataset, batch_size: int, seed: int = 0, start_step: int = 0,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                 budget: int | None = None, cache: ImageCache | None = None, shots: int = 0):
        if start_step < 0:
            raise DataError(f"start_step must be >= 0, got {start_step}")
        self.plan = plan_for(dataset, batch_size, seed, True, rank, world_size, shots)
        self.shots = shots
        self.dataset, self.seed, self.device = dataset, seed, torch.device(device)
        self.batches_per_epoch, self.step = self.plan.per_epoch, start_step
        self.cache = cache if cache is not None else ImageCache(dataset, self.device, budget)
        log.info("gpu-cache: %d images, %.1f MiB uint8 %s (%s), built in %.1f s", len(dataset),
                 self.cache.nbytes / 2**20, "on " + str(self.device) if self.cache.on_device else "in host memory",
                 self.cache.why, self.cache.seconds)

    def __next__(self):
        rows = []
        for epoch, i in self.plan.load_keys(self.step):  # with K-shot: the shot images in the same gather
            j = self.cache.source[i]
            w, h = self.cache.sizes[j]
            # The generator belongs to the requested index, the pixels to its replacement: as in
            # the reference loader.
            a = sample_augment(self.dataset, self.seed, epoch, i, w, h)
            rows.append((j, a.top, a.left, int(a.flip)))
        meta = torch.tensor(rows, dtype=torch.int64)
        store = self.cache.buffer.device
        if store.type == "cuda":  # one small asynchronous copy: no host sync on the training stream
            meta = meta.pin_memory().to(store, non_blocking=True)
        pixels = self.cache.crops(meta, self.dataset.image_size)
        labels = self.cache.labels[meta[:, 0]]
        if pixels.device != self.device:  # host cache: pinned batch, asynchronous copy
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
        x = nhwc_to_unit_range(pixels)
        self.step += 1
        return self.split(x, labels)
