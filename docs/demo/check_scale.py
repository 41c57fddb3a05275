"""A probe-free check of the shape's scale (issue 23): does a generator draw the object at the
content image's size, the class image's, or neither, and does it even reproduce the size in its
own reconstructions?

    OMP_NUM_THREADS=1 python docs/demo/check_scale.py RUN [RUN ...]     # run folders (checkpoints/last.pt)

For the 256 held-out pairs of `g2g_fast.evaluate` (synthetic test split, data seed 0): an image's
object size is the square root of the number of pixels whose colour differs from the median colour
of its border by more than a threshold (the object is brighter than every background), which on
real images follows the true scale closely (the first line). Printed per run: the correlation of
that size with the true scale of the content image (x1) and of the class image (x2), for the mixes
m1 = G(E_A(x1), E_B(x2)), the short reconstructions s1 = G(E_A(x1), E_B(x1)) and the two-stage
reconstructions r1, and the mean |size - size of x1| in pixels.
"""
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from g2g_fast import evaluate as E
from g2g_fast import metrics as M
from g2g_fast.translate import load_generator

THRESHOLD = 0.6  # summed |difference| over RGB in [-1, 1] units: well above noise, below fg-bg contrast


def size(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) in [-1, 1] -> object size in pixels (square root of its area)."""
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], 2)
    d = (x.clamp(-1, 1) - border.median(2).values[:, :, None, None]).abs().sum(1)
    return (d > THRESHOLD).float().sum((1, 2)).sqrt()


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return ((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-12)).item()


def main(runs: list[str]) -> None:
    torch.set_num_threads(1)
    _, held, _, _, _ = E.prepare_data("synthetic", image_size=32, seed=0, synthetic_classes=8,
                                      synthetic_per_class=256, samples=256)
    i1, i2 = M.pair_indices(held.y, 256, 0)
    s1, s2 = held.subset(i1), held.subset(i2)
    scale1, scale2 = s1.factors[:, 2], s2.factors[:, 2]
    real = size(s1.x)
    print(f"real images: corr(size, scale) {corr(real, scale1):.2f}; sizes {real.min():.1f}-{real.max():.1f} px")
    for run in runs:
        gen, _ = load_generator(SimpleNamespace(funit=None, checkpoint=str(Path(run) / "checkpoints" / "last.pt"),
                                                raw=False, image_size=None))
        out = M.run_pairs(gen, s1.x, s2.x)
        cells = []
        for name in ("m1", "s1", "r1"):
            z = size(out[name])
            cells.append(f"{name}: corr with content scale {corr(z, scale1):.2f}, class scale "
                         f"{corr(z, scale2):.2f}, |size - x1's| {(z - real).abs().mean():.2f} px")
        print(f"{run}: " + "; ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1:])
