"""Out-of-memory recovery on the static engine (pipeline/model/recovery.py): a batch that runs out of memory
is halved only after the failed call's memory is released, and the replica cuts its next batches to the
largest that ran. A fatal CUDA error outside Ray goes to the caller, and which errors are which (the
replica ended by a fatal CUDA error under Ray: tests/test_actor_crash.py).

The out-of-memory errors are injected by a hook on the model's text model that raises
`torch.OutOfMemoryError` for a batch of more than N pages, inside the real `generate`; weak references to
what the failed call held (its KV cache, its input embeddings with the image features) say whether the
retry started with them freed.
"""

from __future__ import annotations

import weakref

import pytest
import torch

from scriptorium.core.spec import ResourceSpec, TaskSpec
from scriptorium.pipeline.model.recovery import BatchSize, FittingBatch, is_fatal_cuda_error, is_out_of_memory
from tests.conftest import job, make_pdf, plan_row, preprocessed, run_stages

TASK = TaskSpec(kind="ocr", max_new_tokens=4)


class OutOfMemoryAbove:
    """A forward pre-hook on the text model: out of memory at the prefill of a batch of more than `pages`.
    Each prefill first records how many references of earlier failed calls are still alive."""

    def __init__(self, pages: int):
        self.pages = pages
        self.prefills: list[int] = []  # batch sizes, in order
        self.failed: list[int] = []
        self.held: list[weakref.ref] = []  # what failed calls held
        self.alive_at_prefill: list[int] = []

    def __call__(self, module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        if embeds.shape[1] == 1:
            return None  # a decoding step, not a prefill
        self.alive_at_prefill.append(sum(ref() is not None for ref in self.held))
        self.prefills.append(embeds.shape[0])
        if embeds.shape[0] > self.pages:
            self.failed.append(embeds.shape[0])
            self.held += [weakref.ref(embeds), weakref.ref(kwargs["past_key_values"])]
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected above "
                                         f"{self.pages} pages)")
        return None


@pytest.fixture(scope="module")
def two_blocks(tmp_path_factory, tiny_model):
    """Two blocks of eight same-sized PDF pages, preprocessed for the tiny checkpoint."""
    folder = tmp_path_factory.mktemp("oom")
    spec = job(tiny_model, [TASK])
    plans = [plan_row(make_pdf(folder / f"{name}.pdf", [f"{name} page {p}" for p in range(8)], size=(200, 260)))
             for name in ("a", "b")]
    return spec, plans, [preprocessed(spec, [plan]) for plan in plans]


def replica_of(spec, batch_size: int = 8):
    from scriptorium.pipeline.model.loading import open_model_config
    from scriptorium.pipeline.model.stage import GenerateAnswers
    from scriptorium.pipeline.prompts import PromptBook

    _, settings = open_model_config(spec.model)
    return GenerateAnswers(spec.model, settings, PromptBook(spec.tasks), ResourceSpec(), run_id="oom",
                           batch_size=batch_size)


def test_out_of_memory_is_halved_after_the_memory_is_released_and_the_size_that_ran_is_kept(two_blocks):
    from scriptorium.pipeline.local import step_results

    spec, plans, blocks = two_blocks
    replica = replica_of(spec)
    hook = OutOfMemoryAbove(pages=2)
    replica.model.model.text_model.register_forward_pre_hook(hook, with_kwargs=True)

    first = next(iter(step_results(replica(blocks[0])))).to_pylist()
    # 8 failed, then its first half of 4, whose halves ran; then the second 4 failed, and its halves ran.
    assert hook.prefills == [8, 4, 2, 2, 4, 2, 2] and hook.failed == [8, 4, 4]
    assert hook.alive_at_prefill == [0] * 7  # every retry began with the failed calls' tensors freed
    assert replica.fitting.largest.pages == 2

    second = next(iter(step_results(replica(blocks[1])))).to_pylist()
    assert hook.prefills[7:] == [2, 2, 2, 2] and hook.failed == [8, 4, 4]  # cut to what ran: no error at all

    rows = sorted(first + second, key=lambda r: (r["source_uri"], r["page"]))
    assert [(r["status"], r["error"]) for r in rows] == [("ok", None)] * 16
    reference = run_stages(spec, plans)  # the same answers as a run that never ran out of memory
    assert [(r["text"], r["n_output_tokens"]) for r in rows] == [(r["text"], r["n_output_tokens"]) for r in reference]


