"""What a model replica does when generation fails on its device, by what the failure means.

- **Out of memory** (`torch.OutOfMemoryError`, which `torch.cuda.OutOfMemoryError` is): the batch was too
  big for what is free now. The failed call's frames hold its KV cache and image features for as long as
  its traceback lives, so the replica leaves the exception handler first, keeping only a `Failure` (text),
  collects garbage and empties CUDA's cache, and only then generates the halves. It remembers the largest
  batch that ran after the error (`FittingBatch`) and cuts its next batches to it.
- **Anything else** (a malformed page): a data error, isolated by halving until the unit is alone; that
  unit becomes an error row.
"""

from __future__ import annotations

import gc
import traceback
from dataclasses import dataclass

import torch


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


@dataclass(frozen=True)
class Failure:
    """What is kept of a failed generate call: its text, never the exception (whose traceback holds the
    call's frames and so its tensors)."""

    message: str
    out_of_memory: bool

    @classmethod
    def of(cls, exc: BaseException) -> Failure:
        # Whoever may still hold the exception (a chained one, a log record) keeps no tensors through it.
        traceback.clear_frames(exc.__traceback__)
        return cls(f"{type(exc).__name__}: {exc}", is_out_of_memory(exc))


def release_memory(device: str) -> None:
    """Free what a failed call held, once nothing refers to it: cycles among its frames and objects are
    collected, and on CUDA the allocator's cached blocks go back to the device."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


@dataclass(frozen=True, order=True)
class BatchSize:
    tokens: int  # prompt + max_new_tokens, summed: what the batch's KV cache holds (compared first)
    pages: int


class FittingBatch:
    """The largest batch that ran on this replica since its last out-of-memory error (None before any),
    which caps the next batches. Another error forgets it: the batches that run after it decide anew."""

    def __init__(self):
        self.after_out_of_memory = False
        self.largest: BatchSize | None = None

    def failed(self) -> None:
        self.after_out_of_memory = True
        self.largest = None

    def worked(self, size: BatchSize) -> bool:
        """Note a batch that ran; whether it is the new largest."""
        if self.after_out_of_memory and (self.largest is None or size > self.largest):
            self.largest = size
            return True
        return False

    def limits(self, pages: int, tokens: int) -> tuple[int, int]:
        """(pages, tokens) budgets for the next batch: the configured ones (tokens 0: none), capped."""
        if self.largest is None:
            return pages, tokens
        return min(pages, self.largest.pages), min(tokens or self.largest.tokens, self.largest.tokens)

