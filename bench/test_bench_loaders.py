"""Loader throughput: img/s of each `--loader` at 128² crops from a JPEG folder the benchmark writes
(bench/_loaders.py). On CUDA 2048 images, batch 64, the GPU loaders decoding/augmenting on the
device; on the CPU 96 images, batch 16 (the GPU cache is then a host cache, DALI runs its CPU-only
mode). The setup (file check, the cache's one-time decode, DALI's pipeline build) is not timed; it
is reported in extra_info["setup_s"].

extra_info: img_per_s, setup_s, loader, device, workers, images, batch_size, image_size.
"""
import os

import pytest
import torch

import _loaders as L


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    n = 2048 if torch.cuda.is_available() else 96
    return L.write_jpeg_folder(tmp_path_factory.mktemp("jpegs"), n)


@pytest.mark.parametrize("loader", L.LOADERS)
def test_loader(benchmark, device, jpeg_folder, loader):
    if L.skip_reason(loader):
        pytest.skip(L.skip_reason(loader))
    cuda = device.type == "cuda"
    batch, batches = (64, 16) if cuda else (16, 4)
    workers = min(8, os.cpu_count() or 1)
    benchmark.group = "loaders 128px"
    ds, stream, setup_s, _ = L.open_loader(loader, jpeg_folder, 128, batch, device, workers)
    rates = []
    benchmark.pedantic(lambda: rates.append(L.loader_img_per_s(stream, batches, device)),
                       rounds=3 if cuda else 2, iterations=1)
    stream.close()
    benchmark.extra_info.update(loader=loader, device=str(device), workers=workers, images=len(ds),
                                batch_size=batch, image_size=128, setup_s=round(setup_s, 2),
                                img_per_s=sorted(rates)[len(rates) // 2])
