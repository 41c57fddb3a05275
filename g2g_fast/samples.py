"""Sample grids in the paper's Fig. 4 layout (SPEC §1) and image file helpers.

Per pair a 3 x 2 block: row 1 [x1, x2], row 2 [m1, m2], row 3 [r1, r2]; blocks side by side,
separated by a thin white gap.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

GAP = 2  # pixels between images inside a block
SEPARATOR = 6  # pixels between blocks


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8 (pixel = (x + 1) * 127.5)."""
    return ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)


def g2g_grid(x1, x2, m1, m2, r1, r2, max_pairs: int = 8) -> torch.Tensor:
    """Tensors (N, 3, H, W) -> one (H_grid, W_grid, 3) uint8 image; white background."""
    n = min(x1.shape[0], max_pairs)
    H, W = x1.shape[-2:]
    block_w, block_h = 2 * W + GAP, 3 * H + 2 * GAP
    grid = torch.full((block_h, n * block_w + (n - 1) * SEPARATOR, 3), 255, dtype=torch.uint8)
    for j in range(n):
        left = j * (block_w + SEPARATOR)
        for row, (a, b) in enumerate(((x1, x2), (m1, m2), (r1, r2))):
            top = row * (H + GAP)
            grid[top:top + H, left:left + W] = to_uint8(a[j])
            grid[top:top + H, left + W + GAP:left + 2 * W + GAP] = to_uint8(b[j])
    return grid


def save_png(grid: torch.Tensor, path: str | os.PathLike) -> None:
    """Write an (H, W, 3) uint8 tensor as PNG (atomically, so a viewer never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(grid.numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """An image file -> (1, 3, size, size) in [-1, 1] (RGB, shorter side resized, center crop)."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            im = im.crop((left, top, left + size, top + size))
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None
    return (data.view(size, size, 3).permute(2, 0, 1).float() / 127.5 - 1).unsqueeze(0)
