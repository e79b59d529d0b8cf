"""How much of the decoder's work is useful, static batches against the continuous engine (CPU, measured).

    python bench/engine.py                       # the tiny checkpoint on CPU, the length mix of real PDFs
    python bench/engine.py --batch-size 16 --pdf a.pdf --pdf b.pdf

`decode_slot_efficiency` = useful generated tokens / token rows the decoder computed to generate them.
A forward hook on the text model counts every row it computes (batch x sequence of each call); the
rows of the prompts are taken off (each prompt is computed once by either engine) and one row per
request is added back (the prompt's last row is the one that yields the first new token). A static
batch decodes until its longest page ends, and a page that ended keeps its row to the end, so its
efficiency is sum(lengths) / sum(batch size x longest length); the continuous engine gives a finished
page's slot to the next page and wastes only what it recomputes (a request evicted from a full cache is
prefilled again) or pads.

The length mix comes from real documents: the text layer of every page of born-digital PDFs (by default
those Debian ships under /usr/share/doc, pdfTeX manuals), in tokens at 4 characters per token (about
Mistral's rate on English prose; its tokenizer is not on this machine), capped at `--max-new-tokens` as a
task caps it, at least 1. Each page is one request, with its own rendered page as the image. Where
those PDFs are missing, the mix they gave on the development machine is used (`RECORDED_MIX_TOKENS`).
Lengths are forced so that both engines generate exactly the target: the static engine gets a logits
processor that forbids end-of-sequence before a row's target and forces it at the target (the batch
decodes with the task's max_new_tokens, as the model stage does), the continuous engine gets each
request's target as its max_new_tokens and no end-of-sequence token, which schedules the same.
Both decode at most `--batch-size` pages together (the pipeline's pages per batch).
"""

from __future__ import annotations

import argparse
import glob
import tempfile
import time
from contextlib import contextmanager

import _setup  # noqa: F401  (the repository's packages first; see bench/_setup.py)
import torch  # noqa: E402
from documents import render_pdf  # noqa: E402
from transformers import LogitsProcessor  # noqa: E402

from scriptorium.pipeline.model.collate import batch_by_shape  # noqa: E402
from scriptorium.pipeline.model.features import encode_crops, generate_kwargs  # noqa: E402

CHARS_PER_TOKEN = 4
DEFAULT_PDFS = "/usr/share/doc/**/*.pdf"
INSTRUCTION = "Transcribe all the text on this page, in reading order."  # Scriptorium's OCR prompt


def real_pdfs(pattern: str = DEFAULT_PDFS, min_bytes: int = 20_000) -> list[str]:
    import os

    return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.getsize(p) >= min_bytes)


# The mix measured by `length_mix` from the two PDFs above on the development machine (libtasn1.pdf, 36
# pages, then shared-mime-info-spec.pdf, 17 pages), uncapped: for machines without them (a GPU machine).
RECORDED_MIX_TOKENS = [
    46, 150, 548, 294, 240, 266, 246, 388, 228, 243, 542, 461, 512, 468, 584, 584, 630, 466, 494, 528, 494, 554,
    596, 650, 409, 346, 714, 878, 799, 766, 812, 828, 616, 324, 222, 773, 350, 498, 686, 617, 776, 464, 469, 619,
    521, 376, 279, 225, 370, 593, 688, 557, 340,
]


def length_mix(pdfs: list[str], max_new_tokens: int, render, n_pages: int = 0):
    """(target new tokens, page image) per page of `pdfs`: its text layer's length in tokens, capped at
    `max_new_tokens`, and the page rendered under `render` (a resolved RenderSpec, documents.render_pdf). Without PDFs (or PyMuPDF), the recorded mix on generated report pages. `n_pages`: repeat or cut
    the mix to that many pages (0: as it is)."""
    try:
        import pymupdf
    except ImportError:  # a GPU machine without PyMuPDF cannot read the PDFs' text layers
        pdfs = []
    if pdfs:

        lengths, images = [], []
        for path in pdfs:
            data = open(path, "rb").read()
            with pymupdf.open(stream=data) as document:
                lengths += [round(len(page.get_text()) / CHARS_PER_TOKEN) for page in document]
            images += render_pdf(data, render)
    else:
        from documents import page_images

        lengths = RECORDED_MIX_TOKENS
        images = page_images(len(lengths), render)
    n = n_pages or len(lengths)
    targets = [max(1, min(max_new_tokens, lengths[i % len(lengths)])) for i in range(n)]
    return targets, [images[i % len(images)] for i in range(n)]


