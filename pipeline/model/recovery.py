"""What a model replica does when generation fails on its device, by what the failure means.

- **Out of memory** (`torch.OutOfMemoryError`, which `torch.cuda.OutOfMemoryError` is): the batch was too
  big for what is free now. The failed call's frames hold its KV cache and image features for as long as
  its traceback lives, so the replica leaves the exception handler first, keeping only a `Failure` (text),
  collects garbage and empties CUDA's cache, and only then generates the halves. It remembers the largest
  batch that ran after the error (`FittingBatch`) and cuts its next batches to it.
- **A fatal CUDA error** (a device-side assert, an illegal memory access: `torch.AcceleratorError`, or a
  `RuntimeError` saying so on a torch without it) poisons the process's CUDA context: every later call
  fails the same way. The replica ends its process (`end_process`) while the crash journal still notes the
  units in flight; Ray restarts the actor and retries its block, and the journal (journal.py) isolates a
  unit that keeps causing it.
- **Anything else** (a malformed page): a data error, isolated by halving until the unit is alone; that
  unit becomes an error row.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from typing import NoReturn

import torch

log = logging.getLogger("scriptorium")

# Where torch has it, the error type of a failed kernel or driver call (torch >= 2.8); before, a RuntimeError.
ACCELERATOR_ERROR: type[Exception] | None = getattr(torch, "AcceleratorError", None)
# What CUDA's messages say when the context is lost (an OOM says "CUDA out of memory", none of these).
FATAL_CUDA_MARKERS = ("CUDA error", "device-side assert", "illegal memory access")
# The exit status of a replica ended by a fatal CUDA error (EX_SOFTWARE): a death, which Ray restarts.
FATAL_CUDA_EXIT_STATUS = 70


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


def is_fatal_cuda_error(exc: BaseException) -> bool:
    """Whether `exc` leaves the process's CUDA context unusable (any CUDA error but running out of memory)."""
    if is_out_of_memory(exc):
        return False
    if ACCELERATOR_ERROR is not None and isinstance(exc, ACCELERATOR_ERROR):
        return True
    return isinstance(exc, RuntimeError) and says_fatal_cuda_error(str(exc))


def says_fatal_cuda_error(message: str) -> bool:
    """Whether an error's text (all the continuous engine reports of a failure) is a fatal CUDA error's."""
    return any(marker in message for marker in FATAL_CUDA_MARKERS)


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


def end_process(replica: str, error: str) -> NoReturn:
    """End this replica's process at once, for Ray to restart it: nothing on its device works any more,
    and no Python cleanup is run that could touch the device (or clear the journal's note)."""
    log.critical("model replica %s ends its process after a fatal CUDA error (Ray restarts it): %s", replica, error)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(FATAL_CUDA_EXIT_STATUS)
