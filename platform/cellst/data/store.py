"""The cellst image store: a zarr v3 tree of per-image arrays indexed by ``manifest.parquet``.

Layout::

    STORE/
      zarr.json                    root group (format marker)
      manifest.parquet             one row per item; the store's single commit point
      images/<id>.<key>/           (H, W, 3) uint8, chunked (chunk, chunk, 3), zstd
      labels/<id>.<key>/           (H, W) int32 instance map, relabelled 1..N
      pseudo/<set>/<id>/           (H, W) int32 pseudo-labels written by ``cellst predict``
      pseudo/<set>/items.parquet   per-item statistics of a pseudo-label set

Array names carry a content key (a hash of the source file and the normalisation), so a
changed source gets a new array and the old one stays readable until the new manifest
replaces the old one with an atomic rename. Readers only follow the manifest, so a write
interrupted at any point leaves the previous store intact.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import ZstdCodec

MANIFEST = "manifest.parquet"
FORMAT = "cellst-store/1"
SPLITS = ("labeled", "unlabeled", "test")

#: manifest columns, in order, with their meaning
MANIFEST_COLUMNS = {
    "id": "item id: the source file stem, unique in the store",
    "split": "labeled / unlabeled / test (or another folder name)",
    "modality": "imaging modality if given, else 'unknown'",
    "height": "pixels",
    "width": "pixels",
    "source_path": "absolute path of the source image",
    "source_sha256": "sha256 of the source image file",
    "label_path": "absolute path of the source label, '' if none",
    "label_sha256": "sha256 of the source label file, '' if none",
    "n_instances": "cells in the label, -1 if unlabelled",
    "normalization": "how the image was brought to uint8",
    "image_array": "array path of the image inside the store",
    "label_array": "array path of the label inside the store, '' if none",
}


class StoreError(RuntimeError):
    """The store is missing, malformed, or does not hold what was asked."""


Window = tuple[int, int, int, int]
"""(y0, y1, x0, x1), half-open, in pixels."""


def _slices(window: Window | None) -> tuple[slice, slice]:
    if window is None:
        return slice(None), slice(None)
    y0, y1, x0, x1 = window
    return slice(int(y0), int(y1)), slice(int(x0), int(x1))


@lru_cache(maxsize=4096)
def _open_array(path: str) -> zarr.Array:
    return zarr.open_array(path, mode="r")


def write_array(path: str | Path, data: np.ndarray, chunk: int = 256, level: int = 1) -> None:
    """Write ``data`` as a zarr v3 array at ``path`` with spatial chunks of ``chunk`` pixels."""
    chunks = (chunk, chunk) + tuple(data.shape[2:])
    chunks = tuple(min(c, s) for c, s in zip(chunks, data.shape, strict=True))
    arr = zarr.create_array(
        str(path),
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        compressors=ZstdCodec(level=level),
        overwrite=True,
    )
    arr[...] = data


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file through a temporary sibling and an atomic rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write a parquet table through a temporary sibling and an atomic rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


@contextlib.contextmanager
def store_lock(lock_file: Path) -> Iterator[None]:
    """Exclusive advisory lock so two writers never interleave on one store."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"{lock_file} is held: another process is writing this store"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def init_store(root: Path) -> None:
    """Create the root group marker of a new store (idempotent)."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "zarr.json").exists():
        zarr.open_group(str(root), mode="a", attributes={"format": FORMAT})


@dataclass(frozen=True)
class ItemRef:
    """Where one item's arrays live; small and picklable, for Ray tasks."""

    id: str
    image: str
    label: str | None
    height: int
    width: int


