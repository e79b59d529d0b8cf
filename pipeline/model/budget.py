"""How many tokens a model batch may hold on this replica's GPU.

`generate` keeps a KV cache of every sequence's prompt and new tokens: for idefics2-8b's Mistral-7B
(32 layers, 8 KV heads of 128, bf16) that is 128 KiB per token, so 256 split pages (about 340 prompt
tokens) with 512 new tokens each need 27 GiB, which fits an 80 GB H100 but not a 24 GB A10G beside the
model's 16 GiB of weights. The automatic budget is a fraction of the memory free after loading the
model; the rest is left to the prefill's activations and the vision tower. A batch that still runs
out of memory is halved by the model stage (`GenerateAnswers.generate_static` in stage.py), so the budget
decides speed, never whether a page is done.
"""

from __future__ import annotations

import torch

# The share of the GPU memory free after loading the model that the KV cache of one batch may take.
KV_CACHE_MEMORY_FRACTION = 0.5


def kv_cache_bytes_per_token(text_config, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token holds across all the text model's layers."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    bytes_per_value = torch.tensor([], dtype=dtype).element_size()
    return 2 * text_config.num_hidden_layers * kv_heads * head_dim * bytes_per_value


def token_budget(text_config, dtype: torch.dtype, free_bytes: int, fraction: float = KV_CACHE_MEMORY_FRACTION) -> int:
    """Tokens (prompt + new, summed over a batch) whose KV cache fits in `fraction` of `free_bytes`."""
    return int(free_bytes * fraction) // kv_cache_bytes_per_token(text_config, dtype)


def automatic_token_budget(model, device: str, dtype: torch.dtype) -> int:
    """The budget on this replica's GPU, measured now (after the model is loaded); 0 (none) off GPU."""
    if device != "cuda":
        return 0
    free_bytes, _total = torch.cuda.mem_get_info()
    return token_budget(model.config.text_config, dtype, free_bytes)


def kv_cache_options(kind: str) -> dict:
    """`generate` options for `[model] kv_cache`. "static": the cache of the whole batch (prompt + every new
    token) is allocated once, before the first step, and written in place: on an H200 a decode step of
    idefics2-8b took 1.5 to 2.7 times less than with "dynamic", which concatenates every layer's keys and
    values at each step (BENCHMARKS.md, GPU). torch.compile, which transformers would apply to a static
    cache by itself, stays off: there it recompiled at every call and a step took a second."""
    if kind == "static":
        return {"cache_implementation": "static", "disable_compile": True}
    return {}
