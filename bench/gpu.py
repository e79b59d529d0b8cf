"""The model stage on one GPU: the full-size idefics2-8b architecture (random weights), pages rendered
from real-looking documents by the render rule (1960 px for 980 with image splitting, pipeline/render/size.py),
exactly N new tokens per page, against the model card's snippet loop (batch of one, the processor on PIL
images) on the same pages in the same run.

    python bench/gpu.py                                  # on a GPU machine: 512 pages, 512 new tokens
    python bench/gpu.py --compile                        # static cache + torch.compile
    python bench/gpu.py --batch-size 64                  # a fixed batch instead of the automatic one
    python bench/gpu.py --tiny --pages 2 --new-tokens 4 --device cpu   # crash-free start check on CPU
                                                         # (add --longest-edge 490 to make it quicker)

Ours is the model stage's own code without Ray around it (what `GenerateAnswers` does per block):
uint8 crops from `pipeline.preprocess.model_crops` (the CPU stage, timed apart: it runs on other cores
while the GPU works), batches from `pipeline.collate.batch_by_shape` sized as the pipeline sizes them by
default (up to GPU_BATCH_SIZE pages, within the KV-cache token budget of `pipeline/batch_budget.py`),
crops normalized on the GPU and
encoded at their own size by `pipeline.image_features.encode_crops`, one shared prompt per batch,
`model.generate`, decode. The snippet is the
model card's loop: `processor(text=prompt, images=[image])`, `generate`, `batch_decode`, page by page.
Both use the same model object, dtype and attention, and generate exactly `--new-tokens` tokens
(min = max, EOS ignored), so only the data path and batching differ. The continuous engine
(`[model] engine = "continuous"`, pipeline/model/continuous.py) runs the same pages with the same limits (as
many pages at once as a static batch, a KV cache of the static batch's token budget), then both engines
run the pages with the length mix of real documents from bench/engine.py (each page its own number of
new tokens, forced in both): pages/s for each decides which engine is the default.

Runs where torch and transformers are installed; Ray, pyarrow and PyMuPDF are optional (without
PyMuPDF the pages are drawn with Pillow). Nothing is downloaded: the model is built from its config
with random weights directly on the device, the tokenizer is Scriptorium's tiny offline one.
"""

from __future__ import annotations

import argparse
import sys
import time

import _setup  # noqa: F401  (the repository's packages first; see bench/_setup.py)
import torch  # noqa: E402
from documents import page_images  # noqa: E402
from engine import continuous_engine, length_mix, real_pdfs, run_continuous, run_static  # noqa: E402

from core.image_settings import ImageSettings  # noqa: E402
from core.spec import GPU_BATCH_SIZE, ResourceSpec  # noqa: E402
from pipeline.crops import model_crops  # noqa: E402
from pipeline.model.budget import automatic_token_budget  # noqa: E402
from pipeline.model.collate import batch_by_shape  # noqa: E402
from pipeline.model.features import encode_crops, generate_kwargs  # noqa: E402
from pipeline.model.tiny import IDEFICS2_CHAT_TEMPLATE, build_tokenizer  # noqa: E402

# HuggingFaceM4/idefics2-8b's config.json: SigLIP-so400m vision tower at 980, Mistral-7B text model
# (the keys its config leaves out are MistralConfig's defaults, written out here), perceiver defaults.
IDEFICS2_8B = dict(
    vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       patch_size=14, image_size=980),
    perceiver_config=dict(resampler_n_latents=64, resampler_depth=3, resampler_n_heads=16, resampler_head_dim=96,
                          num_key_value_heads=4),
    text_config=dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=32003,
                     max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096),
    tie_word_embeddings=False,
)
# The same shapes at toy size, for --tiny (CPU smoke runs).
TINY = dict(
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       patch_size=14, image_size=980),
    perceiver_config=dict(hidden_size=64, resampler_n_latents=64, resampler_depth=1, resampler_n_heads=2,
                          resampler_head_dim=16, num_key_value_heads=1),
    text_config=dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=32003, max_position_embeddings=4096),
    tie_word_embeddings=False,
)
INSTRUCTION = "Transcribe all the text on this page, in reading order."  # Scriptorium's OCR prompt
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_processor(longest_edge: int = 980):
    """Idefics2's processor (980 / 378, splitting on, 64 image tokens) around the offline tokenizer."""
    from transformers import Idefics2Processor

    try:  # transformers 5: the PIL backend (torchvision may be missing)
        from transformers.models.idefics2.image_processing_pil_idefics2 import (
            Idefics2ImageProcessorPil as Images,
        )
    except ImportError:  # transformers 4: the numpy/PIL processor is the default one
        from transformers import Idefics2ImageProcessor as Images

    images = Images(do_image_splitting=True, size={"longest_edge": longest_edge, "shortest_edge": min(378, longest_edge)})
    return Idefics2Processor(image_processor=images, tokenizer=build_tokenizer(), image_seq_len=64,
                             chat_template=IDEFICS2_CHAT_TEMPLATE)


