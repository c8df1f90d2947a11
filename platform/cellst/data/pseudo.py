"""Pseudo-label sets of a store: the one owner of their layout on disk.

Layout (inside the store)::

    pseudo/<set>/zarr.json       the set is a zarr group (as are ``pseudo/`` and ``.ignore/``)
    pseudo/<set>/<id>/           (H, W) int32 zarr array per item; its attributes hold the
                                 item's statistics (instances, foreground, timings, model)
    pseudo/<set>/set.json        the model that wrote the set (checkpoint, ``model_id``,
                                 weights digest, post-processing), so a resume never mixes
                                 two models' labels
    pseudo/<set>/items.parquet   the items' statistics, rebuilt from the array attributes
    pseudo/<set>/.tmp-<id>-*     an item being written (removed when the set is resumed)
    pseudo/<set>/.ignore/<id>/   optional (H, W) uint8 zarr array per item, 1 = a pixel the
                                 writer was unsure of (its foreground probability near the
                                 threshold); the training loss skips those pixels. Written
                                 before the item's label, so an item that exists is complete
    pseudo/.<set>.*.staging      a set being built by :meth:`PseudoLabelSet.combine`

Every item is written under a hidden name and renamed into place, so an item folder that
exists is complete; a combined set replaces the old one with a folder swap
(:func:`cellst.fs.staged_dir`). Writers (``cellst predict``, the ST++ stages) and readers
(the training stream, ``cellst evaluate``, exports) all go through this module.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellst import fs
from cellst.data.arrays import (
    StoreError,
    Window,
    ensure_group,
    open_array,
    remove_tree,
    window_slices,
    write_array,
)
from cellst.data.layout import ZARR_META, is_zarr_array

#: the set's record of the model that wrote it (checkpoint, model identity)
SET_META = "set.json"
#: the set's per-item statistics
ITEMS = "items.parquet"
#: the folder of the sets inside a store
PSEUDO_DIR = "pseudo"
#: the folder of a set's optional per-item ignore masks (hidden: not an item)
IGNORE_DIR = ".ignore"


def encode_ignored(label: np.ndarray, ignore: np.ndarray) -> np.ndarray:
    """Carry an ignore mask inside the stream's label: an ignored pixel of instance ``k``
    (0 = background) becomes ``-k - 1``, so the label keeps every instance's extent.

    :func:`decode_ignored` undoes it; the augmentation does so before its transforms.
    """
    return np.where(ignore != 0, -label.astype(np.int32) - 1, label).astype(np.int32)


def decode_ignored(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(label, ignore)`` from an :func:`encode_ignored` label; ``ignore`` is uint8."""
    ignore = label < 0
    return np.where(ignore, -label - 1, label).astype(label.dtype), ignore.astype(np.uint8)


def pseudo_set_names(store_root: str | os.PathLike[str]) -> list[str]:
    """Names of the pseudo-label sets of a store (not the hidden folders of sets being
    built or replaced)."""
    base = Path(store_root) / PSEUDO_DIR
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


def _item_folders(folder: Path) -> list[str]:
    """The items of the set folder ``folder`` (whole ones: hidden names are unfinished)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name[0] != ".")


def _write_item_table(folder: Path) -> pd.DataFrame:
    """Write ``items.parquet`` of the set folder ``folder`` from its items' attributes."""
    import zarr

    rows = [dict(zarr.open_array(str(folder / i), mode="r").attrs) for i in _item_folders(folder)]
    df = pd.DataFrame(rows)
    fs.atomic_write_parquet(df, folder / ITEMS)
    return df


