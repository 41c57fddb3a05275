"""Inference from Python (notebooks, scripts): load a generator, encode images, mix them (issue 16).

    import g2g_fast
    model = g2g_fast.load("runs/g2g/checkpoints/last.pt")       # or an official FUNIT file
    mixes = model.mix(["dog.jpg", "fox.jpg"], ["cat1.jpg", "cat2.jpg", "cat3.jpg"])   # a 3-shot class
    model.to_pil(mixes[0]).save("dog_as_cat.png")

Images may be given as a path (a folder: the images directly in it, by name), a PIL image, a float
tensor in [-1, 1] of shape (3, S, S) or (N, 3, S, S) (S: the model's image size; 1 channel: gray,
repeated to 3), or a list of these. Paths and PIL images are resized (shorter side) and
center-cropped to S, as `translate` does; tensors are used as they are. Everything runs without
gradients, in chunks of `batch_size` images, on the model's device; results stay there (`to_pil`
brings them back as PIL images). Every argument is checked first (`api_checks`): a wrong one is an
`InputError` (a ValueError; `InputTypeError` for a wrong kind of value, also a TypeError).

K-shot (FUNIT's few-shot test): the class code of a class given by K images is the mean of the
class encoder's codes of the K images, which the decoder then uses as one code.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from . import api_checks as checks
from .api_checks import InputError, InputTypeError  # noqa: F401 (exported as g2g_fast.InputError, ...)
from .checkpoint import FORMAT, load_checkpoint
from .config import Funit2FunitConfig, config_from_dict
from .data.transforms import IMAGE_EXTENSIONS, is_image_file, read_rgb, to_rgb
from .reference.funit import Generator, load_official_generator
from .reference.g2g import mean_class_code
from .reference.steps import build_approach
from .samples import image_to_tensor, to_uint8
from .torch_files import safe_torch_load

FUNIT_IMAGE_SIZE = 128  # the official FUNIT models' (animal faces) image size
K_SHOT = "True: all the images are one class, their codes averaged: K-shot, K = how many you pass; " \
         "False: one class code per image"


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
    gen, size, rule = generator_and_sizes(path, kind, raw, flag)
    if image_size is not None:  # the CLIs' --image-size: the same rule as load(image_size=...)
        try:
            checks.image_size(image_size, rule, size)
        except InputError:
            raise InputError(f"--image-size {image_size}: this generator takes {checks.sizes_text(rule)}; pass one "
                             f"of those, or leave --image-size out for its own size ({size})") from None
    return gen, image_size or size


def generator_and_sizes(path: str | os.PathLike, kind: str = "auto", raw: bool = False,
                        flag: str | None = None) -> tuple[torch.nn.Module, int, tuple[int, int]]:
    """`read_generator` without the override -> (generator, its image size, the sizes it takes as
    `api_checks.size_rule` gives them)."""
    if kind not in ("auto", "checkpoint", "funit"):
        raise InputError(f"kind must be 'auto', 'checkpoint' or 'funit', got {checks.shown(kind)}")
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
        return gen.eval(), FUNIT_IMAGE_SIZE, checks.size_rule(Funit2FunitConfig())  # the official architecture
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    cfg = config_from_dict(ckpt["config"]["approach"], ckpt["config"])
    # No pretrained file is read: the checkpoint holds G, and no loss is computed here.
    approach = build_approach(cfg, int(ckpt["num_classes"]), init="inference")
    approach.load_state_dict(ckpt, source=os.fspath(path))
    gen = approach.gen if raw or approach.gen_ema is None else approach.gen_ema
    return gen.eval(), cfg.image_size, checks.size_rule(cfg)


def load(path: str | os.PathLike, device: str | torch.device = "auto", *, kind: str = "auto", raw: bool = False,
         image_size: int | None = None, batch_size: int = 32) -> "Translator":
    """Load a g2g-fast checkpoint or an official FUNIT generator file for inference.

    device: "auto" (CUDA when available), "cpu", "cuda", "cuda:N", or a torch.device. See
    `read_generator` for kind and raw; image_size: None (the generator's own) or a size it takes
    (FUNIT's: multiples of 16); batch_size: images per forward pass. The arguments are checked
    before the file is read."""
    checks.generator_path(path)
    device = checks.device(device)
    raw = checks.flag(raw, "raw", "True: the trained generator, not the EMA one (a FUNIT file: gen, not gen_test)")
    checks.positive_int(batch_size, "batch_size", "images per forward pass")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)):
        raise InputTypeError(f"image_size must be an integer or None (the generator's own size), "
                             f"got {checks.shown(image_size)}")
    gen, size, rule = generator_and_sizes(path, kind, raw)
    size = checks.image_size(image_size, rule, size)
    return Translator(gen, size, device, batch_size=batch_size, source=os.fspath(path))


# ---- the model -------------------------------------------------------------------------------------

class Translator:
    """A G2G generator (any model with encode_content / encode_class / decode) with image handling.

    Codes: `encode_content` -> content codes (N, ...), `encode_class` -> class codes (N, D), or
    (1, D) with k_shot=True; `decode(content_codes, class_codes)` -> images (N, 3, S, S) in [-1, 1]
    (either side may have batch 1: it is used for every image of the other)."""

    def __init__(self, generator: torch.nn.Module, image_size: int, device: str | torch.device = "auto",
                 batch_size: int = 32, source: str | None = None):
        if not all(callable(getattr(generator, m, None)) for m in ("encode_content", "encode_class", "decode")):
            raise InputTypeError(f"generator must be a model with encode_content, encode_class and decode (as "
                                 f"g2g_fast.load(path).generator), got {checks.shown(generator)}")
        self.batch_size = checks.positive_int(batch_size, "batch_size", "images per forward pass")
        self.image_size = checks.positive_int(image_size, "image_size", "the model's input size in pixels")
        self.device = checks.device(device)
        self.generator = generator.eval().to(self.device)
        self.source = source
        self._code_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def __repr__(self):
        return (f"Translator({type(self.generator).__name__}, image_size={self.image_size}, "
                f"device={self.device}, source={self.source!r})")

    # -- images
    def items(self, images, name: str = "images") -> list:
        """Flatten `images` (see the module docstring) into single images: paths, PIL images or
        checked (1, 3, S, S) tensors. A folder gives the images directly in it, sorted by name.
        Errors name `name`, the argument, with the index into lists (`content[2]`)."""
        if isinstance(images, torch.Tensor):
            return list(checks.image_tensor(images, name, self.image_size).split(1))
        if isinstance(images, Image.Image):
            return [images]
        if isinstance(images, (str, os.PathLike)):
            path = Path(images)
            if path.is_dir():
                files = image_files(path)
                if not files:
                    raise InputError(f"{name}: {path}: {no_images_message(path)}")
                return files
            if not path.exists():
                raise InputError(f"{name}: {path}: no such file or folder")
            return [path]
        if isinstance(images, (list, tuple)):
            if not images:
                raise checks.empty_list(name)
            return [item for i, x in enumerate(images) for item in self.items(x, f"{name}[{i}]")]
        raise checks.not_images(images, name)

    def _tensor(self, item) -> torch.Tensor:
        """One image (from `items`) -> (1, 3, S, S) on the device."""
        if isinstance(item, torch.Tensor):
            x = item
        else:
            try:  # every PIL mode by its real range (16-bit, float, alpha: data/transforms.to_rgb), as training
                rgb = to_rgb(item, "a PIL image") if isinstance(item, Image.Image) else read_rgb(item)
            except ValueError as e:  # an unreadable file or mode: the same line, as the API's own error class
                raise InputError(str(e)) from None
            x = image_to_tensor(rgb, self.image_size)
        return x.to(self.device, torch.float32)

    def batches(self, items: list) -> Iterator[torch.Tensor]:
        """`items` (from `items`) loaded batch_size at a time -> (n, 3, S, S) tensors on the device."""
        for i in range(0, len(items), self.batch_size):
            yield torch.cat([self._tensor(x) for x in items[i:i + self.batch_size]])

    def images(self, images) -> torch.Tensor:
        """All of `images` as one (N, 3, S, S) tensor on the device."""
        return torch.cat(list(self.batches(self.items(images))))

    @staticmethod
    def to_pil(images: torch.Tensor) -> Image.Image | list[Image.Image]:
        """(3, H, W) -> a PIL image; (N, 3, H, W) -> a list of them."""
        images = checks.pil_tensor(images)
        if images.dim() == 4:
            return [Translator.to_pil(x) for x in images]
        return Image.fromarray(to_uint8(images).numpy())

    # -- codes
    @torch.no_grad()
    def encode_content(self, images) -> torch.Tensor:
        """Content codes E_A(x), one per image."""
        return self._content_codes(self.items(images))

    @torch.no_grad()
    def encode_class(self, images, k_shot: bool = False) -> torch.Tensor:
        """Class codes E_B(x), one per image: (N, D); k_shot=True: all of `images` are one class,
        and its code is the mean of theirs: (1, D)."""
        k_shot = checks.flag(k_shot, "k_shot", K_SHOT)
        items = self.items(images)
        return self._class_means([items]) if k_shot else self._class_codes(items)

    @torch.no_grad()
    def encode_classes(self, classes: list) -> torch.Tensor:
        """One code per class: `classes[j]` gives class j's images (one or more: K-shot), and its
        code is the mean of their class codes (`mean_class_code`, as training with class_shots
        forms it) -> (C, D). Batched across classes."""
        return self._class_means([self.items(c, f"classes[{j}]") for j, c in enumerate(checks.class_list(classes))])

    def _content_codes(self, items: list) -> torch.Tensor:
        return torch.cat([self.generator.encode_content(x) for x in self.batches(items)])

    def _class_codes(self, items: list) -> torch.Tensor:
        return torch.cat([self.generator.encode_class(x) for x in self.batches(items)])

    def _class_means(self, groups: list[list]) -> torch.Tensor:
        """Checked, non-empty groups of items -> one mean class code per group (C, D)."""
        codes = self._class_codes([item for g in groups for item in g])
        starts = [0]
        for g in groups:
            starts.append(starts[-1] + len(g))
        return torch.cat([mean_class_code(codes[a:b].unsqueeze(0)) for a, b in zip(starts, starts[1:])])

    def code_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(content code, class code) shapes less the batch dimension, from one blank image, once."""
        if self._code_shapes is None:
            with torch.no_grad():
                x = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
                self._code_shapes = (tuple(self.generator.encode_content(x).shape[1:]),
                                     tuple(self.generator.encode_class(x).shape[1:]))
        return self._code_shapes

    @torch.no_grad()
    def decode(self, content_codes: torch.Tensor, class_codes: torch.Tensor) -> torch.Tensor:
        """G(content, class) pairwise, in batches; a side with batch 1 goes with every image of the other."""
        content_shape, class_shape = self.code_shapes()
        a = checks.code(content_codes, "content_codes", content_shape, "encode_content", self.device)
        b = checks.code(class_codes, "class_codes", class_shape, "encode_class or encode_classes", self.device)
        n = max(len(a), len(b))
        if len(a) not in (1, n) or len(b) not in (1, n):
            raise InputError(f"{len(a)} content codes and {len(b)} class codes: give as many of each, or one of "
                             f"either")
        a, b = a.expand(n, *a.shape[1:]), b.expand(n, *b.shape[1:])
        return torch.cat([self.generator.decode(a[i:i + self.batch_size], b[i:i + self.batch_size])
                          for i in range(0, n, self.batch_size)])

    # -- mixes
    @torch.no_grad()
    def mix(self, content, klass, k_shot: bool = True) -> torch.Tensor:
        """The content images rendered with the class -> (N, 3, S, S) in [-1, 1].

        k_shot=True: all of `klass` is one class (K-shot: its class codes averaged), used for every
        content image. k_shot=False: pairwise, content i with class image i (or one class image
        for all)."""
        k_shot = checks.flag(k_shot, "k_shot", K_SHOT)
        a, b = self.items(content, "content"), self.items(klass, "klass")  # both checked before any work
        return self.decode(self._content_codes(a), self._class_means([b]) if k_shot else self._class_codes(b))

    @torch.no_grad()
    def iter_table(self, contents, class_codes: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """The content x class table in chunks of whole rows, for any number of images in bounded
        memory: yields (first row, content images (R, 3, S, S), mixes (R, C, 3, S, S)); `class_codes`
        from `encode_classes`. Each chunk decodes at most batch_size mixes per forward pass."""
        items = self.items(contents, "contents")
        class_codes = checks.code(class_codes, "class_codes", self.code_shapes()[1], "encode_classes", self.device)
        c = len(class_codes)
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
        self.items(contents, "contents")  # checked before the class codes are computed
        codes = self.encode_classes(classes)
        return torch.cat([mixes for _, _, mixes in self.iter_table(contents, codes)])
