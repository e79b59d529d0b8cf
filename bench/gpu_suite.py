"""The GPU suite: one command that checks the model stage on a GPU, then measures it, within one lease.

    python bench/gpu_suite.py                          # on the lent GPU machine (see "On the lent machine")
    python bench/gpu_suite.py --tiny --device cpu      # the same functions and branches on CPU (make test)

It prints (and flushes) each `RESULT` line the moment it is measured, and stops cleanly at `--deadline-s`:
whatever it measured by then is printed, the rest is said to be skipped. Sections, most valuable first:

1. correctness: the tiny image-sensitive Idefics2 checkpoint (pipeline/model/tiny.py) through the model
   stage's own classes (`GenerateAnswers`, `GenerateAnswersContinuously`) on the device, against the same
   rows made on CPU; a repetition-penalty task beside a greedy one (the continuous stage's static fallback
   while an engine session is open); an injected out-of-memory error above a batch size (recovered, every
   row ok); then (`families`) the same rows, both engines, for the tiny Idefics3 checkpoint and SmolVLM's
   model under Idefics3's processor classes, pages cut into grids of tiles whose prompts spell them out
   (`suite_idefics3_*`, `suite_smolvlm_*`);
2. end to end on the full idefics2-8b architecture (random weights, bf16, SDPA): `gpu_pages_per_s` of the
   static and continuous engines at `--new-tokens` with image splitting and the automatic batch (the next
   batch's crops encoded beside this one's decode, as replicas do; `--no-overlap`: in turn; `--both-orders`:
   both, for `gpu_overlap_gain`), the model
   card's loop on a few of the same pages (`gpu_vs_snippet`), peak memory against the KV-cache budget;
3. end to end on the Idefics3 family's full architectures, random weights, after Idefics2's figures
   (sections `smolvlm-256m`, `idefics3-8b`): `gpu_pages_per_s_smolvlm256m` (SmolVLM-256M-Instruct: 512 px
   tiles, 64 image tokens each, SmolLM2-135M) and `gpu_pages_per_s_idefics3_8b` (Idefics3-8B-Llama3: 364 px
   tiles, 169 each, Llama-3-8B), the static engine on `--family-pages` pages rendered and cut by the
   family's rule (pages of one grid share a batch) at `--new-tokens` with splitting, the automatic batch;
4. the vision tower under torch.compile (one graph per crop shape) against eager;
5. where a page's time goes: vision / prefill / decode per page; decode step time by batch size with the
   dynamic and the preallocated (static) cache;
6. an extract task's grammar: the decode step at batch 64 and the largest batch, free and under the
   grammar with its masks started ahead (`gpu_extract_step_ratio_b*`);
7. the length mix of real documents through both engines (bench/engine.py), and the continuous engine's
   tokens/s by the number of requests in flight;
8. the decode step under transformers' compile (static cache + torch.compile, warmed up at the shape).

Ours is the model stage's own code without Ray around it: uint8 crops by the model family's rule
(`pipeline/family.py`: Idefics2's quadrants and page, the Idefics3 family's grid of tiles), pages of one
grid together (their prompt ids spell it out) in batches from `batch_by_shape` sized as the pipeline sizes
them, crops encoded per shape (`pipeline.model.features.encode_crops`), one shared prompt per batch,
`generate` with the KV cache that `[model] kv_cache` asks for.

On the lent machine (torch and transformers of its own, no Ray, no pydantic, no network) the suite needs our
pinned wheels: transformers 5.23.0 (the machine's 5.17 switches the shared text config to paged attention
in the continuous engine and does not switch it back), pydantic and its needs, regex and typing-extensions
(transformers 5.23's minimums), llguidance (the extract section). Download them into `.whl/` (kept out of git by .git/info/exclude) with the
`pip download` line of docs/development.md ("The GPU suite"), carry `.whl`, and run:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;
    PYTHONUNBUFFERED=1 python3 bench/gpu_suite.py --deadline-s 450 --log $OUT/gpu_suite.log

Nothing is downloaded: models are built from their configs with random weights on the device, the
tokenizer is Scriptorium's tiny offline one (a random model generates exactly the tokens it is told to:
every length here is forced, so the figures measure the work, not the text).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import _setup  # noqa: F401  (the repository's packages first; see bench/_setup.py)

_setup.quiet_env()

import torch  # noqa: E402
from documents import page_images  # noqa: E402
from engine import continuous_engine, length_mix, real_pdfs, run_continuous, run_static  # noqa: E402

from scriptorium.core.image_settings import ImageSettings  # noqa: E402
from scriptorium.core.spec import RenderSpec, ResourceSpec  # noqa: E402
from scriptorium.pipeline.crops_idefics3 import PUBLISHED  # noqa: E402
from scriptorium.pipeline.family import family_named  # noqa: E402
from scriptorium.pipeline.model.budget import automatic_token_budget, kv_cache_bytes_per_token, kv_cache_options  # noqa: E402
from scriptorium.pipeline.model.collate import batch_by_shape  # noqa: E402
from scriptorium.pipeline.model.features import VisionStream, encode_crops, generate_kwargs  # noqa: E402
from scriptorium.pipeline.model.tiny import (  # noqa: E402
    IDEFICS2_CHAT_TEMPLATE,
    IDEFICS3_CHAT_TEMPLATE,
    IDEFICS3_TILE_TOKENS,
    SMOLVLM_CHAT_TEMPLATE,
    TINY_TEXT_MODEL,
    build_tokenizer,
)
from scriptorium.pipeline.render.size import resolved_render  # noqa: E402


@dataclass(frozen=True)
class Architecture:
    """A model the suite builds from its config with random weights: its family (pipeline/family.py) and
    the sizes its config is made of, the published checkpoint's (`full`) and a toy's for --tiny runs."""

    name: str  # what the report calls it, and the section that measures it
    metric_suffix: str  # what its figures' RESULT metrics end with
    family: str
    full: dict
    toy: dict


# --tiny: a vision tower of toy width and depth (every family's; TINY_TEXT_MODEL is the text model's).
TOY_VISION_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def toy_of(full: dict) -> dict:
    """The Idefics3 family's `full` config at toy widths and depths: tiles, patches, pixel-shuffle scale and
    vocabulary kept, so the processor, the crops and the prompts are the full model's."""
    return {**full, "vision_config": {**full["vision_config"], **TOY_VISION_TOWER},
            "text_config": {**full["text_config"], **TINY_TEXT_MODEL}}


