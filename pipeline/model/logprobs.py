"""Per-row confidence: the log-probabilities of the tokens a generation chose, and their mean and minimum.

A token's log-probability is taken under the distribution it was chosen from: the model's own when
decoding greedily, the tempered and top-k/top-p filtered one when sampling. Both engines record the
same thing: transformers' continuous batching returns it per token (`return_logprobs`), and for the
static engine `TokenLogprobs` records it as `generate` runs. `generate(output_scores=True)` would keep
every step's (batch, vocabulary) scores until the end: 17 GB of float32 for 256 pages of 512 tokens with
Mistral's 32k vocabulary. The recorder keeps one step's scores and a float per sequence per step.
"""

from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


class TokenLogprobs(LogitsProcessor):
    """A logits processor that passes scores on unchanged and records, per sequence and step, the
    log-probability of the token then chosen. It must run last (after the sampling warpers): a step's
    chosen token is only known at the next call (the last column of `input_ids`), or, for the last step,
    from the finished sequences (`per_sequence`)."""

    def __init__(self):
        self._previous: torch.Tensor | None = None  # the last step's log-softmax, (batch, vocabulary)
        self._steps: list[torch.Tensor] = []  # (batch,) per step whose token is known

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._previous is not None:
            self._steps.append(self._previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self._previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def per_sequence(self, new_tokens: torch.Tensor) -> list[list[float]]:
        """Each sequence's log-probabilities, one per column of `new_tokens` (batch, generated): a
        sequence's own tokens are its first columns (after it ends, `generate` pads it)."""
        steps = self._steps[: new_tokens.shape[1]]  # generate may have run a step it then undid
        if len(steps) < new_tokens.shape[1] and self._previous is not None:
            last = new_tokens[:, len(steps)].to(self._previous.device)
            steps = steps + [self._previous.gather(1, last[:, None]).squeeze(1)]
        if not steps:
            return [[] for _ in range(new_tokens.shape[0])]
        return torch.stack(steps, dim=1).cpu().tolist()


def recording_processors(generation_config, do_sample: bool, temperature: float, top_p: float,
                         recorder: TokenLogprobs, constraints: tuple = ()) -> tuple[LogitsProcessorList, dict]:
    """(logits_processor, generation overrides) for `generate` with `constraints` first (a grammar's
    mask, grammar.py) and `recorder` last.

    `generate` puts custom processors before its sampling warpers, so when sampling the warpers are
    passed here instead, in `generate`'s own order (temperature, top-k, top-p) and with its own values,
    and switched off in the generation settings: the same distribution, the same samples, recorded."""
    if not do_sample:
        return LogitsProcessorList([*constraints, recorder]), {}
    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    top_k = sampling_top_k(generation_config)
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    return LogitsProcessorList([*constraints, *warpers, recorder]), {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


def sampling_top_k(generation_config) -> int:
    """The top-k `generate` samples with: the checkpoint's, else transformers' global default (50)."""
    from transformers import GenerationConfig

    if generation_config.top_k is not None:
        return generation_config.top_k
    return GenerationConfig._get_default_generation_params()["top_k"]


def confidence(logprobs: list[float]) -> dict:
    """The `logprob_mean` and `logprob_min` columns of a generated row (null when it has no tokens)."""
    if not logprobs:
        return {"logprob_mean": None, "logprob_min": None}
    return {"logprob_mean": math.fsum(logprobs) / len(logprobs), "logprob_min": min(logprobs)}