class ForcedLengths(LogitsProcessor):
    """Row i of a static batch ends with end-of-sequence exactly at its `targets[i]`-th new token."""

    def __init__(self, targets: list[int], prompt_length: int, eos_id: int):
        self.targets = torch.tensor(targets)
        self.prompt_length = prompt_length
        self.eos_id = eos_id

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length  # new tokens so far
        targets = self.targets.to(scores.device)
        scores[step < targets - 1, self.eos_id] = -float("inf")
        at_end = step == targets - 1
        scores[at_end] = -float("inf")
        scores[at_end, self.eos_id] = 0.0
        return scores


@contextmanager
def decoder_rows(model):
    """Counts the token rows the text model computes while the block runs: yields a one-item list."""
    counted = [0]

    def count(module, args, kwargs, output):
        embeds = kwargs.get("inputs_embeds")
        counted[0] += embeds.shape[0] * embeds.shape[1]

    handle = model.model.text_model.register_forward_hook(count, with_kwargs=True)
    try:
        yield counted
    finally:
        handle.remove()


@torch.inference_mode()
def run_static(model, prompt_ids, crops, targets, settings, device, dtype, batch_size, max_new_tokens,
               eos_id: int, max_batch_tokens: int = 0, **generate_options) -> list[int]:
    """The static engine's batches (`batch_by_shape`, one shared prompt, `generate` with
    `generate_options`), with forced lengths. Returns each page's number of new tokens, in page order."""
    produced = [0] * len(crops)
    tokens_per_page = len(prompt_ids) + max_new_tokens
    for batch in batch_by_shape(list(range(len(crops))), lambda i: crops[i], batch_size,
                                tokens_of=lambda i: tokens_per_page, max_batch_tokens=max_batch_tokens):
        input_ids = prompt_ids.unsqueeze(0).expand(len(batch), -1).to(device)
        features = encode_crops(model, [crops[i] for i in batch], settings, device, dtype)
        forced = ForcedLengths([targets[i] for i in batch], input_ids.shape[1], eos_id)
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                **generate_kwargs(model, features), max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=eos_id, pad_token_id=eos_id, logits_processor=[forced],
                                **generate_options)
        for row, i in enumerate(batch):
            tokens = output[row, input_ids.shape[1]:].tolist()
            produced[i] = tokens.index(eos_id) + 1 if eos_id in tokens else len(tokens)
    return produced


def continuous_engine(model, batch_size: int, cache_tokens: int, images_per_page: int):
    """The continuous engine as the model stage builds it for `batch_size` pages per batch, with no
    end-of-sequence token (requests end at their max_new_tokens)."""
    from scriptorium.pipeline.model.continuous import ContinuousEngine

    return ContinuousEngine(model, eos_ids=set(), image_token_id=model.config.image_token_id,
                            max_requests=batch_size, cache_tokens=cache_tokens,
                            feature_slots=max(64, 2 * batch_size * images_per_page))