# HuggingFaceM4/idefics2-8b's config.json: SigLIP-so400m vision tower at 980, Mistral-7B text model
# (the keys its config leaves out are MistralConfig's defaults, written out here), perceiver defaults.
IDEFICS2_8B = Architecture("idefics2-8b", "", "idefics2", full=dict(
    vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       patch_size=14, image_size=980),
    perceiver_config=dict(resampler_n_latents=64, resampler_depth=3, resampler_n_heads=16, resampler_head_dim=96,
                          num_key_value_heads=4),
    text_config=dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=32003,
                     max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096),
    tie_word_embeddings=False,
), toy=dict(
    vision_config=dict(TOY_VISION_TOWER, patch_size=14, image_size=980),
    perceiver_config=dict(hidden_size=64, resampler_n_latents=64, resampler_depth=1, resampler_n_heads=2,
                          resampler_head_dim=16, num_key_value_heads=1),
    text_config=dict(model_type="mistral", **TINY_TEXT_MODEL, vocab_size=32003, max_position_embeddings=4096),
    tie_word_embeddings=False,
))
# The Idefics3 family's published checkpoints, by the sizes that set the work (widths, depths, heads, tiles,
# patches, the pixel shuffle's scale, the vocabulary); their rope and norm constants change no time.
# HuggingFaceTB/SmolVLM-256M-Instruct: a SigLIP-base-like tower at 512 px tiles of 16 px patches, pixel
# shuffle by 4 (64 image tokens a tile), SmolLM2-135M.
SMOLVLM_256M_FULL = dict(
    scale_factor=4,
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       patch_size=16, image_size=512),
    text_config=dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, vocab_size=49280, max_position_embeddings=8192),
)
# HuggingFaceM4/Idefics3-8B-Llama3: SigLIP-so400m at 364 px tiles of 14 px patches, pixel shuffle by 2
# (169 image tokens a tile), Llama-3-8B.
IDEFICS3_8B_FULL = dict(
    scale_factor=2,
    vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       patch_size=14, image_size=364),
    text_config=dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128259,
                     max_position_embeddings=8192),
    tie_word_embeddings=False,
)
SMOLVLM_256M = Architecture("smolvlm-256m", "_smolvlm256m", "smolvlm", SMOLVLM_256M_FULL, toy_of(SMOLVLM_256M_FULL))
IDEFICS3_8B = Architecture("idefics3-8b", "_idefics3_8b", "idefics3", IDEFICS3_8B_FULL, toy_of(IDEFICS3_8B_FULL))

INSTRUCTION = "Transcribe all the text on this page, in reading order."  # Scriptorium's OCR prompt


def build_tokenizer_for(family: str):
    """Scriptorium's tiny offline tokenizer; the Idefics3 family's has its tile tags as single tokens, as
    the real ones do, so a page's prompt is as long as its grid makes it. Its bos, eos and pad are
    Idefics2's for every family: the Idefics3 family's chat templates open with a tag it spells in a few
    tokens, nothing beside a page's 800 to 2,900 image tokens."""
    return build_tokenizer(extra_tokens=() if family == "idefics2" else IDEFICS3_TILE_TOKENS)


# The Idefics3 family's chat templates (Idefics2's is IDEFICS2_CHAT_TEMPLATE), as the tiny checkpoints have them.
CHAT_TEMPLATES = {"idefics3": IDEFICS3_CHAT_TEMPLATE, "smolvlm": SMOLVLM_CHAT_TEMPLATE}


def build_processor(family: str, tokenizer, image_seq_len: int, longest_edge: int = 980):
    """The family's processor around `tokenizer`, with the PIL image processor splitting pages: Idefics2's
    at `longest_edge` (and 378); the Idefics3 family's at its published checkpoint's longest edge and
    tile (crops_idefics3.PUBLISHED). SmolVLM's model gets Idefics3's processor classes: transformers'
    SmolVLMProcessor needs torchvision and num2words, and its image rule and prompt text are Idefics3's."""
    if family != "idefics2":
        from transformers import Idefics3Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        images = Idefics3ImageProcessorPil(do_image_splitting=True, **PUBLISHED[family])
        return Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=image_seq_len,
                                 chat_template=CHAT_TEMPLATES[family])
    from transformers import Idefics2Processor

    try:  # transformers 5: the PIL backend (torchvision may be missing)
        from transformers.models.idefics2.image_processing_pil_idefics2 import (
            Idefics2ImageProcessorPil as Images,
        )
    except ImportError:  # transformers 4: the numpy/PIL processor is the default one
        from transformers import Idefics2ImageProcessor as Images

    images = Images(do_image_splitting=True, size={"longest_edge": longest_edge, "shortest_edge": min(378, longest_edge)})
    return Idefics2Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=image_seq_len,
                             chat_template=IDEFICS2_CHAT_TEMPLATE)


# Each family's config and model class: the concrete classes, which transformers 4.x and 5.x both have.
MODEL_CLASSES = {"idefics2": ("Idefics2Config", "Idefics2ForConditionalGeneration"),
                 "idefics3": ("Idefics3Config", "Idefics3ForConditionalGeneration"),
                 "smolvlm": ("SmolVLMConfig", "SmolVLMForConditionalGeneration")}


def build_model(family: str, tok, sizes: dict, device: str, dtype: torch.dtype, attention: str):
    """Random weights, created on the device in `dtype` (no float32 copy, no download); the tokenizer `tok`
    gives the special tokens' ids."""
    import transformers

    config_class, model_class = (getattr(transformers, name) for name in MODEL_CLASSES[family])
    config = config_class(image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **sizes)
    config.text_config.pad_token_id = tok.pad_token_id
    config._attn_implementation = attention
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in `dtype` directly
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_utterance>")]
    return model.eval()


