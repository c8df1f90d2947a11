"""The names of a store's top-level files, and the store version: stdlib only.

:mod:`cellst.data.store` owns the format and re-exports these; modules that only need to
recognise a store or name its version (``cellst evaluate``, the napari reader, MLflow
tags) import them from here, without zarr and pandas.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = [
    "FORMAT",
    "MANIFEST",
    "MANIFESTS",
    "READERS",
    "SPLITS",
    "TRASH",
    "is_store",
    "manifest_sha256",
    "manifest_version",
]

MANIFEST = "manifest.parquet"
MANIFESTS = "manifests"
READERS = ".readers"
TRASH = ".trash"
FORMAT = "cellst-store/1"
SPLITS = ("labeled", "unlabeled", "test")


def is_store(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a cellst store (a folder with a manifest)."""
    return (Path(path) / MANIFEST).is_file()


def manifest_sha256(data: bytes) -> str:
    """The sha256 of a manifest file's bytes (hex)."""
    return hashlib.sha256(data).hexdigest()


def manifest_version(data: bytes) -> str:
    """Short hash of a manifest file's bytes: the store version a reader pins."""
    return manifest_sha256(data)[:12]