def build_model(processor, sizes: dict, device: str, dtype: torch.dtype, attention: str):
    """Random weights, created on the device in `dtype` (no float32 copy, no download)."""
    # The concrete class, which transformers 4.x (on lent GPU machines) and 5.x both have.
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    tok = processor.tokenizer
    config = Idefics2Config(image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **sizes)
    config.text_config.pad_token_id = tok.pad_token_id
    config._attn_implementation = attention
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in `dtype` directly
    try:
        with torch.device(device):
            model = Idefics2ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_utterance>")]
    return model.eval()


def generation_args(new_tokens: int, compile_: bool) -> dict:
    args = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if compile_:  # what `[model] compile = true` does in the pipeline
        args["cache_implementation"] = "static"
    return args


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def run_model_stage(model, processor, prompt, crops, settings, device, dtype, budget, gen):
    """Scriptorium's model stage: shape-sorted batches, GPU collation, one prompt per batch, decode.
    `budget` is (pages, pixels, tokens) per batch."""
    prompt_ids = processor(text=prompt, return_tensors="pt")["input_ids"][0]
    batch_size, max_batch_pixels, max_batch_tokens = budget
    tokens_per_page = len(prompt_ids) + gen["max_new_tokens"]
    texts, new_tokens, batch_sizes = [], [], []
    for batch in batch_by_shape(list(range(len(crops))), lambda i: crops[i], batch_size, max_batch_pixels,
                                tokens_of=lambda i: tokens_per_page, max_batch_tokens=max_batch_tokens):
        batch_sizes.append(len(batch))
        input_ids = prompt_ids.unsqueeze(0).expand(len(batch), -1).to(device)
        features = encode_crops(model, [crops[i] for i in batch], settings, device, dtype)
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                **generate_kwargs(model, features), **gen)
        generated = output[:, input_ids.shape[1]:].cpu()
        new_tokens.extend([generated.shape[1]] * len(batch))
        texts.extend(processor.tokenizer.batch_decode(generated, skip_special_tokens=True))
    synchronize(device)
    return texts, new_tokens, batch_sizes


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


