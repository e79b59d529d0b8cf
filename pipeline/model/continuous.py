"""A continuous-batching engine for the Idefics family: transformers' own engine, with each page's image
features placed in the prefill where its `<image>` tokens stand.

transformers (`generation/continuous_batching/`) schedules requests over a paged KV cache: a request
that ends frees its slot at once and a waiting one takes it, so a short page never waits for a long one.
Its requests are token ids only, and it runs a causal language model's forward on them. Here that model
is the checkpoint's own text model and LM head (the same modules, no copy: Idefics2's Mistral, Idefics3's
and SmolVLM's Llama), as the causal LM class transformers registers for that text model, made to read
image features for *virtual* token ids (`feature_reading_lm`):

- each crop's features (`features.encode_crops`, 64 rows for Idefics2) take a slot of `FeatureSlots`, a
  fixed buffer on the model's device, and the request's `<image>` tokens become the ids
  `vocab_size + slot * rows + row`, in the order the processor lays them out (the order in which
  the model's `inputs_merger` scatters features; the Idefics3 family's tile tags between them are
  ordinary tokens);
- every other id reads the token embedding as usual, so the decoder sees exactly the embeddings that
  `generate` with `mm_encoder_outputs` gives it, at the same positions.

Why virtual ids rather than handing features to the engine: the engine moves only token ids between its
scheduler, its cache and the model (chunked prefill, a request re-prefilled after a cache eviction), and
an id names its feature row wherever it goes. Nothing there can confuse two images: slots are held until
the request has finished (a re-prefill reads them again), and prefix sharing, which would match cached
blocks by token id, is switched off (`allow_block_sharing=False`), so a slot reused by a later image can
never hit an earlier image's cache. The buffer never moves (no reallocation), so it also holds under
CUDA graphs, and a request waits for free slots rather than growing it.

What the engine does per request: its own `max_new_tokens`, the EOS set (with `<end_of_utterance>`), the
log-probability of each chosen token (`return_logprobs`). What it does per engine only: greedy or sampling
(`ContinuousBatchProcessor.do_sample` and `ModelRunner._sample` read `generation_config.do_sample` once),
with per-request temperature and top-p. What it lacks: stop strings (the caller cuts the text with
`generate`'s semantics, see `until_stop`) and a repetition penalty (no per-request processor in
`cb_logits_processors.py`: the model stage runs such tasks on the static engine).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import itertools
import logging
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from scriptorium.pipeline.family import family_named
from scriptorium.pipeline.model.budget import KV_CACHE_MEMORY_FRACTION
from scriptorium.pipeline.model.logprobs import sampling_top_k
from scriptorium.pipeline.model.outputs import generated_output

log = logging.getLogger("scriptorium")

# Query tokens per engine step off GPU (prefill is chunked to this). The SDPA path builds a
# (step tokens x cached tokens) mask per step, so on CPU it is kept small; on a GPU the engine's default.
CPU_STEP_TOKENS = 1024


# Requests decoded together at most on a GPU under SDPA. Its path attends, at each step, over every
# request's cache through one packed dense mask (step tokens x all cached tokens), so a step's cost grows
# with the square of the requests in flight. On an H200 (BENCHMARKS.md, GPU) 256 requests at once ran
# ~0.5 s a step against ~25 ms for a static batch of 256; fitted to those two figures, a step costs about
# 25 ms + 1.25e-5 ms x requests^2 x cached tokens per request, which, at ~600 tokens a request, yields the
# most tokens per second near 60 requests. flash_attention_2's varlen path needs no mask: no cap there.
SDPA_MAX_REQUESTS_ON_GPU = 64

# The feature buffer's size at most. A slot holds one crop's features: 0.5 MB for Idefics2-8B (64 rows of
# 4096 in bf16), 1.4 MB for Idefics3-8B (169 rows), so two blocks of 256 split Letter pages would take 1.3
# and 12 GB; 2 GiB holds 91 such Idefics3 pages at once, more than the requests decoded together, and
# leaves the rest of the GPU to the KV cache. Requests beyond it wait for slots to free.
FEATURE_BUFFER_BYTES = 2 << 30

# Tokens per page of the paged KV cache (`page_size`; `block_size` before transformers 5.18 or so).
PAGE_TOKENS = getattr(ContinuousBatchingConfig, "page_size", None) or ContinuousBatchingConfig.block_size


def engine_config(**options) -> ContinuousBatchingConfig:
    """transformers' engine settings, leaving out those this transformers does not have (5.17, on the
    lent GPU machines, has no `auto_switch_to_flash`: it may switch SDPA to a flash kernel by itself)."""
    known = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    return ContinuousBatchingConfig(**{name: value for name, value in options.items() if name in known})


@dataclass
class EngineRequest:
    """One sequence to generate: its prompt ids (`<image>` tokens included) and their features."""

    prompt_ids: list[int]
    features: torch.Tensor  # (number of `<image>` tokens, hidden): one row per image token, in order
    max_new_tokens: int
    temperature: float = 1.0  # sampling engines only
    top_p: float = 1.0


@dataclass
class EngineResult:
    tokens: list[int]  # generated, up to and including an end-of-sequence token
    logprobs: list[float]  # one per token
    error: str | None = None  # the engine failed this request (it is generated again elsewhere)


class FeatureSlots:
    """Image features of the requests in flight, one slot of `rows_per_image` rows per crop, in a buffer
    allocated once. `acquire` waits while the buffer is full (requests finishing free their slots)."""

    def __init__(self, n_slots: int, rows_per_image: int, hidden: int, vocab_size: int, device, dtype):
        self.rows_per_image = rows_per_image
        self.vocab_size = vocab_size
        self.rows = torch.zeros((n_slots * rows_per_image, hidden), device=device, dtype=dtype)
        self.free = list(range(n_slots))
        self._freed: asyncio.Condition | None = None  # made on the event loop that uses it (see _condition)
        self._loop = None

    @property
    def capacity(self) -> int:
        return self.rows.shape[0] // self.rows_per_image

    async def acquire(self, features: torch.Tensor) -> list[int]:
        """Store `features` (a multiple of `rows_per_image` rows) and return their virtual token ids."""
        n = features.shape[0] // self.rows_per_image
        freed = self._condition()
        async with freed:
            await freed.wait_for(lambda: len(self.free) >= n)
            slots, self.free = self.free[:n], self.free[n:]
        index = torch.tensor(slots, device=self.rows.device)
        rows = (index[:, None] * self.rows_per_image + torch.arange(self.rows_per_image, device=index.device)).view(-1)
        with torch.no_grad():
            self.rows[rows] = features.to(self.rows.device, self.rows.dtype)
        if self.rows.is_cuda:  # the engine reads on its own CUDA stream: the rows must be there first
            torch.cuda.current_stream(self.rows.device).synchronize()
        return (rows + self.vocab_size).tolist()

    async def release(self, virtual_ids: list[int]) -> None:
        slots = sorted({(i - self.vocab_size) // self.rows_per_image for i in virtual_ids})
        freed = self._condition()
        async with freed:
            self.free.extend(slots)
            freed.notify_all()

    def _condition(self) -> asyncio.Condition:
        """The condition on the running event loop (an asyncio primitive belongs to one loop, and callers
        without a loop of their own run each batch of requests on a new one)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._freed, self._loop = asyncio.Condition(), loop
        return self._freed

    def embed(self, input_ids: torch.Tensor, embedding: torch.nn.Embedding) -> torch.Tensor:
        """Token embeddings, with feature rows where the ids are virtual. No host synchronisation and no
        data-dependent shapes, so the engine may capture it in a CUDA graph."""
        virtual = input_ids >= self.vocab_size
        tokens = embedding(input_ids.masked_fill(virtual, 0))
        rows = self.rows[(input_ids - self.vocab_size).clamp(min=0).long()]
        return torch.where(virtual[..., None], rows.to(tokens.dtype), tokens)


