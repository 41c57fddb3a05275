"""The embedded synthetic dataset: shapes with a class identity and known content factors (SPEC §6).

Two families (`family=`, the trainer's `--synthetic-family`):
- "scheme" (the default): a class ("identity") is a shape, a texture and a colour. Class c gets shape
  `c % 12`, texture `(c + c // 12) % 4` and a hue stepped by the golden ratio, so classes differ by
  (shape, texture) up to 48 classes and by colour beyond, and any num_classes >= 2 works.
- "shape" (issue 23): a class is the shape alone, `SHAPES[c]` (so 2..12 classes); colour (hue) and
  texture are drawn per image like the pose, and are two more content factors: a model must carry
  them in the content code and take only the outline from the class code.

An image's content is its pose and lighting, drawn per index: centre (cx, cy) and scale in image
units (the image spans [-1, 1]), rotation in radians, background grey level and the direction of a
linear lighting gradient; in the shape family also hue in [0, 1) and the texture's index in
TEXTURES. `factors(index)` returns them, so disentanglement can be measured exactly.

Images are rendered analytically from signed distances on a coordinate grid (coverage = a one-pixel
ramp across the edge, which anti-aliases), at any resolution, and rounded to 8-bit levels like
decoded files. They are not augmented: a flip or crop would change the factors.
"""
from __future__ import annotations

import colorsys
import math
from functools import lru_cache

import numpy as np
import torch

from .transforms import DataError

FACTOR_NAMES = ["cx", "cy", "scale", "rotation", "background", "light"]
SHAPE_FACTOR_NAMES = FACTOR_NAMES + ["hue", "texture"]  # the shape family's: texture as its index
FAMILIES = ("scheme", "shape")
SPLITS = {"train": 0, "val": 1, "test": 2}  # each split is its own seed stream
TEXTURES = ["plain", "stripes", "checker", "dots"]
_PERIOD = 0.5  # texture period, in shape units (the shape's radius is about 1)


def _length(u, v):
    return torch.sqrt(u * u + v * v)


def _box(u, v, half_w, half_h):
    # Exact signed distance to an axis-aligned box.
    qx, qy = u.abs() - half_w, v.abs() - half_h
    return _length(qx.clamp(min=0), qy.clamp(min=0)) + torch.maximum(qx, qy).clamp(max=0)


def _polygon(u, v, n):
    # Regular n-gon of circumradius 1, a vertex pointing up: the max over its edges' half-planes is
    # exact inside and along the edges, which is where the anti-aliasing ramp needs it.
    apothem = math.cos(math.pi / n)
    edges = [u * math.cos(a) + v * math.sin(a) for a in
             (math.pi / 2 + math.pi / n + 2 * math.pi * k / n for k in range(n))]
    return torch.stack(edges).amax(0) - apothem


def _star(u, v):
    # Five points, tips at radius 1 and valleys at 0.45. Folding the angle into half a sector leaves
    # one straight edge, tip to valley, whose line gives the signed distance near the edge.
    sector = 2 * math.pi / 5
    t = torch.remainder(torch.atan2(u, v), sector)
    t = torch.minimum(t, sector - t)
    r = _length(u, v)
    qx, qy = r * torch.cos(t), r * torch.sin(t)
    bx, by = 0.45 * math.cos(sector / 2), 0.45 * math.sin(sector / 2)
    nx, ny = by, 1.0 - bx  # normal of the edge from (1, 0) to (bx, by), pointing outwards
    norm = math.hypot(nx, ny)
    return ((qx - 1.0) * nx + qy * ny) / norm


