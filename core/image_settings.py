"""The image settings of the checkpoint's processor (plus the job's overrides): what shapes pixels.

They are resolved once, in the driver, from the loaded processor (`ImageSettings.from_processor`), and
travel to the preprocessing workers and the model replicas as this small frozen value.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ImageSettings:
    do_image_splitting: bool = False
    longest_edge: int = 980
    shortest_edge: int = 378
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_seq_len: int = 64  # <image> tokens per image; must equal the perceiver's resampler_n_latents
    resample: int = 2  # PIL bilinear
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def images_per_page(self) -> int:
        return 5 if self.do_image_splitting else 1

    @property
    def render_edge(self) -> int:
        """The longest edge at which a PDF page gives the model all the detail it takes in: with splitting
        each quadrant is brought to at most `longest_edge`, so twice that; without, `longest_edge`."""
        return 2 * self.longest_edge if self.do_image_splitting else self.longest_edge

    @classmethod
    def from_processor(cls, processor, overrides: dict | None = None) -> "ImageSettings":
        """Read the settings off a loaded Idefics2 processor, then apply job overrides (None = keep)."""
        ip = processor.image_processor
        size = ip.size if isinstance(ip.size, dict) else ip.size.__dict__
        values = dict(
            do_image_splitting=bool(ip.do_image_splitting),
            longest_edge=int(size["longest_edge"]),
            shortest_edge=int(size["shortest_edge"]),
            rescale_factor=float(ip.rescale_factor),
            image_mean=tuple(float(x) for x in ip.image_mean),
            image_std=tuple(float(x) for x in ip.image_std),
            image_seq_len=int(processor.image_seq_len),
            resample=int(ip.resample),
        )
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
        return cls(**values)
