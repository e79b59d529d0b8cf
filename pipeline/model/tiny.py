"""Build a tiny, random-weight Idefics2 checkpoint offline.

The checkpoint has the real architecture (SigLIP-style vision tower, perceiver resampler, Mistral text
model), a real byte-level BPE tokenizer with Idefics2's special tokens, the Idefics2 processor config and
the idefics2-8b chat template, all saved with `save_pretrained`. It loads through exactly the same
`AutoProcessor` / `AutoModelForImageTextToText.from_pretrained` path as `HuggingFaceM4/idefics2-8b`.

Its weights are random, so its text is noise; everything around the weights is real. They are drawn at
gain / sqrt(fan_in) with gain 2 (embeddings at std 1) rather than transformers' default std 0.02: at 0.02
the image features are so small beside the text that a white, a black and a red page give the same greedy
tokens, and a test that compares outputs could not tell which image a row saw. At gain 1 plain colours
differ but drawn pictures often do not; at gain 2 they do, while pixel noise of 1e-4 (a thousand times
float32 rounding) still leaves the greedy tokens unchanged, so batched and single generation agree.
`tests/test_tiny_model.py` checks that different images give different tokens.
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

# A little English so the BPE learns real merges; the model's weights are random anyway.
_TOKENIZER_CORPUS = [
    "User: Assistant: Transcribe the text of this page. Describe this image. What is the total?",
    "The quick brown fox jumps over the lazy dog. 0123456789 invoice total date page chapter",
    "Scriptorium turns piles of PDFs and images into transcriptions, answers and captions.",
    "Question: Answer: Caption: In this image we can see a document with a table and a title.",
]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]


def build_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with the Idefics2 special tokens, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_TOKENIZER_CORPUS * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        add_bos_token=True,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    # Mistral's tokenizer prepends <s>; make ours do the same so prompts tokenize like the real one.
    from tokenizers import processors

    bos_id = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
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
    import torch
    from transformers import (
        Idefics2Config,
        Idefics2ForConditionalGeneration,
        Idefics2Processor,
    )
    from transformers.models.idefics2.image_processing_pil_idefics2 import (
        Idefics2ImageProcessorPil,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
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
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config)
    if image_sensitive:
        init_image_sensitive(model)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    # The instruct model stops at <end_of_utterance> as well as at </s>.
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_utterance>")]
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