class PseudoLabelSet:
    """One pseudo-label set, ``<store>/pseudo/<name>/``.

    Parameters
    ----------
    store_root : path-like
        The store's folder.
    name : str
        The set's name (a single path component).
    """

    def __init__(self, store_root: str | os.PathLike[str], name: str):
        if not name or "/" in name or name.startswith("."):
            raise StoreError(f"{name!r} is not a pseudo-label set name")
        self.store_root = Path(store_root)
        self.name = name
        self.path = self.store_root / PSEUDO_DIR / name

    def __repr__(self) -> str:
        return f"PseudoLabelSet({str(self.store_root)!r}, {self.name!r})"

    # -- reading ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.path.is_dir()

    def item_path(self, item_id: str) -> Path:
        """Array folder of one item."""
        return self.path / item_id

    def has_item(self, item_id: str) -> bool:
        return is_zarr_array(self.item_path(item_id))

    def ignore_path(self, item_id: str) -> Path:
        """Array folder of one item's ignore mask (which may not exist)."""
        return self.path / IGNORE_DIR / item_id

    def has_ignore(self, item_id: str) -> bool:
        """Whether the item has an ignore mask (sets written with an uncertainty band)."""
        return is_zarr_array(self.ignore_path(item_id))

    def ignore_mask(self, item_id: str, window: Window | None = None) -> np.ndarray | None:
        """``(H, W) uint8`` ignore mask of an item (1 = uncertain pixel), or a window of it;
        None when the item has none."""
        if not self.has_ignore(item_id):
            return None
        return open_array(str(self.ignore_path(item_id)))[window_slices(window)]

    def done_items(self) -> list[str]:
        """Items written so far (complete: every item is renamed into place when whole)."""
        return _item_folders(self.path)

    def stale_items(self, manifest: pd.DataFrame, ids: Any = None) -> list[str]:
        """Items (of ``ids``, default all) predicted from an image the store no longer
        holds: a re-ingest changed it since. An item records the store array it was
        predicted from (``image_array``); one written before that is compared by shape.
        Items no longer in ``manifest`` count too."""
        rows = manifest.set_index("id")
        stale = []
        for item in self.done_items() if ids is None else [i for i in ids if self.has_item(i)]:
            try:
                meta = fs.read_json(self.item_path(item) / ZARR_META)
            except (OSError, ValueError):
                continue  # unreadable: the reader of the label names it
            if item not in rows.index:
                stale.append(item)
                continue
            row = rows.loc[item]
            key = (meta.get("attributes") or {}).get("image_array")
            if key is not None:
                changed = key != row["image_array"]
            else:
                changed = list(meta.get("shape", [])) != [int(row["height"]), int(row["width"])]
            if changed:
                stale.append(item)
        return stale

    def check_current(self, manifest: pd.DataFrame) -> None:
        """Raise :class:`StoreError` when items were predicted from images a re-ingest
        has changed since (their labels no longer fit the images)."""
        stale = self.stale_items(manifest)
        if stale:
            raise StoreError(
                f"pseudo-label set {self.name!r} of store {self.store_root}: {len(stale)} "
                f"item(s) (e.g. {stale[0]}) were predicted from images a later ingest "
                "changed; run the same `cellst predict` again to predict them anew"
            )

    def remove_items(self, items: list[str]) -> None:
        """Delete items (and their ignore masks), each renamed aside first, and the item
        table, which no longer describes the set (the run that re-predicts them writes it)."""
        for item in items:
            fs.remove_dir(self.ignore_path(item))
            fs.remove_dir(self.item_path(item))
        if items:
            (self.path / ITEMS).unlink(missing_ok=True)

    def item_stamp(self, item_id: str) -> str:
        """What identifies one written pseudo-label (only a new prediction rewrites it): the
        set's weights digest and the item's write time."""
        mtime = (self.item_path(item_id) / ZARR_META).stat().st_mtime_ns
        return f"{self.info().get('weights_sha256', '')}:{mtime}"

    def info(self) -> dict[str, Any]:
        """The set's record (``set.json``); an empty dict when it has none (written by an
        older cellst) or does not exist."""
        path = self.path / SET_META
        try:
            info = fs.read_json(path, missing={})
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path} is not readable JSON ({exc})") from None
        return info if isinstance(info, dict) else {}

    def stats(self) -> pd.DataFrame:
        """Per-item statistics (``items.parquet``) of the set: its item list for training,
        evaluation and ST++'s reliability.

        Raises
        ------
        StoreError
            If the set does not exist, or if it has items but no table: the run writing it
            stopped before its end (the table is written last), so the set is incomplete.
        """
        table = self.path / ITEMS
        if not table.is_file():
            written = len(self.done_items())
            if written:
                raise StoreError(
                    f"pseudo-label set {self.name!r} of store {self.store_root} is incomplete: "
                    f"the run writing it stopped after {written} item(s); run the same "
                    "`cellst predict` again to finish it"
                )
            raise StoreError(f"store {self.store_root} has no pseudo-label set {self.name!r}")
        return pd.read_parquet(table)

    def label(self, item_id: str, window: Window | None = None) -> np.ndarray:
        """``(H, W) int32`` pseudo-label of an item, or a window of it."""
        if not self.has_item(item_id):
            raise StoreError(f"pseudo-label set {self.name!r} has no item {item_id!r}")
        return open_array(str(self.item_path(item_id)))[window_slices(window)]

    # -- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Held by a run that writes the set (``cellst predict``, an ST++ stage): a second
        run on the same set at the same time is refused at once, so that two models never
        mix their labels in one set, nor does one remove (``--overwrite``) or clear what
        the other writes or trains on (:meth:`reading`). The lock file is
        ``pseudo/.<set>.lock`` (a ``flock``, released when the holder ends, however it ends).

        Raises
        ------
        StoreError
            Another process writes the set now, or trains on it.
        """
        refusal = StoreError(
            f"pseudo-label set {self.name!r} of store {self.store_root} is being written "
            "or trained on by another run; wait for it to end, or give another --set-name"
        )
        with fs.held_by_one(fs.lock_beside(self.path), refusal):
            yield

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Held by a training that streams the set: shared with other readers, and
        exclusive of :meth:`writing`, so that no run re-writes or removes (``--overwrite``)
        the set under a training that reads it, nor does a training start on a set that
        another run is writing. Refused at once, not waited for. Nothing is locked (nor
        made) for a set that does not exist, or one in a store no one can write.

        Raises
        ------
        StoreError
            Another process writes the set now.
        """
        refusal = StoreError(
            f"pseudo-label set {self.name!r} of store {self.store_root} is being written "
            "by another run; wait for it to end, or train on another set"
        )
        held = contextlib.ExitStack()
        if self.exists():
            try:
                held.enter_context(fs.held_by_one(fs.lock_beside(self.path), refusal, shared=True))
            except OSError:  # a read-only store: no one writes the set either
                pass
        with held:
            yield

    def create(self, meta: dict[str, Any]) -> None:
        """Create the folder (if needed) and write its record atomically."""
        ensure_group(self.path.parent)
        ensure_group(self.path)
        fs.atomic_write_json(self.path / SET_META, meta, indent=2)

    def clear_partial(self) -> None:
        """Remove half-written items left by an interrupted run (and ignore masks whose
        item was never written, so a resume never pairs a label with a stale mask)."""
        if self.path.is_dir():
            for tmp in [*self.path.glob(".tmp-*"), *(self.path / IGNORE_DIR).glob(".tmp-*")]:
                remove_tree(tmp)
            # a mask whose label never landed is part of an unfinished item too
            masks = self.path / IGNORE_DIR
            if masks.is_dir():
                for mask in masks.iterdir():
                    if mask.is_dir() and mask.name[0] != "." and not self.has_item(mask.name):
                        remove_tree(mask)

    def prepare(
        self,
        meta: dict[str, Any],
        *,
        run_id: str,
        overwrite: bool = False,
        resumable: Callable[[dict[str, Any], list[str]], bool],
    ) -> bool:
        """Get the set ready for run ``run_id`` to write: claimed, then created, replaced
        or resumed. Call under :meth:`writing`.

        Parameters
        ----------
        meta : dict
            The set's record (``set.json``) if it is created now.
        run_id : str
            The run that writes it (:meth:`claim`): claimed first of all, before anything
            is removed, so that no write of an earlier run lands from now on.
        overwrite : bool
            Remove an existing set and start anew.
        resumable : callable
            ``(record, done_items) -> bool`` for an existing set: whether it was written
            by the writer of ``meta`` (then resumed as it is), or may be taken over (False:
            its record is replaced). It raises where resuming would mix two writers' items.

        Returns
        -------
        bool
            Whether an existing set is resumed (its half-written items removed).
        """
        self.claim(run_id)
        if self.exists():
            if overwrite:
                self.remove()
            else:
                same = resumable(self.info(), self.done_items())
                self.clear_partial()  # half-written items of an interrupted run
                if same:
                    return True
        self.create(meta)
        return False

    def claim(self, run_id: str) -> None:
        """Make ``run_id`` the set's one writer from now on (:func:`cellst.fs.claim_writing`),
        under the set's :meth:`writing` lock and before anything is removed or written:
        items that the tasks of an earlier run still try to write are then refused."""
        fs.claim_writing(self.path, run_id)

    def write_item(
        self,
        item_id: str,
        label: np.ndarray,
        attrs: dict[str, Any],
        ignore: np.ndarray | None = None,
        run_id: str | None = None,
    ) -> bool:
        """Write one item's label (with ``attrs`` as array attributes) atomically.

        ``ignore`` (optional, shaped like ``label``, nonzero = uncertain pixel) is written
        first, under :data:`IGNORE_DIR`, so that an item whose label exists has its mask.
        Returns False, writing nothing, when the item is already there (another writer,
        e.g. a retried task, got there first): an item is written exactly once.

        With ``run_id``, the item is written only while that run is the set's writer
        (:meth:`claim`); otherwise :class:`cellst.fs.WriterReplaced` is raised and nothing
        is written: a task of a run whose driver died never adds to a newer run's set.
        """
        import zarr

        def still_ours() -> None:
            if run_id is not None:
                fs.check_writing(self.path, run_id)

        if ignore is not None:
            if ignore.shape != label.shape:
                raise ValueError(
                    f"ignore mask {ignore.shape} is not shaped like the label {label.shape}"
                )
            folder = self.path / IGNORE_DIR
            ensure_group(folder)
            tmp = folder / f".tmp-{item_id}-{uuid.uuid4().hex[:8]}"
            write_array(tmp, (ignore != 0).astype(np.uint8))
            try:
                still_ours()
                os.rename(tmp, self.ignore_path(item_id))
            except OSError:  # one from an interrupted or concurrent writer of the same model
                remove_tree(tmp)
            except fs.WriterReplaced:
                remove_tree(tmp)
                raise
        tmp = self.path / f".tmp-{item_id}-{uuid.uuid4().hex[:8]}"
        write_array(tmp, label)
        zarr.open_array(str(tmp), mode="r+").attrs.update(attrs)
        try:
            still_ours()
            os.rename(tmp, self.item_path(item_id))  # atomic; refused if the item exists
        except fs.WriterReplaced:
            remove_tree(tmp)
            raise
        except OSError:
            remove_tree(tmp)
            return False
        return True

    def collect_stats(self) -> pd.DataFrame:
        """Rebuild ``items.parquet`` from the attributes of the items written so far."""
        return _write_item_table(self.path)

    def remove(self) -> None:
        """Delete the set (nothing happens if it does not exist); an interrupted deletion
        leaves no half set under its name (:func:`cellst.fs.remove_dir`)."""
        fs.remove_dir(self.path)

    @classmethod
    def combine(
        cls,
        store_root: str | os.PathLike[str],
        sources: list[str],
        name: str,
        meta: dict[str, Any],
    ) -> PseudoLabelSet:
        """Write the set ``name`` as the union of the sets ``sources`` (the first source
        wins an item held by several; arrays are hard-linked where the file system allows).

        Built from scratch each time in a hidden folder that is swapped into place, so the
        set is either the previous complete one or the new complete one.
        """
        dest = cls(store_root, name)
        base = dest.path.parent
        for stale in [
            *fs.stale_siblings(dest.path, ".staging"),
            *fs.stale_siblings(dest.path, ".old"),
            *fs.stale_siblings(dest.path, ".removing"),
            *base.glob(f".tmp-{name}-*"),  # names of cellst before this module
            *base.glob(f".old-{name}-*"),
        ]:
            remove_tree(stale)  # left by an interrupted earlier attempt
        ensure_group(base)
        with dest.writing(), fs.staged_dir(dest.path) as stage:
            ensure_group(stage)
            seen: set[str] = set()
            for source in (cls(store_root, s) for s in sources):
                for item in source.done_items():
                    if item not in seen:
                        shutil.copytree(
                            source.item_path(item), stage / item, copy_function=fs.link_or_copy
                        )
                        if source.has_ignore(item):
                            ensure_group(stage / IGNORE_DIR)
                            shutil.copytree(
                                source.ignore_path(item),
                                stage / IGNORE_DIR / item,
                                copy_function=fs.link_or_copy,
                            )
                        seen.add(item)
            fs.atomic_write_json(stage / SET_META, {**meta, "sources": sources})
            _write_item_table(stage)  # inside the swap: the set appears complete or not at all
        return dest
