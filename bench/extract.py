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
   Then what is left of it when the masks start ahead of a 15 ms forward, as the model stage starts them.
4. Which schema keywords each library enforces: per keyword, random walks under its mask, validated
   with `jsonschema`; llguidance refuses what it cannot enforce (the job stops at start), xgrammar
   compiles everything, so a keyword it ignores shows as answers that break the schema.
5. The tiny checkpoint's `generate` with and without the grammar, batch 8: the whole cost in one number.

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

H200_STEP_MS = (15.0, 25.0)  # one decode step of idefics2-8b at batch 64 (the issue's figure)
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


def walk(processor_for, batch: int, steps: int, vocab: int, seed: int = 0, forward_s: float = 0.0) -> float:
    """Seconds per step spent in the processor over `steps` greedy steps on random logits. With
    `forward_s`, the masks are started ahead (`MasksAhead`) and the host then waits that long, as it does
    while a GPU runs a step's forward: what is left is the mask time the forward did not hide."""
    generator = torch.Generator().manual_seed(seed)
    processor = processor_for(batch)
    ids = torch.zeros((batch, 1), dtype=torch.long)
    spent = 0.0
    for step in range(steps):
        scores = torch.randn((batch, vocab), generator=generator)
        if forward_s and step:
            processor.ahead(ids)
            time.sleep(forward_s)
        started = time.perf_counter()
        scores = processor(ids, scores)
        spent += time.perf_counter() - started
        ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
    return getattr(processor, "seconds", spent) / steps


class Computing:
    """A GrammarMask's host work alone (each sequence's last token fed, the next masks computed), without
    applying them to the scores: on a GPU that is device work."""

    def __init__(self, mask):
        self.mask = mask
        self.seconds = 0.0  # in `_advance` only

    def __call__(self, input_ids, scores):
        started = time.perf_counter()
        self.mask._advance(input_ids[:, -1].tolist() if self.mask._started else None)
        self.seconds += time.perf_counter() - started
        return torch.where(self.mask.allowed(scores), scores, float("-inf"))


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


# One schema per keyword (bounded so a random walk can close it): is it enforced, refused or ignored?
def _one(**keywords) -> dict:
    return {"type": "object", "properties": {"x": keywords}, "required": ["x"], "additionalProperties": False}


