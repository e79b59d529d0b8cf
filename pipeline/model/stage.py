"""The model stage: one model replica per actor (Idefics2, Idefics3 or SmolVLM), batched generation of pages
that share a prompt. A batch's input ids are its prompt's, one row repeated with a mask of ones: no
sequence is padded on the way in, and the tokens `generate` appends to a sequence after its end are cut
off (outputs.py). For the Idefics3 family a prompt's ids also spell out each image's tile grid, so a
batch's pages share their grids too (pipeline/family.py).

`GenerateAnswers` is the callable class Ray Data's actor pool runs (one per replica, loaded once by
loading.py): preprocessed page rows in, one result row per (page, task, question) unit out. Units
answered before the model and units of failed pages become rows by the answer steps' one rule
(`pipeline/steps.py`); the rest are grouped into batches (collate.py) under the replica's count, pixel
and KV-cache token budgets (budget.py), their crops encoded at their own sizes (features.py), and
generated with `generate`. A replica takes two blocks at once: one block's crops are decompressed and
encoded, on a CUDA stream of their own, while the other block's batches decode (`answer`). A batch that
fails is halved until it runs or the failing unit is alone; out of memory, the replica frees the failed
call's memory before it retries and cuts its next batches to the largest that ran, and a fatal CUDA
error ends the replica for Ray to restart (recovery.py). A unit that keeps killing the replica is found
through the crash journal (journal.py); degenerate outputs are retried by sampling (degenerate.py).

The continuous stage (continuous_stage.py) builds on this one: it hands the sequences its engine cannot
run to `generate_static`, and makes its rows with `result_row`, `text_of` and `retry_degenerate`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch
from transformers import StoppingCriteriaList

from scriptorium.core.image_settings import ImageSettings
from scriptorium.core.pixels import decompress_crops
from scriptorium.core.schema import PREPROCESSED_SCHEMA
from scriptorium.core.spec import ModelSpec, ResourceSpec, TaskSpec
from scriptorium.core.units import unit_key
from scriptorium.pipeline.family import family_named
from scriptorium.pipeline.metrics import Meter
from scriptorium.pipeline.model.budget import automatic_token_budget, kv_cache_options
from scriptorium.pipeline.model.collate import batch_by_shape
from scriptorium.pipeline.model.degenerate import is_degenerate
from scriptorium.pipeline.model.features import VisionStream, encode_crops, generate_kwargs
from scriptorium.pipeline.model.grammar import Grammars
from scriptorium.pipeline.model.journal import journal_for_this_replica, ray_context
from scriptorium.pipeline.model.loading import load_for_generation
from scriptorium.pipeline.model.logprobs import TokenLogprobs, confidence, recording_processors
from scriptorium.pipeline.model.outputs import generated_output
from scriptorium.pipeline.model.recovery import BatchSize, Failure, FittingBatch, end_process, is_fatal_cuda_error, release_memory
from scriptorium.pipeline.prompts import PromptBook, PromptPlan
from scriptorium.pipeline.results import page_result
from scriptorium.pipeline.steps import AnswerStep

log = logging.getLogger("scriptorium")

T = TypeVar("T")


@dataclass
class Sequence:
    """One (page, prompt) pair waiting for generation."""

    page: dict
    plan: PromptPlan
    crops: list
    grids: tuple = ()  # each image's tile grid, in prompt order: what its prompt ids spell out
    features: torch.Tensor | None = None  # its crops' image features, when encoded ahead of its batch

    @property
    def key(self) -> str:
        return unit_key(self.page["source_uri"], self.page["page"], self.plan.task, self.plan.question)


def _replica_identity() -> tuple[str, str]:
    try:
        ctx = ray_context()
        if ctx is not None:
            actor = ctx.get_actor_id() or ""
            # An actor id is its own unique part followed by the job id: the head tells replicas apart.
            return f"{ctx.get_node_id()[:8]}/{actor[:8] or os.getpid()}", ctx.get_node_id()
    except Exception:
        pass
    return f"{socket.gethostname()}/{os.getpid()}", socket.gethostname()


class GenerateAnswers(AnswerStep):
    """Preprocessed page rows in, result rows out, one per (page, task, question) unit."""

    input_schema = PREPROCESSED_SCHEMA

    def __init__(
        self,
        model: ModelSpec,
        image_settings: ImageSettings,
        prompts: PromptBook,
        resources: ResourceSpec = ResourceSpec(),
        run_id: str = "",
        batch_size: int = 8,
    ):
        self.spec = model
        self.settings = image_settings
        self.book = prompts
        self.tasks = prompts.tasks
        self.run_id = run_id
        self.batch_size = batch_size  # pages per batch, resolved for this replica's device (stages.py)
        self.resources = resources
        self.max_batch_pixels = resources.max_batch_pixels
        self.model, self.processor, self.device, self.dtype, self.eos_ids = load_for_generation(model, image_settings)
        self.tokenizer = self.processor.tokenizer
        self.family = family_named(image_settings.family)
        self.context_tokens = self.model.config.text_config.max_position_embeddings  # prompt + answer, at most
        # Extract tasks decode under their schema's grammar (grammar.py), over the model's whole vocabulary.
        self.grammars = Grammars(self.tokenizer, self.model.get_output_embeddings().out_features, self.eos_ids,
                                 prompts.schemas) if prompts.schemas else None
        # Measured after loading, so the weights are already on the GPU (0 off GPU: no token budget).
        self.max_batch_tokens = resources.max_batch_tokens or automatic_token_budget(self.model, self.device, self.dtype)
        self.replica, self.node = _replica_identity()
        self.meter = Meter(run_id, resources.metrics)  # pipeline/metrics.py: counted per batch
        self.meter.replica_started(self.replica, self.node, batch_size, self.max_batch_tokens)
        self._prompt_ids: dict[tuple, torch.Tensor] = {}
        self.journal = journal_for_this_replica(run_id)  # finds a page that kills the replica (journal.py)
        self.vision = VisionStream(self.device)  # encodes a block's crops while another block decodes
        self._decoding = threading.Lock()  # one block's batches on the GPU at a time
        self.fitting = FittingBatch()  # the largest batch that ran since an out-of-memory error (recovery.py)
        log.info("model replica %s on %s (%s): batches of up to %d pages, %s", self.replica, self.device,
                 str(self.dtype).replace("torch.", ""), batch_size,
                 f"{self.max_batch_tokens} tokens" if self.max_batch_tokens else "no token budget")

    # -- per batch --------------------------------------------------------------------------------
    def row_values(self, page: dict) -> dict:
        return {"run_id": self.run_id, "model": self.spec.id, "replica": self.replica, "node": self.node}

    def answer(self, units: list[tuple[dict, TaskSpec, str | None]]) -> list[dict]:
        """Ray Data runs two calls of a replica at once (in threads: the stage's `concurrent_calls`): each
        decompresses its pages and encodes their crops on the vision stream while the other's batches
        decode, and one call's batches decode at a time."""
        rows, sequences = self.sequences(units)
        self.encode_ahead(sequences)
        with self._decoding:
            return rows + self.generate_static(sequences)

    def encode_ahead(self, sequences: list[Sequence]) -> None:
        """Image features of `sequences` into each sequence, encoded on the vision stream. Units the crash
        journal suspects are left to their batch (isolated there, as after any crash); if encoding fails
        (out of memory beside a decoding batch), each batch encodes its own, as it can in any case."""
        ahead = [s for s in sequences if self.journal is None or not self.journal.is_suspect(s.key)]
        features = self.encode(ahead) if ahead else None
        if features is None:
            return
        rows_per_image = self.processor.image_seq_len
        for seq, seq_features in zip(ahead, features.split([len(s.crops) * rows_per_image for s in ahead])):
            seq.features = seq_features

    def encode(self, sequences: list[Sequence]) -> torch.Tensor | None:
        """The image features of `sequences`, encoded on the vision stream, or None if encoding failed
        (memory released after an out-of-memory error; a fatal CUDA error ends the replica)."""
        features, failure = self.attempt([s.key for s in sequences], lambda: self.vision.encode(
            self.model, [s.crops for s in sequences], self.settings, self.device, self.dtype))
        if failure is not None:
            log.warning("encoding %d pages failed (%s)", len(sequences), failure.message)
            if failure.out_of_memory:
                release_memory(self.device)
        return features

    def sequences(self, units: list[tuple[dict, TaskSpec, str | None]]) -> tuple[list[dict], list[Sequence]]:
        """The (page, prompt) sequences to generate for `units`, and error rows for units that cannot be."""
        rows, sequences, crops_of = [], [], {}
        for page, task, question in units:
            if id(page) not in crops_of:  # a page's crops, decompressed once for all its units
                pixels = page.get("pixels")
                crops_of[id(page)] = None if pixels is None else decompress_crops(pixels, page["crop_shapes"])
            crops = crops_of[id(page)]
            n_page_images = len(page.get("image_shapes") or [None])  # a document row shows several pages
            plan = self.book.plan(self.processor, task, question, n_page_images)
            if crops is None:
                rows.append(self._error_row(page, plan, "page has no pixels for the model", "preprocess"))
                continue
            # Few-shot example images come first, as in the prompt; then the page(s), in page order.
            grids = self.book.example_grids(task) + [tuple(grid) for grid in page.get("image_grids") or []]
            seq = Sequence(page, plan, self.book.example_crops(task) + crops, tuple(grids))
            if self.sequence_tokens(seq) > self.context_tokens:
                rows.append(self._error_row(page, plan, self._beyond_context(seq), "generate"))
                continue
            sequences.append(seq)
        return rows, sequences

    def _beyond_context(self, seq: Sequence) -> str:
        """Why a sequence longer than the text model's context is not generated: past its trained positions
        a model's output degrades without any error (Idefics3-8B's Llama 3 takes 8192 tokens, and one split
        page takes some 2900 of them), so the row says what to change instead."""
        return (f"the prompt takes {len(self.prompt_ids(seq))} tokens ({len(seq.crops)} image crops) and "
                f"max_new_tokens is {seq.plan.max_new_tokens}: more than the model's context of "
                f"{self.context_tokens} tokens; show fewer pages (document_pages, examples), turn image "
                "splitting off, or lower max_new_tokens")

    def generate_static(self, sequences: list[Sequence]) -> list[dict]:
        """Rows of `sequences`, generated in batches with `generate`: a batch that fails is halved until its
        halves run or the failing unit is alone (`_generate_or_split`). The batches are cut afresh after
        each one, so an out-of-memory error caps the rest of the block too (`FittingBatch`)."""
        rows, waiting = [], list(sequences)
        while waiting:
            batch = next(self._batches(waiting))
            rows.extend(self._generate_or_split(batch))
            taken = {id(seq) for seq in batch}
            waiting = [seq for seq in waiting if id(seq) not in taken]
        return rows

    def _batches(self, sequences: list[Sequence]) -> Iterator[list[Sequence]]:
        """Group by prompt ids and generation settings, then by crop shape, then cut by count, pixel and
        token budgets (capped by the largest batch that ran since an out-of-memory error).

        Sequences in one batch share their prompt and image grids, so their ids (text needs no padding at
        all), and have similar crop sizes (so little pixel padding). A sequence's tokens are its prompt's (images included)
        plus its max_new_tokens: a document-scope or few-shot prompt takes more of the KV-cache budget.
        """
        pages, tokens = self.fitting.limits(self.batch_size, self.max_batch_tokens)
        by_key: dict[tuple, list[Sequence]] = {}
        for seq in sequences:
            by_key.setdefault((seq.plan.generation_key, seq.grids), []).append(seq)
        for group in by_key.values():
            yield from batch_by_shape(group, lambda s: s.crops, pages, self.max_batch_pixels,
                                      tokens_of=self.sequence_tokens, max_batch_tokens=tokens)

    def sequence_tokens(self, seq: Sequence) -> int:
        """What a sequence's KV cache holds at most: its prompt and max_new_tokens."""
        return len(self.prompt_ids(seq)) + seq.plan.max_new_tokens

    def _size(self, batch: list[Sequence]) -> BatchSize:
        return BatchSize(tokens=sum(self.sequence_tokens(s) for s in batch), pages=len(batch))

    def _generate_or_split(self, batch: list[Sequence]) -> list[dict]:
        """Generate for a batch; if it fails, halve it until the failing page is alone and record it.

        Out of memory: halved (the memory released first) until the halves fit, and the next batches are
        cut to the largest that did; a fatal CUDA error ends the replica (recovery.py). Units that were in
        flight when a replica died are isolated the same way, across restarts, and a unit that keeps
        killing the replica becomes an error row (journal.py)."""
        journal = self.journal
        if journal is not None:
            if len(batch) == 1 and journal.is_poison(batch[0].key):
                return [self._error_row(batch[0].page, batch[0].plan, journal.poison_reason(batch[0].key), "generate")]
            if len(batch) > 1 and any(journal.is_suspect(s.key) for s in batch):
                return self._split(batch)
        rows, failure = self.attempt([s.key for s in batch],
                                     lambda: self.retry_degenerate(batch, self._generate(batch)))
        if failure is None:
            size = self._size(batch)
            if self.fitting.worked(size):
                log.info("model replica %s: batches of up to %d pages, %d tokens, since it ran out of memory",
                         self.replica, size.pages, size.tokens)
            return rows
        # Out of the handler now: the failed call's frames, its KV cache and image features, are unreachable.
        if failure.out_of_memory:
            self.fitting.failed()
            release_memory(self.device)
        if len(batch) == 1:
            seq = batch[0]
            return [self._error_row(seq.page, seq.plan, f"generate failed: {failure.message}", "generate")]
        log.warning("a batch of %d pages failed (%s): generating it in halves", len(batch), failure.message)
        self.meter.retried("failed_batch", len(batch))
        return self._split(batch)

    def _split(self, batch: list[Sequence]) -> list[dict]:
        middle = len(batch) // 2
        return self._generate_or_split(batch[:middle]) + self._generate_or_split(batch[middle:])

    def attempt(self, keys: list[str], call: Callable[[], T]) -> tuple[T | None, Failure | None]:
        """(`call()`, None), or (None, what failed: out of memory or a data error, such as a malformed page).
        The failure is returned, not handled here, so that the exception and its traceback are gone before
        anything else runs. A fatal CUDA error ends the replica here, inside the journal's note of `keys`."""
        with self.in_flight(keys):
            try:
                return call(), None
            except Exception as exc:
                self.stop_on_fatal_cuda_error(exc)
                failure = Failure.of(exc)
        return None, failure

    def in_flight(self, keys: list[str]):
        """The journal's note of `keys` while they generate (journal.py); nothing outside a Ray actor."""
        return self.journal.in_flight(keys) if self.journal is not None else nullcontext()

    def stop_on_fatal_cuda_error(self, exc: Exception) -> None:
        """A CUDA error other than out of memory leaves this process's device unusable. In a Ray actor (where
        there is a journal) the process ends and Ray restarts it; elsewhere nothing would restart it, so the
        error goes to the caller. Call it inside `in_flight`, so the journal counts the units generating."""
        if not is_fatal_cuda_error(exc):
            return
        if self.journal is None:
            raise exc
        end_process(self.replica, f"{type(exc).__name__}: {exc}")

    def prompt_ids(self, seq: Sequence) -> torch.Tensor:
        """Token ids of a sequence's prompt with each `<image>` expanded, exactly as the processor tokenizes
        it with the sequence's images (pipeline/family.py)."""
        key = (seq.plan.prompt, seq.grids)
        if key not in self._prompt_ids:
            self._prompt_ids[key] = self.family.prompt_ids(self.processor, seq.plan.prompt, list(seq.grids))
        return self._prompt_ids[key]

    def retry_degenerate(self, batch: list[Sequence], rows: list[dict]) -> list[dict]:
        """Generate degenerate rows again by sampling, at each temperature of the task's ramp in turn;
        a retry replaces a row only if it is not degenerate itself."""
        for temperature in batch[0].plan.spec.temperature_ramp:
            again = [i for i, row in enumerate(rows) if row["degenerate"]]
            if not again:
                break
            self.meter.retried("degenerate", len(again))
            torch.manual_seed(len(again) * 1009 + round(temperature * 1000))  # reproducible retries
            for i, row in zip(again, self._generate([batch[i] for i in again], temperature)):
                if not row["degenerate"]:
                    rows[i] = row
        return rows

    @torch.inference_mode()
    def _generate(self, batch: list[Sequence], temperature: float | None = None) -> list[dict]:
        """Greedy (or the task's sampling), or sampling at `temperature` for a degenerate retry."""
        plan = batch[0].plan
        task = plan.spec
        ids = self.prompt_ids(batch[0])
        input_ids = ids.unsqueeze(0).expand(len(batch), -1).to(self.device)
        attention_mask = torch.ones_like(input_ids)
        generation = dict(max_new_tokens=task.max_new_tokens, do_sample=task.do_sample)
        generation.update(kv_cache_options(self.spec.kv_cache))
        if task.do_sample:
            generation.update(temperature=task.temperature, top_p=task.top_p)
        if temperature is not None:
            generation.update(do_sample=True, temperature=temperature, top_p=task.top_p)
        if task.repetition_penalty != 1.0:
            generation["repetition_penalty"] = task.repetition_penalty
        if task.stop_strings:
            generation.update(stop_strings=list(task.stop_strings), tokenizer=self.tokenizer)
        recorder = TokenLogprobs()  # each token's log-probability, for the confidence columns
        grammar = self.grammars.hooks(plan.task, len(batch)) if plan.schema is not None else ()
        processors, overrides = recording_processors(self.model.generation_config, generation["do_sample"],
                                                     generation.get("temperature", 1.0), generation.get("top_p", 1.0),
                                                     recorder, constraints=grammar[:1])
        if grammar:  # starts each step's masks while the GPU runs its forward (grammar.py)
            generation["stopping_criteria"] = StoppingCriteriaList(grammar[1:])
        started = time.perf_counter()
        # Each crop through the vision tower at its own size, not padded to its neighbours (features.py).
        features = batch_features(batch) if all(s.features is not None for s in batch) else encode_crops(
            self.model, [s.crops for s in batch], self.settings, self.device, self.dtype)
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self.eos_ids),
            logits_processor=processors,
            **generate_kwargs(self.model, features),
            **{**generation, **overrides},
        )
        elapsed = time.perf_counter() - started
        new_tokens = output[:, input_ids.shape[1]:].cpu()
        rows = [self.result_row(seq, tokens, logprobs, len(ids), elapsed / len(batch), temperature)
                for seq, tokens, logprobs in zip(batch, new_tokens.tolist(), recorder.per_sequence(new_tokens))]
        self.meter.batch(self.replica, self.node, rows, elapsed)
        return rows

    def result_row(self, seq: Sequence, tokens: list[int], logprobs: list[float], n_input_tokens: int,
                   generate_s: float, temperature: float | None = None) -> dict:
        """The result row of a generated sequence: `tokens` as the engine returned them (they may run on
        past its end), `logprobs` one per token."""
        plan = seq.plan
        n_out, finished, text = generated_output(tokens, self.eos_ids, plan.stop_strings, self.text_of)
        truncated = not finished and n_out >= plan.max_new_tokens
        row = self._row(seq.page, plan, status="ok", text=text, n_input_tokens=n_input_tokens, n_output_tokens=n_out,
                        truncated=truncated, degenerate=is_degenerate(tokens[:n_out], finished), route="model",
                        generate_s=generate_s, **confidence(logprobs[:n_out]))
        if temperature is not None:  # the row says how it was made
            row["generation"] = json.dumps({**plan.settings, "do_sample": True, "temperature": temperature})
        return row

    def text_of(self, tokens: list[int]) -> str:
        """The answer text of generated `tokens`, special tokens left out."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # -- rows ----------------------------------------------------------------------------------------
    def _row(self, page: dict, plan: PromptPlan, **values) -> dict:
        return page_result(
            page,
            task=plan.task,
            question=plan.question,
            prompt=plan.prompt,
            model=self.spec.id,
            max_new_tokens=plan.max_new_tokens,
            generation=plan.generation,
            run_id=self.run_id,
            replica=self.replica,
            node=self.node,
            **values,
        )

    def _error_row(self, page: dict, plan: PromptPlan, error: str, stage: str) -> dict:
        return self._row(page, plan, status="error", error=error, stage=stage, text=None, route=None)


def batch_features(batch: list[Sequence]) -> torch.Tensor:
    """The features encoded ahead for `batch`, in the order of its `<image>` tokens."""
    return torch.cat([seq.features for seq in batch])
