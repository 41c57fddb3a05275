"""Throughput of one full training iteration (D step + G step + EMA) per approach.

Providers so far: the fp32 reference (`g2g_fast.reference.steps`), PyTorch defaults. On CUDA the
paper-scale configuration (128², batch 64, FUNIT widths); on the CPU a tiny one so the suite stays
quick. img/s is reported in extra_info.
"""
import pytest
import torch

from conftest import sync
from g2g_fast.config import config_from_dict
from g2g_fast.reference.steps import build_approach

CPU_TINY = {
    "funit2funit": dict(image_size=32, batch_size=8, nf=16, nf_mlp=32, latent_dim=16, dis_nf=16, dis_n_res_blks=4),
    "cyclefunit": dict(image_size=32, batch_size=8, nf=16, nf_mlp=32, latent_dim=16, patch_nf=16),
    "naive": dict(image_size=32, batch_size=8, code_dim=64),
}
NUM_CLASSES = 119  # animal faces


@pytest.mark.parametrize("approach", ["funit2funit", "cyclefunit", "naive"])
def test_train_step_reference_fp32(benchmark, device, approach):
    values = CPU_TINY[approach] if device.type == "cpu" else dict(image_size=128, batch_size=64)
    cfg = config_from_dict(approach, values)
    torch.manual_seed(0)
    ap = build_approach(cfg, NUM_CLASSES, device)
    x = torch.rand(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    y = torch.randint(0, NUM_CLASSES, (cfg.batch_size,), device=device)

    def step():
        ap.train_step(x, y)
        sync()

    step()  # warm-up (cuDNN autotuning, allocator)
    benchmark.pedantic(step, rounds=3 if device.type == "cpu" else 10, iterations=1)
    benchmark.extra_info.update(
        provider="reference-fp32", device=str(device), image_size=cfg.image_size,
        batch_size=cfg.batch_size, img_per_s=cfg.batch_size / benchmark.stats.stats.mean,
    )
