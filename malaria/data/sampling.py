"""The training data order as a function of (seed, epoch) alone, so a resumed run sees what an
uninterrupted one would have.

`ResumableSampler` draws each epoch's permutation and each image's augmentation seed from the seed
and the epoch; `ResumableLoader` lets Lightning checkpoint how many batches of the epoch were
trained on, and restart after them. `MalariaDataModule` builds its training loader from both.

Kept rather than torchdata's `StatefulDataLoader` (not measured): that loader restores a position
but not augmentations independent of the worker count, which is the sampler's job here anyway,
and what is left for the loader is counting batches, ten lines.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """This rank's share of a permutation drawn from (seed, epoch), each index paired with its own
    augmentation seed, from (seed, epoch, index).

    Nothing depends on the global RNG, the number of workers or whether the epoch was interrupted:
    epoch e yields the same images with the same augmentations every time. `skip` drops the first
    samples of the next iteration, for resuming mid-epoch. On one device use num_replicas=1, rank=0.
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        # Lightning calls this again for the epoch a restored loader is already in: keep its skip then.
        if epoch != self.epoch:
            self.skip = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        seeds = np.random.default_rng([self.seed, self.epoch]).integers(2**32, size=len(self.dataset))
        start, self.skip = self.skip, 0
        return iter([(i, int(seeds[i])) for i in indices[start:]])


class ResumableLoader(DataLoader):
    """A DataLoader over a `ResumableSampler` that Lightning checkpoints with the loops.

    Lightning saves `state_dict()` of a loader that has one and calls `load_state_dict()` before
    iterating again; the state is the epoch and how many batches of it were handed out (Lightning
    fetches no batch ahead from a loader with a length, so handed out means trained on)."""

    sampler: ResumableSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError(f"ResumableLoader needs a ResumableSampler, got {type(self.sampler).__name__}")
        self._served = 0

    def __iter__(self) -> Iterator[Any]:
        self._served = self.sampler.skip // self.batch_size
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._served}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        epoch, batches = state_dict["epoch"], state_dict["batches"]
        if batches >= len(self):  # saved at the end of an epoch: the next one starts afresh
            epoch, batches = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.skip = batches * self.batch_size
        self._served = batches
