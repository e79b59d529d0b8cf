"""Few-shot examples: each task's example images, read and cut into model crops once, in the driver.

The crops travel with the prompt book to every model replica, which puts them before the page's crops
(the order the examples' `<image>` tokens come in the prompt).
"""

from __future__ import annotations

from scriptorium.connectors.storage import read_bytes
from scriptorium.core.errors import PageError, SpecError
from scriptorium.core.image_settings import ImageSettings
from scriptorium.core.pixels import page_image
from scriptorium.core.spec import RenderSpec, StorageSpec, TaskSpec
from scriptorium.pipeline.family import family_named
from scriptorium.pipeline.prompts import Example
from scriptorium.pipeline.render.decoders import local_frames


def load_examples(tasks: list[TaskSpec], image_settings: ImageSettings,
                  storage: StorageSpec | None = None) -> dict[str, list[Example]]:
    """Every task's few-shot examples, by task name. A missing or unreadable example image stops the
    job before any work starts (SpecError naming it)."""
    examples: dict[str, list[Example]] = {}
    family = family_named(image_settings.family)
    for task in tasks:
        for spec in task.examples:
            try:
                frame = next(local_frames("image", read_bytes(spec["image"], storage), RenderSpec(), set()))
                if frame.get("error"):
                    raise PageError(frame["error"])
            except Exception as exc:
                raise SpecError(f"task {task.task_name!r}: example image {spec['image']} cannot be used: {exc}") from None
            crops, grid = family.crops(page_image(frame), image_settings)
            examples.setdefault(task.task_name, []).append(
                Example(crops=crops, prompt=spec.get("prompt", ""), text=spec["text"], grid=grid))
    return examples