def generation_args(new_tokens: int, kv_cache: str = "dynamic") -> dict:
    """Exactly `new_tokens` per page, greedy; the KV cache as `[model] kv_cache` holds it (the model card's
    loop uses transformers' default, the dynamic cache)."""
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kv_cache_options(kv_cache))


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def run_model_stage(bench: Bench, budget, gen, overlap=True, n_pages: int = 0):
    """Scriptorium's model stage on the bench's first `n_pages` pages (0: all): pages of one tile grid
    together, as their prompt ids are the same (Idefics2's pages have no grid: one group), shape-sorted
    batches within, GPU collation, one prompt per batch, decode. `budget` is (pages, pixels, tokens) per
    batch. With `overlap`, the next batch's crops are encoded on the vision stream while this one
    decodes, as a replica does with its next block."""
    model, crops, grids, device = bench.model, bench.crops, bench.grids, bench.device
    batch_size, max_batch_pixels, max_batch_tokens = budget

    def tokens_of(i: int) -> int:  # what a page's KV cache holds
        return len(bench.prompt_ids_by_grid[grids[i]]) + gen["max_new_tokens"]

    batches = []
    for grid in bench.prompt_ids_by_grid:
        pages = [i for i in range(n_pages or len(crops)) if grids[i] == grid]
        batches.extend(batch_by_shape(pages, lambda i: crops[i], batch_size, max_batch_pixels, tokens_of=tokens_of,
                                      max_batch_tokens=max_batch_tokens))
    vision = VisionStream(device)

    def encode(k: int) -> torch.Tensor:
        with torch.inference_mode():  # a worker thread's own mode
            return vision.encode(model, [crops[i] for i in batches[k]], bench.settings, device, bench.dtype)

    texts, new_tokens = [], []
    with ThreadPoolExecutor(1) as encoder:
        upcoming = encoder.submit(encode, 0)
        for k, batch in enumerate(batches):
            features = upcoming.result()
            if overlap and k + 1 < len(batches):
                upcoming = encoder.submit(encode, k + 1)
            input_ids = bench.prompt_ids_by_grid[grids[batch[0]]].unsqueeze(0).expand(len(batch), -1).to(device)
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    **generate_kwargs(model, features), **gen)
            generated = output[:, input_ids.shape[1]:].cpu()
            new_tokens.extend([generated.shape[1]] * len(batch))
            texts.extend(bench.processor.tokenizer.batch_decode(generated, skip_special_tokens=True))
            if not overlap and k + 1 < len(batches):
                upcoming = encoder.submit(encode, k + 1)
    synchronize(device)
    return texts, new_tokens, [len(batch) for batch in batches]