_SHAPES = {
    "circle": lambda u, v: _length(u, v) - 0.85,
    "square": lambda u, v: _box(u, v, 0.7, 0.7),
    "triangle": lambda u, v: _polygon(u, v, 3),
    "star": _star,
    "ring": lambda u, v: (_length(u, v) - 0.72).abs() - 0.22,
    "cross": lambda u, v: torch.minimum(_box(u, v, 0.9, 0.28), _box(u, v, 0.28, 0.9)),
    # A rhombus 2:1, so it is not a rotated square (rotation is content, not identity).
    "diamond": lambda u, v: (u.abs() * 0.95 + v.abs() * 0.5 - 0.475) / math.hypot(0.95, 0.5),
    "hexagon": lambda u, v: _polygon(u, v, 6),
    "pentagon": lambda u, v: _polygon(u, v, 5),
    "crescent": lambda u, v: torch.maximum(_length(u, v) - 0.9, 0.7 - _length(u - 0.45, v)),
    "ellipse": lambda u, v: (_length(u, v / 0.5) - 0.95) * 0.5,
    "semicircle": lambda u, v: torch.maximum(_length(u, v) - 0.95, v - 0.25),
}
SHAPES = list(_SHAPES)


@lru_cache(maxsize=8)
def _grid(size: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    # Pixel centres in [-1, 1]; y points down as in image rows.
    c = (torch.arange(size, dtype=torch.float32, device=device) + 0.5) * (2.0 / size) - 1.0
    return c.view(1, size).expand(size, size), c.view(size, 1).expand(size, size)


def _texture(u, v, kind: str, px: float):
    """Pattern in [0, 1] in the shape's own frame (it turns with the shape); `px` is one pixel in
    shape units, the width of the anti-aliasing ramp."""
    w = 2 * math.pi / _PERIOD
    if kind == "plain":
        return torch.zeros_like(u)
    if kind == "stripes":
        d = torch.sin(w * u) / w  # about the signed distance to the nearest stripe edge
    elif kind == "checker":
        su, sv = torch.sin(w * u), torch.sin(w * v)
        d = su * sv / (w * torch.maximum(su.abs(), sv.abs()).clamp(min=1e-6))
    else:  # dots
        fu = u / _PERIOD - torch.round(u / _PERIOD)
        fv = v / _PERIOD - torch.round(v / _PERIOD)
        d = 0.15 - _length(fu, fv) * _PERIOD
    return (0.5 + d / px).clamp(0.0, 1.0)


def _identity(c: int) -> tuple[str, str, float]:
    """(shape, texture, hue) of class c; the golden-ratio step keeps successive hues far apart."""
    shape = SHAPES[c % len(SHAPES)]
    texture = TEXTURES[(c + c // len(SHAPES)) % len(TEXTURES)]
    return shape, texture, (0.05 + c * 0.6180339887) % 1.0


class SyntheticDataset:
    """`num_classes * per_class` images; index i has label `i // per_class`. Deterministic from
    (seed, split, index) in every process; `get` ignores its generator (no augmentation).
    `family`: "scheme" (class = shape, texture, colour) or "shape" (class = shape; see the module)."""

    augmented = False  # no flip/crop: they would falsify the factors

    def __init__(self, image_size: int = 64, num_classes: int = 8, per_class: int = 256, seed: int = 0,
                 split: str = "train", family: str = "scheme"):
        if family not in FAMILIES:
            raise DataError(f"--synthetic-family {family!r} is unknown; use one of {', '.join(FAMILIES)}")
        if family == "shape" and num_classes > len(SHAPES):
            raise DataError(f"--synthetic-classes {num_classes} with --synthetic-family shape: a class is one of "
                            f"the {len(SHAPES)} shapes; pass --synthetic-classes {len(SHAPES)} or fewer, or "
                            f"--synthetic-family scheme for more classes")
        if num_classes < 2:
            raise DataError(f"--synthetic-classes {num_classes}: found {num_classes} class(es); G2G "
                            f"needs at least 2, pass --synthetic-classes 2 or more")
        if per_class < 1:
            raise DataError(f"synthetic per_class {per_class} leaves the dataset empty; pass per_class >= 1")
        if split not in SPLITS:
            raise DataError(f"split {split!r} is unknown; use one of {', '.join(SPLITS)}")
        if image_size < 1:
            raise DataError(f"image_size must be >= 1, got {image_size}")
        self.image_size, self.num_classes, self.per_class = image_size, num_classes, per_class
        self.seed, self.split, self.family = seed, split, family
        self.factor_names = FACTOR_NAMES if family == "scheme" else SHAPE_FACTOR_NAMES
        self.labels = [i // per_class for i in range(num_classes * per_class)]
        self.class_names = [self.identity(c) for c in range(num_classes)]
        self.skipped: list[str] = []  # nothing can be unreadable; kept for the common interface

    def identity(self, c: int) -> str:
        """Name of class c: e.g. 'star/stripes/h0.85' (scheme family), 'star' (shape family)."""
        if self.family == "shape":
            return SHAPES[c]
        shape, texture, hue = _identity(c)
        return f"{shape}/{texture}/h{hue:.2f}"

    def __len__(self) -> int:
        return len(self.labels)

    def factors(self, index: int) -> torch.Tensor:
        """Ground-truth content factors of `index`, float32, in the order of `factor_names`."""
        # SeedSequence mixes (seed, split, index) into independent, platform-stable streams.
        index = range(len(self))[index]  # IndexError out of range, like a list
        seq = np.random.SeedSequence([self.seed % 2**63, SPLITS[self.split], index])
        # The shape family draws two more from the same stream, after the six: a stream's first
        # draws do not depend on how many follow, so both families share the pose of an index.
        r = np.random.default_rng(seq).random(len(self.factor_names))
        extra = [] if self.family == "scheme" else [
            r[6],                          # hue in [0, 1) (circular: 1 is 0)
            int(r[7] * len(TEXTURES)),     # texture: an index into TEXTURES, uniform
        ]
        return torch.tensor([
            -0.4 + 0.8 * r[0],            # cx
            -0.4 + 0.8 * r[1],            # cy
            0.3 + 0.2 * r[2],             # scale: shape radius; centre + radius stays inside [-1, 1]
            math.pi * (2 * r[3] - 1),     # rotation, radians in [-pi, pi)
            0.12 + 0.45 * r[4],           # background grey: darker than the (bright) foregrounds
            math.pi * (2 * r[5] - 1),     # light: direction of the brightness gradient
            *extra,
        ], dtype=torch.float32)

    def render(self, index: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """uint8 (3, S, S) image of `index`, computed on `device`. On a GPU, transcendental
        functions may round differently from the CPU: a few pixels can differ by one level."""
        f = self.factors(index).tolist()
        cx, cy, scale, rot, bg, light = f[:6]
        # Hue and texture are the factors' where they have them (the shape family; the float32
        # hue, so the image shows exactly what factors() reports), else the class's scheme.
        if len(f) == len(SHAPE_FACTOR_NAMES):
            shape, texture, hue = SHAPES[self.labels[index]], TEXTURES[int(f[7])], f[6]
        else:
            shape, texture, hue = _identity(self.labels[index])
        x, y = _grid(self.image_size, str(torch.device(device)))
        # Into the shape's frame: translate, rotate by -rot, divide by scale.
        dx, dy = (x - cx) / scale, (y - cy) / scale
        cos, sin = math.cos(rot), math.sin(rot)
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy
        px = 2.0 / self.image_size / scale  # one pixel in shape units
        coverage = (0.5 - _SHAPES[shape](u, v) / px).clamp(0.0, 1.0)
        pattern = _texture(u, v, texture, px)
        base = torch.tensor(colorsys.hsv_to_rgb(hue, 0.8, 0.95), dtype=torch.float32, device=device).view(3, 1, 1)
        pastel = 0.35 * base + 0.6  # the texture's second colour: same hue, lighter
        fg = base + (pastel - base) * pattern
        img = bg + (fg - bg) * coverage
        img = img * (1.0 + 0.15 * (x * math.cos(light) + y * math.sin(light)))
        return (img.clamp(0.0, 1.0) * 255.0).round_().to(torch.uint8)

    def stored(self, index: int, device: str | torch.device = "cpu") -> tuple[int, torch.Tensor]:
        """(index, uint8 (S, S, 3)) for the GPU cache: the image itself, rendered on `device`
        (synthetic images get no resize and no augmentation)."""
        return index, self.render(index, device).permute(1, 2, 0)

    def get(self, index: int, rng: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        del rng  # synthetic images are never augmented: flip or crop would falsify the factors
        return self.render(index).float().div_(127.5).sub_(1.0), self.labels[index]
