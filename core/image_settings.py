"""The image settings of the checkpoint's processor (plus the job's overrides): what shapes pixels.

They are resolved once, in the driver, from the loaded processor (`ImageSettings.from_processor`), and
travel to the preprocessing workers and the model replicas as this small frozen value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ImageSettings:
    do_image_splitting: bool = False
    longest_edge: int = 980
    shortest_edge: int = 378
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_seq_len: int = 64  # <image> tokens per crop; must equal what the connector makes of one (pipeline/family.py)
    resample: int = 2  # PIL bilinear
    # The Idefics3 family (Idefics3, SmolVLM; pipeline/crops_idefics3.py): the processor's rule is "idefics3",
    # and `tile_edge` is its `max_image_size["longest_edge"]`, the side of every crop. Idefics2 ignores both.
    family: str = "idefics2"
    tile_edge: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def idefics3_rule(self) -> bool:
        """Whether pages are cut the Idefics3 way (a grid of square tiles plus the global image)."""
        return self.family in ("idefics3", "smolvlm")

    @property
    def images_per_page(self) -> int:
        """Crops per page: Idefics2's 4 quadrants plus the whole page; the Idefics3 family's largest grid
        (the longest edge in tiles, squared) plus the global image, at most."""
        if not self.do_image_splitting:
            return 1
        if self.idefics3_rule:
            return math.ceil(self.longest_edge / self.tile_edge) ** 2 + 1
        return 5

    @property
    def render_edge(self) -> int:
        """The longest edge at which a PDF page gives the model all the detail it takes in: with splitting
        each quadrant is brought to at most `longest_edge`, so twice that; without, `longest_edge`. The
        Idefics3 family resizes every image's longest edge to exactly `longest_edge` before it cuts tiles."""
        if self.idefics3_rule:
            return self.longest_edge
        return 2 * self.longest_edge if self.do_image_splitting else self.longest_edge

    @classmethod
    def from_processor(cls, processor, overrides: dict | None = None) -> "ImageSettings":
        """Read the settings off a loaded Idefics2, Idefics3 or SmolVLM processor, then apply job overrides
        (None = keep)."""
        return cls.from_image_processor(processor.image_processor, int(processor.image_seq_len), overrides)

    @classmethod
    def from_image_processor(cls, ip, image_seq_len: int = 64, overrides: dict | None = None) -> "ImageSettings":
        """The settings of an image processor alone (its processor's `image_seq_len` beside it)."""
        size = ip.size if isinstance(ip.size, dict) else ip.size.__dict__
        family = family_of(ip)
        values = dict(
            do_image_splitting=bool(ip.do_image_splitting),
            longest_edge=int(size["longest_edge"]),
            shortest_edge=int(size.get("shortest_edge") or 1),  # the Idefics3 family has none
            rescale_factor=float(ip.rescale_factor),
            image_mean=tuple(float(x) for x in ip.image_mean),
            image_std=tuple(float(x) for x in ip.image_std),
            image_seq_len=image_seq_len,
            resample=int(ip.resample),
            family=family,
        )
        if family != "idefics2":
            tile = ip.max_image_size if isinstance(ip.max_image_size, dict) else ip.max_image_size.__dict__
            values["tile_edge"] = int(tile["longest_edge"])
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
        return cls(**values)


def family_of(image_processor) -> str:
    """"idefics2", "idefics3" or "smolvlm", from the image processor's class (PIL or torchvision backend)."""
    name = type(image_processor).__name__.lower()
    for family in ("smolvlm", "idefics3"):
        if name.startswith(family):
            return family
    return "idefics2"
