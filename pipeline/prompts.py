"""Prompts: the exact text handed to the processor for a (task, question) unit, and how to generate it.

Instruct checkpoints (`idefics2-8b`) get the checkpoint's own chat template, applied the way the model
card applies it: one user turn with the image(s) first, then the instruction, and
`add_generation_prompt=True`, which gives `User:<image>…<end_of_utterance>\\nAssistant:`. Few-shot
examples become earlier user/assistant turns, as in the card's multi-turn example. Base checkpoints
(`idefics2-8b-base`) get plain text with `<image>` interleaved, as in the card's base example:
`<image>` + each example's text, then `<image>` + the instruction.

Which units a row asks for is `core/units.py`'s; this module turns a unit into the text the processor
gets and the settings `generate` gets (a `PromptPlan`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from scriptorium.core.spec import TaskSpec
from scriptorium.pipeline.extraction import SCHEMA_SETTING, schema_digest

# The built-in instructions per (kind, detail), for instruct and base checkpoints.
INSTRUCT_TEXT = {
    ("ocr", "short"): "Transcribe all the text on this page, in reading order.",
    ("caption", "short"): "Describe this image in one sentence.",
    ("caption", "detailed"): "Describe this image in detail.",
}
BASE_TEXT = {
    ("ocr", "short"): "Transcription of the text on this page:",
    ("caption", "short"): "In this image, we can see",
    ("caption", "detailed"): "A detailed description of this image:",
}
QA_BASE_TEXT = "Question: {question} Answer:"
# Extract tasks show their schema (compact JSON) in the built-in instruction; the grammar enforces it.
EXTRACT_INSTRUCT_TEXT = "Extract the information in this {what} as JSON that follows this JSON Schema: {schema}"
EXTRACT_BASE_TEXT = "JSON Schema: {schema}\nThe information in this {what} as JSON that follows the schema:"


@dataclass(frozen=True)
class PromptPlan:
    """One generation request: a unit (its task and question), the prompt text, and how to generate,
    which is the task's own settings."""

    spec: TaskSpec
    question: str | None
    prompt: str
    schema: dict | None = None  # an extract task's JSON Schema: its answers are decoded under its grammar

    @property
    def task(self) -> str:
        """The task's name: the `task` column."""
        return self.spec.task_name

    @property
    def max_new_tokens(self) -> int:
        return self.spec.max_new_tokens

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.spec.stop_strings)

    @property
    def settings(self) -> dict:
        """The generation settings, as the `generation` column records them."""
        task = self.spec
        settings = {"max_new_tokens": task.max_new_tokens, "repetition_penalty": task.repetition_penalty,
                    "do_sample": task.do_sample, "temperature": task.temperature, "top_p": task.top_p,
                    "stop_strings": list(task.stop_strings)}
        if self.schema is not None:  # an answer made under another schema is another answer
            settings[SCHEMA_SETTING] = schema_digest(self.schema)
        return settings

    @property
    def generation(self) -> str:
        """The settings as JSON (the `generation` column)."""
        return json.dumps(self.settings)

    @property
    def generation_key(self) -> tuple:
        """Plans with the same key can share one `generate` call: the same prompt and settings."""
        return (self.prompt, self.generation, self.task if self.schema is not None else None)


@dataclass
class Example:
    """A few-shot example: its image's model crops, the question shown with it and the expected answer."""

    crops: list[np.ndarray]
    prompt: str
    text: str
    grid: tuple[int, int] = (0, 0)  # the tile grid its image was cut into (pipeline/family.py)


# -- prompt text ------------------------------------------------------------------------------------------
def has_chat_template(processor) -> bool:
    return bool(getattr(processor, "chat_template", None))


def resolve_prompt_format(processor, requested: str) -> str:
    if requested != "auto":
        return requested
    return "instruct" if has_chat_template(processor) else "base"


def instruction_for(task: TaskSpec, question: str | None, prompt_format: str, schema: dict | None = None) -> str:
    if task.prompt:
        # str.replace, not str.format: a custom prompt may contain braces (JSON, LaTeX).
        return task.prompt.replace("{question}", question or "")
    if task.kind == "qa":
        return question if prompt_format == "instruct" else QA_BASE_TEXT.format(question=question)
    if task.kind == "extract":
        text = EXTRACT_INSTRUCT_TEXT if prompt_format == "instruct" else EXTRACT_BASE_TEXT
        return text.replace("{what}", "document" if task.scope == "document" else "page").replace(
            "{schema}", json.dumps(schema, separators=(",", ":"), ensure_ascii=False))
    table = INSTRUCT_TEXT if prompt_format == "instruct" else BASE_TEXT
    return table[(task.kind, task.detail if task.kind == "caption" else "short")]


def build_prompt(processor, instruction: str, prompt_format: str, n_images: int = 1,
                 examples: list[tuple[str, str]] = ()) -> str:
    """The prompt for few-shot `examples` [(question, answer), ...], each with one image, followed by
    `n_images` images and `instruction`. Images appear in the prompt in the order their crops are passed."""
    if prompt_format == "instruct":
        messages = []
        for question, answer in examples:
            messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": instruction}]
        messages.append({"role": "user", "content": content})
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    # Base checkpoints: each shot is its image, its own prompt (if it has one) and its answer, as in the
    # card's "<image>In this image, we can see ... Statue of Liberty.<image>In this image,".
    shots = "".join("<image>" + (f"{question} " if question else "") + answer for question, answer in examples)
    return shots + "<image>" * n_images + instruction


@dataclass
class PromptBook:
    """The job's tasks as prompts. Pure data (pickled to every model replica); the replica's processor
    turns a unit into its PromptPlan, cached per (task, question, number of page images)."""

    tasks: list[TaskSpec]
    prompt_format: str = "instruct"
    examples: dict[str, list[Example]] = field(default_factory=dict)  # task name -> few-shot examples
    schemas: dict[str, dict] = field(default_factory=dict)  # extract task name -> its JSON Schema
    _plans: dict = field(default_factory=dict, repr=False, compare=False)

    def example_crops(self, task: TaskSpec) -> list[np.ndarray]:
        """The examples' crops, which come before the page's crops in the sequence (prompt order)."""
        return [crop for example in self.examples.get(task.task_name, []) for crop in example.crops]

    def example_grids(self, task: TaskSpec) -> list[tuple[int, int]]:
        """The examples' tile grids, in the order of `example_crops`."""
        return [example.grid for example in self.examples.get(task.task_name, [])]

    def plan(self, processor, task: TaskSpec, question: str | None, n_page_images: int = 1) -> PromptPlan:
        key = (task.task_name, question, n_page_images)
        if key not in self._plans:
            schema = self.schemas.get(task.task_name) if task.kind == "extract" else None
            instruction = instruction_for(task, question, self.prompt_format, schema)
            examples = self.examples.get(task.task_name, [])
            if self.prompt_format == "instruct":
                shots = [(ex.prompt or instruction, ex.text) for ex in examples]
            else:  # a QA example's question takes the base form ("Question: ... Answer:") like the query's
                shots = [(instruction_for(task, ex.prompt, "base") if ex.prompt and task.kind == "qa" else ex.prompt,
                          ex.text) for ex in examples]
            self._plans[key] = PromptPlan(
                spec=task, question=question,
                prompt=build_prompt(processor, instruction, self.prompt_format, n_page_images, shots), schema=schema)
        return self._plans[key]