def test_a_malformed_page_is_still_isolated_by_halving(two_blocks):
    """A data error is not out of memory: the batch is halved down to the page, which alone becomes an
    error row, and the replica's batch size is left alone."""
    from scriptorium.pipeline.local import step_results

    spec, _plans, blocks = two_blocks
    replica = replica_of(spec)
    bad = blocks[0].to_pylist()[5]["page"]

    original = replica._generate

    def generate(batch, temperature=None):
        if any(seq.page["page"] == bad for seq in batch):
            raise ValueError("malformed page")
        return original(batch, temperature)

    replica._generate = generate
    rows = next(iter(step_results(replica(blocks[0])))).to_pylist()
    errors = [(r["page"], r["error"]) for r in rows if r["status"] != "ok"]
    assert errors == [(bad, "generate failed: ValueError: malformed page")]
    assert len(rows) == 8 and not replica.fitting.after_out_of_memory  # no batch size learnt from it


def test_sequences_the_continuous_engine_fails_out_of_memory_are_halved_on_the_static_engine(two_blocks):
    """Out of memory in the continuous engine is not a lost CUDA context: the replica goes on, and the
    failed sequences go through the static engine's halving."""
    from scriptorium.pipeline.local import step_results
    from scriptorium.pipeline.model.continuous_stage import GenerateAnswersContinuously
    from scriptorium.pipeline.model.loading import open_model_config
    from scriptorium.pipeline.prompts import PromptBook

    spec, plans, blocks = two_blocks
    spec = spec.updated(model={"engine": "continuous"})
    _, settings = open_model_config(spec.model)
    replica = GenerateAnswersContinuously(spec.model, settings, PromptBook(spec.tasks), ResourceSpec(), run_id="oom",
                                          batch_size=8)

    def engine_out_of_memory(module, args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected in the engine)")

    replica.engine.lm.register_forward_pre_hook(engine_out_of_memory)  # the engine's forward only
    static = OutOfMemoryAbove(pages=4)
    replica.model.model.text_model.register_forward_pre_hook(static, with_kwargs=True)
    try:
        rows = next(iter(step_results(replica(blocks[0])))).to_pylist()
    finally:
        replica.close()
    assert [(r["status"], r["error"]) for r in rows] == [("ok", None)] * 8
    assert static.prefills == [8, 4, 4] and static.alive_at_prefill == [0, 0, 0]


def test_outside_ray_a_fatal_cuda_error_goes_to_the_caller(two_blocks):
    """Nothing would restart a replica outside a Ray actor (and no process is ended there): the error is
    raised, not turned into error rows that every later batch on the lost device would add to."""
    from scriptorium.pipeline.local import step_results
    from tests.lost_cuda_context import cuda_error

    spec, _plans, blocks = two_blocks
    replica = replica_of(spec)

    def lost_context(module, args):
        raise cuda_error()

    replica.model.model.text_model.register_forward_pre_hook(lost_context)
    with pytest.raises(RuntimeError, match="CUDA error: device-side assert triggered"):
        list(step_results(replica(blocks[0])))


def test_the_fitting_batch_is_the_largest_that_ran_after_the_last_out_of_memory_error():
    fitting = FittingBatch()
    fitting.worked(BatchSize(tokens=9000, pages=8))  # before any error: no cap
    assert fitting.limits(8, 0) == (8, 0)
    fitting.failed()
    fitting.worked(BatchSize(tokens=2000, pages=4))
    fitting.worked(BatchSize(tokens=1500, pages=3))
    assert fitting.limits(8, 0) == (4, 2000) and fitting.limits(2, 1000) == (2, 1000)
    fitting.failed()  # a batch of that size failed later (fragmentation, longer prompts): learned anew
    assert fitting.limits(8, 0) == (8, 0)
    fitting.worked(BatchSize(tokens=1000, pages=2))
    assert fitting.limits(8, 0) == (2, 1000)


@pytest.mark.parametrize("error, kind", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"), "out of memory"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory."), "out of memory"),
    (RuntimeError("CUDA error: device-side assert triggered"), "fatal"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "fatal"),
    (RuntimeError("shape mismatch: value tensor of shape [64, 32] cannot be broadcast"), "data"),
    (ValueError("malformed page"), "data"),
])
def test_out_of_memory_fatal_cuda_errors_and_data_errors_are_told_apart(error, kind):
    assert is_out_of_memory(error) is (kind == "out of memory")
    assert is_fatal_cuda_error(error) is (kind == "fatal")


def test_an_accelerator_error_is_fatal_whatever_it_says():
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is None:
        pytest.skip("this torch has no AcceleratorError")
    assert is_fatal_cuda_error(accelerator_error("unspecified launch failure"))
