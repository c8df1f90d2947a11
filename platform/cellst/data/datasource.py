"""Ray Data datasources over a cellst store (zarr v3; Ray's own ``read_zarr`` reads v2 only).

* :class:`TrainCropDatasource` streams random ``crop x crop`` windows of images with their
  instance labels, items drawn by weight (e.g. balanced across modalities, or across
  labelled and pseudo-labelled sources).
* :class:`ImageDatasource` streams whole images, or overlapping tiles with their offsets,
  for inference.

Each read task opens the zarr arrays itself, so tasks run on any node that sees the store,
and yields blocks of at most ``block_rows`` rows, so memory stays bounded whatever the
size of the store.

Reading cost is dominated by chunk decoding: an unaligned 256-pixel window touches up to
four 256-pixel chunks. A training *visit* therefore reads one chunk-aligned region of
``crop + chunk`` pixels (the same four chunks) and cuts ``crops_per_visit`` random crops
from it, so decoding is paid once for several crops.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.data import Datasource, ReadTask
from ray.data.block import Block, BlockAccessor, BlockMetadata

from cellst.data.executor import pace
from cellst.data.pseudo import encode_ignored
from cellst.data.store import CellStore, ItemRef, StoreError, open_array

#: training stream columns
TRAIN_COLUMNS = ("image", "label", "source", "item", "y0", "x0")


def modality_weights(modalities: Sequence[str]) -> np.ndarray:
    """Per-item sampling weights that give every modality the same total weight."""
    mods = np.asarray(modalities)
    uniq, inverse, counts = np.unique(mods, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inverse]
    return w / w.sum()


@dataclass(frozen=True)
class CropItem:
    """One item of the training stream: arrays, size, sampling weight and source tag."""

    ref: ItemRef
    weight: float
    source: int = 0  # 0 = ground-truth label, 1 = pseudo-label


def _axis_region(size: int, crop: int, chunk: int, rng: np.random.Generator) -> tuple[int, int]:
    """A chunk-aligned region [r0, r0 + rlen) along one axis that holds at least one crop."""
    rlen = min(size, crop + chunk)
    last = size - rlen
    starts = np.arange(0, last + 1, chunk)
    if starts[-1] != last:
        starts = np.append(starts, last)
    return int(rng.choice(starts)), rlen


def _cut(arr: np.ndarray, y: int, x: int, crop: int) -> np.ndarray:
    """A ``crop x crop`` window at (y, x), zero-padded where the array is smaller."""
    win = arr[y : y + crop, x : x + crop]
    if win.shape[0] == crop and win.shape[1] == crop:
        return win
    pad = [(0, crop - win.shape[0]), (0, crop - win.shape[1])] + [(0, 0)] * (arr.ndim - 2)
    return np.pad(win, pad)


def read_crops(
    items: Sequence[CropItem],
    visits: np.ndarray,
    crop: int,
    crops_per_visit: int,
    chunk: int,
    rng: np.random.Generator,
    block_rows: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Read ``len(visits)`` regions and yield batches of crops (the body of a read task).

    Crops are written straight into preallocated block arrays (no list + stack copy).
    """
    n_total = len(visits) * crops_per_visit
    block = _new_block(min(block_rows, n_total), crop)
    i = 0
    for idx in visits:
        it = items[int(idx)]
        h, w = it.ref.height, it.ref.width
        ry, rh = _axis_region(h, crop, chunk, rng)
        rx, rw = _axis_region(w, crop, chunk, rng)
        img = open_array(it.ref.image)[ry : ry + rh, rx : rx + rw]
        lab = open_array(it.ref.label)[ry : ry + rh, rx : rx + rw]
        if it.ref.ignore is not None:
            lab = encode_ignored(lab, open_array(it.ref.ignore)[ry : ry + rh, rx : rx + rw])
        for _ in range(crops_per_visit):
            cy = int(rng.integers(0, max(rh - crop, 0) + 1))
            cx = int(rng.integers(0, max(rw - crop, 0) + 1))
            block["image"][i] = _cut(img, cy, cx, crop)
            block["label"][i] = _cut(lab, cy, cx, crop)
            block["source"][i] = it.source
            block["item"][i] = int(idx)
            block["y0"][i], block["x0"][i] = ry + cy, rx + cx
            i += 1
            n_total -= 1
            if i == len(block["image"]):
                yield block
                block, i = _new_block(min(block_rows, n_total), crop), 0
    if i:
        yield {k: v[:i] for k, v in block.items()}


