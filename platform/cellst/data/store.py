"""The cellst image store: a zarr v3 tree of per-image arrays indexed by ``manifest.parquet``.

Layout::

    STORE/
      zarr.json                    root group (format marker); ``images/``, ``labels/``,
                                   ``pseudo/`` and each set are zarr groups too, so that
                                   ``zarr.open_group(STORE)`` lists every array
      manifest.parquet             one row per item; the store's single commit point
      images/<id>.<key>/           (H, W, 3) uint8, chunked (chunk, chunk, 3), zstd
      labels/<id>.<key>/           (H, W) int32 instance map, relabelled 1..N
      pseudo/<set>/                pseudo-label sets written by ``cellst predict`` and the
                                   ST++ stages (layout: :mod:`cellst.data.pseudo`)
      manifests/<version>.parquet  every manifest version a reader may still hold
      .readers/<pid>-<token>.json  reader leases: pid, host and the manifest version read

Array names carry a content key (a hash of the source file and the normalisation), so a
changed source gets a new array beside the old one, and the new manifest replaces the old
one with an atomic rename. Readers only follow the manifest, so a write interrupted at any
point leaves the previous store intact.

Consistent reads: a :class:`CellStore` pins the manifest version it opened
(:attr:`CellStore.version`, a short hash of the manifest) and holds a lease on it until it
is closed or its process exits. An ingest never deletes arrays of a version a live reader
holds; :func:`collect_garbage` removes them on a later ingest, once no reader holds them
(leases of dead processes are ignored). Reading an array that is gone raises
:class:`StoreError` naming it, never zeros.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cellst import fs
from cellst.data import layout
from cellst.data.arrays import (
    StoreError,
    Window,
    ensure_group,
    open_array,
    remove_tree,
    window_slices,
)
from cellst.data.pseudo import PseudoLabelSet, pseudo_set_names

# the store's file names and version hash, owned by the stdlib-only data.layout
FORMAT, MANIFEST, MANIFESTS = layout.FORMAT, layout.MANIFEST, layout.MANIFESTS
READERS, SPLITS, TRASH = layout.READERS, layout.SPLITS, layout.TRASH
is_store, manifest_sha256, manifest_version = (
    layout.is_store,
    layout.manifest_sha256,
    layout.manifest_version,
)

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


# the store's atomic writes are cellst.fs's (re-exported: other modules import them here)
atomic_write_bytes = fs.atomic_write_bytes
atomic_write_parquet = fs.atomic_write_parquet


def _locked_thing(lock_file: Path) -> str:
    """What a lock file guards, for messages: ``.NAME.lock`` guards the store ``NAME``
    beside it, any other lock file the folder that holds it (a run folder)."""
    name = lock_file.name
    if name.startswith(".") and name.endswith(".lock") and len(name) > len("..lock"):
        return f"the store {lock_file.parent / name[1 : -len('.lock')]}"
    return f"the folder {lock_file.parent}"


#: seconds a writer retries a held lock before refusing (longer than any probe holds it)
LOCK_PROBE_GRACE_S = fs.PROBE_GRACE_S


@contextlib.contextmanager
def store_lock(lock_file: Path, what: str | None = None) -> Iterator[None]:
    """Exclusive advisory lock so two writers never interleave on one store or run folder
    (:func:`cellst.fs.held_by_one`, refused as a :class:`StoreError`).

    Parameters
    ----------
    what : str, optional
        What the lock guards, for the refusal message (e.g. ``"the run folder runs/x"``);
        by default derived from the lock file's name and folder.
    """
    refusal = StoreError(
        f"{lock_file} is held: another process is writing {what or _locked_thing(lock_file)}"
    )
    with fs.held_by_one(lock_file, refusal):
        yield


def init_store(root: Path) -> None:
    """Create the root group marker of a new store, and the groups ``images/`` and
    ``labels/`` (idempotent: an ingest into a store of an earlier cellst adds them)."""
    ensure_group(root, {"format": FORMAT})
    for group in layout.ARRAY_GROUPS:
        ensure_group(root / group)


# ----------------------------------------------------------------------------- versions
def manifest_bytes(df: pd.DataFrame) -> bytes:
    """A manifest table as parquet bytes (what :func:`write_manifest` commits)."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def parse_manifest(data: bytes, where: str | Path) -> pd.DataFrame:
    """The manifest table from its Parquet bytes; a file that is not one (truncated,
    overwritten) is a :class:`StoreError` naming ``where``."""
    try:
        return pd.read_parquet(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a broken file vary
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StoreError(f"{where}: not a valid manifest ({first})") from None


def archive_manifest(root: Path, data: bytes) -> str:
    """Keep a manifest version under ``manifests/<version>.parquet`` so that the arrays a
    reader of that version needs can be known after the manifest is replaced."""
    version = manifest_version(data)
    path = Path(root) / MANIFESTS / f"{version}.parquet"
    if not path.is_file():
        path.parent.mkdir(exist_ok=True)
        atomic_write_bytes(path, data)
    return version


def write_manifest(root: Path, df: pd.DataFrame) -> str:
    """Commit ``df`` as the store's manifest (archived, then an atomic rename); returns
    its version. A manifest with the same bytes is left as it is (the version stays)."""
    root = Path(root)
    data = manifest_bytes(df)
    version = archive_manifest(root, data)
    current = root / MANIFEST
    if not (current.is_file() and manifest_version(current.read_bytes()) == version):
        atomic_write_bytes(current, data)
    return version


# ----------------------------------------------------------------------------- leases
_HOST = socket.gethostname()


def _proc_start(pid: int) -> str:
    """Start time of a process (``/proc/PID/stat`` field 22), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


@dataclass
class Lease:
    """A reader's claim on one manifest version: ``STORE/.readers/<pid>-<token>.json``."""

    path: Path
    pid: int
    host: str
    version: str
    start: str = ""
    created: float = field(default=0.0)
    root: str = ""

    def alive(self) -> bool:
        """Whether the reading process still runs (leases from other hosts count as alive:
        their processes cannot be checked from here). A lease copied along with a store
        (its recorded root is another folder) is not alive."""
        if self.root and Path(self.root).resolve() != self.path.parent.parent.resolve():
            return False
        if self.host != _HOST:
            return True
        if not fs.process_alive(self.pid):
            return False
        return not self.start or _proc_start(self.pid) in ("", self.start)


@contextlib.contextmanager
def _readers_lock(root: Path, exclusive: bool) -> Iterator[None]:
    """Shared while a reader reads the manifest and writes its lease, exclusive while a
    collection decides what to delete: a version is never collected between the two."""
    with fs.file_lock(root / READERS / ".lock", shared=not exclusive):
        yield


def _take_lease(root: Path, version: str) -> Path:
    pid = os.getpid()
    path = root / READERS / f"{pid}-{uuid.uuid4().hex[:8]}.json"
    info = {
        "pid": pid,
        "host": _HOST,
        "start": _proc_start(pid),
        "version": version,
        "created": time.time(),
        "root": str(root),
    }
    atomic_write_bytes(path, json.dumps(info).encode())
    return path


def _release_lease(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # a forked child never drops its parent's lease
        with contextlib.suppress(OSError):
            os.unlink(path)


def read_leases(root: str | Path) -> list[Lease]:
    """Every reader lease of a store (alive or not)."""
    out = []
    for p in sorted((Path(root).absolute() / READERS).glob("*.json")):
        try:
            d = json.loads(p.read_text())
            out.append(
                Lease(
                    p,
                    int(d["pid"]),
                    str(d["host"]),
                    str(d["version"]),
                    str(d.get("start", "")),
                    float(d.get("created", 0.0)),
                    str(d.get("root", "")),
                )
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # vanished meanwhile, or not ours
    return out


def collect_garbage(root: str | Path) -> dict:
    """Remove arrays and archived manifests that no live reader and no current manifest
    names; leases of dead processes are dropped. Call with the store's write lock held.

    Only zarr arrays are removed from ``images/`` and ``labels/``: a file or folder a user
    put there (say, the label TIFFs of a source folder) is left alone.

    Returns
    -------
    dict
        ``removed`` (array paths), ``held`` (versions kept for live readers), ``dropped``
        (archived versions removed), ``stale_leases`` (leases of dead processes removed).
    """
    root = Path(root).absolute()
    report: dict = {"removed": [], "held": [], "dropped": [], "stale_leases": 0}
    if not (root / MANIFEST).is_file():
        return report
    trash = root / TRASH / uuid.uuid4().hex[:8]
    with _readers_lock(root, exclusive=True):
        current = (root / MANIFEST).read_bytes()
        current_version = manifest_version(current)
        live = []
        for lease in read_leases(root):
            if lease.alive():
                live.append(lease)
            else:
                lease.path.unlink(missing_ok=True)
                report["stale_leases"] += 1
        held = {lease.version for lease in live} - {current_version}
        report["held"] = sorted(held)
        tables = [pd.read_parquet(io.BytesIO(current))]
        for version in sorted(held):
            archived = root / MANIFESTS / f"{version}.parquet"
            if not archived.is_file():  # a reader holds a version we cannot resolve: keep all
                report["unresolved"] = version
                return report
            tables.append(pd.read_parquet(archived))
        keep = set().union(*(set(t["image_array"]) | set(t["label_array"]) for t in tables))
        for group in layout.ARRAY_GROUPS:
            folder = root / group
            for arr in sorted(folder.iterdir()) if folder.is_dir() else []:
                if f"{group}/{arr.name}" not in keep and layout.is_zarr_array(arr):
                    trash.mkdir(parents=True, exist_ok=True)
                    os.rename(arr, trash / f"{group}-{arr.name}")  # atomic: readers see it gone
                    report["removed"].append(f"{group}/{arr.name}")
        for archived in sorted((root / MANIFESTS).glob("*.parquet")):
            if archived.stem not in held | {current_version}:
                archived.unlink(missing_ok=True)
                report["dropped"].append(archived.stem)
    remove_tree(root / TRASH)  # ours, and any left by a killed collection
    return report


@dataclass(frozen=True)
class ItemRef:
    """Where one item's arrays live; small and picklable, for Ray tasks."""

    id: str
    image: str
    label: str | None
    height: int
    width: int
    #: a pseudo-label's ignore mask (:mod:`cellst.data.pseudo`), where it has one
    ignore: str | None = None


class CellStore:
    """Read access to a cellst store (and writing of pseudo-label sets).

    A store object reads one manifest version for its whole life (:attr:`version`) and
    holds a lease on it (a small file under ``STORE/.readers/``) until :meth:`close`, its
    garbage collection or its process's exit, so a concurrent ``cellst ingest`` keeps that
    version's arrays. Pickling it (to a Ray task or actor) reopens the same version there,
    with a lease of its own.

    Parameters
    ----------
    root : path
        The store directory, as written by ``cellst ingest``.
    version : str, optional
        Open this manifest version (e.g. the one a driver opened, for its workers); the
        current one by default. :class:`StoreError` if it has been collected.
    lease : bool
        Hold a reader lease (default). Without one a later ingest may remove the arrays,
        and reads of them then raise :class:`StoreError`.

    Examples
    --------
    >>> store = CellStore("store")                                  # doctest: +SKIP
    >>> store.items(split="labeled", modality="fluorescence")        # doctest: +SKIP
    >>> store.image("cell_00001", window=(0, 256, 0, 256)).shape     # doctest: +SKIP
    (256, 256, 3)
    """

    def __init__(self, root: str | Path, version: str | None = None, *, lease: bool = True):
        self.root = Path(root).absolute()
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            raise StoreError(
                f"{self.root} is not a cellst store (no {MANIFEST}); create it with `cellst ingest`"
            )
        self._release = None
        data = self._pin(version, lease)
        #: short hash of the manifest this object reads (record it beside results)
        self.version: str = manifest_version(data)
        #: sha256 of those manifest bytes (``version`` is its first 12 hex digits)
        self.manifest_sha256: str = manifest_sha256(data)
        self.manifest = parse_manifest(data, manifest)
        missing = [c for c in MANIFEST_COLUMNS if c not in self.manifest.columns]
        if missing:
            raise StoreError(f"{manifest}: missing columns {missing}")
        self._by_id = {r.id: r for r in self.manifest.itertuples(index=False)}

    # -- versions and leases ---------------------------------------------------------------
    def _manifest_data(self, version: str | None) -> bytes:
        data = (self.root / MANIFEST).read_bytes()
        if version is None or manifest_version(data) == version:
            return data
        archived = self.root / MANIFESTS / f"{version}.parquet"
        if not archived.is_file():
            raise StoreError(
                f"store {self.root} no longer holds version {version} (current: "
                f"{manifest_version(data)}): a later ingest replaced it and no reader held it"
            )
        return archived.read_bytes()

    def _pin(self, version: str | None, lease: bool) -> bytes:
        """Read the manifest and take a lease on its version, atomically w.r.t. collection."""
        if not lease:
            return self._manifest_data(version)
        try:
            with _readers_lock(self.root, exclusive=False):
                data = self._manifest_data(version)
                path = _take_lease(self.root, manifest_version(data))
        except OSError:  # a read-only store or file system: nobody can re-ingest it here
            return self._manifest_data(version)
        self._lease_path = path
        self._release = weakref.finalize(self, _release_lease, str(path), os.getpid())
        return data

    @property
    def lease_path(self) -> Path | None:
        """The lease file this object holds, or None (closed, or opened without lease)."""
        return self._lease_path if self._release is not None and self._release.alive else None

    def close(self) -> None:
        """Release the lease; the version's arrays may be collected by a later ingest."""
        if self._release is not None:
            self._release()

    def __enter__(self) -> CellStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self):
        return (CellStore, (str(self.root), self.version))

    def current_version(self) -> str:
        """The version the store's manifest has now (may differ from :attr:`version`)."""
        return manifest_version((self.root / MANIFEST).read_bytes())

    # -- listing ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.manifest)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._by_id

    def __repr__(self) -> str:
        counts = self.manifest["split"].value_counts().to_dict()
        return f"CellStore({str(self.root)!r}, version={self.version!r}, items={counts})"

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

    def require(self, ids: list[str]) -> None:
        """Raise :class:`StoreError` naming the first few of ``ids`` this store lacks."""
        unknown = [i for i in ids if i not in self]
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise StoreError(f"no item(s) {unknown[:5]}{more} in store {self.root}")

    def row(self, item_id: str):
        """The manifest row of one item (a namedtuple)."""
        try:
            return self._by_id[item_id]
        except KeyError:
            raise StoreError(f"no item {item_id!r} in store {self.root}") from None

    def ref(self, item_id: str, pseudo_set: str | None = None) -> ItemRef:
        """Absolute array paths of an item, for readers in other processes."""
        r = self.row(item_id)
        ignore = None
        if pseudo_set is not None:
            pset = self.pseudo_set(pseudo_set)
            label = str(pset.item_path(item_id))
            ignore = str(pset.ignore_path(item_id)) if pset.has_ignore(item_id) else None
        else:
            label = str(self.root / r.label_array) if r.label_array else None
        return ItemRef(
            r.id, str(self.root / r.image_array), label, int(r.height), int(r.width), ignore
        )

    # -- reading ---------------------------------------------------------------------------
    def _read(self, item_id: str, what: str, array: str, window: Window | None) -> np.ndarray:
        path = self.root / array
        try:
            return open_array(str(path))[window_slices(window)]
        except StoreError as exc:  # missing (also through a cached handle)
            raise StoreError(f"item {item_id!r}: cannot read its {what}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a chunk the codec cannot decode
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StoreError(
                f"item {item_id!r}: its {what} {path} has a corrupt chunk ({first})"
            ) from None

    def image(self, item_id: str, window: Window | None = None) -> np.ndarray:
        """``(H, W, 3) uint8`` image, or the window ``(y0, y1, x0, x1)`` of it."""
        return self._read(item_id, "image", self.row(item_id).image_array, window)

    def label(self, item_id: str, window: Window | None = None) -> np.ndarray:
        """``(H, W) int32`` instance map of a labelled item, or a window of it."""
        r = self.row(item_id)
        if not r.label_array:
            raise StoreError(f"item {item_id!r} ({r.split}) has no label")
        return self._read(item_id, "label", r.label_array, window)

    # -- pseudo-label sets (layout owned by cellst.data.pseudo) -----------------------------
    def pseudo_set(self, set_name: str) -> PseudoLabelSet:
        """The :class:`cellst.data.pseudo.PseudoLabelSet` ``set_name`` of this store."""
        return PseudoLabelSet(self.root, set_name)

    def pseudo_path(self, set_name: str, item_id: str) -> Path:
        """Array path of one pseudo-label."""
        return self.pseudo_set(set_name).item_path(item_id)

    def pseudo_sets(self) -> list[str]:
        """Names of the pseudo-label sets in the store (not the hidden folders of sets
        being built or replaced)."""
        return pseudo_set_names(self.root)

    def pseudo_set_info(self, set_name: str) -> dict:
        """The record of a pseudo-label set (``set.json``): the checkpoint and the model
        identity (``model_id``, ``weights_sha256``, ``postprocess``) that wrote it; an empty
        dict when the set has none (written by an older cellst) or does not exist."""
        return self.pseudo_set(set_name).info()

    def pseudo_items(self, set_name: str) -> pd.DataFrame:
        """Per-item statistics of a pseudo-label set (the items written so far)."""
        return self.pseudo_set(set_name).stats()

    def pseudo_label(self, set_name: str, item_id: str, window: Window | None = None) -> np.ndarray:
        """``(H, W) int32`` pseudo-label of an item, or a window of it."""
        return self.pseudo_set(set_name).label(item_id, window)

    def info(self) -> dict:
        """Counts per split and modality, for ``cellst info``."""
        df = self.manifest
        others = [x for x in read_leases(self.root) if x.path != self.lease_path and x.alive()]
        return {
            "root": str(self.root),
            "version": self.version,
            "readers": len(others),
            "items": len(df),
            "splits": df["split"].value_counts().to_dict(),
            "modalities": df["modality"].value_counts().to_dict(),
            # annotated cells of the training split, and of every split that has some
            "labeled_instances": int(
                df.loc[(df["split"] == "labeled") & (df["n_instances"] > 0), "n_instances"].sum()
            ),
            "instances_per_split": {
                str(k): int(v)
                for k, v in df[df["n_instances"] > 0].groupby("split")["n_instances"].sum().items()
            },
            "pseudo_sets": self.pseudo_sets(),
        }