def timed(device: str, fn, *args):
    """(seconds, peak device memory in bytes, result) of fn(*args)."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    started = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return seconds, peak, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=512, help="pages through the model stage")
    parser.add_argument("--snippet-pages", type=int, default=4, help="of those, pages through the snippet loop")
    parser.add_argument("--new-tokens", type=int, default=512, help="exactly this many per page")
    parser.add_argument("--batch-size", type=int, default=0,
                        help=f"pages per generate call at most (0: the pipeline's automatic {GPU_BATCH_SIZE} on a GPU)")
    parser.add_argument("--max-batch-pixels", type=int, default=0, help="crop pixels per batch (0: no limit)")
    parser.add_argument("--max-batch-tokens", type=int, default=0,
                        help="prompt + new tokens per batch (0: the pipeline's automatic KV-cache budget)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"])
    parser.add_argument("--compile", action="store_true", help="static KV cache (+ torch.compile on CUDA)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="toy-size model (a crash-free start check)")
    parser.add_argument("--longest-edge", type=int, default=980, help="render and resize size (the card's is 980)")
    args = parser.parse_args()

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py measures the model stage on a CUDA GPU, and this machine has none: nothing measured.\n"
              "Run it on a GPU machine, or check it starts with: python bench/gpu.py --tiny --device cpu", file=sys.stderr)
        sys.exit(2)
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    snippet_pages = min(args.snippet_pages, args.pages)

    processor = build_processor(args.longest_edge)
    settings = ImageSettings.from_processor(processor)
    started = time.perf_counter()
    model = build_model(processor, TINY if args.tiny else IDEFICS2_8B, device, dtype, args.attn)
    build_s = time.perf_counter() - started
    n_params = sum(p.numel() for p in model.parameters())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)

    pages = page_images(args.pages, longest_edge=settings.render_edge)
    started = time.perf_counter()
    crops = [model_crops(page, settings) for page in pages]
    cpu_s = time.perf_counter() - started
    from PIL import Image

    pil_pages = [Image.fromarray(page) for page in pages[:snippet_pages]]

    gen = generation_args(args.new_tokens, args.compile)
    # Warm-up for both paths (CUDA context, kernels, compilation): two pages, a few tokens.
    warm = generation_args(min(8, args.new_tokens), args.compile)
    run_model_stage(model, processor, prompt, crops[:2], settings, device, dtype, (2, 0, 0), warm)
    run_snippet(model, processor, prompt, pil_pages[:1], device, warm)

    # Batches as the pipeline sizes them by default: measured now, with the model loaded and warmed up.
    budget = (ResourceSpec(batch_size=args.batch_size).pages_per_batch(on_gpu=device == "cuda"),
              args.max_batch_pixels, args.max_batch_tokens or automatic_token_budget(model, device, dtype))
    ours_s, ours_peak, (_, ours_tokens, batch_sizes) = timed(device, run_model_stage, model, processor, prompt, crops,
                                                             settings, device, dtype, budget, gen)
    snip_s, snip_peak, (_, snip_tokens) = timed(device, run_snippet, model, processor, prompt, pil_pages, device, gen)

    # The continuous engine (pipeline/model/continuous.py) on the same pages, then both engines on the length
    # mix of real documents (bench/engine.py): each page its own target, forced in both engines.
    prompt_ids = processor(text=prompt, return_tensors="pt")["input_ids"][0]
    engine = continuous_engine(model, budget[0], budget[2] or budget[0] * (len(prompt_ids) + args.new_tokens),
                               settings.images_per_page)
    run_continuous(engine, model, prompt_ids, crops[:2], [min(8, args.new_tokens)] * 2, settings, device, dtype)
    cont_s, cont_peak, cont_tokens = timed(device, run_continuous, engine, model, prompt_ids, crops,
                                           [args.new_tokens] * len(crops), settings, device, dtype)
    targets, _ = length_mix(real_pdfs(), args.new_tokens, 64, n_pages=len(crops))
    eos_id = processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    mix_static_s, mix_static_peak, mix_static_tokens = timed(
        device, run_static, model, prompt_ids, crops, targets, settings, device, dtype, budget[0], args.new_tokens,
        eos_id, budget[2])
    mix_cont_s, mix_cont_peak, mix_cont_tokens = timed(device, run_continuous, engine, model, prompt_ids, crops,
                                                       targets, settings, device, dtype)
    engine.close()

    exact = set(ours_tokens) == set(snip_tokens) == set(cont_tokens) == {args.new_tokens}
    exact_mix = mix_static_tokens == mix_cont_tokens == targets
    ours_rate, snip_rate = len(pages) / ours_s, snippet_pages / snip_s
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name}; model: {'tiny' if args.tiny else 'idefics2-8b'} architecture, {n_params / 1e9:.2f} B "
          f"parameters, random weights, {str(dtype).replace('torch.', '')}, attention {args.attn}, "
          f"compile {'on' if args.compile else 'off'}; built in {build_s:.0f} s")
    print(f"pages: {len(pages)} rendered at {settings.render_edge} with splitting ({settings.images_per_page} crops), "
          f"{args.new_tokens} new tokens each (all exact: {'yes' if exact else 'NO'})")
    print(f"batches: up to {budget[0]} pages, token budget {budget[2] or 'none'}; "
          f"sizes {', '.join(str(n) for n in batch_sizes)}")
    print(f"CPU stage (crops for all pages, one core, not in the GPU time): {cpu_s:.1f} s = "
          f"{len(pages) / cpu_s:.1f} pages/s per core")
    print(f"{'':28}{'pages':>7}{'seconds':>10}{'pages/s':>10}{'tokens/s':>11}{'peak GiB':>10}")
    n_mix = sum(targets)
    for label, n, tokens, seconds, peak in (
            ("static engine", len(pages), len(pages) * args.new_tokens, ours_s, ours_peak),
            ("continuous engine", len(pages), len(pages) * args.new_tokens, cont_s, cont_peak),
            ("model card snippet loop", snippet_pages, snippet_pages * args.new_tokens, snip_s, snip_peak),
            ("mix: static engine", len(pages), n_mix, mix_static_s, mix_static_peak),
            ("mix: continuous engine", len(pages), n_mix, mix_cont_s, mix_cont_peak)):
        print(f"{label:28}{n:7d}{seconds:10.1f}{n / seconds:10.2f}{tokens / seconds:11.0f}{peak / 2**30:10.1f}")
    print(f"length mix: {n_mix / len(pages):.0f} new tokens per page on average (max {max(targets)}), all exact: "
          f"{'yes' if exact_mix else 'NO'}")
    if args.tiny or device != "cuda":
        print("NOTE: a toy model or no GPU: the lines below check the script runs, they measure nothing")
    print(f"RESULT gpu_pages_per_s {ours_rate:.2f} pages/s target >= 10")
    print(f"RESULT gpu_vs_snippet {ours_rate / snip_rate:.1f} x target >= 20")
    print(f"RESULT gpu_continuous_pages_per_s {len(pages) / cont_s:.2f} pages/s")
    print(f"RESULT gpu_mix_static_pages_per_s {len(pages) / mix_static_s:.2f} pages/s")
    print(f"RESULT gpu_mix_continuous_pages_per_s {len(pages) / mix_cont_s:.2f} pages/s")
    print(f"RESULT gpu_mix_continuous_vs_static {mix_static_s / mix_cont_s:.2f} x target >= 1")
    if not exact_mix:
        sys.exit(f"the length mix was not generated exactly: {sum(mix_static_tokens)} and {sum(mix_cont_tokens)} "
                 f"tokens for {n_mix}")
    if not exact:
        sys.exit(f"expected exactly {args.new_tokens} new tokens per page, got {sorted(set(ours_tokens + snip_tokens))}")


if __name__ == "__main__":
    main()