def _new_block(n: int, crop: int) -> dict[str, np.ndarray]:
    return {
        "image": np.empty((n, crop, crop, 3), np.uint8),
        "label": np.empty((n, crop, crop), np.int32),
        "source": np.empty(n, np.int8),
        "item": np.empty(n, np.int32),
        "y0": np.empty(n, np.int32),
        "x0": np.empty(n, np.int32),
    }


@dataclass(frozen=True)
class LazyTransform:
    """A block transform named by module and function, imported where it first runs.

    A plain function (or ``functools.partial``) is pickled by reference, so every process
    that merely carries the dataset (Ray Train's controller, its dataset manager and split
    coordinator) imports the function's module on unpickling. For the augmentation that is
    torch and MONAI, 4-7 s per process on 2 CPUs, two of them on the path to the first
    training batch. Naming the function instead leaves that import to the read tasks.
    """

    module: str
    function: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, module: str, function: str, **kwargs: Any) -> LazyTransform:
        return cls(module, function, tuple(sorted(kwargs.items())))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fn = import_function(self.module, self.function)
        return fn(batch, **dict(self.kwargs))


def import_function(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, imported; a Ray worker process whose import was interrupted exits.

    Ray cancels a running task by raising ``KeyboardInterrupt`` in it, as it does to a
    stream's read tasks when a training stops or its worker group restarts; the first read
    task of a process spends seconds importing torch, MONAI and SciPy (:class:`LazyTransform`).
    An import interrupted part-way leaves half-made modules behind, and every later task of
    that process failed (``NameError: name '_ndimage_api' is not defined`` from SciPy, after
    an elastic group grew back); removing them to import again fails too (NumPy loads only
    once per process). So the process exits, and Ray starts a fresh one for the next task.
    """
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:
        raise
    except BaseException:  # KeyboardInterrupt: a cancelled task (or Ctrl-C in a driver)
        if ray.is_initialized() and ray.get_runtime_context().get_task_id() is not None:
            os._exit(1)  # in a Ray task or actor, never in a driver
        raise


class TrainCropDatasource(Datasource):
    """Random training crops (image ``(c, c, 3) uint8``, label ``(c, c) int32``).

    Columns: ``image``, ``label``, ``source`` (0 labelled, 1 pseudo), ``item`` (index into
    ``items``), ``y0``/``x0`` (crop origin in the item's image). Pixels of a pseudo-label's
    ignore mask arrive as negative labels (:func:`cellst.data.pseudo.encode_ignored`).

    Parameters
    ----------
    items : sequence of CropItem
        Items with a label (ground truth or pseudo) and a sampling weight.
    n_crops : int
        Crops per pass over the dataset (one epoch).
    crop : int
        Crop side; images smaller than that are zero-padded (label 0).
    crops_per_visit : int
        Crops cut from each region read.
    seed : int, optional
        Fixed crop positions (the same every pass); ``None`` draws new crops each pass.
    transform : callable, optional
        Applied to every block in the read task itself (training passes the augmentation,
        so reading and augmenting are one task: no raw crops through the object store).
    """

    def __init__(
        self,
        items: Sequence[CropItem],
        n_crops: int,
        crop: int = 256,
        crops_per_visit: int = 4,
        chunk: int = 256,
        seed: int | None = None,
        block_rows: int = 64,
        transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    ):
        super().__init__()
        if not items:
            raise StoreError("no items to draw training crops from")
        if any(it.ref.label is None for it in items):
            raise StoreError("every training item needs a label")
        self.items = list(items)
        self.n_crops = int(n_crops)
        self.crop = int(crop)
        self.crops_per_visit = int(crops_per_visit)
        self.chunk = int(chunk)
        self.seed = seed
        self.block_rows = int(block_rows)
        self.transform = transform
        w = np.asarray([it.weight for it in self.items], float)
        if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
            raise ValueError("item weights must be finite, non-negative and not all zero")
        self.p = w / w.sum()

    def get_name(self) -> str:
        return "CellstTrainCrops"

    def estimate_inmemory_data_size(self) -> int:
        return self.n_crops * self.crop * self.crop * 7

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        n_visits = math.ceil(self.n_crops / self.crops_per_visit)
        n_tasks = max(1, min(parallelism, n_visits))
        per_task = np.array_split(np.arange(n_visits), n_tasks)
        tasks = []
        for t, chunk_ids in enumerate(per_task):
            n_rows = len(chunk_ids) * self.crops_per_visit
            if t == n_tasks - 1:
                n_rows -= n_visits * self.crops_per_visit - self.n_crops
            meta = BlockMetadata(
                num_rows=n_rows,
                size_bytes=n_rows * self.crop * self.crop * 7,
                input_files=None,
                exec_stats=None,
            )
            tasks.append(
                ReadTask(
                    self._make_read_fn(t, len(chunk_ids), n_rows),
                    meta,
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return tasks

    def _make_read_fn(self, task_index: int, n_visits: int, n_rows: int):
        items, p, crop, k, chunk = self.items, self.p, self.crop, self.crops_per_visit, self.chunk
        seed, block_rows, transform = self.seed, self.block_rows, self.transform

        def read_fn() -> Iterator[Block]:
            rng = np.random.default_rng(None if seed is None else [seed, task_index])
            visits = rng.choice(len(items), size=n_visits, p=p)
            left = n_rows
            for batch in read_crops(items, visits, crop, k, chunk, rng, block_rows):
                if left <= 0:
                    break
                batch = {c: v[:left] for c, v in batch.items()}
                left -= len(batch["image"])
                yield BlockAccessor.batch_to_block(transform(batch) if transform else batch)

        return read_fn


@dataclass(frozen=True)
class Tile:
    """A window of one item: offset and size."""

    ref: ItemRef
    y0: int
    x0: int
    h: int
    w: int


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Top-left corners of ``tile``-sized windows covering an image with ``overlap`` pixels."""
    if overlap >= tile:
        raise ValueError(f"overlap ({overlap}) must be smaller than the tile ({tile})")
    step = tile - overlap

    def starts(n: int) -> list[int]:
        if n <= tile:
            return [0]
        s = list(range(0, n - tile, step)) + [n - tile]
        return sorted(set(s))

    return [(y, x) for y in starts(height) for x in starts(width)]


class ImageDatasource(Datasource):
    """Whole images, or overlapping tiles, with their ids and offsets (for inference).

    Rows: ``id`` (str), ``y0``, ``x0``, ``height``, ``width`` (of the whole image) and
    ``image`` (``(h, w, 3) uint8``, variable-shaped across rows).
    """

    def __init__(
        self,
        refs: Sequence[ItemRef],
        tile: int | None = None,
        overlap: int = 0,
        tiles_per_task: int = 16,
        block_rows: int = 8,
    ):
        super().__init__()
        self.tiles: list[Tile] = []
        for r in refs:
            if tile is None:
                self.tiles.append(Tile(r, 0, 0, r.height, r.width))
            else:
                for y, x in tile_grid(r.height, r.width, tile, overlap):
                    self.tiles.append(Tile(r, y, x, min(tile, r.height), min(tile, r.width)))
        self.tiles_per_task = tiles_per_task
        self.block_rows = block_rows

    def get_name(self) -> str:
        return "CellstImages"

    def estimate_inmemory_data_size(self) -> int:
        return sum(t.h * t.w * 3 for t in self.tiles)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        if not self.tiles:
            return []
        n_tasks = max(
            1, min(len(self.tiles), max(parallelism, len(self.tiles) // self.tiles_per_task))
        )
        groups = np.array_split(np.arange(len(self.tiles)), n_tasks)
        tasks = []
        for g in groups:
            tiles = [self.tiles[i] for i in g]
            meta = BlockMetadata(
                num_rows=len(tiles),
                size_bytes=sum(t.h * t.w * 3 for t in tiles),
                input_files=None,
                exec_stats=None,
            )
            tasks.append(
                ReadTask(self._make_read_fn(tiles), meta, per_task_row_limit=per_task_row_limit)
            )
        return tasks

    def _make_read_fn(self, tiles: list[Tile]):
        block_rows = self.block_rows

        def read_fn() -> Iterator[Block]:
            for s in range(0, len(tiles), block_rows):
                part = tiles[s : s + block_rows]
                images = [
                    open_array(t.ref.image)[t.y0 : t.y0 + t.h, t.x0 : t.x0 + t.w] for t in part
                ]
                batch = {
                    "id": np.asarray([t.ref.id for t in part], dtype=object),
                    "y0": np.asarray([t.y0 for t in part], np.int32),
                    "x0": np.asarray([t.x0 for t in part], np.int32),
                    "height": np.asarray([t.ref.height for t in part], np.int32),
                    "width": np.asarray([t.ref.width for t in part], np.int32),
                    "image": _ragged(images),
                }
                yield BlockAccessor.batch_to_block(batch)

        return read_fn


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


# ----------------------------------------------------------------------------- builders
#: CPU share of a read task beside training workers or model actors: reading is light, and
#: a whole CPU per read would starve (or deadlock) workers that hold the cluster's CPUs
READ_CPUS = 0.25


def crop_items(
    store: CellStore,
    ids: Sequence[str] | None = None,
    balance_by: str = "modality",
    pseudo_set: str | None = None,
    source: int = 0,
    total_weight: float = 1.0,
) -> list[CropItem]:
    """Training items of a store (labelled ones, or a pseudo-label set's) with weights."""
    if pseudo_set is None:
        df = store.items(labeled=True)
        if ids is not None:
            df = df[df["id"].isin(set(ids))]
    else:
        store.pseudo_set(pseudo_set).check_current(store.manifest)  # labels fit the images
        done = set(store.pseudo_items(pseudo_set)["id"])
        df = store.manifest[store.manifest["id"].isin(done)]
        if ids is not None:
            df = df[df["id"].isin(set(ids))]
    if df.empty:
        if pseudo_set and ids is not None:
            raise StoreError(
                f"pseudo-label set {pseudo_set!r} of store {store.root} has no items a "
                "training may learn from (its validation and test-split items are left out)"
            )
        what = f"pseudo-label set {pseudo_set!r}" if pseudo_set else "labelled items"
        raise StoreError(f"store {store.root} has no {what} to train on")
    if balance_by == "modality":
        w = modality_weights(df["modality"].tolist())
    else:
        w = np.full(len(df), 1.0 / len(df))
    return [
        CropItem(store.ref(i, pseudo_set), float(total_weight * wi), source)
        for i, wi in zip(df["id"], w, strict=True)
    ]


def train_crop_dataset(
    items: Sequence[CropItem],
    n_crops: int,
    crop: int = 256,
    crops_per_visit: int = 4,
    seed: int | None = None,
    chunk: int = 256,
    parallelism: int = -1,
    read_cpus: float = 1.0,
    transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    block_rows: int = 64,
) -> ray.data.Dataset:
    """A Ray Dataset of random training crops (see :class:`TrainCropDatasource`).

    ``read_cpus`` is the CPU share of a read task; training passes a fraction so the reads
    fit beside workers that hold the cluster's CPUs. ``parallelism`` -1 gives read tasks
    of about ``4 * block_rows`` crops each (fewer, longer tasks: start-up is paid less
    often), and at least one per CPU of the cluster.
    """
    ds = TrainCropDatasource(
        items,
        n_crops,
        crop,
        crops_per_visit,
        chunk,
        seed,
        block_rows=block_rows,
        transform=transform,
    )
    if parallelism < 0:
        cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
        parallelism = max(1, min(math.ceil(n_crops / (4 * block_rows)), 2 * cpus) or 1)
        parallelism = max(parallelism, min(cpus, math.ceil(n_crops / crops_per_visit)))
    return pace(ray.data.read_datasource(ds, override_num_blocks=parallelism, num_cpus=read_cpus))


def image_dataset(
    store: CellStore, ids: Sequence[str] | None = None, tile: int | None = None, overlap: int = 0
) -> ray.data.Dataset:
    """A Ray Dataset of whole images (``tile=None``) or overlapping tiles, for inference."""
    ids = store.ids() if ids is None else list(ids)
    return pace(
        ray.data.read_datasource(
            ImageDatasource([store.ref(i) for i in ids], tile, overlap), num_cpus=READ_CPUS
        )
    )
