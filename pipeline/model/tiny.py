"""Build tiny, random-weight checkpoints of the Idefics family offline: Idefics2, Idefics3 and SmolVLM.

`build_tiny(out_dir, family=...)` writes one; `scriptorium tiny-model DIR --family ...` calls it. Each has
its family's real architecture (Idefics2: SigLIP-style vision tower, perceiver resampler, Mistral text
model; Idefics3 and SmolVLM: vision tower, pixel-shuffle connector, Llama text model), a real byte-level
BPE tokenizer with the family's special tokens, the family's processor config (image splitting, tile size
and image_seq_len as the real checkpoints have them: Idefics3-8B-Llama3 169 tokens per 364 px tile,
SmolVLM-256M/500M 64 per 512 px tile) and the real checkpoint's chat template, all saved with
`save_pretrained`. It loads through exactly the same `AutoProcessor` /
`AutoModelForImageTextToText.from_pretrained` path as the real model. Only the widths and depths are
tiny; the vision tower's tile and patch size and the connector's scale factor are the real ones, so that
processor and model agree on image_seq_len = (tile / patch)^2 / scale_factor^2.

Their weights are random, so their text is noise; everything around the weights is real. They are drawn at
gain / sqrt(fan_in) with gain 2 (embeddings at std 1) rather than transformers' default std 0.02: at 0.02
the image features are so small beside the text that a white, a black and a red page give the same greedy
tokens, and a test that compares outputs could not tell which image a row saw. At gain 1 plain colours
differ but drawn pictures often do not; at gain 2 they do, while pixel noise of 1e-4 (a thousand times
float32 rounding) still leaves the greedy tokens unchanged, so batched and single generation agree.
`tests/test_tiny_model.py` checks that different images give different tokens, for every family.
"""

from __future__ import annotations

from pathlib import Path

# The chat template of HuggingFaceM4/idefics2-8b (processor_config / tokenizer_config on the hub).
IDEFICS2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# The chat template of HuggingFaceM4/Idefics3-8B-Llama3, verbatim as a public Idefics3 fine-tuning script
# copies it (`idefics3_chat_template`, found through the code search). transformers'
# tests/models/idefics3/test_processing_idefics3.py (test_apply_chat_template) renders the hub's template
# to exactly what this one renders: "<|begin_of_text|>User: ...<end_of_utterance>\nAssistant:". The tokenizer
# prepends <|begin_of_text|> as well, so real prompts start with it twice; ours do the same.
IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# The chat template of HuggingFaceTB/SmolVLM-256M-Instruct and SmolVLM-Instruct (chat_template.json on the
# hub), verbatim as transformers' tests/models/smolvlm/test_processing_smolvlm.py (prepare_processor_dict)
# carries it. (processing_smolvlm.py's DEFAULT_CHAT_TEMPLATE is the SmolVLM2 one, with <video> besides.)
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

FAMILIES = ("idefics2", "idefics3", "smolvlm")

# Every family's text model: tiny widths and depths, grouped-query attention as the real ones have.
TINY_TEXT_MODEL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}

# A little English so the BPE learns real merges; the model's weights are random anyway.
_TOKENIZER_CORPUS = [
    "User: Assistant: Transcribe the text of this page. Describe this image. What is the total?",
    "The quick brown fox jumps over the lazy dog. 0123456789 invoice total date page chapter",
    "Scriptorium turns piles of PDFs and images into transcriptions, answers and captions.",
    "Question: Answer: Caption: In this image we can see a document with a table and a title.",
]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]


