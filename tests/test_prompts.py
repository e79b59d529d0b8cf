"""Prompts equal the Idefics2 model card's examples, for instruct (chat template) and base checkpoints.

The tiny checkpoint carries idefics2-8b's chat template, so instruct prompts come out of the same
`processor.apply_chat_template` call the card makes.
"""

from __future__ import annotations

import pytest

from scriptorium.core.image_settings import ImageSettings
from scriptorium.core.spec import TaskSpec
from scriptorium.core.units import open_units
from scriptorium.pipeline.examples import load_examples
from scriptorium.pipeline.model.loading import load_processor
from scriptorium.pipeline.prompts import PromptBook, resolve_prompt_format
from tests.conftest import job, make_image, plan_row, run_stages

STATUE = "In this image, we can see the city of New York, and more specifically the Statue of Liberty."

# HuggingFaceM4/idefics2-8b, "Technical summary" / usage: the prompt its chat template produces.
CARD_INSTRUCT = "User:<image>What do we see in this image?<end_of_utterance>\nAssistant:"
CARD_MULTI_TURN = (
    "User:<image>What do we see in this image?<end_of_utterance>\n"
    f"Assistant: {STATUE}<end_of_utterance>\n"
    "User:<image>And how about this image?<end_of_utterance>\n"
    "Assistant:"
)
# HuggingFaceM4/idefics2-8b-base: the card's prompt for the base checkpoint.
CARD_BASE = f"<image>{STATUE}<image>In this image,"


@pytest.fixture(scope="module")
def processor(tiny_model):
    return load_processor(str(tiny_model))


@pytest.fixture(scope="module")
def example_image(tmp_path_factory):
    return make_image(tmp_path_factory.mktemp("examples") / "new-york.png", text="NYC")


def test_instruct_question_prompt_is_the_model_cards(processor):
    book = PromptBook([TaskSpec(kind="qa", questions=["What do we see in this image?"])], "instruct")
    plan = book.plan(processor, *open_units(book.tasks, {"page": 0})[0])
    assert plan.prompt == CARD_INSTRUCT


def test_few_shot_instruct_prompt_is_the_model_cards_multi_turn_example(processor, example_image):
    task = TaskSpec(kind="custom", prompt="And how about this image?",
                    examples=[{"image": str(example_image), "prompt": "What do we see in this image?", "text": STATUE}])
    book = PromptBook([task], "instruct", load_examples([task], ImageSettings()))
    plan = book.plan(processor, task, None)
    assert plan.prompt == CARD_MULTI_TURN
    # ...which is what the card's own messages give through the chat template.
    card_messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What do we see in this image?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": STATUE}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And how about this image?"}]},
    ]
    assert plan.prompt == processor.apply_chat_template(card_messages, add_generation_prompt=True)
    assert len(book.example_crops(task)) == 1  # the example's image comes with it, before the page's


def test_few_shot_base_prompt_is_the_model_cards_base_example(processor, example_image):
    task = TaskSpec(kind="custom", prompt="In this image,", examples=[{"image": str(example_image), "text": STATUE}])
    book = PromptBook([task], "base", load_examples([task], ImageSettings()))
    assert book.plan(processor, task, None).prompt == CARD_BASE


def test_few_shot_base_qa_examples_show_their_question_in_the_same_form(processor, example_image):
    task = TaskSpec(kind="qa", questions=["What is the total?"],
                    examples=[{"image": str(example_image), "prompt": "What is the date?", "text": "12 May 1990"}])
    book = PromptBook([task], "base", load_examples([task], ImageSettings()))
    assert book.plan(processor, task, "What is the total?").prompt == (
        "<image>Question: What is the date? Answer: 12 May 1990<image>Question: What is the total? Answer:")


def test_built_in_prompts_per_format(processor):
    tasks = [TaskSpec(kind="ocr"), TaskSpec(kind="caption"), TaskSpec(kind="caption", name="long", detail="detailed"),
             TaskSpec(kind="qa", questions=["What is the total?"])]
    base = PromptBook(tasks, "base")
    prompts = [base.plan(processor, task, question).prompt for task, question in open_units(base.tasks, {"page": 0})]
    assert prompts == ["<image>Transcription of the text on this page:", "<image>In this image, we can see",
                       "<image>A detailed description of this image:", "<image>Question: What is the total? Answer:"]
    instruct = PromptBook(tasks, "instruct")
    caption = instruct.plan(processor, tasks[2], None).prompt
    assert caption == "User:<image>Describe this image in detail.<end_of_utterance>\nAssistant:"


def test_auto_format_follows_the_checkpoint(processor):
    assert resolve_prompt_format(processor, "auto") == "instruct"  # idefics2-8b ships a chat template
    assert resolve_prompt_format(processor, "base") == "base"
    template, processor.chat_template = processor.chat_template, None  # as idefics2-8b-base: no template
    try:
        assert resolve_prompt_format(processor, "auto") == "base"
    finally:
        processor.chat_template = template


def test_rows_store_the_exact_prompt_the_model_was_given(tiny_model, tmp_path, processor):
    image = make_image(tmp_path / "page.png", text="invoice 42")
    tasks = [TaskSpec(kind="qa", questions=["What do we see in this image?"], max_new_tokens=3)]
    for prompt_format, expected in (("instruct", CARD_INSTRUCT),
                                    ("base", "<image>Question: What do we see in this image? Answer:")):
        spec = job(tiny_model, tasks)
        spec = spec.updated(model={"prompt_format": prompt_format})
        [row] = run_stages(spec, [plan_row(image)])
        assert row["status"] == "ok" and row["prompt"] == expected
        # The prompt's tokens, <image> expanded, are what the model read.
        assert row["n_input_tokens"] == len(processor(text=expected)["input_ids"][0])
