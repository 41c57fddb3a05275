"""A probe-free check of what docs/evaluation.md reads from the factor probe (issue 15): where the
preset's mixes put the object, and which image their background grey follows.

    OMP_NUM_THREADS=1 python docs/demo/check_factors.py     # needs runs/ablation/all_on/seed_{0,1,2}

For the 256 held-out pairs of `g2g_fast.evaluate` (synthetic test split, seed 0), m1 = G(E_A(x1),
E_B(x2)): the centroid of the pixels that differ most from the image's border colour (the top
fifth), correlated with x1's (content) and x2's (class) true centre; and the mean of the mix's top
row (background) correlated with either image's background grey.
"""
from types import SimpleNamespace

import torch

from g2g_fast import evaluate as E
from g2g_fast import metrics as M
from g2g_fast.translate import load_generator


def centroid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, S, S) in [-1, 1] -> the (x, y) centroid in [-1, 1] of each image's most salient
    fifth of pixels (distance from the median colour of its border)."""
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], 2)
    w = (x - border.median(2).values[:, :, None, None]).abs().sum(1)
    w = (w - w.flatten(1).quantile(0.8, dim=1)[:, None, None]).clamp(min=0)
    g = torch.linspace(-1, 1, x.shape[-1])
    total = w.sum((1, 2)) + 1e-8
    return (w.sum(1) * g).sum(1) / total, (w.sum(2) * g).sum(1) / total


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return ((a * b).sum() / (a.norm() * b.norm())).item()


def main() -> None:
    torch.set_num_threads(1)
    _, held, _, _, _ = E.prepare_data("synthetic", image_size=32, seed=0, synthetic_classes=8,
                                      synthetic_per_class=256, samples=256)
    i1, i2 = M.pair_indices(held.y, 256, 0)
    s1, s2 = held.subset(i1), held.subset(i2)
    print("real images: corr(centroid x, cx) %.2f" % corr(centroid(s1.x)[0], s1.factors[:, 0]))
    for s in (0, 1, 2):
        ckpt = f"runs/ablation/all_on/seed_{s}/checkpoints/last.pt"
        gen, _ = load_generator(SimpleNamespace(funit=None, checkpoint=ckpt, raw=False, image_size=None))
        m1 = M.run_pairs(gen, s1.x, s2.x)["m1"]
        mx, my = centroid(m1)
        bg = m1[:, :, 0].mean((1, 2))  # the top row
        print(f"seed {s}: corr(mix centroid x, content cx) {corr(mx, s1.factors[:, 0]):.2f}, "
              f"with class cx {corr(mx, s2.factors[:, 0]):.2f}; "
              f"y: {corr(my, s1.factors[:, 1]):.2f} / {corr(my, s2.factors[:, 1]):.2f}; "
              f"bg: mix border vs content bg {corr(bg, s1.factors[:, 4]):.2f}, "
              f"vs class bg {corr(bg, s2.factors[:, 4]):.2f}")


if __name__ == "__main__":
    main()
