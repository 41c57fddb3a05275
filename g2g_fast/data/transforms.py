"""Image decoding and FUNIT's transform: flip, resize the shorter side, crop, scale to [-1, 1].

FUNIT's training transform (its `get_train_loaders`) is, in order: random horizontal flip (p 0.5),
resize the shorter side to `resize_to` (140 for 128 crops) with bilinear filtering, random crop
`image_size` x `image_size`, then `pixel / 127.5 - 1`. Evaluation uses no flip and a center crop.

The random decisions are drawn by `draw_augment` from a caller-provided `torch.Generator` and nothing
else, in a fixed order (flip, then crop top, then crop left), so that other loader backends can
replay exactly the same decisions on the same image and produce the same tensor.

This module is the leaf of `g2g_fast.data`, so it also holds `DataError`.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFile

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataError(ValueError):
    """Bad data input. The message is one line: what is wrong, with which path or flag, and the fix."""


def default_resize_to(image_size: int) -> int:
    # FUNIT's animal-faces ratio: crops of 128 from images resized to 140.
    return round(image_size * 140 / 128)


def check_sizes(image_size: int, resize_to: int | None) -> int:
    """Validate the transform sizes and return the effective `resize_to`."""
    if image_size < 1:
        raise DataError(f"image_size must be >= 1, got {image_size}")
    resize_to = default_resize_to(image_size) if resize_to is None else resize_to
    if resize_to < image_size:
        raise DataError(f"resize_to {resize_to} is smaller than the crop image_size {image_size}; "
                        f"pass resize_to >= {image_size} (or leave it unset for "
                        f"{default_resize_to(image_size)})")
    return resize_to


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class ImageInfo(NamedTuple):
    """What the up-front check learns about a file without decoding its pixels."""
    width: int
    height: int
    mode: str  # PIL's mode: "RGB", "L", "RGBA", "P", "CMYK", ...


# The last bytes of a complete file. A JPEG ends with the EOI marker, a PNG with its IEND chunk;
# some writers append padding, so the marker is looked for in a short tail rather than at the end.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
_TAIL = 1024


def _complete(path: str, fmt: str | None) -> bool:
    marker = _END_MARKERS.get(fmt or "")
    if marker is None:
        return True
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - _TAIL))
        return marker in f.read()


def image_info(path: str) -> ImageInfo | None:
    """Cheap check that `path` is a complete image PIL can read: parses the header and looks for the
    format's end marker (JPEG, PNG), decodes no pixels. None for a bad file.

    The end marker catches truncated files, which a header alone does not; that matters because
    NVIDIA DALI aborts the whole pipeline on a truncated JPEG, so every loader must skip the same
    files up front.
    """
    try:
        with Image.open(path) as img:
            info = ImageInfo(img.width, img.height, img.mode)
            fmt = img.format
            img.verify()
        return info if info.width > 0 and info.height > 0 and _complete(path, fmt) else None
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad files
        return None


def header_ok(path: str) -> bool:
    """True when `image_info` accepts `path`."""
    return image_info(path) is not None


def load_rgb(path: str) -> Image.Image:
    """Decode `path` fully into an RGB image.

    Grayscale, palette and CMYK images are converted. Images with transparency (RGBA, LA, palette
    with a transparent index) are composited on black, i.e. colours are premultiplied by alpha, so
    that whatever RGB values hide under transparent pixels never reach the network.
    Raises OSError for truncated or undecodable files.
    """
    # PIL's default, but a process-wide flag that other code may flip: without it a truncated file
    # would decode silently into a partly grey image.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with Image.open(path) as img:
        img.load()
        if img.mode == "RGB":
            return img.copy()
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            black = Image.new("RGB", rgba.size, (0, 0, 0))
            black.paste(rgba, mask=rgba.getchannel("A"))
            return black
        return img.convert("RGB")


def resized_size(width: int, height: int, resize_to: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to `resize_to`, the longer side truncated
    as torchvision's `Resize(int)` does."""
    if width <= height:
        return resize_to, int(resize_to * height / width)
    return int(resize_to * width / height), resize_to


class Augment(NamedTuple):
    """The random decisions for one image: flip first, then crop at (top, left) of the resized image."""
    flip: bool
    top: int
    left: int


def draw_augment(rng: torch.Generator | None, width: int, height: int, image_size: int) -> Augment:
    """Decisions for a resized image of `width` x `height`; `rng=None` gives the evaluation transform
    (no flip, center crop rounded as torchvision's CenterCrop)."""
    if rng is None:
        return Augment(False, int(round((height - image_size) / 2.0)), int(round((width - image_size) / 2.0)))
    flip = bool(torch.rand((), generator=rng) < 0.5)
    top = int(torch.randint(0, height - image_size + 1, (), generator=rng))
    left = int(torch.randint(0, width - image_size + 1, (), generator=rng))
    return Augment(flip, top, left)


def to_unit_range(pixels: np.ndarray) -> torch.Tensor:
    """Writable uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def funit_transform(img: Image.Image, image_size: int, resize_to: int,
                    rng: torch.Generator | None) -> torch.Tensor:
    """FUNIT's transform of an RGB PIL image -> float32 (3, image_size, image_size) in [-1, 1]."""
    width, height = resized_size(img.width, img.height, resize_to)
    aug = draw_augment(rng, width, height, image_size)
    if aug.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if (width, height) != img.size:
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    img = img.crop((aug.left, aug.top, aug.left + image_size, aug.top + image_size))
    # np.array copies: PIL's buffer view is read-only, which torch.from_numpy warns about.
    return to_unit_range(np.array(img, dtype=np.uint8))