def build_tokenizer(
    vocab_size: int = 400,
    *,
    unk: str | None = "<unk>",
    bos: str = "<s>",
    eos: str = "</s>",
    pad: str = "<pad>",
    add_bos: bool = True,
    extra_tokens: tuple[str, ...] = (),
):
    """A byte-level BPE tokenizer trained on a few sentences, with IMAGE_TOKENS as special tokens. The
    defaults are Idefics2's (Mistral's <unk> <s> </s>, <s> prepended); the other families pass their own
    bos/eos/pad, and `extra_tokens` (single tokens that are not special, as <row_1_col_1>)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    named = [token for token in (unk, bos, eos, pad) if token is not None]
    bpe = Tokenizer(models.BPE(unk_token=unk))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(dict.fromkeys(named)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_TOKENIZER_CORPUS * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        padding_side="left",
        add_bos_token=add_bos,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=False) for token in extra_tokens])
    if add_bos:
        # Mistral's and Llama 3's tokenizers prepend their bos; ours do the same so prompts tokenize alike.
        bos_id = tokenizer.convert_tokens_to_ids(bos)
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tokenizer


def init_image_sensitive(model, gain: float = 2.0) -> None:
    """Redraw the weights at a scale where every layer passes its input on undiminished: linear and
    convolution weights N(0, gain / sqrt(fan_in)) with zero biases, embeddings N(0, 1); norms keep their
    ones. The image features then reach the text model at the scale of the token embeddings."""
    import math

    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                fan_in = module.weight[0].numel()
                torch.nn.init.normal_(module.weight, 0.0, gain / math.sqrt(fan_in))
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
            elif isinstance(module, torch.nn.Embedding):
                torch.nn.init.normal_(module.weight, 0.0, 1.0)


def build_tiny_idefics2(
    out_dir: str | Path,
    *,
    seed: int = 0,
    do_image_splitting: bool = False,
    longest_edge: int = 980,
    shortest_edge: int = 378,
    image_seq_len: int = 64,
    image_sensitive: bool = True,
) -> Path:
    """Write a tiny random Idefics2 checkpoint (model + processor) to `out_dir` and return the path.
    `image_sensitive=False` keeps transformers' default initialisation, whose greedy output ignores the
    image and falls into a loop at once: only for tests of loop handling, never for equality tests."""
    from transformers import (
        Idefics2Config,
        Idefics2ForConditionalGeneration,
        Idefics2Processor,
    )
    from transformers.models.idefics2.image_processing_pil_idefics2 import (
        Idefics2ImageProcessorPil,
    )

    out = _mkdir(out_dir)
    tokenizer = build_tokenizer()
    image_processor = Idefics2ImageProcessorPil(
        do_image_splitting=do_image_splitting,
        size={"longest_edge": longest_edge, "shortest_edge": shortest_edge},
    )
    processor = Idefics2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=IDEFICS2_CHAT_TEMPLATE,
    )
    tok = processor.tokenizer
    config = Idefics2Config(
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": 14,
            "image_size": 980,
        },
        perceiver_config={
            "hidden_size": 64,  # the text model's: the perceiver projects into it
            "rms_norm_eps": 1e-6,
            "resampler_n_latents": image_seq_len,
            "resampler_depth": 1,
            "resampler_n_heads": 2,
            "resampler_head_dim": 16,
            "num_key_value_heads": 1,
        },
        text_config={
            "model_type": "mistral",
            **TINY_TEXT_MODEL,
            "vocab_size": len(tok),
            "max_position_embeddings": 4096,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return _save(Idefics2ForConditionalGeneration, config, processor, out, seed=seed, image_sensitive=image_sensitive)


def _save(model_class, config, processor, out: Path, *, seed: int, image_sensitive: bool) -> Path:
    """Draw the model's weights (seeded; image-sensitive unless told otherwise), set its generation
    config from the processor's tokenizer and save model and processor to `out`."""
    import torch

    tok = processor.tokenizer
    torch.manual_seed(seed)
    model = model_class(config)
    if image_sensitive:
        init_image_sensitive(model)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    # The instruct models stop at <end_of_utterance> as well as at their eos.
    stops = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_utterance>")]
    model.generation_config.eos_token_id = list(dict.fromkeys(stops))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# Idefics3's and SmolVLM's image tokens besides IMAGE_TOKENS: the global image's tag and one tag per tile
# of a split image; their processors look up the tiles' tags up to a 6 x 6 grid.
IDEFICS3_TILE_TOKENS = ("<global-img>", *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))


