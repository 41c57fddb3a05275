"""The reference loader: an infinite, exactly resumable stream of batches through a torch DataLoader.

Everything a batch contains is a pure function of (seed, global step):
- epoch e's order is `torch.randperm(n)` from a generator seeded `seed * 1_000_003 + e`;
- global step k consumes batch `k % batches_per_epoch` of epoch `k // batches_per_epoch`;
- the sample (epoch, index) is augmented with a generator seeded from (seed, epoch, index).
So `BatchStream(..., start_step=k)` continues exactly where a stream that yielded k batches stopped,
and the result does not depend on the number of workers or on which worker loads which sample.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .transforms import DataError


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of dataset indices for `epoch`."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The augmentation generator of one sample. SeedSequence hashes the triple, so neighbouring
    samples and epochs get unrelated streams."""
    state = np.random.SeedSequence([seed % 2**63, epoch, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class _StepBatches(Sampler):
    """Infinite batch sampler: lists of (epoch, index), starting at global step `start_step`."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, drop_last: bool):
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)

    def __iter__(self):
        order, order_epoch = None, -1
        for step in itertools.count(self.start_step):
            epoch, b = divmod(step, self.per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(self.n, self.seed, epoch).tolist(), epoch
            yield [(epoch, i) for i in order[b * self.batch_size:(b + 1) * self.batch_size]]


class _Augmented(torch.utils.data.Dataset):
    """Map-style view keyed by (epoch, index), seeding each sample's augmentation."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        return self.dataset.get(index, sample_generator(self.seed, epoch, index))


class BatchStream:
    """`next(stream) -> (x float32 (B, 3, S, S), y int64 (B,))` on the CPU, forever.

    Attributes: `step` (batches yielded so far, counting `start_step`), `batches_per_epoch`, and
    `epoch` (the epoch the next batch comes from). With `drop_last=False` the last batch of each
    epoch is smaller.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, start_step: int = 0, num_workers: int = 0,
                 drop_last: bool = True, pin_memory: bool = False):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if len(dataset) < batch_size:
            raise DataError(f"the dataset has {len(dataset)} images, fewer than batch_size {batch_size}; "
                            f"lower the batch size or add images")
        if start_step < 0:
            raise DataError(f"start_step must be >= 0, got {start_step}")
        sampler = _StepBatches(len(dataset), batch_size, seed, start_step, drop_last)
        self.batches_per_epoch = sampler.per_epoch
        self.step = start_step
        self._loader = DataLoader(_Augmented(dataset, seed), batch_sampler=sampler, num_workers=num_workers,
                                  persistent_workers=num_workers > 0, pin_memory=pin_memory)
        self._it = iter(self._loader)  # the sampler never ends, so this one iterator serves every epoch

    @property
    def epoch(self) -> int:
        return self.step // self.batches_per_epoch

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next(self._it)
        self.step += 1
        return x, y

    def close(self) -> None:
        """Stop the worker processes now rather than at garbage collection (the loader keeps a
        reference to its persistent iterator, so both go)."""
        self._it = self._loader = None
