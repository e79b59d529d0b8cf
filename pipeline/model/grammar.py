"""Grammar-constrained decoding for extract tasks: each generated token is masked so that the answer is
JSON that follows the task's schema, whatever the weights say.

The library is llguidance (Microsoft's guidance engine, also behind llama.cpp's and vLLM's JSON
modes): it compiles a JSON Schema into a grammar and, per sequence and step, computes the set of
tokens that keep the answer inside it (a bitmask over the vocabulary), from the checkpoint's own
tokenizer. It refuses schema keywords it cannot enforce rather than ignoring them (pipeline/extraction.py
checks every schema with it in the driver), and it has no dependencies. BENCHMARKS.md ("extract") has
its cost per token beside xgrammar's and why it was chosen.

A replica wraps its tokenizer once (`Grammars`, about a second for a 32k vocabulary) and makes one
`GrammarMask` per `generate` call: a logits processor holding one matcher per sequence of the batch.
At each step it feeds every matcher the token its sequence chose last, computes the next masks
(in parallel over the batch, outside the GIL) and sets every token outside a sequence's mask to -inf,
before sampling warpers and the log-probability recorder (logprobs.py), so greedy, sampling and the
confidence columns all see the constrained distribution. When a sequence's JSON is complete, its mask
holds the end-of-answer tokens only; a sequence that has ended is left unmasked, as `generate` pads it
from then on.

The masks of a step depend only on the tokens chosen at the step before, so they need not wait for the
step's forward: a stopping criterion (`MasksAhead`), which `generate` calls as soon as a step's tokens are
chosen, starts them on a thread of their own, and the forward of the next step, queued on the GPU right
after, runs while they compute. The processor then only waits for what is left and applies them.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from transformers import LogitsProcessor, StoppingCriteria

from scriptorium.pipeline.extraction import GRAMMAR_OPTIONS

ALL_TOKENS = -1  # a bitmask word with every bit set: no token masked


class Grammars:
    """One replica's grammars: its tokenizer as llguidance sees it, and a grammar per extract task."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids, schemas: dict[str, dict]):
        import llguidance
        import llguidance.hf

        self.vocab_size = vocab_size
        self.eos_ids = frozenset(eos_ids)
        self.end_only = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)  # a mask of the end tokens
        for token in self.eos_ids:
            self.end_only[token // 32] |= (1 << (token % 32)) if token % 32 < 31 else -(1 << 31)
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_ids))
        self.grammars = {name: llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=GRAMMAR_OPTIONS)
                         for name, schema in schemas.items()}
        self.executor = llguidance.LLExecutor()
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")  # one generate at a time

    def hooks(self, task: str, batch_size: int) -> tuple["GrammarMask", "MasksAhead"]:
        """(logits processor, stopping criterion) for one `generate` call: the criterion only starts the
        next step's masks early, it never stops anything."""
        mask = self.mask(task, batch_size)
        return mask, MasksAhead(mask)

    def mask(self, task: str, batch_size: int) -> "GrammarMask":
        """A fresh mask for one `generate` call of `batch_size` sequences of extract task `task`."""
        return GrammarMask(self, self.grammars[task], batch_size)


class GrammarMask(LogitsProcessor):
    """Masks a batch's scores to the tokens that keep each sequence inside its grammar. One per call."""

    def __init__(self, grammars: Grammars, grammar: str, batch_size: int):
        import llguidance
        import llguidance.torch

        self.grammars = grammars
        self.matchers = [llguidance.LLMatcher(grammars.tokenizer, grammar) for _ in range(batch_size)]
        for matcher in self.matchers:
            if matcher.is_error():  # checked in the driver already: only a bug gets here
                raise RuntimeError(f"grammar rejected: {matcher.get_error()}")
        self.bitmask = llguidance.torch.allocate_token_bitmask(batch_size, grammars.vocab_size)
        self._fill = llguidance.torch.fill_next_token_bitmask_par
        self.ended: set[int] = set()  # sequences that chose an end-of-answer token: `generate` pads them
        self._started = False
        self._next: Future | None = None  # the next step's masks, being computed
        self._bits: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._next is not None:  # computed while this step's forward ran (`ahead`)
            self._next.result()
            self._next = None
        else:
            self._advance(input_ids[:, -1].tolist() if self._started else None)
        # torch.where, not masked_fill: on CPU the latter costs several times as much per element.
        return torch.where(self.allowed(scores), scores, float("-inf"))

    def ahead(self, input_ids: torch.LongTensor) -> None:
        """Start the next step's masks from the tokens just chosen, on the replica's mask thread: `generate`
        calls this (`MasksAhead`) before the next forward, which then runs on the GPU while they compute."""
        self._next = self.grammars.thread.submit(self._advance_in_inference_mode, input_ids[:, -1].tolist())

    @torch.inference_mode()  # as `generate` runs: the bitmask was made there (grad modes are per thread)
    def _advance_in_inference_mode(self, tokens: list[int]) -> None:
        self._advance(tokens)

    def _advance(self, tokens: list[int] | None) -> None:
        """Feed each sequence its last token (None: the first step) and compute the next masks."""
        for i, token in enumerate(tokens or []):
            if i in self.ended:
                continue
            if token in self.grammars.eos_ids:
                self.ended.add(i)
            else:
                self.matchers[i].consume_token(token)
        self._started = True
        self.bitmask.fill_(ALL_TOKENS)  # ended sequences: anything (their tokens are padding)
        live = [(m, i) for i, m in enumerate(self.matchers) if i not in self.ended and not m.is_error()]
        if live:  # a finished JSON's mask holds the end-of-answer tokens only
            self._fill(self.grammars.executor, live, self.bitmask)
        for i, matcher in enumerate(self.matchers):
            if i not in self.ended and matcher.is_error():  # cannot happen with a checked grammar: end it there
                self.bitmask[i] = self.grammars.end_only

    def allowed(self, scores: torch.Tensor) -> torch.Tensor:
        """The bitmask as booleans (batch, vocabulary) on the scores' device: unpacked by numpy on CPU,
        by shifts on a GPU (after one small copy)."""
        if scores.device.type == "cpu":
            unpacked = np.unpackbits(self.bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")
            allowed = torch.from_numpy(unpacked.view(np.bool_))
        else:
            if self._bits is None or self._bits.device != scores.device:
                self._bits = torch.arange(32, dtype=torch.int32, device=scores.device)
            words = self.bitmask.to(scores.device)  # synchronous: the next step refills this buffer
            allowed = ((words.unsqueeze(-1) >> self._bits) & 1).view(words.shape[0], -1).bool()
        return allowed[:, : scores.shape[-1]]  # the bitmask is whole 32-bit words: the vocabulary rounded up


class MasksAhead(StoppingCriteria):
    """`generate` calls its stopping criteria once a step's tokens are chosen, before it starts the next
    step's forward: the moment to start that step's masks, so that on a GPU they compute while the forward
    runs instead of after it. It stops nothing."""

    def __init__(self, mask: GrammarMask):
        self.mask = mask

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.mask.ahead(input_ids)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
