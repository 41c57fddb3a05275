"""The reference loader: an infinite, exactly resumable stream of batches through a torch DataLoader.

Everything a batch contains is a pure function of (seed, global step, rank, world size):
- epoch e's order is `torch.randperm(n)` from a generator seeded `seed * 1_000_003 + e`;
- global step k consumes global batch `k % batches_per_epoch` of epoch `k // batches_per_epoch`,
  a global batch being `world_size * batch_size` consecutive entries of the order;
- rank r takes entries `[r * h, (r + 1) * h)` and `[W * h + r * h, W * h + (r + 1) * h)` of the
  global batch (h = batch_size / 2, W = world_size): the ranks' shards are disjoint, cover the
  epoch, and each rank's halves pairs (x[j], x[j + h]) are pairs (x[j], x[j + W * h]) of one
  process with batch size W * batch_size, so W ranks train exactly that process's step (an odd
  batch size takes the contiguous entries `[r * batch_size, (r + 1) * batch_size)`);
- the sample (epoch, index) is augmented with a generator seeded from (seed, epoch, index);
- with K-shot class codes (`shots=K`, the config's `class_shots`), each sample (epoch, index) also
  brings K other images of its class, drawn from a generator seeded from (seed, epoch, index) on a
  stream of their own (`shot_indices`), each augmented as that image would be in that epoch.
So `BatchStream(..., start_step=k)` continues exactly where a stream that yielded k batches stopped,
and the result does not depend on the number of workers or on which worker loads which sample.
Every loader (`StepPlan` is the shared schedule) follows these rules, so they are interchangeable.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .transforms import Augment, DataError, draw_augment, resized_size


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of dataset indices for `epoch`."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The augmentation generator of one sample. SeedSequence hashes the triple, so neighbouring
    samples and epochs get unrelated streams."""
    state = np.random.SeedSequence([seed % 2**63, epoch, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def nhwc_to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float32 (B, 3, S, S) in [-1, 1]: a channels_last view, scaled by the
    same ops as the reference transform (`transforms.to_unit_range`), so the values are identical."""
    return pixels.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def stored_sizes(dataset) -> list[tuple[int, int]]:
    """(width, height) of every image before flip and crop (`dataset.stored`), from the up-front
    file check, without decoding; synthetic images are stored at their final size."""
    if hasattr(dataset, "infos"):
        return [resized_size(i.width, i.height, dataset.resize_to) for i in dataset.infos]
    return [(dataset.image_size, dataset.image_size)] * len(dataset)


def sample_augment(dataset, seed: int, epoch: int, index: int, width: int, height: int) -> Augment:
    """The flip/crop decisions `dataset.get` makes for sample (epoch, index) of a stream, for a
    resized image of `width` x `height`; the GPU loaders replay them to produce the same pixels.
    Datasets with `augmented = False` (synthetic) are never flipped or cropped."""
    if not dataset.augmented:
        return Augment(False, 0, 0)
    return draw_augment(sample_generator(seed, epoch, index), width, height, dataset.image_size)


SHOT_STREAM = 0x5407  # the K-shot draws' own SeedSequence stream: they never reuse an augmentation's


def shot_indices(seed: int, epoch: int, index: int, members: list[int], k: int) -> list[int]:
    """K images of the class of `index` other than itself (`members`: every index of that class),
    for K-shot class codes in training: distinct while the class has K others, else every other
    image once and then repeats (a permutation cycled). A pure function of (seed, epoch, index)."""
    others = [m for m in members if m != index]
    if not others:
        raise DataError(f"image {index} is the only one of its class: K-shot class codes need another image")
    state = np.random.SeedSequence([seed % 2**63, epoch, index, SHOT_STREAM]).generate_state(1, np.uint64)[0]
    order = torch.randperm(len(others), generator=torch.Generator().manual_seed(int(state))).tolist()
    return [others[order[j % len(others)]] for j in range(k)]


class StepPlan:
    """The schedule shared by every loader: which (epoch, index) samples rank `rank` gets at a step.

    `shots` K > 0 (`labels` then required): `load_keys(step)` appends K keys per sample, the images
    of its K-shot class code (`shot_indices`), sample-major: sample j's are entries B + j*K ... B + j*K + K-1."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, drop_last: bool = True, rank: int = 0,
                 world_size: int = 1, labels=None, shots: int = 0, class_names=None):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size {world_size})")
        total = batch_size * world_size
        if n < total:
            per = f" ({world_size} ranks x {batch_size})" if world_size > 1 else ""
            raise DataError(f"the dataset has {n} images, fewer than the batch size {total}{per}; "
                            f"lower the batch size or add images")
        if world_size > 1 and not drop_last:
            raise DataError("drop_last=False is not supported with several ranks: the short last batch "
                            "would be split unevenly")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.per_epoch = n // total if drop_last else math.ceil(n / total)
        self._order, self._order_epoch = None, -1
        self.shots, self._members = shots, None
        if shots:
            if labels is None or len(labels) != n:
                raise DataError("K-shot class codes (class_shots) need the dataset's labels")
            self._members = {}
            for i, c in enumerate(labels):
                self._members.setdefault(int(c), []).append(i)
            alone = [c for c, m in self._members.items() if len(m) < 2]
            if alone:
                name = class_names[alone[0]] if class_names else alone[0]
                raise DataError(f"class_shots={shots}: class {name!r} has only one image, and its K-shot class "
                                f"code needs other images of the class; add images, drop that class, or use "
                                f"--set class_shots=0")
            self.labels = [int(c) for c in labels]

    def keys(self, step: int) -> list[tuple[int, int]]:
        """The (epoch, index) pairs of global step `step` for this rank."""
        epoch, b = divmod(step, self.per_epoch)
        if epoch != self._order_epoch:
            self._order, self._order_epoch = epoch_order(self.n, self.seed, epoch).tolist(), epoch
        base = b * self.batch_size * self.world_size
        if self.world_size > 1 and self.batch_size % 2 == 0:
            # The first half from the global first half, the second from the second half: the
            # G2G pairs of one process (g2g_fast.distributed explains the exactness).
            h, global_half = self.batch_size // 2, self.batch_size * self.world_size // 2
            first = base + self.rank * h
            picked = self._order[first:first + h] + self._order[first + global_half:first + global_half + h]
        else:
            start = base + self.rank * self.batch_size
            picked = self._order[start:start + self.batch_size]
        return [(epoch, i) for i in picked]

    def load_keys(self, step: int) -> list[tuple[int, int]]:
        """What a loader loads at `step`: `keys(step)`, then with `shots` the K-shot images of each."""
        keys = self.keys(step)
        if not self.shots:
            return keys
        extra = [(epoch, j) for epoch, i in keys
                 for j in shot_indices(self.seed, epoch, i, self._members[self.labels[i]], self.shots)]
        return keys + extra


