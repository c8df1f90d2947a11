"""The names of a store's top-level files, the store version, and the image file suffixes
cellst reads: stdlib only.

:mod:`cellst.data.store` owns the format and re-exports these; modules that only need to
recognise a store or name its version (``cellst evaluate``, the napari reader, MLflow
tags) import them from here, without zarr and pandas.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from pathlib import Path

__all__ = [
    "ARRAY_GROUPS",
    "FORMAT",
    "IMAGE_SUFFIXES",
    "MANIFEST",
    "MANIFESTS",
    "READERS",
    "SPLITS",
    "TRASH",
    "is_store",
    "is_store_root",
    "ZARR_META",
    "image_name",
    "name_key",
    "is_zarr_array",
    "without_ome",
    "manifest_sha256",
    "manifest_version",
]

MANIFEST = "manifest.parquet"
MANIFESTS = "manifests"
READERS = ".readers"
TRASH = ".trash"
FORMAT = "cellst-store/1"
SPLITS = ("labeled", "unlabeled", "test")
#: the store's folders of arrays (``images/NAME.KEY``, ``labels/NAME.KEY``), as in a staging
ARRAY_GROUPS = ("images", "labels")
#: the image files cellst reads (compared in lower case)
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".bmp", ".jpg", ".jpeg")


def image_name(path: str | os.PathLike[str]) -> str:
    """The name cellst gives an image file (its item id, the ``NAME`` of ``NAME_label.tiff``):
    the file name without its image suffix and without an OME-TIFF's ``.ome``.

    ``X.tif`` and ``X.ome.tif`` are both ``X``, so an OME-TIFF's label is ``X_label.tiff``
    as for any image; other dots stay (``a.b.png`` -> ``a.b``), and a name without an image
    suffix is kept whole (``a.b`` -> ``a.b``).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        return p.name
    return without_ome(p.stem) if suffix in (".tif", ".tiff") else p.stem


def name_key(name: str) -> str:
    """The form in which two names count as the same when an image is paired with its
    label or prediction: Unicode NFC. macOS and some archives write accented names
    decomposed (NFD), Linux and Windows tools composed, so ``Zelle_\u00e9`` and
    ``Zelle_e\u0301`` look alike and would otherwise never pair."""
    return unicodedata.normalize("NFC", name)


def without_ome(stem: str) -> str:
    """``stem`` without a trailing OME-TIFF ``.ome`` (``X.ome`` -> ``X``; ``.ome`` stays)."""
    return stem[:-4] if stem.lower().endswith(".ome") and len(stem) > 4 else stem


def is_store(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a cellst store (a folder with a manifest)."""
    return (Path(path) / MANIFEST).is_file()


def is_store_root(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a cellst store or the start of one: a manifest, or the root group
    marker (``zarr.json`` with this format) that a first ingest writes before its manifest."""
    root = Path(path)
    if is_store(root):
        return True
    try:
        meta = json.loads((root / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and (meta.get("attributes") or {}).get("format") == FORMAT


#: the metadata file of every zarr v3 array and group
ZARR_META = "zarr.json"


def is_zarr_array(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding a zarr array (what a store's ``images/`` and
    ``labels/`` hold; anything else there is not the store's to remove)."""
    return (Path(path) / ZARR_META).is_file()


def manifest_sha256(data: bytes) -> str:
    """The sha256 of a manifest file's bytes (hex)."""
    return hashlib.sha256(data).hexdigest()


def manifest_version(data: bytes) -> str:
    """Short hash of a manifest file's bytes: the store version a reader pins."""
    return manifest_sha256(data)[:12]