class ReadsFeatures:
    """Mixed into a causal LM class: its input embedding reads image features for virtual token ids."""

    slots: FeatureSlots

    def forward(self, input_ids=None, **kwargs):
        return super().forward(inputs_embeds=self.slots.embed(input_ids, self.model.embed_tokens), **kwargs)


@functools.cache
def feature_reading_class(causal_lm_class: type) -> type:
    """`causal_lm_class` (MistralForCausalLM, LlamaForCausalLM, ...) reading image features: one class per base."""
    return type(f"FeatureReading{causal_lm_class.__name__}", (ReadsFeatures, causal_lm_class), {})


def feature_reading_lm(model, slots: FeatureSlots):
    """The checkpoint's text model and LM head as the causal LM the engine drives, reading image features
    for virtual token ids. Built around the loaded modules, never from weights."""
    text_model = with_own_config(model.model.text_model)
    causal_lm_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(text_model.config)]
    with torch.device("meta"):  # no weights of its own: the checkpoint's modules are put in below
        lm = feature_reading_class(causal_lm_class)(text_model.config)
    lm.model = text_model
    lm.lm_head = model.lm_head
    lm.slots = slots
    return lm.eval()


def with_own_config(text_model):
    """The text model's layers and weights (shared, not copied) under a config object of its own.

    transformers' forward wrapper writes the call's `is_causal` into `self.config` for the length of the
    call: the engine's SDPA steps run with `is_causal=False` (their mask is custom). On the shared config,
    a static `generate` running beside the engine (the continuous stage's fallback, in another thread)
    read that and built its prompt's attention without the causal mask: its tokens changed. With a copy,
    each path's forward writes only its own config."""
    view = copy.copy(text_model)  # a new module object over the same submodules and parameters
    for registry in ("_modules", "_parameters", "_buffers"):  # what is set on the view stays on the view
        setattr(view, registry, dict(getattr(text_model, registry)))
    view.config = copy.deepcopy(text_model.config)
    return view


