"""The model families Scriptorium runs, and what differs between them, behind one small interface.

Idefics2 (HuggingFaceM4/idefics2-8b, -base) and the Idefics3 family (HuggingFaceM4/Idefics3-8B-Llama3, and
SmolVLM, whose transformers code is Idefics3's generated under another name) share the architecture the
pipeline is built around: a SigLIP-like vision tower, a connector that turns each crop into a fixed number
of image tokens, a decoder-only text model, `<image>` placeholders that the processor expands, and the same
rescale/normalize/pad of uint8 crops. What differs, and lives here:

- **the crops** (`crops`): Idefics2 cuts a page into 4 quadrants plus the whole page and resizes each to
  its edge rule (`crops.py`); the Idefics3 family resizes the page to its longest edge and cuts a grid of
  square tiles plus a global tile (`crops_idefics3.py`);
- **the prompt ids** (`prompt_ids`): Idefics2's processor expands every `<image>` alike, so a prompt has
  one sequence of ids; the Idefics3 family's expands each by its image's grid (a tag per tile, a newline
  per row, then the global image), so a page's prompt ids depend on its grid, which preprocessing records
  per image (`image_grids`), and pages share a batch only if their grids match;
- **the connector** (`connect`): Idefics2's perceiver resampler reads the patch mask; Idefics3's pixel
  shuffle and projection read every patch;
- **the image tokens a crop takes** (`image_tokens_per_crop`, `crop_edge`): the perceiver's latents, or
  the patches of a tile left after the pixel shuffle: what the processor's `image_seq_len` must equal,
  with tiles of the size the vision tower was made for.

The text model (Mistral or Llama) needs no entry: the continuous engine takes the causal LM class
transformers registers for the checkpoint's text config (`pipeline/model/continuous.py`).

A family is chosen from the checkpoint's config `model_type` (`family_named`), and travels to workers as
its name, in `ImageSettings.family`. Numpy and Pillow only: the preprocess workers import it.
"""

from __future__ import annotations

import numpy as np

from scriptorium.core.image_settings import ImageSettings
from scriptorium.pipeline.crops import model_crops
from scriptorium.pipeline.crops_idefics3 import idefics3_crops

Grid = tuple[int, int]  # (rows, cols) of tiles an image was cut into; (0, 0): not cut into a grid


class Idefics2Family:
    name = "idefics2"
    checkpoints = ("HuggingFaceM4/idefics2-8b", "HuggingFaceM4/idefics2-8b-base")

    def crops(self, image: np.ndarray, settings: ImageSettings) -> tuple[list[np.ndarray], Grid]:
        """HWC uint8 image -> (the crops the model sees, in the processor's order; their grid)."""
        return model_crops(image, settings), (0, 0)

    def prompt_ids(self, processor, prompt: str, grids: list[Grid]):
        """The token ids of `prompt` with each `<image>` expanded, exactly as `processor(text, images)` gives
        them for images of these grids. Idefics2's processor expands `<image>` without the images."""
        return processor(text=prompt, return_tensors="pt")["input_ids"][0]

    def connect(self, inner_model, hidden, patch_mask):
        """The connector over the vision tower's `hidden` states of crops of one shape, all patches real."""
        return inner_model.connector(hidden, attention_mask=patch_mask.view(patch_mask.shape[0], -1))

    def image_tokens_per_crop(self, config) -> int:
        return int(config.perceiver_config.resampler_n_latents)

    def crop_edge(self, config) -> int | None:
        """None: Idefics2's perceiver makes the same number of tokens of a crop of any size."""
        return None


class Idefics3Family(Idefics2Family):
    def __init__(self, name: str, checkpoints: tuple[str, ...]):
        self.name, self.checkpoints = name, checkpoints

    def crops(self, image: np.ndarray, settings: ImageSettings) -> tuple[list[np.ndarray], Grid]:
        crops, rows, cols = idefics3_crops(image, settings)
        return crops, (rows, cols)

    def prompt_ids(self, processor, prompt: str, grids: list[Grid]):
        """Each `<image>` replaced by the processor's own text for its grid (`replace_image_token`), through
        its own replacement (`get_text_with_replacements`), then tokenized, as `processor(text, images)`
        does (which refuses image tokens without the images)."""
        if prompt.count(processor.image_token) != len(grids):
            raise ValueError(f"the prompt shows {prompt.count(processor.image_token)} images and the page "
                             f"{len(grids)}")
        layout = {"rows": [[rows for rows, _ in grids]], "cols": [[cols for _, cols in grids]]}
        replacements = [processor.replace_image_token(layout, i) for i in range(len(grids))]
        [text], _ = processor.get_text_with_replacements([prompt], images_replacements=replacements)
        return processor.tokenizer(text, return_tensors="pt")["input_ids"][0]

    def connect(self, inner_model, hidden, patch_mask):
        return inner_model.connector(hidden)

    def image_tokens_per_crop(self, config) -> int:
        patches = config.vision_config.image_size // config.vision_config.patch_size
        return int(patches**2 // config.scale_factor**2)

    def crop_edge(self, config) -> int | None:
        """The side of every crop the model was made for: the processor's tiles must be this size, or the
        connector would make another number of image tokens of each."""
        return int(config.vision_config.image_size)


FAMILIES = {
    "idefics2": Idefics2Family(),
    "idefics3": Idefics3Family("idefics3", ("HuggingFaceM4/Idefics3-8B-Llama3",)),
    "smolvlm": Idefics3Family("smolvlm", (
        "HuggingFaceTB/SmolVLM-256M-Instruct", "HuggingFaceTB/SmolVLM-500M-Instruct", "HuggingFaceTB/SmolVLM-Instruct",
        "HuggingFaceTB/SmolVLM2-256M-Video-Instruct", "HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
        "HuggingFaceTB/SmolVLM2-2.2B-Instruct")),
}


def family_named(name: str) -> Idefics2Family:
    """The family of `ImageSettings.family` (a checkpoint's config `model_type`)."""
    return FAMILIES[name]


def supported_families_line() -> str:
    """The families that run and a checkpoint of each, for a message that refuses another."""
    return "; ".join(f"{name} ({family.checkpoints[0]})" for name, family in FAMILIES.items())
