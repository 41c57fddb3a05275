"""Datasets of image files: a folder of class sub-folders (FUNIT animal faces) and CelebA identities.

Both share `_FileDataset`: a list of (path, label), a cheap check of every file at construction
(header and end marker; bad files are skipped with one warning; a PIL mode that cannot be
converted, `transforms.image_problem`, is an error), and `get` that decodes (`transforms.load_rgb`:
every mode by its real range) and applies FUNIT's transform. The GPU loaders use `infos` (size and
mode per file, from that check) and `stored` (the resized image before flip and crop).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import torch

import numpy as np
from PIL import Image

from .transforms import (DataError, ImageInfo, check_sizes, funit_transform, image_info, image_problem,
                         is_image_file, load_rgb, resized_size)

log = logging.getLogger("g2g_fast")

_FEW = 3  # how many file names an error or warning lists before "..."


def _few(names: list[str]) -> str:
    return ", ".join(names[:_FEW]) + (f", ... ({len(names)} in all)" if len(names) > _FEW else "")


def _inspect(path: str) -> tuple[ImageInfo | None, str | None]:
    """(`image_info`, `image_problem`) of one file: the up-front check."""
    info = image_info(path)
    return info, None if info is None else image_problem(path, info.mode)


def _require_dir(root: str) -> None:
    if not os.path.exists(root):
        raise DataError(f"--data {root}: does not exist; pass an existing dataset folder or "
                        f"'--data synthetic'")
    if not os.path.isdir(root):
        raise DataError(f"--data {root}: is a file, not a folder; pass the folder that holds the "
                        f"class sub-folders (or the CelebA root)")


class _FileDataset:
    """Shared part of the file-backed datasets; subclasses supply `paths`, `labels`, `class_names`."""

    augmented = True  # FUNIT's random flip and crop in training

    def __init__(self, paths: list[str], labels: list[int], class_names: list[str], image_size: int,
                 resize_to: int | None, where: str):
        self.image_size = image_size
        self.resize_to = check_sizes(image_size, resize_to)
        # Threads, because verify() is mostly file I/O; map keeps the order.
        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
            infos, problems = zip(*pool.map(_inspect, paths)) if paths else ((), ())
        ok = [info is not None for info in infos]
        self.skipped: list[str] = [p for p, good in zip(paths, ok) if not good]
        if self.skipped:
            log.warning("%s: skipped %d unreadable image file(s) (remove or replace them): %s", where,
                        len(self.skipped), _few(self.skipped))
        kept = [(p, y) for p, y, good in zip(paths, labels, ok) if good]
        # A mode that cannot be converted is an error rather than a skip: the file is fine, and
        # re-saving it (the fix the message names) keeps it in the data.
        refused = [f"{p} ({w})" for p, w in zip(paths, problems) if w]
        if refused:
            raise DataError(f"{where}: {len(refused)} image(s) cannot be converted to RGB: {_few(refused)}")
        if not kept:
            raise DataError(f"{where}: none of the {len(paths)} image files can be read; "
                            f"check that they are valid jpg/png/bmp/webp images")
        # Relabel densely: a class whose every file was bad disappears rather than staying empty.
        present = sorted({y for _, y in kept})
        if len(present) < 2:
            raise DataError(f"{where}: found {len(present)} class(es) with readable images; G2G needs "
                            f"at least 2 (one sub-folder or identity per class)")
        new = {old: i for i, old in enumerate(present)}
        self.class_names = [class_names[old] for old in present]
        self.num_classes = len(present)
        self.paths = [p for p, _ in kept]
        self.labels = [new[y] for _, y in kept]
        self.infos = [info for info in infos if info is not None]
        self._failed: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, index: int) -> tuple[int, Image.Image]:
        """(i, RGB image) of the first decodable file at `index` or after it (wrapping around).
        A file that fails to decode (one that passed the up-front check but is broken further in)
        is logged once and replaced by the next index's file, so every loader and every run makes
        the same replacement. `skipped` is updated in this process only (in DataLoader workers it
        is the worker's copy)."""
        for k in range(len(self.paths)):
            i = (index + k) % len(self.paths)
            path = self.paths[i]
            try:
                return i, load_rgb(path)
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
                if path not in self._failed:
                    self._failed.add(path)
                    self.skipped.append(path)
                    log.warning("cannot decode %s (%s); using the next image instead", path, err)
        raise DataError(f"no image of this dataset can be decoded (first: {self.paths[0]}); "
                        f"check the files")

    def get(self, index: int, rng: torch.Generator | None) -> tuple[torch.Tensor, int]:
        """Decoded, transformed image and its label (of the replacement, see `_decode`)."""
        i, img = self._decode(index)
        # The generator is untouched by a failed decode, so the replacement sample gets exactly
        # the augmentation it would have got at its own index with this generator.
        return funit_transform(img, self.image_size, self.resize_to, rng), self.labels[i]

    def stored(self, index: int, device: str | torch.device = "cpu") -> tuple[int, torch.Tensor]:
        """(i, uint8 (H, W, 3) on the CPU): the image `get` would flip and crop, resized (shorter side
        `resize_to`) but not yet flipped; i is the index actually decoded (see `_decode`). A flip
        commutes exactly with PIL's bilinear resize, so flipping later gives `get`'s pixels."""
        i, img = self._decode(index)
        size = resized_size(img.width, img.height, self.resize_to)
        if size != img.size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        del device  # decoded on the CPU; the cache moves it
        return i, torch.from_numpy(np.array(img, dtype=np.uint8))  # np.array: PIL's buffer is read-only


def _read_list_file(root: str, list_file: str) -> list[str]:
    """Lines `class/file.jpg` relative to root; relative list_file paths are tried as given (cwd)
    and then under root."""
    as_given = os.path.exists(list_file) or os.path.isabs(list_file)
    path = list_file if as_given else os.path.join(root, list_file)
    if not os.path.isfile(path):
        raise DataError(f"list file {list_file}: does not exist (also looked in {root}); pass the path "
                        f"of a file of 'class/file.jpg' lines")
    with open(path) as f:
        entries = [line.strip() for line in f if line.strip()]
    if not entries:
        raise DataError(f"list file {path}: is empty; add 'class/file.jpg' lines or drop the list file")
    flat = [e for e in entries if "/" not in e.strip("/")]
    if flat:
        raise DataError(f"list file {path}: lines without a class folder: {_few(flat)}; write each "
                        f"line as 'class/file.jpg'")
    missing = [e for e in entries if not os.path.isfile(os.path.join(root, e))]
    if missing:
        raise DataError(f"list file {path}: {len(missing)} listed file(s) missing under {root}: "
                        f"{_few(missing)}; fix the list or the root folder")
    return entries


class FolderDataset(_FileDataset):
    """A folder of class sub-folders (FUNIT animal-faces layout), or the files named by a FUNIT list.

    Without a list file, classes are the sorted names of the sub-folders holding images directly
    (not in nested folders); with one, the sorted distinct first path components of its lines.
    `seed` is accepted so every dataset takes the same keywords; this dataset has no randomness of
    its own (augmentation comes from the generator passed to `get`).
    """

    def __init__(self, root: str, image_size: int = 128, resize_to: int | None = None,
                 list_file: str | None = None, seed: int = 0):
        root = os.fspath(root)
        _require_dir(root)
        self.root, self.seed = root, seed
        if list_file is not None:
            rel = _read_list_file(root, os.fspath(list_file))
            class_names = sorted({e.strip("/").split("/")[0] for e in rel})
            index = {c: i for i, c in enumerate(class_names)}
            paths = [os.path.join(root, e) for e in rel]
            labels = [index[e.strip("/").split("/")[0]] for e in rel]
            where = f"list file {list_file}"
        else:
            class_names, paths, labels = self._scan(root)
            where = f"--data {root}"
        super().__init__(paths, labels, class_names, image_size, resize_to, where)

    @staticmethod
    def _scan(root: str) -> tuple[list[str], list[str], list[int]]:
        class_names, paths, labels = [], [], []
        for name in sorted(os.listdir(root)):
            folder = os.path.join(root, name)
            if not os.path.isdir(folder):
                continue
            files = sorted(f for f in os.listdir(folder)
                           if is_image_file(f) and os.path.isfile(os.path.join(folder, f)))
            if files:
                paths += [os.path.join(folder, f) for f in files]
                labels += [len(class_names)] * len(files)
                class_names.append(name)
        if not paths:
            loose = sum(is_image_file(f) for f in os.listdir(root))
            hint = (f"{loose} images lie directly in it; move each class into its own sub-folder"
                    if loose else "put each class's jpg/jpeg/png/bmp/webp images in its own sub-folder")
            raise DataError(f"--data {root}: no images in class sub-folders; {hint}")
        if len(class_names) < 2:
            raise DataError(f"--data {root}: found {len(class_names)} class sub-folder with images "
                            f"({class_names[0]}); G2G needs at least 2 classes, one sub-folder each")
        return class_names, paths, labels


CELEBA_SPLITS = {"train": 0, "val": 1, "test": 2}  # codes of list_eval_partition.txt


def _read_pairs(path: str) -> list[tuple[str, int]]:
    """Lines `000001.jpg 2880` -> [(file, int)]; a malformed line is an error naming it."""
    pairs = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].isdigit():
                raise DataError(f"{path}:{lineno}: expected 'file.jpg <integer>', got {line.strip()!r}; "
                                f"restore the original CelebA file")
            pairs.append((parts[0], int(parts[1])))
    return pairs


