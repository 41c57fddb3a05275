"""Inference from Python (notebooks, scripts): load a generator, encode images, mix them (issue 16).

    import g2g_fast
    model = g2g_fast.load("runs/g2g/checkpoints/last.pt")       # or an official FUNIT file
    mixes = model.mix(["dog.jpg", "fox.jpg"], ["cat1.jpg", "cat2.jpg", "cat3.jpg"])   # a 3-shot class
    model.to_pil(mixes[0]).save("dog_as_cat.png")

Images may be given as a path (a folder: the images directly in it, by name), a PIL image, a float
tensor in [-1, 1] of shape (3, H, W) or (N, 3, H, W), or a list of these. Paths and PIL images are
resized (shorter side) and center-cropped to the model's image size, as `translate` does; tensors
are used as they are. Everything runs without gradients, in chunks of `batch_size` images, on the
model's device; results stay there (`to_pil` brings them back as PIL images).

K-shot (FUNIT's few-shot test): the class code of a class given by K images is the mean of the
class encoder's codes of the K images, which the decoder then uses as one code.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from .checkpoint import FORMAT, load_checkpoint
from .config import config_from_dict
from .data.transforms import IMAGE_EXTENSIONS, is_image_file
from .options import pick_device
from .reference.funit import Generator, load_official_generator
from .reference.g2g import mean_class_code
from .reference.steps import build_approach
from .samples import image_to_tensor, load_image, to_uint8
from .torch_files import safe_torch_load

FUNIT_IMAGE_SIZE = 128  # the official FUNIT models' (animal faces) image size


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files (jpg, jpeg, png, bmp, webp) directly in `folder`, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and is_image_file(p.name))


def no_images_message(folder: str | os.PathLike) -> str:
    """Why a folder gives no images, as the end of an error line."""
    subs = [p.name for p in sorted(Path(folder).iterdir()) if p.is_dir() and image_files(p)]
    hint = (f"; it has sub-folders with images ({', '.join(subs[:3])}{', ...' if len(subs) > 3 else ''}): "
            f"pass those" if subs else "")
    return f"a folder with no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) directly in it{hint}"


# ---- loading a generator --------------------------------------------------------------------------

def read_generator(path: str | os.PathLike, kind: str = "auto", raw: bool = False, image_size: int | None = None,
                   flag: str | None = None) -> tuple[torch.nn.Module, int]:
    """A generator file -> (generator in eval mode on the CPU, its image size).

    kind: "checkpoint" (a g2g-fast training checkpoint: its EMA generator, `raw` for the trained
    one), "funit" (an official FUNIT generator file: `gen_test`, `raw` for `gen`; image size 128)
    or "auto" (whichever the file is). `image_size` overrides the size. Errors name `flag` (the
    option that named the file) and the file."""
    if kind not in ("auto", "checkpoint", "funit"):
        raise ValueError(f"kind must be 'auto', 'checkpoint' or 'funit', got {kind!r}")
    ckpt = None
    if kind == "auto":  # read once, then look at what the file holds
        ckpt = safe_torch_load(path, what="generator file", flag=flag)
        if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
            kind = "checkpoint"
        elif isinstance(ckpt, dict) and any(isinstance(ckpt.get(k), dict) for k in ("gen", "gen_test")):
            kind = "funit"
        else:
            raise ValueError(f"{f'{flag} ' if flag else ''}{os.fspath(path)}: neither a g2g-fast training "
                             f"checkpoint nor an official FUNIT generator file (no 'format' or 'gen' keys)")
    if kind == "funit":
        gen = Generator()
        load_official_generator(gen, path, "gen" if raw else "gen_test", flag=flag, ckpt=ckpt)
        return gen.eval(), image_size or FUNIT_IMAGE_SIZE
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    cfg = config_from_dict(ckpt["config"]["approach"], ckpt["config"])
    # No pretrained file is read: the checkpoint holds G, and no loss is computed here.
    approach = build_approach(cfg, int(ckpt["num_classes"]), init="inference")
    approach.load_state_dict(ckpt, source=os.fspath(path))
    gen = approach.gen if raw or approach.gen_ema is None else approach.gen_ema
    return gen.eval(), image_size or cfg.image_size


def load(path: str | os.PathLike, device: str | torch.device = "auto", *, kind: str = "auto", raw: bool = False,
         image_size: int | None = None, batch_size: int = 32) -> "Translator":
    """Load a g2g-fast checkpoint or an official FUNIT generator file for inference.

    device: "auto" (CUDA when available), "cpu", "cuda", or a torch.device. See `read_generator`
    for kind, raw and image_size; batch_size: images per forward pass."""
    gen, size = read_generator(path, kind, raw, image_size)
    return Translator(gen, size, device, batch_size=batch_size, source=os.fspath(path))


# ---- the model -------------------------------------------------------------------------------------

class Translator:
    """A G2G generator (any model with encode_content / encode_class / decode) with image handling.

    Codes: `encode_content` -> content codes (N, ...), `encode_class` -> class codes (N, D), or
    (1, D) with k_shot=True; `decode(content_codes, class_codes)` -> images (N, 3, S, S) in [-1, 1]
    (either side may have batch 1: it is used for every image of the other)."""

    def __init__(self, generator: torch.nn.Module, image_size: int, device: str | torch.device = "auto",
                 batch_size: int = 32, source: str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.device = pick_device(device) if isinstance(device, str) and device in ("auto", "cpu", "cuda") \
            else torch.device(device)
        self.generator = generator.eval().to(self.device)
        self.image_size, self.batch_size, self.source = image_size, batch_size, source

    def __repr__(self):
        return (f"Translator({type(self.generator).__name__}, image_size={self.image_size}, "
                f"device={self.device}, source={self.source!r})")

    # -- images
    @staticmethod
    def items(images) -> list:
        """Flatten `images` (see the module docstring) into single images: paths, PIL images or
        (3, H, W) tensors. A folder gives the images directly in it, sorted by name."""
        if isinstance(images, torch.Tensor):
            if images.dim() == 3:
                return [images]
            if images.dim() == 4:
                return list(images)
            raise ValueError(f"an image tensor must be (3, H, W) or (N, 3, H, W), got {tuple(images.shape)}")
        if isinstance(images, Image.Image):
            return [images]
        if isinstance(images, (str, os.PathLike)):
            path = Path(images)
            if path.is_dir():
                files = image_files(path)
                if not files:
                    raise ValueError(f"{path}: {no_images_message(path)}")
                return files
            return [path]
        if isinstance(images, (list, tuple)):
            return [item for x in images for item in Translator.items(x)]
        raise TypeError(f"images must be paths, PIL images or tensors, got {type(images).__name__}")

    def _tensor(self, item) -> torch.Tensor:
        """One image -> (1, 3, H, W) on the device."""
        if isinstance(item, torch.Tensor):
            if not item.is_floating_point():
                raise ValueError("image tensors must be float in [-1, 1] (uint8 pixels: x / 127.5 - 1)")
            x = item.unsqueeze(0)
        elif isinstance(item, Image.Image):
            x = image_to_tensor(item, self.image_size)
        else:
            x = load_image(item, self.image_size)
        return x.to(self.device, torch.float32)

    def batches(self, items: list) -> Iterator[torch.Tensor]:
        """`items` (from `items`) loaded batch_size at a time -> (n, 3, H, W) tensors on the device."""
        for i in range(0, len(items), self.batch_size):
            yield torch.cat([self._tensor(x) for x in items[i:i + self.batch_size]])

    def images(self, images) -> torch.Tensor:
        """All of `images` as one (N, 3, H, W) tensor on the device."""
        return torch.cat(list(self.batches(self.items(images))))

    @staticmethod
    def to_pil(images: torch.Tensor) -> Image.Image | list[Image.Image]:
        """(3, H, W) -> a PIL image; (N, 3, H, W) -> a list of them."""
        if images.dim() == 4:
            return [Translator.to_pil(x) for x in images]
        return Image.fromarray(to_uint8(images).numpy())

    # -- codes
    @torch.no_grad()
    def encode_content(self, images) -> torch.Tensor:
        """Content codes E_A(x), one per image."""
        return torch.cat([self.generator.encode_content(x) for x in self.batches(self.items(images))])

    @torch.no_grad()
    def encode_class(self, images, k_shot: bool = False) -> torch.Tensor:
        """Class codes E_B(x), one per image: (N, D); k_shot=True: all of `images` are one class,
        and its code is the mean of theirs: (1, D)."""
        if k_shot:
            return self.encode_classes([images])
        return torch.cat([self.generator.encode_class(x) for x in self.batches(self.items(images))])

    @torch.no_grad()
    def encode_classes(self, classes: list) -> torch.Tensor:
        """One code per class: `classes[j]` gives class j's images (one or more: K-shot), and its
        code is the mean of their class codes (`mean_class_code`, as training with class_shots
        forms it) -> (C, D). Batched across classes."""
        groups = [self.items(c) for c in classes]
        if not groups or any(not g for g in groups):
            raise ValueError("every class needs at least one image")
        codes = torch.cat([self.generator.encode_class(x) for x in self.batches([item for g in groups for item in g])])
        starts = [0]
        for g in groups:
            starts.append(starts[-1] + len(g))
        return torch.cat([mean_class_code(codes[a:b].unsqueeze(0)) for a, b in zip(starts, starts[1:])])

    @torch.no_grad()
    def decode(self, content_codes: torch.Tensor, class_codes: torch.Tensor) -> torch.Tensor:
        """G(content, class) pairwise, in batches; a side with batch 1 goes with every image of the other."""
        n = max(len(content_codes), len(class_codes))
        if len(content_codes) not in (1, n) or len(class_codes) not in (1, n):
            raise ValueError(f"{len(content_codes)} content codes and {len(class_codes)} class codes: "
                             f"give as many of each, or one of either")
        a = content_codes.expand(n, *content_codes.shape[1:])
        b = class_codes.expand(n, *class_codes.shape[1:])
        return torch.cat([self.generator.decode(a[i:i + self.batch_size], b[i:i + self.batch_size])
                          for i in range(0, n, self.batch_size)])

    # -- mixes
    def mix(self, content, klass, k_shot: bool = True) -> torch.Tensor:
        """The content images rendered with the class -> (N, 3, S, S) in [-1, 1].

        k_shot=True: all of `klass` is one class (K-shot: its class codes averaged), used for every
        content image. k_shot=False: pairwise, content i with class image i (or one class image
        for all)."""
        return self.decode(self.encode_content(content), self.encode_class(klass, k_shot=k_shot))

    @torch.no_grad()
    def iter_table(self, contents, class_codes: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """The content x class table in chunks of whole rows, for any number of images in bounded
        memory: yields (first row, content images (R, 3, S, S), mixes (R, C, 3, S, S)); `class_codes`
        from `encode_classes`. Each chunk decodes at most batch_size mixes per forward pass."""
        items, c = self.items(contents), len(class_codes)
        class_codes = class_codes.to(self.device)
        rows = max(1, self.batch_size // c)
        for r0 in range(0, len(items), rows):
            x = torch.cat([self._tensor(item) for item in items[r0:r0 + rows]])
            a = self.generator.encode_content(x)
            ia = torch.arange(len(x), device=self.device).repeat_interleave(c)
            jb = torch.arange(c, device=self.device).repeat(len(x))
            out = torch.cat([self.generator.decode(a[ia[p:p + self.batch_size]], class_codes[jb[p:p + self.batch_size]])
                             for p in range(0, len(ia), self.batch_size)])
            yield r0, x, out.view(len(x), c, *out.shape[1:])

    def mix_table(self, contents, classes: list) -> torch.Tensor:
        """Every content image with every class -> (N, C, 3, S, S); `classes[j]` gives class j's
        image(s) (several: one K-shot class, codes averaged)."""
        codes = self.encode_classes(classes)
        return torch.cat([mixes for _, _, mixes in self.iter_table(contents, codes)])
