"""Prompts: which (task, question) units a page row asks for, and the exact text handed to the processor.

Instruct checkpoints (`idefics2-8b`) get the checkpoint's own chat template, applied the way the model
card applies it: one user turn with the image(s) first, then the instruction, and
`add_generation_prompt=True`, which gives `User:<image>…<end_of_utterance>\\nAssistant:`. Few-shot
examples become earlier user/assistant turns, as in the card's multi-turn example. Base checkpoints
(`idefics2-8b-base`) get plain text with `<image>` interleaved, as in the card's base example:
`<image>` + each example's text, then `<image>` + the instruction.

A *unit* of work is (task, question): one result row per unit per page, or per document for tasks with
`scope = "document"` (page = -1, the prompt shows the document's first `document_pages` pages in order).
QA tasks without questions of their own ask each document's manifest questions, one row per question.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from jobs.spec import TaskSpec
from pipeline.schema import DOCUMENT_PAGE  # noqa: F401  (re-exported: the page of a document row)

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
NO_QUESTION = "task {task!r} has no question for this document: give it questions in the job spec or the manifest"


@dataclass(frozen=True)
class PromptPlan:
    """One generation request: which task and question, the prompt and how to generate."""

    task: str
    question: str | None
    prompt: str
    max_new_tokens: int
    repetition_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()

    @property
    def generation_key(self) -> tuple:
        """Plans with the same key can share one `generate` call."""
        return (self.prompt, self.max_new_tokens, self.repetition_penalty, self.do_sample, self.temperature,
                self.top_p, self.stop_strings)

    @property
    def generation(self) -> str:
        """The settings as the `generation` column records them (JSON)."""
        return json.dumps({
            "max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty,
            "do_sample": self.do_sample, "temperature": self.temperature, "top_p": self.top_p,
            "stop_strings": list(self.stop_strings),
        })


@dataclass
class Example:
    """A few-shot example: its image's model crops, the question shown with it and the expected answer."""

    crops: list[np.ndarray]
    prompt: str
    text: str


# -- units: what a row asks for (no processor needed: the driver, routes and the actor all use these) ------
def questions_for(task: TaskSpec, document_questions) -> list[str | None]:
    """The questions `task` asks of a document: its own, else the document's; [None] for non-QA tasks.

    A QA task with no question at all still gets one unit (question None), which becomes an error row:
    a document is never silently left out.
    """
    if task.kind != "qa":
        return [None]
    return list(task.questions) or list(document_questions or []) or [None]


def row_units(tasks: list[TaskSpec], page: int, document_questions=None) -> list[tuple[TaskSpec, str | None]]:
    """The (task, question) units of a page row (page >= 0) or of a document row (page = DOCUMENT_PAGE)."""
    scope = "document" if page == DOCUMENT_PAGE else "page"
    return [(task, question) for task in tasks if task.scope == scope
            for question in questions_for(task, document_questions)]


def open_units(tasks: list[TaskSpec], row: dict) -> list[tuple[TaskSpec, str | None]]:
    """The units of a page or document row still to do: its `row_units` less those published before
    this run (the row's `done_units`, set by the planner for pages that owe only some of their units)."""
    published = {(u["task"], u["question"]) for u in row.get("done_units") or [] if u["page"] == row["page"]}
    return [(task, question) for task, question in row_units(tasks, row["page"], row.get("questions"))
            if (task.task_name, question) not in published]


def work_units(tasks: list[TaskSpec], document_questions=None):
    """What one document must have published to be complete: the ledger's `Units` of (task, question)."""
    from connectors.ledger import Units

    def names(page: int) -> frozenset:
        return frozenset((t.task_name, q) for t, q in row_units(tasks, page, document_questions))

    return Units(page=names(0), document=names(DOCUMENT_PAGE))


def document_window(tasks: list[TaskSpec]) -> int:
    """How many leading pages a document row shows (0: no task has scope = "document")."""
    return max((t.document_pages for t in tasks if t.scope == "document"), default=0)


# -- prompt text ------------------------------------------------------------------------------------------
def has_chat_template(processor) -> bool:
    return bool(getattr(processor, "chat_template", None))


def resolve_prompt_format(processor, requested: str) -> str:
    if requested != "auto":
        return requested
    return "instruct" if has_chat_template(processor) else "base"


def instruction_for(task: TaskSpec, question: str | None, prompt_format: str) -> str:
    if task.prompt:
        # str.replace, not str.format: a custom prompt may contain braces (JSON, LaTeX).
        return task.prompt.replace("{question}", question or "")
    if task.kind == "qa":
        return question if prompt_format == "instruct" else QA_BASE_TEXT.format(question=question)
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
    _plans: dict = field(default_factory=dict, repr=False, compare=False)

    def units(self, row: dict) -> list[tuple[TaskSpec, str | None]]:
        return open_units(self.tasks, row)

    def example_crops(self, task: TaskSpec) -> list[np.ndarray]:
        """The examples' crops, which come before the page's crops in the sequence (prompt order)."""
        return [crop for example in self.examples.get(task.task_name, []) for crop in example.crops]

    def plan(self, processor, task: TaskSpec, question: str | None, n_page_images: int = 1) -> PromptPlan:
        key = (task.task_name, question, n_page_images)
        if key not in self._plans:
            instruction = instruction_for(task, question, self.prompt_format)
            examples = self.examples.get(task.task_name, [])
            if self.prompt_format == "instruct":
                shots = [(ex.prompt or instruction, ex.text) for ex in examples]
            else:  # a QA example's question takes the base form ("Question: ... Answer:") like the query's
                shots = [(instruction_for(task, ex.prompt, "base") if ex.prompt and task.kind == "qa" else ex.prompt,
                          ex.text) for ex in examples]
            self._plans[key] = PromptPlan(
                task=task.task_name,
                question=question,
                prompt=build_prompt(processor, instruction, self.prompt_format, n_page_images, shots),
                max_new_tokens=task.max_new_tokens,
                repetition_penalty=task.repetition_penalty,
                do_sample=task.do_sample,
                temperature=task.temperature,
                top_p=task.top_p,
                stop_strings=tuple(task.stop_strings),
            )
        return self._plans[key]


def load_examples(tasks: list[TaskSpec], image_settings, storage=None) -> dict[str, list[Example]]:
    """Read and preprocess every task's few-shot example images once, in the driver.

    A missing or unreadable example image stops the job before any work starts (SpecError naming it).
    """
    from connectors.storage import read_bytes
    from jobs.spec import SpecError
    from pipeline.pages import PageError, RenderSettings, decode_image_frames
    from pipeline.preprocess import model_crops

    examples: dict[str, list[Example]] = {}
    for task in tasks:
        for spec in task.examples:
            try:
                frame = next(decode_image_frames(read_bytes(spec["image"], storage), RenderSettings(), set()))
                if frame.get("error"):
                    raise PageError(frame["error"])
            except Exception as exc:
                raise SpecError(f"task {task.task_name!r}: example image {spec['image']} cannot be used: {exc}") from None
            image = np.frombuffer(frame["image"], dtype=np.uint8).reshape(frame["height"], frame["width"], 3)
            examples.setdefault(task.task_name, []).append(
                Example(crops=model_crops(image, image_settings), prompt=spec.get("prompt", ""), text=spec["text"])
            )
    return examples