class CelebADataset(_FileDataset):
    """CelebA with identities as classes: `root/img_align_celeba/*.jpg`, `root/identity_CelebA.txt`,
    `root/list_eval_partition.txt`. Classes are the identities present in `split`, relabelled
    0..K-1 in increasing (numeric) identity id; `class_names` are those ids as strings."""

    def __init__(self, root: str, image_size: int = 128, resize_to: int | None = None,
                 split: str = "train"):
        root = os.fspath(root)
        _require_dir(root)
        if split not in CELEBA_SPLITS:
            raise DataError(f"split {split!r} is not a CelebA split; use one of {', '.join(CELEBA_SPLITS)}")
        need = ("img_align_celeba", "identity_CelebA.txt", "list_eval_partition.txt")
        missing = [n for n in need if not os.path.exists(os.path.join(root, n))]
        if missing:
            raise DataError(f"--data {root}: CelebA file(s) missing: {', '.join(missing)}; download them "
                            f"into this folder or pass --data-format folder")
        self.root, self.split = root, split
        identity = dict(_read_pairs(os.path.join(root, "identity_CelebA.txt")))
        code = CELEBA_SPLITS[split]
        files = sorted(f for f, s in _read_pairs(os.path.join(root, "list_eval_partition.txt")) if s == code)
        if not files:
            raise DataError(f"--data {root}: list_eval_partition.txt has no {split} images (code {code}); "
                            f"restore the original file or pick another split")
        unknown = [f for f in files if f not in identity]
        if unknown:
            raise DataError(f"--data {root}: {len(unknown)} {split} image(s) have no identity in "
                            f"identity_CelebA.txt: {_few(unknown)}; restore the original file")
        image_dir = os.path.join(root, "img_align_celeba")
        on_disk = set(os.listdir(image_dir))
        absent = [f for f in files if f not in on_disk]
        if absent:
            raise DataError(f"--data {root}: {len(absent)} {split} image(s) listed in "
                            f"list_eval_partition.txt are missing from img_align_celeba: {_few(absent)}; "
                            f"complete the download")
        ids = sorted({identity[f] for f in files})
        label = {ident: i for i, ident in enumerate(ids)}
        super().__init__([os.path.join(image_dir, f) for f in files], [label[identity[f]] for f in files],
                         [str(i) for i in ids], image_size, resize_to, f"--data {root} ({split})")
