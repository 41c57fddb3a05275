"""Sample grids in the paper's Fig. 4 layout (SPEC §1), the content x class table of
`translate --grid`, and image file helpers.

Per pair a 3 x 2 block: row 1 [x1, x2], row 2 [m1, m2], row 3 [r1, r2]; blocks side by side,
separated by a thin white gap.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .data.transforms import read_rgb, to_rgb

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


def save_png(grid: torch.Tensor | Image.Image, path: str | os.PathLike) -> None:
    """Write an (H, W, 3) uint8 tensor (or a PIL image) as PNG (atomically, so a viewer never sees
    half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image = grid if isinstance(grid, Image.Image) else Image.fromarray(grid.numpy())
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: no stray temp file beside the images
        tmp.unlink(missing_ok=True)
        raise


LABEL_H = 14  # pixels of the label band under an edge image (PIL's default font is ~11 px high)


class TableGrid:
    """The content x class table (`translate --grid`): content images down the left column, each
    class's first image across the top row (for a K-shot class its next images as a strip of
    thumbnails under it), and in cell (i, j) the mix of content i with class j. The edge images
    have their labels under them (cut to the cell's width). Cells are pasted as they are computed,
    so only the canvas itself is held; white background, SEPARATOR between the edges and the mixes,
    GAP between cells."""

    THUMBS = 4  # thumbnails in a K-shot class's strip (its images 2..5)

    def __init__(self, rows: list[str], columns: list[str], size: int, strip: bool = False):
        self.size, self.thumb = size, max(1, size // self.THUMBS)
        self.header_h = size + (self.thumb + GAP if strip else 0) + LABEL_H
        self.row_h = size + LABEL_H + GAP
        n, c = len(rows), len(columns)
        width = size + SEPARATOR + c * size + (c - 1) * GAP
        height = self.header_h + SEPARATOR + n * self.row_h - GAP
        self.canvas = Image.new("RGB", (width, height), "white")
        self.draw = ImageDraw.Draw(self.canvas)
        for i, text in enumerate(rows):
            self._label(text, 0, self.cell_xy(i, 0)[1] + size)
        for j, text in enumerate(columns):
            self._label(text, self.cell_xy(0, j)[0], self.header_h - LABEL_H)
        self._label("content \\ class", 0, self.header_h - LABEL_H)

    def cell_xy(self, i: int, j: int) -> tuple[int, int]:
        """Top-left pixel (x, y) of the mix of content i with class j."""
        return self.size + SEPARATOR + j * (self.size + GAP), self.header_h + SEPARATOR + i * self.row_h

    def _label(self, text: str, x: int, y: int) -> None:
        if self.draw.textlength(text) > self.size:  # cut to the cell's width
            while len(text) > 1 and self.draw.textlength(text + "..") > self.size:
                text = text[:-1]
            text += ".."
        self.draw.text((x, y), text, fill="black")  # PIL's built-in font, as the ablation's grid

    def _paste(self, img: torch.Tensor, x: int, y: int, size: int | None = None) -> None:
        im = Image.fromarray(to_uint8(img).numpy())
        if size is not None and size != im.width:
            im = im.resize((size, size), Image.BOX)
        self.canvas.paste(im, (x, y))

    def put_content(self, i: int, img: torch.Tensor) -> None:
        self._paste(img, 0, self.cell_xy(i, 0)[1])

    def put_class(self, j: int, img: torch.Tensor, thumbs=()) -> None:
        """Class j's first image, and up to THUMBS more of its images as thumbnails under it."""
        x = self.cell_xy(0, j)[0]
        self._paste(img, x, 0)
        for k, t in enumerate(list(thumbs)[:self.THUMBS]):
            self._paste(t, x + k * self.thumb, self.size + GAP, self.thumb)

    def put_mix(self, i: int, j: int, img: torch.Tensor) -> None:
        self._paste(img, *self.cell_xy(i, j))


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """An image file -> (1, 3, size, size) in [-1, 1] (RGB, shorter side resized, center crop)."""
    return image_to_tensor(read_rgb(path), size)  # every PIL mode by its real range (DataError)


def image_to_tensor(im: Image.Image, size: int) -> torch.Tensor:
    """A PIL image -> (1, 3, size, size) in [-1, 1] (RGB, shorter side resized, center crop), every
    mode through `to_rgb` (16-bit by its real range, where convert("RGB") would clip it; an RGB
    image's transparent colour composited as the loaders do)."""
    im = to_rgb(im)
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    im = im.crop((left, top, left + size, top + size))
    data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return (data.view(size, size, 3).permute(2, 0, 1).float() / 127.5 - 1).unsqueeze(0)
