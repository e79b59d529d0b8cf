"""What the extract tasks' grammar costs beside free decoding, on CPU, in one run.

    .venv/bin/python bench/extract.py [--steps 64] [--vocab 32000]

1. The tokenizer: a byte-level BPE of `--vocab` tokens (Mistral's is 32,000) trained here, in seconds,
   on the Python standard library's source, with Idefics2's special tokens. A mask is a walk over the
   whole vocabulary, so its size is what matters, not its merges.
2. Compile time: the tokenizer wrapped for llguidance (once per replica), then per schema (the invoice
   schema of jobs/extract_invoices.toml, and a small one) the grammar and its first matcher.
3. Mask time per token per sequence: the model stage's own `GrammarMask` (pipeline/model/grammar.py)
   over `--steps` decoding steps at batch 1 and 32, logits drawn at random and the token chosen greedily
   under the mask, so every step lands somewhere new in the JSON (inside strings, numbers, keys), which
   is where masks cost most. Free decoding's processor cost is a pass-through: 0. Beside it, the same
   with xgrammar when it is installed (`pip install xgrammar`): the figures the library was chosen on.
4. The tiny checkpoint's `generate` with and without the grammar, batch 8: the whole cost in one number.

The RESULT is batch 32's figure. An H200 decode step of the 8B model at batch 64 takes ~15-25 ms; the
line after it says what 64 sequences' masks take on one core, and what fraction of that step it is.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import _setup  # noqa: E402  (the repository's packages first; see bench/_setup.py)

_setup.quiet_env()

import torch  # noqa: E402

H200_STEP_MS = (15.0, 25.0)  # one decode step of idefics2-8b at batch 64 (the figure)
TARGET_US = 50
SMALL = {"type": "object", "additionalProperties": False, "required": ["title", "year", "signed"],
         "properties": {"title": {"type": "string", "maxLength": 40}, "year": {"type": "integer"},
                        "signed": {"type": "boolean"}, "kind": {"enum": ["letter", "form", "photo"]}}}


def train_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from scriptorium.pipeline.model.tiny import IMAGE_TOKENS, SPECIAL_TOKENS

    sources = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "**", "*.py"), recursive=True))[:1500]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS + IMAGE_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator((Path(p).read_text(errors="ignore") for p in sources), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def invoice_schema() -> dict:
    from scriptorium.core.spec import load_spec

    return load_spec(_setup.REPO / "jobs" / "extract_invoices.toml").tasks[0].json_schema


def walk(processor_for, batch: int, steps: int, vocab: int, seed: int = 0) -> float:
    """Seconds per step spent in the processor over `steps` greedy steps on random logits."""
    generator = torch.Generator().manual_seed(seed)
    processor = processor_for(batch)
    ids = torch.zeros((batch, 1), dtype=torch.long)
    spent = 0.0
    for _ in range(steps):
        scores = torch.randn((batch, vocab), generator=generator)
        started = time.perf_counter()
        scores = processor(ids, scores)
        spent += time.perf_counter() - started
        ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
    return spent / steps


def xgrammar_processor(tokenizer, vocab: int, eos: list[int], schema: dict):
    """xgrammar's own transformers processor, compact JSON like ours, or None when it is not installed."""
    try:
        import xgrammar
        from xgrammar.contrib.hf import LogitsProcessor
    except ImportError:
        return None
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=eos)
    compiled = xgrammar.GrammarCompiler(info, cache_enabled=False).compile_json_schema(
        json.dumps(schema), any_whitespace=False)
    return lambda batch: LogitsProcessor(compiled)


def generate_with_and_without(steps: int) -> tuple[float, float]:
    """Seconds per token of the tiny checkpoint's `generate`, batch 8, free and under the small schema."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from scriptorium.pipeline.model.grammar import Grammars
    from scriptorium.pipeline.model.tiny import build_tiny_idefics2

    folder = build_tiny_idefics2(Path(tempfile.mkdtemp(prefix="bench-extract-")) / "tiny")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    eos = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_utterance>")})
    grammars = Grammars(tokenizer, model.get_output_embeddings().out_features, eos, {"small": SMALL})
    ids = torch.tensor([tokenizer.encode("User: Extract. Assistant:")] * 8)
    timings = []
    for constrained in (False, True):
        best = float("inf")
        for _ in range(3):
            processors = [grammars.mask("small", 8)] if constrained else []
            started = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                     min_new_tokens=steps if not constrained else 0, do_sample=False,
                                     logits_processor=processors, eos_token_id=eos, pad_token_id=0)
            best = min(best, (time.perf_counter() - started) / (out.shape[1] - ids.shape[1]))
        timings.append(best)
    return timings[0], timings[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    import llguidance

    from scriptorium.pipeline.model.grammar import Grammars

    started = time.perf_counter()
    tokenizer = train_tokenizer(args.vocab)
    vocab = len(tokenizer)
    eos = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_utterance>")})
    print(f"tokenizer: {vocab} tokens, trained in {time.perf_counter() - started:.1f} s; torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} cores")
    schemas = {"invoice": invoice_schema(), "small": SMALL}

    started = time.perf_counter()
    grammars = Grammars(tokenizer, vocab, eos, {})
    print(f"llguidance {llguidance.__version__}: tokenizer wrapped in {time.perf_counter() - started:.2f} s "
          "(once per replica)")
    for name, schema in schemas.items():
        started = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        llguidance.LLMatcher(grammars.tokenizer, grammar)  # the first matcher compiles the grammar
        print(f"  schema {name}: compiled in {(time.perf_counter() - started) * 1e3:.1f} ms")
        grammars.grammars[name] = grammar

    figures = {}
    for name in schemas:
        line = []
        xgrammar = xgrammar_processor(tokenizer, vocab, eos, schemas[name])
        for batch in (1, 32):
            per_step = walk(lambda b: grammars.mask(name, b), batch, args.steps, vocab)
            figures[(name, batch)] = per_step / batch * 1e6
            line.append(f"batch {batch}: {figures[(name, batch)]:.1f} us/token/sequence")
            if xgrammar is not None:
                theirs = walk(xgrammar, batch, args.steps, vocab) / batch * 1e6
                line.append(f"(xgrammar {theirs:.1f})")
        print(f"mask, schema {name}: " + " ".join(line) + "; free decoding: 0")
    if xgrammar_processor(tokenizer, vocab, eos, SMALL) is None:
        print("xgrammar is not installed: its figures are left out (pip install xgrammar to compare)")

    free, constrained = generate_with_and_without(24)
    print(f"tiny checkpoint, batch 8: generate {free * 1e3:.2f} ms/token free, {constrained * 1e3:.2f} ms/token "
          f"under the grammar ({constrained / free:.2f}x; the tiny model's step is ~1000x cheaper than the 8B's)")

    worst = max(figures[(name, 32)] for name in schemas)
    batch64_ms = 64 * worst / 1e3
    print(f"at batch 64 on one core: {batch64_ms:.1f} ms of masks per step, "
          f"{batch64_ms / H200_STEP_MS[1]:.0%}-{batch64_ms / H200_STEP_MS[0]:.0%} of an H200 decode step "
          f"({H200_STEP_MS[0]:.0f}-{H200_STEP_MS[1]:.0f} ms); llguidance fills a batch's masks on all the "
          "replica's cores at once")
    print(f"RESULT extract_mask_us_per_token {worst:.1f} us target <= {TARGET_US}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
