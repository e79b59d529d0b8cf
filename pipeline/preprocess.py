"""Preprocess on CPU workers: the model family's image-processor semantics, shipped compact.

The reference processors (`Idefics2ImageProcessorPil`, `Idefics3ImageProcessorPil`, `SmolVLMImageProcessorPil`)
do, per image: RGB conversion, the family's split and resizes (pipeline/family.py), rescale to [0, 1],
normalize, then pad the batch and build an int64 mask. This stage does the expensive, per-page part
(split + resize) and stops there: its uint8 crops are exactly what the reference resized, so the actor's
rescale/normalize/pad (see `collate.py`) reproduces the reference tensors bit for bit, while far fewer
bytes cross the object store: uint8 instead of float32, compressed losslessly (`core/pixels.py`;
`tests/test_preprocess_fidelity.py` and `tests/test_crops_idefics3.py` hold it to that).

The split and resize themselves are `crops.py`'s and `crops_idefics3.py`'s; this is the stage around them.
"""

from __future__ import annotations

import time

from scriptorium.core.image_settings import ImageSettings
from scriptorium.core.pixels import compress_crops, page_images
from scriptorium.core.schema import PAGE_SCHEMA, PREPROCESSED_SCHEMA
from scriptorium.pipeline.family import family_named
from scriptorium.pipeline.metrics import Meter
from scriptorium.pipeline.steps import PageStep, fail


class PreprocessPages(PageStep):
    """Page rows in, rows with the model's uint8 crops compressed (`pixels`, `crop_shapes`; core/pixels.py)
    and each image's tile grid (`image_grids`) out."""

    input_schema, output_schema = PAGE_SCHEMA, PREPROCESSED_SCHEMA
    stage_name = "preprocess"

    def __init__(self, settings: ImageSettings, meter: Meter = Meter()):
        self.settings = settings
        self.family = family_named(settings.family)
        self.meter = meter

    def process(self, rows: list[dict]) -> None:
        for row in rows:
            row["preprocessed_at"] = time.time()  # a replica measures from here how long the page waited
            if row["image"] is None:  # routes answered all its units without the model
                continue
            try:
                # A document row's images one after the other, in page order: the prompt's order.
                crops, grids = [], []
                for image in page_images(row):
                    image_crops, grid = self.family.crops(image, self.settings)
                    crops.extend(image_crops)
                    grids.append(list(grid))
                row["pixels"], row["crop_shapes"] = compress_crops(crops)
                row["image_grids"] = grids
            except Exception as exc:
                fail(row, "preprocess", f"preprocess failed: {exc}")
