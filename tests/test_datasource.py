"""Ray Data streams over the store: crops equal direct zarr windows, weights, tiles."""

from __future__ import annotations

import numpy as np
import pytest

from cellst.data.datasource import (
    CropItem,
    crop_items,
    image_dataset,
    modality_weights,
    tile_grid,
    train_crop_dataset,
)
from cellst.data.store import CellStore, StoreError


def padded_window(arr: np.ndarray, y: int, x: int, c: int) -> np.ndarray:
    win = arr[y : y + c, x : x + c]
    pad = [(0, c - win.shape[0]), (0, c - win.shape[1])] + [(0, 0)] * (arr.ndim - 2)
    return np.pad(win, pad)


def test_crops_equal_direct_windows(store_dir, ray_session):
    store = CellStore(store_dir)
    items = crop_items(store)
    ds = train_crop_dataset(items, n_crops=50, crop=96, crops_per_visit=3, seed=3)
    rows = ds.take_all()
    assert len(rows) == 50
    for r in rows:
        it = items[r["item"]]
        assert r["image"].shape == (96, 96, 3) and r["image"].dtype == np.uint8
        assert r["label"].shape == (96, 96) and r["label"].dtype == np.int32
        img = store.image(it.ref.id)
        lab = store.label(it.ref.id)
        np.testing.assert_array_equal(r["image"], padded_window(img, r["y0"], r["x0"], 96))
        np.testing.assert_array_equal(r["label"], padded_window(lab, r["y0"], r["x0"], 96))
    # a fixed seed gives the same crops on every pass
    again = train_crop_dataset(items, n_crops=50, crop=96, crops_per_visit=3, seed=3).take_all()
    assert [(r["item"], r["y0"], r["x0"]) for r in again] == [
        (r["item"], r["y0"], r["x0"]) for r in rows
    ]


def test_crops_larger_than_image_are_padded(store_dir, ray_session):
    store = CellStore(store_dir)
    items = crop_items(store)
    big = 384  # every synthetic image in the fixture is at most 320 px
    rows = train_crop_dataset(items, n_crops=6, crop=big, crops_per_visit=2, seed=0).take_all()
    for r in rows:
        ref = items[r["item"]].ref
        assert r["image"].shape == (big, big, 3)
        assert (r["image"][ref.height :, :] == 0).all() and (r["label"][:, ref.width :] == 0).all()
        # the image's own pixels are there, at their place (not a crop of zeros)
        img, lab = store.image(ref.id), store.label(ref.id)
        np.testing.assert_array_equal(r["image"], padded_window(img, r["y0"], r["x0"], big))
        np.testing.assert_array_equal(r["label"], padded_window(lab, r["y0"], r["x0"], big))
        assert r["label"].max() > 0


def test_modality_balance(store_dir, ray_session):
    store = CellStore(store_dir)
    w = modality_weights(["a", "a", "a", "b"])
    np.testing.assert_allclose(w, [1 / 6, 1 / 6, 1 / 6, 1 / 2])
    items = crop_items(store, balance_by="modality")
    rows = train_crop_dataset(items, n_crops=800, crop=64, crops_per_visit=1, seed=1).take_all()
    mods = np.array([store.row(items[r["item"]].ref.id).modality for r in rows])
    _, counts = np.unique(mods, return_counts=True)
    assert len(counts) == 4
    assert counts.min() > 0.7 * 200 and counts.max() < 1.3 * 200


def test_weights_skew_sampling(store_dir, ray_session):
    store = CellStore(store_dir)
    base = crop_items(store, balance_by="none")
    heavy = [CropItem(it.ref, 100.0 if i == 0 else 1.0) for i, it in enumerate(base)]
    rows = train_crop_dataset(heavy, n_crops=300, crop=64, crops_per_visit=1, seed=2).take_all()
    share = np.mean([r["item"] == 0 for r in rows])
    assert share > 0.8


def test_no_labelled_items_is_a_clear_error(store_dir):
    store = CellStore(store_dir)
    with pytest.raises(StoreError, match="no labelled items"):
        crop_items(store, ids=["does-not-exist"])
    with pytest.raises(StoreError, match="no pseudo-label set"):
        crop_items(store, pseudo_set="nope")


def test_tile_grid_covers_image():
    for h, w, t, o in [(100, 100, 256, 32), (600, 1000, 256, 64), (257, 256, 256, 16)]:
        cover = np.zeros((h, w), int)
        for y, x in tile_grid(h, w, t, o):
            cover[y : y + t, x : x + t] += 1
            assert y + min(t, h) <= h and x + min(t, w) <= w
        assert cover.min() >= 1
    with pytest.raises(ValueError, match="overlap"):
        tile_grid(10, 10, 8, 8)


