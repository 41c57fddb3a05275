"""`--loader dali`: NVIDIA DALI decodes (nvJPEG on the GPU, libjpeg-turbo in CPU-only mode), flips,
resizes and crops; the optional extra `pip install -e ".[dali]"` (nvidia-dali-cuda130).

Which files a step reads, and their flip/crop, come from the same schedule as every other loader
(`StepPlan` + `sample_augment`): a per-epoch permutation of the whole dataset, drop-last batches,
rank r's shard of each global batch, exact resume at any step. The files are fed through
`fn.external_source` rather than `fn.readers.file`, whose shuffle (a 1024-sample buffer, or its
own per-epoch permutation) cannot reproduce that schedule, so a DALI run could not be resumed
exactly or compared with the reference loader; sharding (`shard_id`/`num_shards`) is the plan's.

Equal to the reference loader up to the resampler: files already at the stored size (shorter side
`resize_to`) give the same pixels for PNG and, in CPU-only mode, for JPEG (both libjpeg-turbo);
DALI's antialiased linear resize differs from PIL's bilinear one by at most one 8-bit level on
smooth (natural) images, more on pixel noise (up to ~10 levels at a 2x downscale); nvJPEG may
differ from libjpeg-turbo by a level or two. DALI's decoder takes 16-bit PNGs to 8 bits by
rounding (PIL, and so the reference, by truncating) and ignores palette and grey/RGB transparency
keys, so only files that store 8-bit RGB or grey without transparency
(`transforms.decodes_as_stored`) go to DALI as they are; every other file (16-bit, alpha, palette,
1-bit, CMYK, ...) is decoded once by PIL through `transforms.load_rgb`, exactly as the reference
does, and fed to DALI as lossless PNG, so they match too.
Truncated files, on which DALI would abort the pipeline, are skipped up front by the datasets'
end-marker check (`transforms.image_info`), as they are for every loader.
"""
from __future__ import annotations

import io
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from .loader import Stream, nhwc_to_unit_range, plan_for, sample_augment, stored_sizes
from .transforms import DataError, decodes_as_stored, load_rgb

log = logging.getLogger("g2g_fast")