@torch.inference_mode()
def run_snippet(model, processor, prompt, images, device, gen):
    """The model card's loop, one page at a time."""
    texts, new_tokens = [], []
    for image in images:
        inputs = processor(text=prompt, images=[image], return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        generated = model.generate(**inputs, **gen)
        new_tokens.append(generated.shape[1] - inputs["input_ids"].shape[1])
        texts.extend(processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    synchronize(device)
    return texts, new_tokens


def timed(device: str, fn, *args, **kwargs):
    """(seconds, peak device memory in bytes, result) of fn(*args, **kwargs)."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return seconds, peak, result



class Report:
    """RESULT and information lines, printed and flushed at once, copied to a log file if asked."""

    def __init__(self, log_path: str | None):
        self.log = open(log_path, "a", buffering=1) if log_path else None
        self.failed: list[str] = []

    def say(self, line: str) -> None:
        print(line, flush=True)
        if self.log:
            self.log.write(line + "\n")

    def result(self, metric: str, value: float, unit: str, target: str = "") -> None:
        self.say(f"RESULT {metric} {value:.4g} {unit}" + (f" target {target}" if target else ""))

    @contextmanager
    def section(self, name: str):
        """A section that fails is reported and the suite goes on with the next one."""
        started = time.perf_counter()
        self.say(f"== {name}")
        try:
            yield
        except Exception as exc:
            self.failed.append(name)
            self.say(f"!! {name} failed after {time.perf_counter() - started:.0f} s: {type(exc).__name__}: "
                     f"{str(exc)[:600]}")
            self.say("".join(traceback.format_exc().splitlines(keepends=True)[-12:]).rstrip())
        else:
            self.say(f"   ({name}: {time.perf_counter() - started:.1f} s)")
        finally:
            gc.collect()  # a section's own model (the families') goes before the cache is emptied
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def stop_at_deadline(report: Report, seconds: float) -> None:
    """A watchdog: at the deadline, say so and end the process (what was measured is already printed)."""

    def watch():
        time.sleep(seconds)
        report.say(f"DEADLINE: {seconds:.0f} s reached; the sections not printed above were not measured")
        os._exit(3 if report.failed else 0)

    threading.Thread(target=watch, daemon=True).start()


# -- 1. correctness ---------------------------------------------------------------------------------------
def page_rows(pages):
    """PAGE_SCHEMA rows of rendered page images, as the render stage makes them."""
    from scriptorium.core.schema import PAGE_SCHEMA, table_from_rows

    rows = [dict(source_uri=f"suite://page-{i}.png", size=page.nbytes, etag=f"e{i}", kind="image", page=0,
                 n_pages=1, member=None, width=page.shape[1], height=page.shape[0], image=page.tobytes(),
                 text_layer=None, status="ok", error=None, stage=None, questions=None, image_shapes=None,
                 content_hash=None, routed=None, done_units=None) for i, page in enumerate(pages)]
    return table_from_rows(rows, PAGE_SCHEMA)


def stage_rows(replica, preprocessed) -> list[dict]:
    """Result rows of a model-stage replica's call, sorted."""
    from scriptorium.pipeline.steps import step_results

    rows = [row for table in step_results(replica(preprocessed)) for row in table.to_pylist()]
    return sorted(rows, key=lambda r: (r["source_uri"], r["task"]))


GENERATION_KEYS = ("source_uri", "task", "status", "text", "n_output_tokens")


def same_generation(a: list[dict], b: list[dict]) -> int:
    """How many rows of `a` and `b` (in the same order) have the same status, text and token count."""
    return sum(all(x[k] == y[k] for k in GENERATION_KEYS) for x, y in zip(a, b))


def differing_rows(a: list[dict], b: list[dict]) -> str:
    """The rows of `a` and `b` that differ, named (page and task) with their token counts."""
    return "; ".join(f"{x['source_uri']} {x['task']}: {x['n_output_tokens']} vs {y['n_output_tokens']} tokens"
                     for x, y in zip(a, b) if any(x[k] != y[k] for k in GENERATION_KEYS))


# The tiny image-sensitive checkpoints the correctness sections run (pipeline/model/tiny.py), each splitting
# pages by its family's rule at a size quick on CPU: Idefics2's four quadrants and the page at 490; the
# Idefics3 family's real tiles at a longest edge of two (a 2 x 2 grid and the global tile on a page).
# SmolVLM's model runs under Idefics3's processor classes: transformers' SmolVLMProcessor needs torchvision
# and num2words, and its image rule and prompt text are Idefics3's.
CORRECTNESS_CHECKPOINTS = {
    "idefics2": dict(do_image_splitting=True, longest_edge=490, shortest_edge=378),
    "idefics3": dict(longest_edge=2 * 364),
    "smolvlm": dict(longest_edge=2 * 512, idefics3_processor=True),
}


def check_correctness(report: Report, device: str, n_pages: int, family: str = "idefics2",
                      inject_oom: bool = True) -> None:
    """The model stage's classes on `device` against CPU, on `family`'s tiny checkpoint: both engines, a
    static fallback, and with `inject_oom` an out-of-memory error (its recovery is the same for every
    family, so one family checks it). Idefics2's RESULT lines are `suite_*`, another family's
    `suite_<family>_*`."""
    from scriptorium.core.spec import ModelSpec, TaskSpec
    from scriptorium.pipeline.model.continuous_stage import GenerateAnswersContinuously
    from scriptorium.pipeline.model.loading import open_model_config
    from scriptorium.pipeline.model.stage import GenerateAnswers
    from scriptorium.pipeline.model.tiny import build_tiny
    from scriptorium.pipeline.preprocess import PreprocessPages
    from scriptorium.pipeline.prompts import PromptBook

    metric = "suite_" if family == "idefics2" else f"suite_{family}_"
    # fp32 without TF32 on both devices: the same arithmetic up to kernel order, so greedy tokens agree.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tasks = [TaskSpec(kind="ocr", max_new_tokens=24),
             TaskSpec(kind="caption", max_new_tokens=24, repetition_penalty=1.3)]
    with tempfile.TemporaryDirectory() as folder:
        path = build_tiny(folder, family=family, **CORRECTNESS_CHECKPOINTS[family])
        spec = ModelSpec(id=str(path), device="cpu", dtype="fp32")
        _, settings = open_model_config(spec)
        images = page_images(n_pages, resolved_render(RenderSpec(), settings), seed=7)
        pages = PreprocessPages(settings)(page_rows(images))
        preprocessed = next(iter(pages))
        book = PromptBook(tasks)
        on_cpu = stage_rows(GenerateAnswers(spec, settings, book, batch_size=4), preprocessed)
        device_spec = spec.model_copy(update={"device": device})
        static = GenerateAnswers(device_spec, settings, book, batch_size=4)
        on_device = {"static": stage_rows(static, preprocessed)}
        n = len(on_cpu)
        report.say(f"tiny {family} checkpoint, {n_pages} split pages x {len(tasks)} tasks = {n} rows; "
                   f"ok on {device}: {sum(r['status'] == 'ok' for r in on_device['static'])}")
        report.result(f"{metric}static_rows_equal_to_cpu", same_generation(on_cpu, on_device["static"]) / n, "ratio",
                      ">= 1")

        continuous = GenerateAnswersContinuously(device_spec, settings, book, batch_size=4)
        try:
            on_device["continuous"] = stage_rows(continuous, preprocessed)
        finally:
            continuous.close()
        report.result(f"{metric}continuous_rows_equal_to_cpu", same_generation(on_cpu, on_device["continuous"]) / n,
                      "ratio", ">= 1")

        if inject_oom:
            on_device["out of memory"] = rows_despite_out_of_memory(static, preprocessed)
            report.result(f"{metric}oom_rows_recovered", same_generation(on_cpu, on_device["out of memory"]) / n,
                          "ratio", ">= 1")
        unequal = {name: differing_rows(on_cpu, rows) for name, rows in on_device.items()
                   if same_generation(on_cpu, rows) < n}
        for name, rows in unequal.items():
            report.say(f"{name} rows that differ from the CPU run's: {rows}")
        if unequal:
            raise AssertionError(f"rows differ from the CPU run's: {', '.join(unequal)}")


def rows_despite_out_of_memory(static, preprocessed) -> list[dict]:
    """The static stage's rows with out of memory above two pages per batch: it halves the batch, and
    every row is still made."""
    real_generate = static.model.generate

    def generate_within_two_pages(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("injected: CUDA out of memory (more than 2 pages)")
        return real_generate(*args, **kwargs)

    static.model.generate = generate_within_two_pages
    try:
        return stage_rows(static, preprocessed)
    finally:
        static.model.generate = real_generate


# -- 2-8. the full architectures --------------------------------------------------------------------------
class Bench:
    """A full-size model (or its toy with --tiny), its processor, pages and crops, built once for every
    measurement of it."""

    def __init__(self, args, device: str, dtype: torch.dtype, architecture: Architecture = IDEFICS2_8B,
                 n_pages: int = 0):
        self.args, self.device, self.dtype, self.architecture = args, device, dtype, architecture
        n_pages = n_pages or args.pages
        family = family_named(architecture.family)
        tokenizer = build_tokenizer_for(architecture.family)
        started = time.perf_counter()
        self.model = build_model(architecture.family, tokenizer, architecture.toy if args.tiny else architecture.full,
                                 device, dtype, args.attn)
        self.build_s = time.perf_counter() - started
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.processor = build_processor(architecture.family, tokenizer, family.image_tokens_per_crop(self.model.config),
                                         args.longest_edge)
        self.settings = ImageSettings.from_processor(self.processor)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION}]}]
        self.prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        # A few distinct pages, repeated: every length is forced, so their content changes no time, and the
        # lease's minutes go to the GPU rather than to drawing and cropping hundreds of pages on one core.
        distinct = page_images(min(n_pages, args.distinct_pages), resolved_render(RenderSpec(), self.settings))
        started = time.perf_counter()
        distinct_crops = [family.crops(page, self.settings) for page in distinct]
        self.cpu_s = (time.perf_counter() - started) / len(distinct)
        self.pages = [distinct[i % len(distinct)] for i in range(n_pages)]
        self.crops = [distinct_crops[i % len(distinct)][0] for i in range(n_pages)]
        self.grids = [distinct_crops[i % len(distinct)][1] for i in range(n_pages)]
        # A page's prompt ids spell out its grid of tiles (the Idefics3 family's; Idefics2's pages have none).
        self.prompt_ids_by_grid = {grid: family.prompt_ids(self.processor, self.prompt, [grid])
                                   for grid in sorted(set(self.grids))}
        # The first page's, with which the measurements of one page's features (features_of_one_page) and
        # the Idefics2 sections, whose pages all share it, make their batches.
        self.prompt_ids = self.prompt_ids_by_grid[self.grids[0]]
        self.batch_pages = ResourceSpec(batch_size=args.batch_size).pages_per_batch(on_gpu=device == "cuda")
        self.token_budget = args.max_batch_tokens or automatic_token_budget(self.model, device, dtype)
        self.engine = None

    @property
    def budget(self) -> tuple[int, int, int]:
        return self.batch_pages, 0, self.token_budget

    def continuous(self):
        if self.engine is None:
            per_page = len(self.prompt_ids) + self.args.new_tokens
            cache_tokens = self.token_budget or self.batch_pages * per_page
            self.engine = continuous_engine(self.model, self.batch_pages, cache_tokens, self.settings.images_per_page)
        return self.engine

    def close_engine(self) -> None:
        """Frees the continuous engine's cache (sized for the whole token budget) for what comes next."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def describe_machine(report: Report, args) -> None:
    import transformers

    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report.say(f"device: {name}; torch {torch.__version__}, transformers {transformers.__version__}, CUDA "
               f"{torch.version.cuda}")
    if args.tiny or args.device != "cuda":
        report.say("NOTE: a toy model or no GPU: the RESULT lines below check the suite runs, they measure nothing")


def describe(report: Report, bench: Bench) -> None:
    args, settings = bench.args, bench.settings
    report.say(f"model: {'toy ' if args.tiny else ''}{bench.architecture.name} architecture, "
               f"{bench.n_params / 1e9:.2f} B parameters, random weights, {str(bench.dtype).replace('torch.', '')}, "
               f"attention {args.attn}; built in {bench.build_s:.1f} s")
    report.say(f"pages: {len(bench.pages)} rendered at {settings.render_edge} with splitting "
               f"({span(len(crops) for crops in bench.crops)} crops), prompt "
               f"{span(len(ids) for ids in bench.prompt_ids_by_grid.values())} tokens; automatic batch up to "
               f"{bench.batch_pages} pages within {bench.token_budget or 'no'} KV-cache tokens; CPU stage "
               f"{1 / bench.cpu_s:.1f} pages/s on one core (not in the GPU times)")


def span(values) -> str:
    """"5" or "13-17": the smallest and the largest of `values`."""
    values = list(values)
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}-{high}"


def ceilings(report: Report, device: str) -> None:
    """The card's two ceilings as found today: a bf16 matrix product and a device-to-device copy."""
    if device != "cuda":
        return
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    source = torch.randn(2**30, device=device, dtype=torch.bfloat16)
    target = torch.empty_like(source)
    for label, work, amount in (("bf16 matmul", lambda: a @ b, 2 * 8192**3),
                                ("copy", lambda: target.copy_(source), 2 * source.nbytes)):
        work()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            work()
        torch.cuda.synchronize()
        rate = amount * 10 / (time.perf_counter() - started)
        report.say(f"ceiling, {label}: {rate / 1e12:.0f} {'TFLOP/s' if 'matmul' in label else 'TB/s'}")
    del a, b, source, target


