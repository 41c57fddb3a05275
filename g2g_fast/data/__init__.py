"""Data (SPEC §6): the synthetic default, a folder of class sub-folders, CelebA, and the loader.

Every dataset has `len`, `num_classes`, `class_names`, `labels` (per index), `image_size`, `skipped`
and `get(index, rng) -> (float32 (3, S, S) in [-1, 1], label)`, where `rng=None` is the evaluation
transform. `build_dataset` picks one from the `--data` / `--data-format` flags; `build_stream` turns it
into an exactly resumable stream of batches through one of the loaders (`--loader`): `BatchStream`
(torch DataLoader, the reference), `CachedStream` (GPU cache) or `DaliStream` (NVIDIA DALI).
"""
from __future__ import annotations

import logging
import os

from .folder import CelebADataset, FolderDataset
from .gpu_cache import CachedStream
from .loader import BatchStream, StepPlan, Stream
from .select import LOADERS, build_stream, choose_loader
from .synthetic import SyntheticDataset
from .transforms import DataError

__all__ = ["BatchStream", "CachedStream", "LOADERS", "StepPlan", "Stream", "build_stream", "choose_loader", "CelebADataset", "DataError", "FolderDataset", "SyntheticDataset", "build_dataset"]

log = logging.getLogger("g2g_fast")


def build_dataset(data: str, *, data_format: str = "auto", image_size: int = 128,
                  resize_to: int | None = None, split: str = "train", seed: int = 0,
                  synthetic_classes: int = 8, synthetic_per_class: int = 256, synthetic_family: str = "scheme"):
    """The dataset named by `data`: "synthetic" (of `synthetic_family`, "scheme" or "shape": what a
    class is, data/synthetic.py), or a path.

    For a path, `data_format="auto"` means CelebA if `identity_CelebA.txt` is in the root, else a
    folder. A folder whose root holds FUNIT list files (`train_list.txt`, `test_list.txt`) is read
    through `{split}_list.txt` when that file exists; otherwise (also when only the other split's
    list exists, with a warning) every image in the class sub-folders is used.
    A folder named "synthetic" must be passed as "./synthetic".
    """
    if data == "synthetic":
        return SyntheticDataset(image_size=image_size, num_classes=synthetic_classes,
                                per_class=synthetic_per_class, seed=seed, split=split, family=synthetic_family)
    if data_format not in ("auto", "folder", "celeba"):
        raise DataError(f"--data-format {data_format!r} is unknown; use auto, folder or celeba")
    root = os.fspath(data)
    celeba_here = os.path.isfile(os.path.join(root, "identity_CelebA.txt"))
    if data_format == "celeba" or (data_format == "auto" and celeba_here):
        return CelebADataset(root, image_size=image_size, resize_to=resize_to, split=split)
    list_file = os.path.join(root, f"{split}_list.txt")
    if os.path.isfile(list_file):
        return FolderDataset(root, image_size=image_size, resize_to=resize_to, list_file=list_file, seed=seed)
    others = [n for n in ("train_list.txt", "test_list.txt") if os.path.isfile(os.path.join(root, n))]
    if others:
        log.warning("%s has %s but no %s_list.txt; using every image of the class sub-folders for the "
                    "%s split", root, " and ".join(others), split, split)
    return FolderDataset(root, image_size=image_size, resize_to=resize_to, seed=seed)
