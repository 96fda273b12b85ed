"""A training DataLoader that resumes mid-epoch where the interrupted run stopped.

`LoaderPosition` records how many batches of the current epoch were handed to the training loop; the data module
saves it in every checkpoint (`LightningDataModule.state_dict`) and loads it back on resume, and the loader's
next iteration then starts right after those batches. The skipped batches are skipped as index lists by the batch
sampler, so their images are never read, and the epoch's order is the uninterrupted run's (the sampler's shuffle
depends only on (seed, epoch)). The data module rather than the loader carries the state because Lightning builds
the train loader before it restores a checkpoint whenever `configure_optimizers` asks for
`estimated_stepping_batches` (ours does, for its schedule), and then never hands a loader its saved state. One
position object is shared by the loader, its batch sampler and the data module, and by the copies Lightning makes
of the loader and batch sampler under DDP (it re-creates them with the same arguments around a distributed
sampler), so every rank skips its own first batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import BatchSampler, DataLoader


class LoaderPosition:
    """Batches of the current epoch handed to the training loop, and how many the next iteration skips."""

    def __init__(self) -> None:
        self.handed_out = 0
        self.skip = 0

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.handed_out}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skip = int(state.get("batches", 0))


class ResumableBatchSampler(BatchSampler):
    """A `BatchSampler` whose next iteration starts after the `position.skip` batches of a resumed epoch (an
    epoch that was complete is not skipped: the next one starts from its first batch)."""

    def __init__(self, sampler, batch_size: int, drop_last: bool, position: LoaderPosition) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.position = position

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.position.skip = self.position.skip, 0
        if skip >= len(self):
            skip = 0
        self.position.handed_out = skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `ResumableBatchSampler` that counts batches as they reach the training loop (not as
    workers prefetch them), so a checkpoint written after step s resumes at the epoch's batch s + 1. It also has
    Lightning's `state_dict` / `load_state_dict`, which mark it as resumable."""

    def __init__(self, *args: Any, position: LoaderPosition, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.batch_sampler, ResumableBatchSampler):
            raise ValueError("ResumableDataLoader needs batch_sampler=ResumableBatchSampler(...), got "
                             f"{type(self.batch_sampler).__name__}")
        self.position = position

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            self.position.handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position.load_state_dict(state)
