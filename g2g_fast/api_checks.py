"""The checks of what callers pass to the Python API (`g2g_fast.load`, `Translator`; issue 24).

Every public entry point of `g2g_fast.api` checks its arguments here before any work: a wrong
argument is one `InputError` naming the argument, what it takes and the fix, not a torch error
from deep inside a convolution, nor a silently wrong result (a 0..255 tensor read as [-1, 1], a
100x100 tensor cropped to 96x96 by the decoder's strides, `k_shot='yes'` taken as true).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from .config import BaseConfig, FunitArchConfig

# Float rounding of x / 127.5 - 1 or of a normalisation stays far inside this; a 0..255 tensor does not.
RANGE_SLACK = 1e-3
DEVICES = "'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:N' or a torch.device"
IMAGES = "paths (image files, or folders of them), PIL images, image tensors, or a list of these"


class InputError(ValueError):
    """A bad argument to the Python API; the message names the argument, what it takes and the fix."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong kind (a string where a tensor goes, ...): a TypeError as well."""


def shown(value) -> str:
    """`value` as an error message describes it: its type, and its value when short."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return f"{type(value).__name__} {text}" if len(text) <= 60 else type(value).__name__


def flag(value, name: str, meaning: str) -> bool:
    """True or False only: `k_shot='yes'` or `raw=0` is an error, not a truth value."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise InputTypeError(f"{name} must be True or False ({meaning}), got {shown(value)}")


def positive_int(value, name: str, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer ({meaning}), got {shown(value)}")
    return value


def generator_path(path) -> str | os.PathLike:
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"path must be the path of a g2g-fast checkpoint or an official FUNIT generator "
                             f"file (a str or pathlib.Path), got {shown(path)}")
    return path