@torch.inference_mode()
def run_continuous(engine, model, prompt_ids, crops, targets, settings, device, dtype) -> list[int]:
    """Every page a request of `engine`, each with its target as max_new_tokens. Returns new tokens per page."""
    from scriptorium.pipeline.model.continuous import EngineRequest

    features = encode_crops(model, crops, settings, device, dtype)
    per_page = features.split([len(c) * settings.image_seq_len for c in crops])
    ids = prompt_ids.tolist()
    results = engine.generate_all([EngineRequest(ids, f, n) for f, n in zip(per_page, targets)])
    failed = [r.error for r in results if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed in the continuous engine: {failed[0]}")
    return [len(r.tokens) for r in results]


def slot_efficiency(rows: int, prompt_length: int, produced: list[int]) -> float:
    slots = rows - prompt_length * len(produced) + len(produced)
    return sum(produced) / slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pdf", action="append", help=f"PDFs whose pages give the mix (default: {DEFAULT_PDFS})")
    parser.add_argument("--batch-size", type=int, default=8, help="pages decoded together (the CPU default)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="the task's cap")
    parser.add_argument("--cache-tokens", type=int, default=0,
                        help="the continuous engine's KV cache in tokens (0: as the model stage sizes it on CPU, "
                             "batch size x CPU_CACHE_TOKENS_PER_PAGE)")
    parser.add_argument("--pages", type=int, default=0, help="repeat or cut the mix to this many pages (0: as it is)")
    parser.add_argument("--longest-edge", type=int, default=224, help="page render size (the image does not "
                                                                       "change the count, only the time)")
    args = parser.parse_args()

    from scriptorium.pipeline.model.continuous_stage import CPU_CACHE_TOKENS_PER_PAGE

    from scriptorium.core.image_settings import ImageSettings
    from scriptorium.core.spec import ModelSpec, RenderSpec
    from scriptorium.pipeline.crops import model_crops
    from scriptorium.pipeline.model.loading import load_model, load_processor
    from scriptorium.pipeline.model.tiny import build_tiny_idefics2
    from scriptorium.pipeline.render.size import resolved_render

    pdfs = args.pdf or real_pdfs()
    with tempfile.TemporaryDirectory() as folder:
        path = build_tiny_idefics2(folder, longest_edge=args.longest_edge, shortest_edge=min(112, args.longest_edge))
        processor = load_processor(str(path))
        model = load_model(ModelSpec(id=str(path), device="cpu", dtype="fp32"), "cpu")
    settings = ImageSettings.from_processor(processor)
    targets, pages = length_mix(pdfs, args.max_new_tokens, resolved_render(RenderSpec(), settings), args.pages)
    crops = [model_crops(page, settings) for page in pages]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION}]}], add_generation_prompt=True)
    prompt_ids = processor(text=prompt, return_tensors="pt")["input_ids"][0]
    eos_id = processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")

    cache_tokens = args.cache_tokens or args.batch_size * CPU_CACHE_TOKENS_PER_PAGE
    source = ", ".join(p.rsplit("/", 1)[-1] for p in pdfs) if pdfs else "the recorded mix"
    print(f"length mix: {len(targets)} pages from {source}; "
          f"new tokens min {min(targets)}, median {sorted(targets)[len(targets) // 2]}, max {max(targets)}, "
          f"total {sum(targets)}; prompt {len(prompt_ids)} tokens; {args.batch_size} pages decoded together; "
          f"continuous engine's KV cache {cache_tokens} tokens (a static batch holds "
          f"{args.batch_size * (len(prompt_ids) + args.max_new_tokens)})")
    figures = {}
    started = time.perf_counter()
    with decoder_rows(model) as rows:
        produced = run_static(model, prompt_ids, crops, targets, settings, "cpu", torch.float32, args.batch_size,
                              args.max_new_tokens, eos_id)
    figures["static"] = (slot_efficiency(rows[0], len(prompt_ids), produced), time.perf_counter() - started, produced)
    engine = continuous_engine(model, args.batch_size, cache_tokens, settings.images_per_page)
    started = time.perf_counter()
    try:
        with decoder_rows(model) as rows:
            produced = run_continuous(engine, model, prompt_ids, crops, targets, settings, "cpu", torch.float32)
    finally:
        engine.close()
    figures["continuous"] = (slot_efficiency(rows[0], len(prompt_ids), produced), time.perf_counter() - started, produced)
    for name, (efficiency, seconds, produced) in figures.items():
        exact = "all exact" if produced == targets else f"NOT exact: {sum(produced)} tokens for {sum(targets)}"
        print(f"{name:11} decode slot efficiency {efficiency:.3f}, {seconds:.1f} s ({exact})")
    print(f"RESULT decode_slot_efficiency {figures['continuous'][0]:.3f} ratio target >= 0.9")
    print(f"RESULT static_decode_slot_efficiency {figures['static'][0]:.3f} ratio")


if __name__ == "__main__":
    main()
