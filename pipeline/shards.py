"""Tar shards: one source holding many images (WebDataset and similar), each image member a page.

Image corpora for training are usually stored as tar shards of a few thousand samples, where a sample
is files sharing a key (`000123.jpg` beside `000123.json`). A shard is one source here: its image
members, in the order the tar holds them, are pages 0..n-1, and every row names its member in the
`member` column, so captions join back to the samples by name. Members that are not images (captions,
metadata) are not pages and are passed over.

Each member is decoded exactly as an image file is (`pages.py`: the same size checks, the first frame,
transparency onto white), in the render sandbox when there is one, and only that member's bytes are
sent there. A member that fails is an error row for its page; a shard that cannot be opened is an
error row, as any unreadable file.
"""

from __future__ import annotations

import io
import tarfile
from typing import Callable, Iterator

from pipeline.pages import PageError, RenderSettings, kind_of, time_limit


class Shard:
    """An open tar shard: its image members, read one at a time."""

    def __init__(self, data: bytes, settings: RenderSettings):
        if not data:
            raise PageError("file is empty (0 bytes)")
        with time_limit(settings.timeout_s, "reading the tar index"):
            try:
                self.tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
                # Only regular files: links and devices name no image of their own.
                self.members = [m for m in self.tar.getmembers() if m.isfile() and kind_of(m.name) == "image"]
            except tarfile.TarError as exc:
                raise PageError(f"cannot open tar: {exc}") from None
        if not self.members:
            raise PageError("tar holds no image members (png, jpg, tiff, webp, ...)")

    @property
    def n_pages(self) -> int:
        return len(self.members)

    def member_name(self, number: int) -> str:
        return self.members[number].name

    def member_bytes(self, number: int) -> bytes:
        return self.tar.extractfile(self.members[number]).read()


def shard_frames(data: bytes, settings: RenderSettings, skip: set[int], image_frames: Callable) -> Iterator[dict]:
    """One frame per image member not in `skip`: page, n_pages, member, and pixels or an error.
    `image_frames(kind, data, settings, skip)` decodes one image file (in the sandbox or here).
    Raises PageError if the shard cannot be opened."""
    shard = Shard(data, settings)
    for number in range(shard.n_pages):
        if number in skip:
            continue
        head = {"page": number, "n_pages": shard.n_pages, "member": shard.member_name(number)}
        try:
            frames = image_frames("image", shard.member_bytes(number), settings, set())
            try:
                frame = next(frames)  # a multi-frame member (TIFF) is one sample: its first frame
            finally:
                frames.close()
        except PageError as exc:
            frame = {"error": str(exc)}
        except Exception as exc:
            frame = {"error": f"decoding member failed: {type(exc).__name__}: {exc}"}
        yield {**frame, **head}
