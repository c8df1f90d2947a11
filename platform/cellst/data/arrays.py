"""The zarr arrays and groups of a store, and the one error of reading them.

What both :mod:`cellst.data.store` (the images, labels and manifest) and
:mod:`cellst.data.pseudo` (the pseudo-label sets) read and write, below both: opening an
array read-only (a missing one is a :class:`StoreError`, never zeros), writing one with
spatial chunks, marking a folder as a zarr group, and windows of an array.
"""

from __future__ import annotations

import os
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.storage import LocalStore

from cellst import fs
from cellst.data import layout

__all__ = [
    "StoreError",
    "Window",
    "create_array",
    "ensure_group",
    "open_array",
    "remove_tree",
    "window_slices",
    "write_array",
]


class StoreError(RuntimeError):
    """The store is missing, malformed, or does not hold what was asked."""


Window = tuple[int, int, int, int]
"""(y0, y1, x0, x1), half-open, in pixels."""


def window_slices(window: Window | None) -> tuple[slice, slice]:
    """Array slices of a window (``None``: the whole array)."""
    if window is None:
        return slice(None), slice(None)
    y0, y1, x0, x1 = window
    return slice(int(y0), int(y1)), slice(int(x0), int(x1))


class _CheckedLocalStore(LocalStore):
    """A read-only zarr store that refuses to invent data for an array that is gone.

    zarr answers a missing chunk with the fill value (zeros), which is right for the
    all-background chunks zarr never writes, but silently wrong when the whole array was
    deleted under an open handle. A missing chunk is therefore checked against the array's
    ``zarr.json``: when that is gone too, the read raises :class:`StoreError`.
    """

    async def get(self, key, prototype=None, byte_range=None):  # noqa: D102
        buf = await super().get(key, prototype, byte_range)
        if buf is None and key != layout.ZARR_META and not (self.root / layout.ZARR_META).is_file():
            raise StoreError(_missing_message(str(self.root)))
        return buf


def _missing_message(path: str) -> str:
    return (
        f"array {path} is missing (removed from the store: the manifest that named it was "
        f"replaced and the reader held no lease on it)"
    )


@lru_cache(maxsize=4096)
def open_array(path: str) -> zarr.Array:
    """Open a stored array read-only (cached per process); :class:`StoreError` if gone."""
    if not layout.is_zarr_array(path):
        raise StoreError(_missing_message(path))
    return zarr.open_array(store=_CheckedLocalStore(path, read_only=True), mode="r")


def create_array(
    path: str | Path, shape: tuple[int, ...], dtype, chunk: int = 256, level: int = 1
) -> zarr.Array:
    """Create an empty zarr v3 array at ``path`` with spatial chunks of ``chunk`` pixels
    (the stored-array format of images and labels), to be filled region by region."""
    chunks = (chunk, chunk) + tuple(shape[2:])
    chunks = tuple(min(c, s) for c, s in zip(chunks, shape, strict=True))
    return zarr.create_array(
        str(path),
        shape=shape,
        dtype=dtype,
        chunks=chunks,
        compressors=ZstdCodec(level=level),
        overwrite=True,
    )


def write_array(path: str | Path, data: np.ndarray, chunk: int = 256, level: int = 1) -> None:
    """Write ``data`` as a zarr v3 array at ``path`` with spatial chunks of ``chunk`` pixels."""
    create_array(path, data.shape, data.dtype, chunk, level)[...] = data


def ensure_group(folder: str | os.PathLike[str], attributes: dict | None = None) -> None:
    """Make ``folder`` a zarr group (write its ``zarr.json`` if it has none), so that zarr
    and other readers walking the hierarchy from the store's root find the arrays below
    it: zarr v3 has no implicit groups. Idempotent; existing attributes are kept.

    The metadata (zarr v3's minimal group document, as ``zarr.open_group`` writes it) is
    written by an atomic rename, not through zarr: prediction actors on several nodes may
    create the same group at once, and none may read another's half-written file."""
    folder = Path(folder)
    if not (folder / layout.ZARR_META).exists():
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"attributes": attributes or {}, "zarr_format": 3, "node_type": "group"}
        fs.atomic_write_json(folder / layout.ZARR_META, meta)


def remove_tree(path: Path) -> None:
    """Remove a directory tree if it exists."""
    shutil.rmtree(path, ignore_errors=True)