def device(value) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | a torch.device -> a torch.device that exists here."""
    if isinstance(value, str):
        if value == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(value)
        except RuntimeError:
            raise InputError(f"device {value!r}: not a device; use {DEVICES}") from None
    elif isinstance(value, torch.device):
        dev = value
    else:
        raise InputTypeError(f"device must be {DEVICES}, got {shown(value)}")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not n:
            raise InputError(f"device {str(dev)!r}: no CUDA GPU is available here; use device='cpu' or 'auto'")
        if dev.index is not None and dev.index >= n:
            raise InputError(f"device {str(dev)!r}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}; "
                             f"use one of those, or 'cuda'")
    elif dev.type != "cpu":  # mps, xpu, ...: only where torch says it is there
        available = getattr(getattr(torch, dev.type, None), "is_available", None)
        if available is None or not available():
            raise InputError(f"device {str(dev)!r}: not available here; use {DEVICES}")
    return dev


# ---- image sizes -----------------------------------------------------------------------------------

def size_rule(cfg: BaseConfig) -> tuple[int, int]:
    """(smallest, step) of the image sizes a generator of `cfg` takes; step 0: `smallest` only.

    FUNIT's networks are convolutional: any multiple of 2**n_downs (the config's training rule)
    gives an output of the input's size. The naive approach's encoders end in a conv whose kernel
    covers the map at the trained size, so that size is the only one."""
    if isinstance(cfg, FunitArchConfig):
        step = 2 ** max(cfg.n_downs_content, cfg.n_downs_class)
        return max(16, step), step
    return cfg.image_size, 0


def sizes_text(rule: tuple[int, int]) -> str:
    smallest, step = rule
    if not step:
        return f"only {smallest} (the size its encoders were built for)"
    return f"multiples of {step} from {smallest} up ({', '.join(str(smallest + i * step) for i in range(3))}, ...)"


def image_size(value, rule: tuple[int, int], native: int) -> int:
    """`load(image_size=...)`: None (the generator's own size) or a size the generator takes."""
    if value is None:
        return native
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputTypeError(f"image_size must be an integer or None (the generator's own size, {native}), "
                             f"got {shown(value)}")
    smallest, step = rule
    if value != smallest if not step else (value < smallest or value % step):
        raise InputError(f"image_size={value}: this generator takes {sizes_text(rule)}; pass one of those, "
                         f"or image_size=None for its own size ({native})")
    return value


# ---- image tensors ---------------------------------------------------------------------------------

def image_tensor(x: torch.Tensor, name: str, size: int) -> torch.Tensor:
    """An image tensor given as `name` -> (N, 3, size, size), after checking that it is one.

    (1, H, W) and (N, 1, H, W) are gray images, repeated to 3 channels: what an image file in
    gray ('L' mode) gives through PIL's convert('RGB'), so a gray tensor and the same image saved
    as a gray PNG give the same mixes. Values must lie in [-1, 1]; a tensor in [0, 1] cannot be
    told from a bright image, so it is taken as one."""
    shape, s = tuple(x.shape), size
    form = f"(3, {s}, {s}) or (N, 3, {s}, {s}), float in [-1, 1]"
    if x.dim() not in (3, 4):
        hint = "; a gray image (H, W): x[None]" if x.dim() == 2 else ""
        raise InputError(f"{name}: an image tensor of shape {shape}; expected {form}{hint}")
    channels = shape[-3]
    if channels not in (1, 3):
        if shape[-1] in (1, 3):
            fix = "x.permute(2, 0, 1)" if x.dim() == 3 else "x.permute(0, 3, 1, 2)"
            hint = f"channels last (H, W, C)? {fix} puts them first"
        elif channels == 4:
            hint = f"RGBA? {'x[:3]' if x.dim() == 3 else 'x[:, :3]'} keeps RGB"
        else:
            hint = "the channels go first: 3 (RGB) or 1 (gray)"
        raise InputError(f"{name}: an image tensor of shape {shape}; expected {form} ({hint})")
    if not x.is_floating_point():
        raise InputError(f"{name}: {shown(x)}; expected {form} (uint8 pixels: x.float() / 127.5 - 1)")
    if shape[-2:] != (s, s):
        raise InputError(f"{name}: {shape[-2]}x{shape[-1]} image tensor(s); this model takes {s}x{s} (its image "
                         f"size): resize first (torch.nn.functional.interpolate(x, size=({s}, {s}), "
                         f"mode='bilinear', antialias=True) on (N, 3, H, W)), or pass the image as a path or "
                         f"PIL image, which are resized and center-cropped to {s}")
    if not x.numel():
        raise InputError(f"{name}: an empty tensor of shape {shape}; give at least one image ({form})")
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(f"{name}: the image tensor holds NaN or inf; expected {form}")
    if lo < -1 - RANGE_SLACK or hi > 1 + RANGE_SLACK:
        raise InputError(f"{name}: image values from {lo:g} to {hi:g}; the model takes [-1, 1] "
                         f"(pixels 0..255: x / 127.5 - 1; values in [0, 1]: x * 2 - 1)")
    x = x if x.dim() == 4 else x.unsqueeze(0)
    return x.expand(-1, 3, -1, -1) if channels == 1 else x


def not_images(value, name: str) -> InputTypeError:
    hint = "; for several classes pass a list with one entry per class" if isinstance(value, dict) else ""
    return InputTypeError(f"{name} must be {IMAGES}, got {shown(value)}{hint}")


def empty_list(name: str) -> InputError:
    return InputError(f"{name}: an empty list; give at least one image (a path, a folder of images, a PIL image "
                      f"or an image tensor)")


def class_list(classes) -> list:
    """`encode_classes` / `mix_table`'s `classes`: a list, one entry per class."""
    if not isinstance(classes, (list, tuple)):
        raise InputTypeError(f"classes must be a list with one entry per class (each one or more images), got "
                             f"{shown(classes)}; for one class: [that]")
    if not classes:
        raise InputError("classes: an empty list; give one entry per class (each one or more images)")
    return list(classes)


# ---- codes and outputs -----------------------------------------------------------------------------

def code(value, name: str, expected: tuple[int, ...], source: str, device: torch.device) -> torch.Tensor:
    """A content or class code given to `decode` -> on `device`; its shape (less the batch) must be
    the model's, `expected`."""
    form = f"(N, {', '.join(map(str, expected))})"
    if not isinstance(value, torch.Tensor):
        raise InputTypeError(f"{name} must be a tensor of codes {form} from {source}, got {shown(value)}; "
                             f"images go to mix(content, klass), or to {source} first")
    if not value.is_floating_point():
        raise InputError(f"{name}: {shown(value)}; this model's codes are float {form} from {source}")
    if tuple(value.shape[1:]) != expected or not len(value):
        hint = f"; one code without its batch dimension: {name}[None]" if tuple(value.shape) == expected else ""
        raise InputError(f"{name}: shape {tuple(value.shape)}; this model's are {form} (from {source}){hint}")
    return value.to(device)


def pil_tensor(x) -> torch.Tensor:
    """`to_pil`'s argument: (3, H, W) or (N, 3, H, W) float, as mix and decode return."""
    form = "an image tensor (3, H, W) or (N, 3, H, W) in [-1, 1], as mix and decode return"
    if not isinstance(x, torch.Tensor):
        hint = "; to open an image file: PIL.Image.open(path)" if isinstance(x, (str, os.PathLike)) else ""
        raise InputTypeError(f"to_pil takes {form}, got {shown(x)}{hint}")
    if x.dim() not in (3, 4) or x.shape[-3] != 3 or not x.is_floating_point():
        raise InputError(f"to_pil: {shown(x)}; it takes {form}")
    return x