def static_engine(report: Report, bench: Bench) -> tuple[float, int]:
    """The static engine on every page at exactly --new-tokens, the automatic batch, after a warm-up on two
    pages: (seconds, peak device memory in bytes), and a line of its batches and memory."""
    args, device = bench.args, bench.device
    run_model_stage(bench, (2, 0, 0), generation_args(min(8, args.new_tokens), args.kv_cache), n_pages=2)
    seconds, peak, (_, tokens, sizes) = timed(device, run_model_stage, bench, bench.budget,
                                              generation_args(args.new_tokens, args.kv_cache),
                                              overlap=not args.no_overlap)
    exact = set(tokens) == {args.new_tokens}
    per_token = kv_cache_bytes_per_token(bench.model.config.text_config, bench.dtype)
    report.say(f"{bench.architecture.name}, static engine: {len(bench.crops)} pages in {seconds:.1f} s, batches "
               f"{sizes} (vision {'in turn' if args.no_overlap else 'beside decode'}), {args.new_tokens} tokens "
               f"each, all exact: {'yes' if exact else 'NO'}; peak {peak / 2**30:.1f} GiB (KV-cache budget "
               f"{bench.token_budget * per_token / 2**30:.1f} GiB, total "
               f"{torch.cuda.get_device_properties(0).total_memory / 2**30 if device == 'cuda' else 0:.0f} GiB)")
    return seconds, peak


def end_to_end(report: Report, bench: Bench) -> dict:
    """Both engines at exactly --new-tokens per page, the automatic batch; the model card's loop."""
    args, model, device, dtype = bench.args, bench.model, bench.device, bench.dtype
    seconds, peak = static_engine(report, bench)
    n = len(bench.crops)
    static_rate = n / seconds
    report.result("gpu_pages_per_s", static_rate, "pages/s", ">= 15")
    report.result("gpu_peak_memory", peak / 2**30, "GiB")
    if args.both_orders:  # the same batches with each batch's crops encoded only after the previous decoded
        other_s, _, _ = timed(device, run_model_stage, bench, bench.budget,
                              generation_args(args.new_tokens, args.kv_cache), overlap=args.no_overlap)
        report.say(f"static engine, vision {'beside decode' if args.no_overlap else 'in turn'}: {n} pages in "
                   f"{other_s:.1f} s")
        report.result("gpu_overlap_gain", (other_s / seconds) ** (-1 if args.no_overlap else 1), "x")

    pages = bench.crops[: args.continuous_pages or n]
    engine = bench.continuous()
    run_continuous(engine, model, bench.prompt_ids, bench.crops[:2], [min(8, args.new_tokens)] * 2, bench.settings,
                   device, dtype)
    seconds, peak, produced = timed(device, run_continuous, engine, model, bench.prompt_ids, pages,
                                    [args.new_tokens] * len(pages), bench.settings, device, dtype)
    report.say(f"continuous engine: {len(pages)} pages in {seconds:.1f} s, all exact: "
               f"{'yes' if set(produced) == {args.new_tokens} else 'NO'}; peak {peak / 2**30:.1f} GiB")
    report.result("gpu_continuous_pages_per_s", len(pages) / seconds, "pages/s", ">= 15")

    from PIL import Image

    pil_pages = [Image.fromarray(page) for page in bench.pages[: args.snippet_pages]]
    card = generation_args(args.new_tokens)
    run_snippet(model, bench.processor, bench.prompt, pil_pages[:1], device, generation_args(min(8, args.new_tokens)))
    seconds, _, (_, snippet_tokens) = timed(device, run_snippet, model, bench.processor, bench.prompt, pil_pages,
                                            device, card)
    snippet_rate = len(pil_pages) / seconds
    report.say(f"model card loop: {len(pil_pages)} pages in {seconds:.1f} s ({snippet_rate:.3f} pages/s), all exact: "
               f"{'yes' if set(snippet_tokens) == {args.new_tokens} else 'NO'}")
    report.result("gpu_vs_snippet", static_rate / snippet_rate, "x", ">= 20")
    return {"static": static_rate}