def until_stop(tokens: list[int], eos_ids: set[int], stop_strings, decode) -> list[int]:
    """The tokens `generate` would have produced with these stop strings: up to the end of sequence, or
    to the first token whose text completes a stop string if that comes first (the engine has no stop
    strings; `generated_output` then reads the result as it reads `generate`'s)."""
    end = next((i + 1 for i, token in enumerate(tokens) if token in eos_ids), len(tokens))
    if stop_strings:
        n_stop, stopped, _ = generated_output(tokens[:end], set(), stop_strings, decode)
        if stopped:
            return tokens[:n_stop]
    return tokens[:end]


def requests_in_flight(max_requests: int, on_gpu: bool, attention: str) -> int:
    """How many requests the engine decodes together: `max_requests` (0: the engine's default), capped on a
    GPU under SDPA, whose masked attention grows with the square of that number."""
    if on_gpu and attention == "sdpa":
        capped = min(max_requests or SDPA_MAX_REQUESTS_ON_GPU, SDPA_MAX_REQUESTS_ON_GPU)
        if capped != max_requests:
            log.info("continuous engine: %d requests at once under SDPA on a GPU (%s asked); flash_attention_2 "
                     "lifts the cap", capped, max_requests or "the engine's default")
        return capped
    return max_requests


class ContinuousEngine:
    """One continuous-batching engine per model replica, kept across blocks: `await generate(request)`
    from any number of coroutines on one event loop; each returns when its own sequence ends.

    The engine's thread runs while requests are in flight and stops when none are, keeping its KV cache
    for the next ones (so no thread outlives the work, in an actor or a test). If it fails (out of
    memory, a CUDA error), every request in flight gets an error result, and the next request starts
    a fresh engine; the model stage decides from the error's text what the failure means (recovery.py).
    """

    def __init__(self, model, eos_ids: set[int], image_token_id: int, *, do_sample: bool = False,
                 sampling: tuple[float, float] = (1.0, 1.0), max_requests: int = 0, cache_tokens: int = 0,
                 feature_slots: int = 0):
        """`sampling`: a (temperature, top_p) of the tasks it will serve (the engine builds a warper only
        for a value other than 1.0; per-request values then override it). `cache_tokens`: KV-cache size in
        tokens (0: `KV_CACHE_MEMORY_FRACTION` of the free GPU memory). `max_requests`: sequences decoded
        together at most (0: the engine's default). `feature_slots`: crops in flight at most, within
        FEATURE_BUFFER_BYTES."""
        text_config = model.config.text_config
        self.eos_ids = sorted(eos_ids)
        self.image_token_id = image_token_id
        self.device = model.device
        rows_per_image = family_named(model.config.model_type).image_tokens_per_crop(model.config)
        slot_bytes = rows_per_image * text_config.hidden_size * model.dtype.itemsize
        self.slots = FeatureSlots(min(feature_slots or 1024, max(1, FEATURE_BUFFER_BYTES // slot_bytes)),
                                  rows_per_image, text_config.hidden_size,
                                  text_config.vocab_size, model.device, model.dtype)
        self.lm = feature_reading_lm(model, self.slots)
        temperature, top_p = sampling
        self.generation_config = GenerationConfig(
            **{key: value for key, value in model.generation_config.to_dict().items()
               if key in ("bos_token_id", "pad_token_id")},
            eos_token_id=self.eos_ids, do_sample=do_sample,
            **(dict(temperature=temperature, top_p=top_p, top_k=sampling_top_k(model.generation_config))
               if do_sample else {}),
        )
        on_gpu = self.device.type == "cuda"
        self.config = engine_config(
            return_logprobs=True,
            allow_block_sharing=False,  # prefixes are matched by token id: virtual ids must never match
            auto_switch_to_flash=False,  # the text model is shared with the static engine: keep its attention
            per_request_processors=do_sample,
            max_requests_per_batch=requests_in_flight(max_requests, on_gpu, text_config._attn_implementation) or None,
            max_batch_tokens=None if on_gpu else CPU_STEP_TOKENS,
            **({"num_blocks": -(-cache_tokens // PAGE_TOKENS)} if cache_tokens
               else {"max_memory_percent": KV_CACHE_MEMORY_FRACTION}),
        )
        self._manager = None
        self._request_ids = itertools.count()
        self._in_flight = 0

    # -- requests ----------------------------------------------------------------------------------------
    def fits(self, prompt_ids: list[int], n_feature_rows: int) -> bool:
        """Whether a request can run here at all: its image tokens match its feature rows, whole crops
        of them, no more crops than the feature buffer holds."""
        n_image_tokens = sum(1 for token in prompt_ids if token == self.image_token_id)
        rows = self.slots.rows_per_image
        return (n_image_tokens == n_feature_rows and n_image_tokens % rows == 0
                and n_image_tokens // rows <= self.slots.capacity)

    async def generate(self, request: EngineRequest) -> EngineResult:
        virtual_ids = await self.slots.acquire(request.features)
        self._in_flight += 1
        try:
            return await self._run(request, virtual_ids)
        except Exception as exc:  # the engine could not take it (a full queue, a broken engine): said, not raised
            return EngineResult([], [], f"{type(exc).__name__}: {exc}")
        finally:
            self._in_flight -= 1
            await self.slots.release(virtual_ids)
            if not self._in_flight:
                self._pause()

    def generate_all(self, requests: list[EngineRequest]) -> list[EngineResult]:
        """`generate` for each request, all in flight together (for callers without an event loop)."""

        async def every():
            return await asyncio.gather(*(self.generate(r) for r in requests))

        return asyncio.run(every())

    async def _run(self, request: EngineRequest, virtual_ids: list[int]) -> EngineResult:
        features = iter(virtual_ids)
        input_ids = [next(features) if token == self.image_token_id else token for token in request.prompt_ids]
        manager = self._running_manager()
        request_id = f"page-{next(self._request_ids)}"
        finished = asyncio.get_running_loop().create_future()
        manager.register_result_handler(request_id, lambda output: finished.done() or finished.set_result(output))
        per_request = {"temperature": float(request.temperature), "top_p": float(request.top_p)}
        accepted = manager.add_request(input_ids, request_id=request_id, max_new_tokens=request.max_new_tokens,
                                       eos_token_id=self.eos_ids,
                                       **{k: v for k, v in per_request.items() if k in manager.logit_processor.supported_keys})
        if accepted is None:
            return EngineResult([], [], "the continuous engine stopped before taking the request")
        output = await finished
        return EngineResult(list(output.generated_tokens), list(output.logprobs), output.error)

    # -- the engine's thread -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Take the KV cache now (and capture CUDA graphs where the engine uses them), not at the first
        request, so that what memory is left afterwards can be measured."""
        if self._manager is None:
            # The engine's thread updates its tensors in place outside inference mode: they must not be
            # inference tensors, whatever mode the caller is in.
            with torch.inference_mode(False):
                self._manager = self.lm.init_continuous_batching(generation_config=self.generation_config,
                                                                 continuous_batching_config=self.config)
                self._manager.warmup()

    def _running_manager(self):
        self.prepare()
        if not self._manager.is_running():
            if getattr(self.lm, "_cached_continuous_batching_manager", None) is self._manager:
                # Paused (`stop` puts the text model's attention back): taken again the way transformers
                # takes a kept manager, which switches the attention to its paged form if it needs one.
                self.lm.init_continuous_batching(generation_config=self.generation_config,
                                                 continuous_batching_config=self.config)
            if self._manager.background_thread_status.fatal_error is not None:
                log.warning("continuous engine restarts after: %s", self._manager.background_thread_status.fatal_error)
                self._manager.batch_processor = None  # a fresh KV cache and scheduler, made by its thread
            self._manager.start()
        return self._manager

    def _pause(self) -> None:
        if self._manager is not None and self._manager.is_running():
            self._manager.stop(block=True, keep_for_next_session=True)

    def close(self) -> None:
        if self._manager is not None:
            self._pause()
            self._manager.destroy()
            self.lm.destroy_cached_continuous_batching_manager()
            self._manager = None