INSTALL = 'pip install -e ".[dali]"  (the nvidia-dali-cuda130 wheel)'
# Modes DALI's decoders may turn into the same RGB as `load_rgb` (when also 8-bit without
# transparency: `decodes_as_stored`); anything else is re-encoded via PIL.
_DIRECT_MODES = ("RGB", "L")
# Re-encoded PNGs are kept in host memory up to this many bytes; past it the rest are re-encoded on
# every read (a dataset of mostly RGBA or palette files would otherwise grow without bound).
REENCODED_CACHE_BYTES = 512 * 2**20


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _cause(err: Exception) -> str:
    """The informative line of a DALI pipeline error (it ends with boilerplate)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        return lines[lines.index("encountered:") + 1]
    return lines[0] if lines else type(err).__name__


def _png_bytes(path: str) -> np.ndarray:
    buf = io.BytesIO()
    load_rgb(path).save(buf, format="PNG", compress_level=1)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def _build_pipeline(source, batch_size: int, image_size: int, device_id: int | None, threads: int,
                    prefetch: int, seed: int):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=prefetch)
    def pipeline():
        encoded, flip, size, anchor, label = fn.external_source(source=source, num_outputs=5, batch=True)
        gpu = device_id is not None
        # EXIF orientation is ignored, as PIL's plain open does; fancy upsampling is libjpeg-turbo's
        # chroma upsampling, i.e. what PIL does on the CPU.
        kw = {"jpeg_fancy_upsampling": True} if gpu else {}
        img = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                adjust_orientation=False, **kw)
        img = fn.flip(img, horizontal=flip)  # before the resize, in the reference's order
        img = fn.resize(img, resize_x=size[0], resize_y=size[1], interp_type=types.INTERP_LINEAR,
                        antialias=True)
        # Crop corner as an argument input (always CPU, also for GPU images), size a constant.
        img = fn.slice(img, start=anchor, shape=[image_size, image_size], axis_names="WH",
                       out_of_bounds_policy="error")
        return img, label

    pipe = pipeline()
    pipe.build()
    return pipe


class DaliStream(Stream):
    """The DALI loader: the batches of `BatchStream` for the same arguments (see the module
    docstring for the tolerance), on `device`; on the CPU it runs DALI's CPU-only mode."""

    name = "dali"

    def __init__(self, dataset, batch_size: int, seed: int = 0, start_step: int = 0,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                 threads: int = 4, prefetch: int = 2, shots: int = 0):
        if not dali_available():
            raise DataError(f"--loader dali: NVIDIA DALI is not installed; {INSTALL}, or use --loader gpu-cache or torch")
        if not hasattr(dataset, "paths"):
            raise DataError("--loader dali reads image files, and the synthetic data has none; use --loader "
                            "gpu-cache (renders it on the device) or torch")
        if start_step < 0:
            raise DataError(f"start_step must be >= 0, got {start_step}")
        self.plan = plan_for(dataset, batch_size, seed, True, rank, world_size, shots)
        self.shots = shots
        self.dataset, self.seed, self.device = dataset, seed, torch.device(device)
        self.batches_per_epoch, self.step = self.plan.per_epoch, start_step
        self.sizes = stored_sizes(dataset)
        self._reencoded: dict[int, np.ndarray] = {}
        self._direct: dict[int, bool] = {}  # RGB/L files: whether DALI may decode them as they are
        self._reencoded_bytes, self._reencoded_lock, self._cache_full_logged = 0, threading.Lock(), False
        self._reencoded_budget = REENCODED_CACHE_BYTES
        self._io = ThreadPoolExecutor(max_workers=max(2, threads))
        self._feed = start_step  # DALI runs the source ahead of the consumer (prefetch)
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None
        # With K-shot class codes one pipeline batch is the step's B images and their B * K shots.
        self._pipe = _build_pipeline(self._source, batch_size * (1 + shots), dataset.image_size, device_id, threads,
                                     prefetch, seed)
        log.info("dali: %d images, %s decoding, %d threads", len(dataset),
                 "GPU (nvJPEG)" if gpu else "CPU-only mode", threads)

    def _encoded(self, i: int) -> np.ndarray:
        if self.dataset.infos[i].mode in _DIRECT_MODES and self._direct.get(i) is not False:
            data = np.fromfile(self.dataset.paths[i], dtype=np.uint8)
            if i not in self._direct:  # the header of the bytes just read: no second file read
                with Image.open(io.BytesIO(data)) as img:
                    self._direct[i] = decodes_as_stored(img)
            if self._direct[i]:
                return data
        cached = self._reencoded.get(i)
        if cached is not None:
            return cached
        data = _png_bytes(self.dataset.paths[i])
        with self._reencoded_lock:  # the I/O threads call this concurrently
            if i not in self._reencoded and self._reencoded_bytes + data.nbytes <= self._reencoded_budget:
                self._reencoded[i] = data
                self._reencoded_bytes += data.nbytes
            elif i not in self._reencoded and not self._cache_full_logged:
                self._cache_full_logged = True
                log.info("dali: the cache of re-encoded (non-RGB) images reached %d MiB; the rest are "
                         "re-encoded on every read", self._reencoded_budget // 2**20)
        return data

    def _source(self):
        """One batch of inputs for step `self._feed`: encoded bytes, flip, resized size, crop corner, label."""
        keys = self.plan.load_keys(self._feed)
        self._feed += 1
        encoded = list(self._io.map(self._encoded, [i for _, i in keys]))
        flip, size, anchor, label = [], [], [], []
        for epoch, i in keys:
            w, h = self.sizes[i]
            a = sample_augment(self.dataset, self.seed, epoch, i, w, h)
            flip.append(np.array(int(a.flip), dtype=np.int32))
            size.append(np.array([w, h], dtype=np.float32))
            anchor.append(np.array([a.left, a.top], dtype=np.int32))  # fn.slice's `start`: int32
            label.append(np.array(self.dataset.labels[i], dtype=np.int64))
        return encoded, flip, size, anchor, label

    def __next__(self):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        try:
            images, labels = self._pipe.run()
        except RuntimeError as e:
            raise DataError(f"--loader dali: the pipeline failed near step {self.step} ({_cause(e)}); a file "
                            f"may be corrupt beyond its header: try --loader torch, which names it") from None
        images = images.as_tensor()
        pixels = torch.empty(images.shape(), dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(images, pixels, cuda_stream=stream)
        y = torch.from_numpy(np.array(labels.as_tensor())).to(self.device, non_blocking=True)
        x = nhwc_to_unit_range(pixels)
        self.step += 1
        return self.split(x, y)

    def close(self) -> None:
        self._pipe = None
        self._io.shutdown(wait=False)
