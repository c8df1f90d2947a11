"""How cellst tells the files it wrote from anybody else's, so that a re-run replaces its
own outputs and never a user's file of the same name (ground truth, tables, figures).

Each writer marks its files: TIFFs and PNGs with a ``Software`` tag / text, tables by
their leading columns. The readers here check those marks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "PNG_SOFTWARE_KEY",
    "SOFTWARE_TAG",
    "csv_begins_with",
    "is_cellst_png",
    "png_software",
]

#: the ``Software`` value of every TIFF and PNG cellst writes
SOFTWARE_TAG = "cellst"
#: PNG text key holding :data:`SOFTWARE_TAG`
PNG_SOFTWARE_KEY = "Software"


def png_software(path: str | os.PathLike[str]) -> str | None:
    """The ``Software`` text of a PNG (who wrote it); None for a file that is not a PNG or
    has none."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            value = getattr(im, "text", {}).get(PNG_SOFTWARE_KEY)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return str(value) if value is not None else None


def is_cellst_png(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a PNG cellst wrote (its ``Software`` text says so)."""
    return png_software(path) == SOFTWARE_TAG


def csv_begins_with(path: str | os.PathLike[str], columns: Sequence[str]) -> bool:
    """Whether the CSV file ``path``'s header starts with ``columns``, in order (how
    cellst recognises the tables it wrote); False for anything unreadable."""
    try:
        with open(Path(path), encoding="utf-8") as fh:
            names = fh.readline().rstrip("\r\n").split(",")
    except (OSError, UnicodeDecodeError):
        return False
    return names[: len(columns)] == list(columns)
