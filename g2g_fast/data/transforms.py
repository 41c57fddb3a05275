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
    mode: str  # PIL's mode: "RGB", "L", "RGBA", "P", "CMYK", "I;16", ... (see `to_rgb`)


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


# How each PIL mode becomes 8-bit RGB, by the range its values really have (docs/data.md has the
# table). Every loader, the API and translate decode through `to_rgb`, so they agree pixel for pixel.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_DEEP = (*SIXTEEN_BIT_MODES, "I", "F")  # single channel, more than 8 bits: scaled here, not by PIL
_PREMULTIPLIED = ("RGBa", "La")         # colour already multiplied by alpha: the composite on black
# PIL's own conversion is right for these (palette lookup, 1 -> 255, CMYK/YCbCr/HSV formulas);
# alpha and transparency keys are composited on black first.
_PIL_CONVERTS = ("1", "L", "P", "RGB", "RGBX", "RGBA", "LA", "PA", "CMYK", "YCbCr", "HSV")
SUPPORTED_MODES = (*_PIL_CONVERTS, *_DEEP, *_PREMULTIPLIED)
I_MAX = 65535  # mode I is read as 16-bit: PIL (before 10.x) and TIFF give 16-bit greys as I


def mode_problem(mode: str) -> str | None:
    """Why an image of PIL `mode` cannot be converted (the end of an error line), or None."""
    if mode == "LAB":
        return ("mode LAB (CIELAB) is not converted: that needs a white point and colour profile "
                "g2g cannot guess; re-save the image as RGB")
    if mode not in SUPPORTED_MODES:
        return f"PIL mode {mode!r} is not one g2g converts; re-save the image as 8-bit RGB"
    return None


def _range_problem(img: Image.Image) -> str | None:
    """For modes I and F, why the pixel values are outside the range g2g reads them in, or None."""
    if img.mode not in ("I", "F") or img.width * img.height == 0:
        return None
    a = np.asarray(img)
    if img.mode == "F":
        if not np.isfinite(a).all():
            return "mode F (32-bit float) has NaN or infinite pixels; replace them"
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 1:
            return (f"mode F (32-bit float) pixels span [{lo:g}, {hi:g}]; g2g reads mode F as 0 = black, "
                    f"1 = white: scale them to [0, 1] (values of 0-255: divide by 255)")
        return None
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi > I_MAX:
        return (f"mode I (32-bit integer) pixels span [{lo}, {hi}]; g2g reads mode I as 16-bit "
                f"(0-{I_MAX}, as PIL opens 16-bit greys): scale them to 0-{I_MAX} or save the image as 8-bit")
    return None


def image_problem(path: str, mode: str) -> str | None:
    """Why `path` (of PIL `mode`, from `image_info`) cannot be converted, or None. Only modes I and
    F are decoded (their range is in the pixels); every other mode is judged from the header."""
    why = mode_problem(mode)
    if why is None and mode in ("I", "F"):
        try:
            with Image.open(path) as img:
                why = _range_problem(img)
        except Exception:  # undecodable after all: decoding it later skips it with a warning
            return None
    return why


def _deep_to_rgb(img: Image.Image) -> Image.Image:
    """I;16* and I: 0-65535 -> the high byte (as PIL reduces 16-bit RGB, RGBA and LA PNGs, so a
    grey saved as 16-bit grey or as 16-bit RGB gives the same levels); F: 0-1 -> round(255 v).
    A transparency key (a 16-bit grey PNG's tRNS) goes to black, as every transparent pixel."""
    a = np.asarray(img)
    grey = (np.rint(a * 255) if img.mode == "F" else a.astype(np.int64) >> 8).astype(np.uint8)
    key = img.info.get("transparency")
    if img.mode != "F" and isinstance(key, int):
        grey[a == key] = 0
    return Image.fromarray(grey, "L").convert("RGB")


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """A loaded PIL image of any supported mode -> a new 8-bit RGB image, each mode by its real range
    (16-bit: 0-65535, not clipped at 255; F: 0-1; docs/data.md). Alpha and transparency keys
    (RGBA, LA, PA, P or L/RGB with a transparent colour) are composited on black, i.e. colours are
    premultiplied by alpha, so that whatever RGB values hide under transparent pixels never reach
    the network. DataError naming `name` for an unsupported mode or out-of-range I/F values."""
    why = mode_problem(img.mode) or _range_problem(img)
    if why is not None:
        raise DataError(f"{name}: {why}")
    if img.mode in _DEEP:
        return _deep_to_rgb(img)
    if img.mode == "RGBa":
        return Image.merge("RGB", img.split()[:3])
    if img.mode == "La":
        return img.split()[0].convert("RGB")
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        black = Image.new("RGB", rgba.size, (0, 0, 0))
        black.paste(rgba, mask=rgba.getchannel("A"))
        return black
    return img.copy() if img.mode == "RGB" else img.convert("RGB")


def _rawmode(img: Image.Image) -> str:
    """How the file stores the pixels ("RGB;16B" for 16-bit RGB, "L;2" for 2-bit grey), before
    load(); "" when the format does not say (WebP)."""
    if not img.tile:
        return ""
    args = img.tile[0].args
    return str(args[0] if isinstance(args, tuple) and args else args or "")


def decodes_as_stored(img: Image.Image) -> bool:
    """True for a just-opened file whose samples are already the 8-bit RGB `to_rgb` gives: 8-bit
    RGB or grey, no transparency. Other decoders (DALI) may take only those as they are: they
    scale 16 bits to 8 by rounding (PIL truncates) and ignore transparency keys."""
    return img.mode in ("RGB", "L") and ";" not in _rawmode(img) and not img.has_transparency_data


def load_rgb(path: str) -> Image.Image:
    """Decode `path` fully into an RGB image through `to_rgb`.
    Raises OSError for truncated or undecodable files, DataError for a mode `to_rgb` refuses."""
    # PIL's default, but a process-wide flag that other code may flip: without it a truncated file
    # would decode silently into a partly grey image.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with Image.open(path) as img:
        raw = _rawmode(img)
        img.load()
        key = img.info.get("transparency")
        if img.mode == "L" and raw in ("L;2", "L;4") and isinstance(key, int) and 0 < key < 2 ** int(raw[2:]):
            # PIL scales 2- and 4-bit greys to 0-255 but leaves their tRNS key in file units
            img.info["transparency"] = key * 255 // (2 ** int(raw[2:]) - 1)
        return to_rgb(img, path)


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """`load_rgb` for a file the user named (API, translate): every failure a DataError naming it."""
    try:
        return load_rgb(os.fspath(path))
    except DataError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise DataError(f"{path}: cannot read image ({e})") from None


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