def family_end_to_end(report: Report, bench: Bench, architecture: Architecture) -> None:
    """`architecture` (of the Idefics3 family) end to end with the static engine: --family-pages pages rendered
    and cut by its family's rule, at exactly --new-tokens, the automatic batch, after idefics2-8b's figures.
    The continuous engine is left out: on idefics2-8b it made a seventh of the static engine's pages/s,
    attending over every request in flight at each step, and a page here is 13 to 17 tiles of image
    tokens; the `families` section checks its rows on these families."""
    bench.close_engine()  # idefics2-8b's engine cache makes room; its weights stay for the sections after
    family_bench = Bench(bench.args, bench.device, bench.dtype, architecture, n_pages=bench.args.family_pages)
    describe(report, family_bench)
    seconds, _ = static_engine(report, family_bench)
    report.result(f"gpu_pages_per_s{architecture.metric_suffix}", len(family_bench.crops) / seconds, "pages/s")


def features_of_one_page(bench: Bench) -> torch.Tensor:
    return encode_crops(bench.model, [bench.crops[0]], bench.settings, bench.device, bench.dtype)


def generate_seconds(bench: Bench, batch: int, new_tokens: int, features: torch.Tensor, **options) -> float:
    """Seconds of one `generate` of `batch` copies of a page (features given) for exactly `new_tokens`."""
    ids = bench.prompt_ids.unsqueeze(0).expand(batch, -1).to(bench.device)
    synchronize(bench.device)
    started = time.perf_counter()
    with torch.inference_mode():
        bench.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             **generate_kwargs(bench.model, features.repeat(batch, 1)),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **options)
    synchronize(bench.device)
    return time.perf_counter() - started


def vision_flops(crops, vision_config) -> float:
    """Matrix-multiply FLOPs of the vision tower on these crops (attention included, the perceiver not)."""
    d, mlp, layers, patch = (vision_config.hidden_size, vision_config.intermediate_size,
                             vision_config.num_hidden_layers, vision_config.patch_size)
    total = 0.0
    for crop in crops:
        p = (crop.shape[0] // patch) * (crop.shape[1] // patch)
        total += layers * (2 * p * (4 * d * d + 2 * d * mlp) + 4 * p * p * d) + 2 * p * 3 * patch * patch * d
    return total


def vision_seconds_per_page(report: Report, bench: Bench, label: str) -> float:
    """Seconds per page of the vision tower and connector on --vision-pages pages, after a first pass over
    the same pages (each crop shape's kernels chosen, or compiled, before the timed pass)."""
    pages = bench.crops[: bench.args.vision_pages]
    started = time.perf_counter()
    encode_crops(bench.model, pages, bench.settings, bench.device, bench.dtype)
    synchronize(bench.device)
    warm_up_s = time.perf_counter() - started
    started = time.perf_counter()
    encode_crops(bench.model, pages, bench.settings, bench.device, bench.dtype)
    synchronize(bench.device)
    seconds = (time.perf_counter() - started) / len(pages)
    crops = [crop for page in pages for crop in page]
    flops = vision_flops(crops, bench.model.config.vision_config) / len(pages)
    report.say(f"{label}: {seconds * 1e3:.1f} ms per page ({flops / 1e12:.1f} TFLOP, {flops / seconds / 1e12:.0f} "
               f"TFLOP/s; {len({c.shape for c in crops})} crop shapes; first pass {warm_up_s:.1f} s)")
    return seconds


def vision_compiled(report: Report, bench: Bench) -> None:
    """The vision tower under torch.compile (one graph per crop shape), against eager just before."""
    inner = bench.model.model
    eager_s = vision_seconds_per_page(report, bench, "vision, eager")
    eager_tower = inner.vision_model
    inner.vision_model = torch.compile(eager_tower, dynamic=False)
    try:
        compiled_s = vision_seconds_per_page(report, bench, "vision, compiled")
    finally:
        inner.vision_model = eager_tower
    report.result("gpu_vision_compiled_vs_eager", eager_s / compiled_s, "x")


def where_time_goes(report: Report, bench: Bench) -> None:
    """Vision, prefill and decode per page; decode step time by batch and cache."""
    args = bench.args
    vision_s = vision_seconds_per_page(report, bench, "vision")
    report.result("gpu_vision_ms_per_page", vision_s * 1e3, "ms")

    features = features_of_one_page(bench)
    steps = args.decode_steps
    for batch in args.decode_batches:
        for cache in ("dynamic", "static"):
            options = kv_cache_options(cache)
            generate_seconds(bench, batch, 2, features, **options)  # warm-up at this shape
            first = generate_seconds(bench, batch, 1, features, **options)
            longer = generate_seconds(bench, batch, 1 + steps, features, **options)
            step_ms = (longer - first) / steps * 1e3
            report.say(f"batch {batch:4d}, {cache:7} cache: prefill + first token {first * 1e3:8.1f} ms "
                       f"({first / batch * 1e3:.1f} ms per page), decode step {step_ms:6.2f} ms "
                       f"({step_ms / batch:.3f} ms per page-token)")
            report.result(f"gpu_decode_step_ms_b{batch}_{cache}", step_ms, "ms")
    # A page at --new-tokens in a batch of the largest size measured, from the figures above.
    report.say(f"per page at {args.new_tokens} new tokens and batch {args.decode_batches[-1]}: vision "
               f"{vision_s * 1e3:.0f} ms, prefill {first / batch * 1e3:.0f} ms, decode "
               f"{step_ms / batch * args.new_tokens:.0f} ms (dynamic vs static: see the step times)")


# An extract task's grammar with a string that never has to close: random weights keep it open, so every
# step is masked inside a string (where a mask costs most) and `generate` runs exactly the steps it is told.
EXTRACT_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["text"],
                  "properties": {"text": {"type": "string"}}}