KEYWORDS = {
    "maxLength": _one(type="string", maxLength=5), "minLength": _one(type="string", minLength=3, maxLength=6),
    "pattern": _one(type="string", pattern="^[A-Z]{3}$"), "format date": _one(type="string", format="date"),
    "enum": _one(enum=["a", "b"]), "const": _one(const="k"), "minimum/maximum": _one(type="integer", minimum=3, maximum=17),
    "exclusiveMinimum": _one(type="integer", exclusiveMinimum=5, maximum=9),
    "multipleOf": _one(type="integer", multipleOf=7, minimum=0, maximum=100),
    "maxItems": _one(type="array", items={"type": "integer", "minimum": 0, "maximum": 9}, maxItems=2),
    "minItems": _one(type="array", items={"type": "boolean"}, minItems=2, maxItems=3),
    "uniqueItems": _one(type="array", items={"enum": [1, 2, 3]}, uniqueItems=True, maxItems=3),
    "contains": _one(type="array", items={"type": "integer", "minimum": 0, "maximum": 3}, contains={"const": 2}, maxItems=4),
    "anyOf": _one(anyOf=[{"type": "boolean"}, {"type": "null"}]),
    "oneOf": _one(oneOf=[{"type": "integer", "minimum": 0, "maximum": 5}, {"type": "string", "maxLength": 2}]),
    "allOf": _one(allOf=[{"type": "integer"}, {"minimum": 2, "maximum": 4}]),
    "not": _one(type="integer", minimum=0, maximum=5, **{"not": {"const": 3}}),
    "$ref": {"$defs": {"b": {"type": "boolean"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/b"}},
             "required": ["x"]},
    "if/then": {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"],
                "if": {"properties": {"x": {"const": True}}}, "then": {"required": ["y"]}},
    "dependentRequired": {"type": "object", "properties": {"x": {"type": "boolean"}, "y": {"type": "boolean"}},
                          "dependentRequired": {"x": ["y"]}},
}


def keyword_table(tokenizer, vocab: int, eos: list[int], walks: int = 12) -> None:
    """For each keyword: llguidance refuses it (the job stops at start) or enforces it (every finished
    random walk validates); xgrammar's figure is how many finished walks break the schema."""
    import jsonschema

    from scriptorium.pipeline.extraction import grammar_problem
    from scriptorium.pipeline.model.grammar import Grammars

    def broken(processor_for, schema) -> str:
        finished = invalid = 0
        for seed in range(walks):
            generator, processor = torch.Generator().manual_seed(seed), processor_for(1)
            ids = torch.zeros((1, 1), dtype=torch.long)
            for _ in range(60):
                token = int(processor(ids, torch.randn((1, vocab), generator=generator)).argmax())
                if token in eos:
                    finished += 1
                    text = tokenizer.decode(ids[0, 1:].tolist())
                    try:
                        jsonschema.validate(json.loads(text), schema)
                    except (ValueError, jsonschema.ValidationError):
                        invalid += 1
                    break
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        return f"{invalid}/{finished} invalid"

    print(f"schema keywords, {walks} random walks each (finished walks that break the schema):")
    for name, schema in KEYWORDS.items():
        problem = grammar_problem(schema)
        ours = "refused at start" if problem else broken(
            lambda b: Grammars(tokenizer, vocab, eos, {"k": schema}).mask("k", b), schema)
        xgrammar = xgrammar_processor(tokenizer, vocab, eos, schema)
        theirs = broken(xgrammar, schema) if xgrammar is not None else "-"
        print(f"  {name:18} llguidance: {ours:18} xgrammar: {theirs}")


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
        xgrammar = xgrammar_processor(tokenizer, vocab, eos, schemas[name])
        for batch in (1, 32):
            whole = walk(lambda b: grammars.mask(name, b), batch, args.steps, vocab) / batch * 1e6
            compute = walk(lambda b: Computing(grammars.mask(name, b)), batch, args.steps, vocab) / batch * 1e6
            figures[(name, batch)] = compute
            theirs = f", xgrammar's processor {walk(xgrammar, batch, args.steps, vocab) / batch * 1e6:.1f}" \
                if xgrammar is not None else ""
            print(f"mask, schema {name}, batch {batch}: {compute:.1f} us/token/sequence to compute; the processor "
                  f"with its apply on CPU {whole:.1f}{theirs}; free decoding 0")
        hidden = walk(lambda b: grammars.mask(name, b), 32, args.steps, vocab, forward_s=H200_STEP_MS[0] / 1e3)
        print(f"  started ahead, behind a {H200_STEP_MS[0]:.0f} ms forward (the host idle, as while a GPU runs it): "
              f"{hidden / 32 * 1e6:.1f} us/token/sequence left at batch 32, the apply on CPU included")
    if xgrammar_processor(tokenizer, vocab, eos, SMALL) is None:
        print("xgrammar is not installed: its figures are left out (pip install xgrammar to compare)")

    keyword_table(tokenizer, vocab, eos)

    free, constrained = generate_with_and_without(24)
    print(f"tiny checkpoint, batch 8: generate {free * 1e3:.2f} ms/token free, {constrained * 1e3:.2f} ms/token "
          f"under the grammar ({constrained / free:.2f}x; the tiny model's step is ~1000x cheaper than the 8B's)")

    worst = max(figures[(name, 32)] for name in schemas)
    batch64_ms = 64 * worst / 1e3
    print(f"at batch 64 on one core: {batch64_ms:.1f} ms of masks per step, "
          f"{batch64_ms / H200_STEP_MS[1]:.0%}-{batch64_ms / H200_STEP_MS[0]:.0%} of an H200 decode step "
          f"({H200_STEP_MS[0]:.0f}-{H200_STEP_MS[1]:.0f} ms), before two things that shrink it: llguidance "
          "fills a batch's masks on all the replica's cores at once, and they start ahead of the forward")
    print(f"RESULT extract_mask_us_per_token {worst:.1f} us target <= {TARGET_US}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