class CellStore:
    """Read access to a cellst store (and writing of pseudo-label sets).

    Parameters
    ----------
    root : path
        The store directory, as written by ``cellst ingest``.

    Examples
    --------
    >>> store = CellStore("store")                                  # doctest: +SKIP
    >>> store.items(split="labeled", modality="fluorescence")        # doctest: +SKIP
    >>> store.image("cell_00001", window=(0, 256, 0, 256)).shape     # doctest: +SKIP
    (256, 256, 3)
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            raise StoreError(
                f"{self.root} is not a cellst store (no {MANIFEST}); create it with `cellst ingest`"
            )
        self.manifest = pd.read_parquet(manifest)
        missing = [c for c in MANIFEST_COLUMNS if c not in self.manifest.columns]
        if missing:
            raise StoreError(f"{manifest}: missing columns {missing}")
        self._by_id = {r.id: r for r in self.manifest.itertuples(index=False)}

    # -- listing ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.manifest)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._by_id

    def __repr__(self) -> str:
        counts = self.manifest["split"].value_counts().to_dict()
        return f"CellStore({str(self.root)!r}, items={counts})"

    def items(
        self, split: str | None = None, modality: str | None = None, labeled: bool | None = None
    ) -> pd.DataFrame:
        """Manifest rows, optionally filtered by split, modality and whether a label exists."""
        df = self.manifest
        if split is not None:
            df = df[df["split"] == split]
        if modality is not None:
            df = df[df["modality"] == modality]
        if labeled is not None:
            df = df[(df["label_array"] != "") == labeled]
        return df.reset_index(drop=True)

    def ids(self, split: str | None = None, modality: str | None = None) -> list[str]:
        """Item ids, optionally filtered by split and modality."""
        return self.items(split, modality)["id"].tolist()

    def row(self, item_id: str):
        """The manifest row of one item (a namedtuple)."""
        try:
            return self._by_id[item_id]
        except KeyError:
            raise StoreError(f"no item {item_id!r} in store {self.root}") from None

    def ref(self, item_id: str, pseudo_set: str | None = None) -> ItemRef:
        """Absolute array paths of an item, for readers in other processes."""
        r = self.row(item_id)
        if pseudo_set is not None:
            label = str(self.pseudo_path(pseudo_set, item_id))
        else:
            label = str(self.root / r.label_array) if r.label_array else None
        return ItemRef(r.id, str(self.root / r.image_array), label, int(r.height), int(r.width))

    # -- reading ---------------------------------------------------------------------------
    def image(self, item_id: str, window: Window | None = None) -> np.ndarray:
        """``(H, W, 3) uint8`` image, or the window ``(y0, y1, x0, x1)`` of it."""
        return _open_array(str(self.root / self.row(item_id).image_array))[_slices(window)]

    def label(self, item_id: str, window: Window | None = None) -> np.ndarray:
        """``(H, W) int32`` instance map of a labelled item, or a window of it."""
        r = self.row(item_id)
        if not r.label_array:
            raise StoreError(f"item {item_id!r} ({r.split}) has no label")
        return _open_array(str(self.root / r.label_array))[_slices(window)]

    # -- pseudo-label sets -----------------------------------------------------------------
    def pseudo_path(self, set_name: str, item_id: str) -> Path:
        """Array path of one pseudo-label."""
        return self.root / "pseudo" / set_name / item_id

    def pseudo_sets(self) -> list[str]:
        """Names of the pseudo-label sets in the store."""
        base = self.root / "pseudo"
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def pseudo_items(self, set_name: str) -> pd.DataFrame:
        """Per-item statistics of a pseudo-label set (the items written so far)."""
        table = self.root / "pseudo" / set_name / "items.parquet"
        if not table.is_file():
            raise StoreError(f"store {self.root} has no pseudo-label set {set_name!r}")
        return pd.read_parquet(table)

    def pseudo_label(self, set_name: str, item_id: str, window: Window | None = None) -> np.ndarray:
        """``(H, W) int32`` pseudo-label of an item, or a window of it."""
        path = self.pseudo_path(set_name, item_id)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"pseudo-label set {set_name!r} has no item {item_id!r}")
        return _open_array(str(path))[_slices(window)]

    def info(self) -> dict:
        """Counts per split and modality, for ``cellst info``."""
        df = self.manifest
        return {
            "root": str(self.root),
            "items": len(df),
            "splits": df["split"].value_counts().to_dict(),
            "modalities": df["modality"].value_counts().to_dict(),
            "labeled_instances": int(df.loc[df["n_instances"] > 0, "n_instances"].sum()),
            "pseudo_sets": self.pseudo_sets(),
        }


def remove_tree(path: Path) -> None:
    """Remove a directory tree if it exists."""
    shutil.rmtree(path, ignore_errors=True)


def read_json(path: Path) -> dict:
    """Read a JSON file, or an empty dict when it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else {}