def extract_grammar(report: Report, bench: Bench) -> None:
    """A decode step free and under an extract task's grammar (its masks started ahead, as the model stage
    starts them), with a 32,000-token tokenizer (bench/extract.py's; the suite's own has 400 tokens)."""
    from extract import train_tokenizer

    from scriptorium.pipeline.model.grammar import Grammars

    args = bench.args
    started = time.perf_counter()
    tokenizer = train_tokenizer(32000 if args.device == "cuda" else 1000)
    eos = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_utterance>")})
    grammars = Grammars(tokenizer, bench.model.get_output_embeddings().out_features, eos, {"x": EXTRACT_SCHEMA})
    report.say(f"grammar ready in {time.perf_counter() - started:.1f} s ({len(tokenizer)}-token tokenizer)")
    features = features_of_one_page(bench)
    steps = args.decode_steps
    options = kv_cache_options(args.kv_cache)
    for batch in sorted({min(64, args.decode_batches[-1]), args.decode_batches[-1]}):

        def hooked(**extra):
            mask, ahead = grammars.hooks("x", batch)
            return dict(logits_processor=[mask], stopping_criteria=[ahead], **extra)

        generate_seconds(bench, batch, 2, features, **options)  # warm-up at this shape
        free = (generate_seconds(bench, batch, 1 + steps, features, **options)
                - generate_seconds(bench, batch, 1, features, **options)) / steps
        masked = (generate_seconds(bench, batch, 1 + steps, features, **hooked(**options))
                  - generate_seconds(bench, batch, 1, features, **hooked(**options))) / steps
        report.say(f"batch {batch:4d}: decode step {free * 1e3:6.2f} ms free, {masked * 1e3:6.2f} ms under the "
                   f"grammar ({(masked - free) / batch * 1e6:.1f} us per token per sequence left after the overlap)")
        report.result(f"gpu_extract_step_ratio_b{batch}", masked / free, "x")


def length_mix_runs(report: Report, bench: Bench) -> None:
    args, model, device, dtype = bench.args, bench.model, bench.device, bench.dtype
    targets, _ = length_mix(real_pdfs(), args.new_tokens, resolved_render(RenderSpec(page_edge=64), bench.settings),
                            n_pages=len(bench.crops))
    eos_id = bench.processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    n = len(bench.crops)
    static_s, _, static_tokens = timed(device, run_static, model, bench.prompt_ids, bench.crops, targets, bench.settings,
                                       device, dtype, bench.batch_pages, args.new_tokens, eos_id, bench.token_budget,
                                       **kv_cache_options(args.kv_cache))
    continuous_s, _, continuous_tokens = timed(device, run_continuous, bench.continuous(), model, bench.prompt_ids,
                                               bench.crops, targets, bench.settings, device, dtype)
    exact = static_tokens == continuous_tokens == targets
    report.say(f"length mix: {sum(targets) / n:.0f} new tokens per page on average (max {max(targets)}), all exact: "
               f"{'yes' if exact else 'NO'}; static {static_s:.1f} s, continuous {continuous_s:.1f} s")
    report.result("gpu_mix_static_pages_per_s", n / static_s, "pages/s")
    report.result("gpu_mix_continuous_pages_per_s", n / continuous_s, "pages/s")
    report.result("gpu_mix_continuous_vs_static", static_s / continuous_s, "x", ">= 1")


def engine_concurrency(report: Report, bench: Bench) -> None:
    """The continuous engine at several numbers of requests in flight (SDPA's cap lifted for the sweep):
    twice that many pages, each exactly --sweep-tokens new tokens, in a cache just big enough."""
    from scriptorium.pipeline.model import continuous

    args, model, device, dtype = bench.args, bench.model, bench.device, bench.dtype
    bench.close_engine()  # its cache, sized for the whole budget, goes first
    cap = continuous.SDPA_MAX_REQUESTS_ON_GPU
    per_page = len(bench.prompt_ids) + args.sweep_tokens
    for requests in args.engine_requests:
        continuous.SDPA_MAX_REQUESTS_ON_GPU = max(cap, requests)
        engine = continuous_engine(model, requests, 2 * requests * per_page, bench.settings.images_per_page)
        try:
            crops = [bench.crops[i % len(bench.crops)] for i in range(2 * requests)]
            run_continuous(engine, model, bench.prompt_ids, crops[:2], [2, 2], bench.settings, device, dtype)
            seconds, _, produced = timed(device, run_continuous, engine, model, bench.prompt_ids, crops,
                                         [args.sweep_tokens] * len(crops), bench.settings, device, dtype)
        finally:
            engine.close()
            continuous.SDPA_MAX_REQUESTS_ON_GPU = cap
        tokens = sum(produced)
        report.say(f"continuous engine, {requests:4d} requests at once: {len(crops)} pages x {args.sweep_tokens} "
                   f"tokens in {seconds:.1f} s = {tokens / seconds:.0f} tokens/s, {len(crops) / seconds:.2f} pages/s")
        report.result(f"gpu_continuous_tokens_per_s_r{requests}", tokens / seconds, "tokens/s")


