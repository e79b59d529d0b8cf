"""File kinds, told from names alone: what the listing plans and which decoder a file goes to."""

from __future__ import annotations

# JPEG 2000 is what many libraries and archives keep their master scans in; AVIF is common on the web.
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif", ".jp2", ".j2k", ".avif"}
PDF_EXTENSIONS = {".pdf"}
# Shards of many images (pipeline/render/shards.py): WebDataset-style tars, Parquet tables of images.
SHARD_EXTENSIONS = {".tar": "tar", ".parquet": "parquet"}
SHARD_KINDS = tuple(SHARD_EXTENSIONS.values())
KINDS = ("pdf", "image", *SHARD_KINDS)


def kind_of(name: str) -> str:
    """pdf, image, tar, parquet, or unknown, from the file name's extension."""
    lower = name.lower()
    dot = lower.rfind(".")
    ext = lower[dot:] if dot >= 0 else ""
    if ext in PDF_EXTENSIONS:
        return "pdf"
    if ext in IMAGE_EXTENSIONS:
        return "image"
    return SHARD_EXTENSIONS.get(ext, "unknown")