def test_image_stream_whole_and_tiled(store_dir, ray_session):
    store = CellStore(store_dir)
    ids = store.ids("test")
    whole = {r["id"]: r for r in image_dataset(store, ids).take_all()}
    assert sorted(whole) == sorted(ids)
    for i, r in whole.items():
        np.testing.assert_array_equal(r["image"], store.image(i))
        assert (r["height"], r["width"]) == r["image"].shape[:2]
    tiles = image_dataset(store, ids, tile=128, overlap=32).take_all()
    for i in ids:
        img = store.image(i)
        mine = [t for t in tiles if t["id"] == i]
        assert len(mine) == len(tile_grid(*img.shape[:2], 128, 32))
        cover = np.zeros(img.shape[:2], bool)
        for t in mine:
            y, x = t["y0"], t["x0"]
            h, w = t["image"].shape[:2]
            np.testing.assert_array_equal(t["image"], img[y : y + h, x : x + w])
            cover[y : y + h, x : x + w] = True
        assert cover.all()


def test_streams_pace_ray_datas_scheduling_loop(store_dir, ray_session, monkeypatch):
    """Every stream cellst builds carries :class:`cellst.data.executor.PacedLoop`; Ray Data
    calls it in its scheduling loop with counters it can read (so a Ray upgrade that drops
    either fails here); it spaces idle steps that come sooner than ``MIN_STEP_S`` and leaves
    steps after progress, and later ones, alone."""
    from types import SimpleNamespace

    from cellst.data import executor

    store = CellStore(store_dir)
    crops = train_crop_dataset(crop_items(store), n_crops=8, crop=64, crops_per_visit=2)
    images = image_dataset(store, store.ids()[:2])
    for ds in (crops, images):
        assert executor.PacedLoop in ds.context.custom_execution_callback_classes
    marks: list = []
    real = executor.PacedLoop.on_execution_step

    def counted(self, ex):
        marks.append(executor.progress_mark(ex))
        real(self, ex)

    monkeypatch.setattr(executor.PacedLoop, "on_execution_step", counted)
    assert len(crops.take_all()) == 8
    assert marks and None not in marks  # Ray ran the loop through it, counters readable
    assert len(set(marks)) > 1  # ... and they moved as the stream did

    # the pacing itself, on a clock and an executor of its own
    class Clock:
        now, slept = 100.0, []

        def perf_counter(self):
            return self.now

        def sleep(self, s):
            self.slept.append(s)
            self.now += s

    clock = Clock()
    monkeypatch.setattr(executor, "time", clock)
    counters = dict.fromkeys(executor.PROGRESS_COUNTERS, 0)
    ex = SimpleNamespace(_topology=[SimpleNamespace(metrics=SimpleNamespace(**counters))])
    loop = executor.PacedLoop()
    loop.on_execution_step(ex)  # the first step: nothing to space it from
    clock.now += 0.001
    loop.on_execution_step(ex)  # idle, right after: spaced
    assert clock.slept == [pytest.approx(executor.MIN_STEP_S - 0.001)]
    clock.now += 0.001
    ex._topology[0].metrics.num_outputs_taken += 1  # the consumer took an output
    loop.on_execution_step(ex)
    clock.now += 2 * executor.MIN_STEP_S  # an idle step that waited for a task
    loop.on_execution_step(ex)
    assert len(clock.slept) == 1
    # the switch for comparisons leaves a stream as Ray builds it
    monkeypatch.setenv(executor.ENV_SWITCH, "0")
    plain = train_crop_dataset(crop_items(store), n_crops=8, crop=64, crops_per_visit=2)
    assert executor.PacedLoop not in plain.context.custom_execution_callback_classes


def test_a_ray_process_whose_import_is_interrupted_exits(tmp_path, ray_session):
    """Ray cancels a running read task with ``KeyboardInterrupt``; one that lands inside the
    import of the augmentation left that worker process failing every later task
    (SciPy's half-made ``scipy.ndimage``). The process exits instead, and Ray starts a fresh
    one; a plain import error stays an error of the task, and a driver is not exited."""
    import sys

    import ray

    from cellst.data.datasource import LazyTransform

    (tmp_path / "cellst_interrupted_import.py").write_text("raise KeyboardInterrupt\n")
    transform = LazyTransform.of("cellst_interrupted_import", "augment")

    @ray.remote(max_retries=0)
    def read(folder: str, module: str) -> int:
        sys.path.insert(0, folder)
        LazyTransform.of(module, "augment")({})
        return 0

    with pytest.raises(ray.exceptions.WorkerCrashedError):
        ray.get(read.remote(str(tmp_path), "cellst_interrupted_import"))
    with pytest.raises(ray.exceptions.RayTaskError, match="No module named 'cellst_absent'"):
        ray.get(read.remote(str(tmp_path), "cellst_absent"))
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(KeyboardInterrupt):  # this process (a driver) goes on
            transform({})
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("cellst_interrupted_import", None)
