"""`--loader {auto,torch,dali,gpu-cache}`: the one place that picks a loader and says why.

auto: on a CUDA device, DALI for image files when it is installed, else the GPU cache when the
decoded data fits in GPU memory (synthetic data always: it renders on the device), else the
reference torch DataLoader; on the CPU, the torch DataLoader. Every loader yields the same batches
for the same (seed, step, rank), so the choice changes speed, not results (DALI's resampler aside,
see `dali.py`).
"""
from __future__ import annotations

import logging

import torch

from .dali import INSTALL, DaliStream, dali_available
from .gpu_cache import CachedStream, cache_bytes, placement
from .loader import BatchStream, Stream
from .transforms import DataError

log = logging.getLogger("g2g_fast")

LOADERS = ("auto", "torch", "dali", "gpu-cache")


def check_request(requested: str, synthetic: bool) -> None:
    """The DataError of an impossible `--loader` request; the trainer calls it before any other
    work, so the error is the first thing the user sees."""
    if requested not in LOADERS:
        raise DataError(f"--loader {requested!r} is unknown; use one of {', '.join(LOADERS)}")
    if requested == "dali":
        if not dali_available():
            raise DataError(f"--loader dali: NVIDIA DALI is not installed; {INSTALL}")
        if synthetic:
            raise DataError("--loader dali reads image files, and the synthetic data has none; use "
                            "--loader gpu-cache (renders it on the device) or torch")


def choose_loader(requested: str, dataset, device: torch.device) -> tuple[str, str]:
    """(loader name, why) for `--loader requested`; raises DataError for an impossible request."""
    device = torch.device(device)
    files = hasattr(dataset, "paths")
    check_request(requested, synthetic=not files)
    if requested == "dali":
        return "dali", "requested" + ("" if device.type == "cuda" else " (DALI's CPU-only mode)")
    if requested != "auto":
        return requested, "requested"
    if device.type != "cuda":
        return "torch", f"training on {device}: the torch DataLoader"
    if not files:
        return "gpu-cache", "synthetic data: rendered once on the GPU"
    if dali_available():
        return "dali", "DALI is installed: GPU decoding"
    where, why = placement(cache_bytes(dataset), device)
    if where == "device":
        return "gpu-cache", f"DALI is not installed ({INSTALL}); the decoded data {why}"
    return "torch", f"DALI is not installed ({INSTALL}) and the decoded data {why.split(';')[0]}"


def build_stream(requested: str, dataset, batch_size: int, *, seed: int = 0, start_step: int = 0,
                 device: str | torch.device = "cpu", workers: int = 0, rank: int = 0,
                 world_size: int = 1, shots: int = 0) -> Stream:
    """The loader `choose_loader` picks, logged once with the reason. `shots` K > 0: each batch also
    brings K other images of each sample's class (K-shot class codes, `Stream`)."""
    device = torch.device(device)
    name, why = choose_loader(requested, dataset, device)
    log.info("loader %s: %s", name, why)
    common = dict(seed=seed, start_step=start_step, rank=rank, world_size=world_size, shots=shots)
    if name == "torch":
        return BatchStream(dataset, batch_size, num_workers=workers, pin_memory=device.type == "cuda", **common)
    if name == "gpu-cache":
        return CachedStream(dataset, batch_size, device=device, **common)
    return DaliStream(dataset, batch_size, device=device, threads=max(1, workers), **common)
