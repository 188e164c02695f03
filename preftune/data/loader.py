"""Micro-batches collated ahead in worker processes (``dataloader_num_workers > 0``).

The training loop decides which samples each micro-batch holds (`StepPlan`); this module only moves
the host-side collation of those exact index lists into a `torch.utils.data.DataLoader`'s workers, so
that the next micro-batches are ready while the current one trains. The loader's batch sampler yields
``StepPlan.micro_batches`` in the loop's order, from a given position of an epoch to the end of that
epoch (or the run); the collate function is the algorithm's own host collate (CPU tensors). Nothing
about the order or the contents changes: 0 workers (collation in the loop) and N workers give the same
batches, bit for bit.

One DataLoader iteration covers one epoch (as in Hugging Face's Trainer), so
``dataloader_persistent_workers`` keeps the workers from one epoch to the next. Workers start with
``fork`` where the platform has it: they inherit the collate function and its tokenized features
instead of receiving a pickled copy.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from preftune.data.pipeline import StepPlan


class _Indices(Dataset):
    """A dataset whose item i is i: the collate function receives the micro-batch's index list itself."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def __getitems__(self, indices: list[int]) -> list[int]:
        return list(indices)


class StepBatchSampler(Sampler):
    """This process's micro-batches of one epoch, step by step, from step `start` to `stop`.

    Iterated in the main process (the DataLoader sends each index list to a worker); `set_range` is
    called before each iteration."""

    def __init__(self, plan: StepPlan, rank: int):
        self.plan, self.rank = plan, rank
        self.epoch, self.start, self.stop = 0, 0, 0

    def set_range(self, epoch: int, start: int, stop: int) -> None:
        self.epoch, self.start, self.stop = epoch, start, stop

    def __len__(self) -> int:
        return (self.stop - self.start) * self.plan.accumulation

    def __iter__(self):
        perm = self.plan.permutation(self.epoch)
        for step in range(self.start, self.stop):
            yield from self.plan.micro_batches(perm, step, self.rank)


def start_method() -> str | None:
    """``fork`` where the platform has it (cheap: workers inherit the features), else torch's default."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else None


class MicroBatchLoader:
    """Host batches of the loop's coming micro-batches, collated ahead by `num_workers` processes.

    ``batches(epoch, step_in_epoch, total_steps_left)`` returns the K host batches of that optimizer step;
    the steps must be asked for in order (a jump, e.g. a new epoch, starts a new iteration). `close()`
    shuts the workers down (the loop calls it however the run ends)."""

    def __init__(self, plan: StepPlan, rank: int, collate_fn: Callable[[list[int]], dict], *, num_workers: int,
                 prefetch_factor: int | None = None, pin_memory: bool = False, persistent_workers: bool = False,
                 seed: int = 0):
        if num_workers < 1:
            raise ValueError(f"MicroBatchLoader needs num_workers >= 1, got {num_workers}")
        self.plan = plan
        self.sampler = StepBatchSampler(plan, rank)
        # the loader's own generator: drawing worker seeds must not consume the global torch RNG, which
        # dropout and the checkpoint's saved RNG state depend on
        generator = torch.Generator().manual_seed(int(seed))
        self.loader = DataLoader(_Indices(plan.num_samples), batch_sampler=self.sampler, collate_fn=collate_fn,
                                 num_workers=num_workers, prefetch_factor=prefetch_factor, pin_memory=pin_memory,
                                 persistent_workers=persistent_workers, multiprocessing_context=start_method(),
                                 generator=generator)
        self._iter = None
        self._next: tuple[int, int] | None = None  # (epoch, step) the open iteration yields next
        self._stop = 0

    def batches(self, epoch: int, step_in_epoch: int, steps_left: int) -> list[dict]:
        if self._iter is None or self._next != (epoch, step_in_epoch):
            self._end_iteration()
            stop = min(self.plan.steps_per_epoch, step_in_epoch + steps_left)
            self.sampler.set_range(epoch, step_in_epoch, stop)
            self._iter, self._stop = iter(self.loader), stop
        out = [next(self._iter) for _ in range(self.plan.accumulation)]
        self._next = (epoch, step_in_epoch + 1) if step_in_epoch + 1 < self._stop else None
        if self._next is None:
            self._end_iteration()
        return out

    def _end_iteration(self) -> None:
        """Let go of the open iteration: its workers stop unless they persist (the DataLoader keeps those)."""
        it, self._iter, self._next = self._iter, None, None
        if it is not None and not self.loader.persistent_workers:
            _shutdown(it)

    def close(self) -> None:
        """Stop every worker process (also persistent ones) and the pin-memory thread."""
        self._end_iteration()
        kept = getattr(self.loader, "_iterator", None)
        if kept is not None:
            _shutdown(kept)
            self.loader._iterator = None


def _shutdown(it) -> None:
    shutdown = getattr(it, "_shutdown_workers", None)  # multi-process iterators; a no-op when already done
    if shutdown is not None:
        shutdown()


__all__ = ["MicroBatchLoader", "StepBatchSampler", "start_method"]