def build_tiny_idefics3(
    out_dir: str | Path,
    *,
    seed: int = 0,
    do_image_splitting: bool = True,
    longest_edge: int | None = None,
    image_sensitive: bool = True,
) -> Path:
    """Write a tiny random Idefics3 checkpoint (model + processor) to `out_dir` and return the path: as
    HuggingFaceM4/Idefics3-8B-Llama3, 364 px tiles of 14 px patches, pixel shuffle by 2, so 169 image
    tokens a tile; images resized to a longest edge of 4 x 364 (`longest_edge`) and split into tiles; a
    Llama 3 text model whose tokenizer prepends <|begin_of_text|>."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = build_tokenizer(
        unk=None, bos="<|begin_of_text|>", eos="<|end_of_text|>", pad="<|reserved_special_token_0|>",
        extra_tokens=IDEFICS3_TILE_TOKENS,
    )
    return _build_tiled(out_dir, tokenizer, tile=364, patch=14, scale=2, chat_template=IDEFICS3_CHAT_TEMPLATE,
                        classes=(Idefics3ImageProcessorPil, Idefics3Processor, Idefics3Config,
                                 Idefics3ForConditionalGeneration),
                        do_image_splitting=do_image_splitting, longest_edge=longest_edge, seed=seed,
                        image_sensitive=image_sensitive)


def build_tiny_smolvlm(
    out_dir: str | Path, *, seed: int = 0, do_image_splitting: bool = True, longest_edge: int | None = None,
    image_sensitive: bool = True, idefics3_processor: bool = False,
) -> Path:
    """Write a tiny random SmolVLM checkpoint (model + processor) to `out_dir` and return the path: as
    HuggingFaceTB/SmolVLM-256M-Instruct and -500M-Instruct, 512 px tiles of 16 px patches, pixel shuffle by
    4, so 64 image tokens a tile; images resized to a longest edge of 4 x 512 (`longest_edge`) and split
    into tiles; a SmolLM2 (Llama) text model whose tokenizer prepends nothing (the chat template starts
    <|im_start|>) and whose eos is <end_of_utterance>.

    `idefics3_processor`: the SmolVLM model under Idefics3's processor classes, for where SmolVLM's own
    cannot load (transformers' SmolVLMProcessor needs torchvision and num2words). Its image rule and its
    image text (`get_image_prompt_string`) are Idefics3's, code for code, so the pixels and prompt ids are
    the same: what differs is only which classes read the settings."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    tokenizer = build_tokenizer(
        unk="<|endoftext|>", bos="<|im_start|>", eos="<end_of_utterance>", pad="<|im_end|>", add_bos=False,
        extra_tokens=IDEFICS3_TILE_TOKENS,
    )
    if idefics3_processor:
        from transformers import Idefics3Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        processor_classes, extra = (Idefics3ImageProcessorPil, Idefics3Processor), {}
    else:
        from transformers import SmolVLMProcessor
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
        from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

        processor_classes, extra = (SmolVLMImageProcessorPil, SmolVLMProcessor), {"video_processor": SmolVLMVideoProcessor()}
    return _build_tiled(out_dir, tokenizer, tile=512, patch=16, scale=4, chat_template=SMOLVLM_CHAT_TEMPLATE,
                        classes=(*processor_classes, SmolVLMConfig, SmolVLMForConditionalGeneration),
                        do_image_splitting=do_image_splitting, longest_edge=longest_edge, seed=seed,
                        image_sensitive=image_sensitive, **extra)


def _build_tiled(out_dir, tokenizer, *, tile: int, patch: int, scale: int, chat_template: str, classes: tuple,
                 do_image_splitting: bool, longest_edge: int | None, seed: int, image_sensitive: bool,
                 **processor_extra) -> Path:
    """An Idefics3-like checkpoint (Idefics3, SmolVLM): images resized to a longest edge of 4 tiles (or
    `longest_edge`) and split into `tile`-pixel tiles of `patch`-pixel patches, pixel-shuffled by `scale`,
    so (tile / patch)^2 / scale^2 image tokens a tile. `classes`: the family's image processor, processor,
    config and model classes."""
    image_processor_class, processor_class, config_class, model_class = classes
    image_processor = image_processor_class(
        do_image_splitting=do_image_splitting,
        size={"longest_edge": longest_edge or 4 * tile},
        max_image_size={"longest_edge": tile},
    )
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(tile // patch) ** 2 // scale**2,
        chat_template=chat_template,
        **processor_extra,
    )
    config = config_class(**_idefics3_like_config(processor.tokenizer, tile, patch, scale))
    return _save(model_class, config, processor, _mkdir(out_dir), seed=seed, image_sensitive=image_sensitive)


def _idefics3_like_config(tok, tile: int, patch: int, scale: int) -> dict:
    """Idefics3's and SmolVLM's model config: a tiny vision tower and Llama text model around the real
    tile size, patch size and pixel-shuffle scale factor."""
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    return {
        "image_token_id": tok.convert_tokens_to_ids("<image>"),
        "scale_factor": scale,
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": patch,
            "image_size": tile,
        },
        "text_config": {
            "model_type": "llama",
            **TINY_TEXT_MODEL,
            "vocab_size": len(tok),
            "max_position_embeddings": 8192,  # a split page: 13 tiles of 169 image tokens
            **ids,
        },
        **ids,
    }


def _mkdir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


_BUILDERS = {"idefics2": build_tiny_idefics2, "idefics3": build_tiny_idefics3, "smolvlm": build_tiny_smolvlm}


def build_tiny(out_dir: str | Path, family: str = "idefics2", **options) -> Path:
    """Write a tiny random checkpoint of `family` (one of FAMILIES) to `out_dir`; `options` go to its
    builder (seed, do_image_splitting, longest_edge, image_sensitive). Idefics2's splits no image unless told to (the
    many tests that build it want it fast); Idefics3's and SmolVLM's split, as their real checkpoints do."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown model family {family!r}: one of {', '.join(FAMILIES)}")
    return _BUILDERS[family](out_dir, **options)
