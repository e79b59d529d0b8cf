"""Prompts: the exact text handed to the processor for each task.

Instruct checkpoints (`idefics2-8b`) get the checkpoint's own chat template, applied the way the model
card's snippet applies it: one user turn with the image first, then the instruction, and
`add_generation_prompt=True`, which gives `User:<image>…<end_of_utterance>\\nAssistant:`. Base checkpoints
(`idefics2-8b-base`) get plain text with `<image>` interleaved, as in the model card's base example.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs.spec import TaskSpec

# The built-in instructions per task kind, for instruct and base checkpoints.
INSTRUCT_TEXT = {
    "ocr": "Transcribe all the text on this page, in reading order.",
    "caption": "Describe this image.",
}
BASE_TEXT = {
    "ocr": "Transcription of the text on this page:",
    "caption": "In this image, we can see",
}
QA_BASE_TEXT = "Question: {question} Answer:"


@dataclass(frozen=True)
class PromptPlan:
    """One generation request per page: which task, which question, the prompt and how to generate."""

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


def has_chat_template(processor) -> bool:
    return bool(getattr(processor, "chat_template", None))


def instruction_for(task: TaskSpec, question: str | None, prompt_format: str) -> str:
    if task.prompt:
        return task.prompt.format(question=question or "")
    if task.kind == "qa":
        return question if prompt_format == "instruct" else QA_BASE_TEXT.format(question=question)
    table = INSTRUCT_TEXT if prompt_format == "instruct" else BASE_TEXT
    return table[task.kind]


def build_prompt(processor, instruction: str, prompt_format: str, n_images: int = 1) -> str:
    """The prompt string for `n_images` images followed by `instruction`."""
    if prompt_format == "instruct":
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": instruction}]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return "<image>" * n_images + instruction


def resolve_prompt_format(processor, requested: str) -> str:
    if requested != "auto":
        return requested
    return "instruct" if has_chat_template(processor) else "base"


def plan_prompts(processor, tasks: list[TaskSpec], prompt_format: str) -> list[PromptPlan]:
    """Every (task, question) of the job as a PromptPlan; one row per plan per page comes out."""
    plans = []
    for task in tasks:
        questions = task.questions if task.kind == "qa" else [None]
        for question in questions:
            plans.append(
                PromptPlan(
                    task=task.task_name,
                    question=question,
                    prompt=build_prompt(processor, instruction_for(task, question, prompt_format), prompt_format),
                    max_new_tokens=task.max_new_tokens,
                    repetition_penalty=task.repetition_penalty,
                    do_sample=task.do_sample,
                    temperature=task.temperature,
                    top_p=task.top_p,
                    stop_strings=tuple(task.stop_strings),
                )
            )
    return plans