def compile_runs(report: Report, bench: Bench) -> None:
    """Decode steps through a preallocated cache of one fixed size, with and without torch.compile.

    One cache object for every call, so every call has the same shapes: `cache_implementation="static"`
    alone sizes the cache by each call's max_new_tokens, and the compiled step then recompiles per size
    (with batch sizes that vary, as halving and retries make them, it would recompile per batch too)."""
    from transformers import StaticCache

    args = bench.args
    features = features_of_one_page(bench)
    batch, steps = args.compile_batch, args.decode_steps
    cache_tokens = len(bench.prompt_ids) + 1 + steps
    cache = StaticCache(config=bench.model.config.text_config, max_cache_len=cache_tokens)

    def seconds(new_tokens: int, compiled: bool) -> float:
        with torch.inference_mode():  # the cache's tensors were made in inference mode
            cache.reset()
        return generate_seconds(bench, batch, new_tokens, features, past_key_values=cache, disable_compile=not compiled)

    started = time.perf_counter()
    seconds(2, compiled=True)  # compiles (on CUDA) for this shape
    report.say(f"compile warm-up at batch {batch}: {time.perf_counter() - started:.1f} s")
    for label, compiled in (("compiled", True), ("eager", False)):
        seconds(2, compiled)
        first, longer = seconds(1, compiled), seconds(1 + steps, compiled)
        step_ms = (longer - first) / steps * 1e3
        report.say(f"batch {batch}, preallocated cache of {cache_tokens} tokens, {label}: decode step "
                   f"{step_ms:.2f} ms")
        report.result(f"gpu_decode_step_ms_b{batch}_static_{label}", step_ms, "ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true",
                        help="toy-size models for the measurement sections (a check that they run)")
    parser.add_argument("--deadline-s", type=float, default=450, help="stop cleanly after this many seconds")
    parser.add_argument("--log", help="also append every line to this file")
    parser.add_argument("--pages", type=int, default=0, help="pages end to end (0: 512 on cuda, 4 on cpu)")
    parser.add_argument("--distinct-pages", type=int, default=32, help="distinct page images among --pages")
    parser.add_argument("--snippet-pages", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=0, help="exactly this many per page (0: 512, 4 on cpu)")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the pipeline's automatic batch")
    parser.add_argument("--max-batch-tokens", type=int, default=0, help="0: the automatic KV-cache budget")
    parser.add_argument("--no-overlap", action="store_true",
                        help="encode each batch's crops only after the previous batch decoded (as before)")
    parser.add_argument("--both-orders", action="store_true",
                        help="also time the static engine the other way (vision in turn, or beside decode)")
    parser.add_argument("--continuous-pages", type=int, default=0, help="the continuous engine's share (0: all)")
    parser.add_argument("--kv-cache", default="static", choices=["static", "dynamic"],
                        help="the static engine's KV cache, as [model] kv_cache")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"])
    parser.add_argument("--longest-edge", type=int, default=980, help="the processor's size (pages render at twice)")
    parser.add_argument("--vision-pages", type=int, default=0, help="pages timed through the vision tower alone")
    parser.add_argument("--decode-batches", default="", help="comma-separated batch sizes for the decode steps")
    parser.add_argument("--decode-steps", type=int, default=0, help="decode steps timed per measurement")
    parser.add_argument("--compile-batch", type=int, default=0)
    parser.add_argument("--engine-requests", default="", help="comma-separated requests in flight to sweep")
    parser.add_argument("--sweep-tokens", type=int, default=0, help="new tokens per page in the sweep")
    parser.add_argument("--correctness-pages", type=int, default=5)
    parser.add_argument("--family-pages", type=int, default=0,
                        help="pages end to end for each of smolvlm-256m and idefics3-8b (0: 64 on cuda, --pages on cpu)")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out: "
                                                   "correctness,families,end-to-end,smolvlm-256m,idefics3-8b,"
                                                   "vision-compile,time,extract,mix,concurrency,compile")
    args = parser.parse_args()
    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        sys.exit("bench/gpu_suite.py: no CUDA GPU here. On CPU: python bench/gpu_suite.py --tiny --device cpu")
    args.pages = args.pages or (512 if on_gpu else 4)
    args.new_tokens = args.new_tokens or (512 if on_gpu else 4)
    args.family_pages = args.family_pages or (64 if on_gpu else args.pages)
    args.vision_pages = args.vision_pages or (16 if on_gpu else 2)
    args.decode_batches = [int(b) for b in (args.decode_batches or ("32,64,128,256" if on_gpu else "2,4")).split(",")]
    args.decode_steps = args.decode_steps or (32 if on_gpu else 2)
    args.compile_batch = args.compile_batch or (64 if on_gpu else 2)
    args.engine_requests = [int(r) for r in (args.engine_requests or ("16,32,64,128" if on_gpu else "2")).split(",")]
    args.sweep_tokens = args.sweep_tokens or (128 if on_gpu else 4)
    skip = set(filter(None, args.skip.split(",")))

    report = Report(args.log)
    stop_at_deadline(report, args.deadline_s)
    started = time.perf_counter()
    if "correctness" not in skip:
        with report.section("correctness: the model stage's classes on the device against CPU"):
            check_correctness(report, args.device, args.correctness_pages)
    for family in ("idefics3", "smolvlm"):  # the Idefics3 family: its grids of tiles and its prompts per grid
        if "families" not in skip:
            with report.section(f"families: the tiny {family} checkpoint through the model stage's classes on the "
                                f"device against CPU"):
                check_correctness(report, args.device, args.correctness_pages, family, inject_oom=False)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    bench = None
    with report.section("build the model"):
        bench = Bench(args, args.device, dtype)
        describe_machine(report, args)
        describe(report, bench)
        ceilings(report, args.device)
    if bench is not None:
        for name, run in (("end-to-end", end_to_end),
                          (SMOLVLM_256M.name, partial(family_end_to_end, architecture=SMOLVLM_256M)),
                          (IDEFICS3_8B.name, partial(family_end_to_end, architecture=IDEFICS3_8B)),
                          ("vision-compile", vision_compiled), ("time", where_time_goes),
                          ("extract", extract_grammar), ("mix", length_mix_runs), ("concurrency", engine_concurrency),
                          ("compile", compile_runs)):
            if name not in skip:
                with report.section(name):
                    run(report, bench)
        bench.close_engine()
    report.say(f"suite done in {time.perf_counter() - started:.0f} s; sections failed: {report.failed or 'none'}")
    sys.stdout.flush()
    os._exit(3 if report.failed else 0)  # the engine's and the watchdog's threads do not hold the exit


if __name__ == "__main__":
    main()
