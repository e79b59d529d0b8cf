"""A model replica whose CUDA context is lost, for tests/test_actor_crash.py: the job's model stage class
with a hook on its text model that raises a CUDA error at every call in one process, as a device-side
assert leaves a process. Its own module, so that the Ray actors import it by name (`tests.` is on their
path; a test module is imported by pytest under another name).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from scriptorium.pipeline.model.continuous_stage import GenerateAnswersContinuously
from scriptorium.pipeline.model.stage import GenerateAnswers


def lost_context_marker(run_id: str) -> Path:
    """Names the one replica process whose CUDA context is lost in a run (its pid)."""
    return Path(tempfile.gettempdir()) / f"scriptorium-lost-cuda-context-{run_id}"


def cuda_error() -> Exception:
    """What a device-side assert raises: torch.AcceleratorError where torch has it, else a RuntimeError."""
    return getattr(torch, "AcceleratorError", RuntimeError)("CUDA error: device-side assert triggered")


class LosesItsCudaContext:
    """A model replica whose text model raises a CUDA error at every call in the first process to run one
    in the run, as a lost CUDA context does; a process started later (a restart) works."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        marker = lost_context_marker(self.run_id)

        def lost_context(module, args):
            try:  # the first process here takes the marker (atomically: replicas may race for it)
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                marker.write_text(str(os.getpid()))
            except FileExistsError:
                pass
            if marker.read_text() == str(os.getpid()):
                raise cuda_error()

        self.model.model.text_model.register_forward_pre_hook(lost_context)


class StaticLosingItsCudaContext(LosesItsCudaContext, GenerateAnswers):
    pass


class ContinuousLosingItsCudaContext(LosesItsCudaContext, GenerateAnswersContinuously):
    pass