def plan_for(dataset, batch_size: int, seed: int, drop_last: bool, rank: int, world_size: int,
             shots: int = 0) -> StepPlan:
    """The StepPlan of a loader over `dataset` (its labels and class names for K-shot draws)."""
    return StepPlan(len(dataset), batch_size, seed, drop_last, rank, world_size,
                    labels=dataset.labels if shots else None, shots=shots,
                    class_names=getattr(dataset, "class_names", None))


class _StepBatches(Sampler):
    """Infinite batch sampler: lists of (epoch, index), starting at global step `start_step`."""

    def __init__(self, plan: StepPlan, start_step: int):
        self.plan, self.start_step = plan, start_step

    def __iter__(self):
        for step in itertools.count(self.start_step):
            yield self.plan.load_keys(step)


class _Augmented(torch.utils.data.Dataset):
    """Map-style view keyed by (epoch, index), seeding each sample's augmentation."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        return self.dataset.get(index, sample_generator(self.seed, epoch, index))


class Stream:
    """What the trainer needs of every loader: `next(stream) -> (x float32 (B, 3, S, S) in [-1, 1],
    y int64 (B,))` forever, `step` (batches yielded so far, counting `start_step`),
    `batches_per_epoch`, `epoch` (of the next batch), `name` and `close()`. With `shots` K > 0
    (K-shot class codes) the batch has a third part: `shots` float32 (B * K, 3, S, S), sample j's
    K images at rows j*K ... j*K + K-1."""

    name = "?"
    step = 0
    batches_per_epoch = 1
    shots = 0

    def split(self, x: torch.Tensor, y: torch.Tensor):
        """A loaded batch of B * (1 + K) images -> (x, y) or, with shots, (x, y, shot images)."""
        if not self.shots:
            return x, y
        b = x.shape[0] // (1 + self.shots)
        return x[:b], y[:b], x[b:]

    @property
    def epoch(self) -> int:
        return self.step // self.batches_per_epoch

    def __iter__(self):
        return self

    def close(self) -> None:
        pass


class BatchStream(Stream):
    """`next(stream) -> (x float32 (B, 3, S, S), y int64 (B,))` on the CPU, forever.

    Attributes: `step` (batches yielded so far, counting `start_step`), `batches_per_epoch`, and
    `epoch` (the epoch the next batch comes from). With `drop_last=False` the last batch of each
    epoch is smaller. `batch_size` is per rank; see the module docstring for the sharding.
    """

    name = "torch"

    def __init__(self, dataset, batch_size: int, seed: int = 0, start_step: int = 0, num_workers: int = 0,
                 drop_last: bool = True, pin_memory: bool = False, rank: int = 0, world_size: int = 1,
                 shots: int = 0):
        if start_step < 0:
            raise DataError(f"start_step must be >= 0, got {start_step}")
        plan = plan_for(dataset, batch_size, seed, drop_last, rank, world_size, shots)
        self.shots = shots
        sampler = _StepBatches(plan, start_step)
        self.batches_per_epoch = plan.per_epoch
        self.step = start_step
        self._loader = DataLoader(_Augmented(dataset, seed), batch_sampler=sampler, num_workers=num_workers,
                                  persistent_workers=num_workers > 0, pin_memory=pin_memory)
        self._it = iter(self._loader)  # the sampler never ends, so this one iterator serves every epoch

    def __next__(self):
        x, y = next(self._it)
        self.step += 1
        return self.split(x, y)

    def close(self) -> None:
        """Stop the worker processes now rather than at garbage collection (the loader keeps a
        reference to its persistent iterator, so both go)."""
        self._it = self._loader = None
