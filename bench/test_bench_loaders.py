"""Loader throughput: img/s of each `--loader` at 128² crops from a JPEG folder the benchmark writes
(bench/_loaders.py). On CUDA 2048 images, batch 64, the GPU loaders decoding/augmenting on the
device; on the CPU 96 images, batch 16 (the GPU cache is then a host cache, DALI runs its CPU-only
mode). The setup (file check, the cache's one-time decode, DALI's pipeline build) is not timed; it
is reported in extra_info["setup_s"]. `shots` 4: K-shot class codes in training (`class_shots=4`),
each sample also brings 4 other images of its class, so a batch loads 5x the images; img_per_s
counts the batch's training images (what the trainer's img/s counts), loaded_img_per_s all of them.

extra_info: img_per_s, loaded_img_per_s, setup_s, loader, shots, device, workers, images, batch_size,
image_size.
"""
import os

import pytest
import torch

import _loaders as L


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    n = 2048 if torch.cuda.is_available() else 96
    return L.write_jpeg_folder(tmp_path_factory.mktemp("jpegs"), n)


@pytest.mark.parametrize("shots", [0, 4])
@pytest.mark.parametrize("loader", L.LOADERS)
def test_loader(benchmark, device, jpeg_folder, loader, shots):
    if L.skip_reason(loader):
        pytest.skip(L.skip_reason(loader))
    cuda = device.type == "cuda"
    batch, batches = (64, 16) if cuda else (16, 4)
    workers = min(8, os.cpu_count() or 1)
    benchmark.group = "loaders 128px" + (f", K-shot {shots}" if shots else "")
    ds, stream, setup_s, _ = L.open_loader(loader, jpeg_folder, 128, batch, device, workers, shots)
    rates = []
    benchmark.pedantic(lambda: rates.append(L.loader_img_per_s(stream, batches, device)),
                       rounds=3 if cuda else 2, iterations=1)
    stream.close()
    rate = sorted(rates)[len(rates) // 2]
    benchmark.extra_info.update(loader=loader, shots=shots, device=str(device), workers=workers, images=len(ds),
                                batch_size=batch, image_size=128, setup_s=round(setup_s, 2),
                                img_per_s=rate, loaded_img_per_s=rate * (1 + shots))
