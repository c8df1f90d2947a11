"""Ingest: round trips for every format, every bad-input case, incremental and atomic updates."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest
import tifffile
from skimage.segmentation import relabel_sequential

from cellst.config import IngestConfig
from cellst.data.images import normalize_image, read_array
from cellst.data.ingest import REPORT as INGEST_REPORT
from cellst.data.ingest import IngestError, ingest, scan_source
from cellst.data.store import MANIFEST, CellStore


def tree_digest(root: Path) -> str:
    """Hash of every file's path and bytes under ``root`` (to prove a store is unchanged)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != ".lock" and ".readers" not in p.parts:
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def blobs(h: int, w: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros((h, w), np.int32)
    for k in range(1, n + 1):
        y, x = rng.integers(8, h - 8), rng.integers(8, w - 8)
        lab[y - 5 : y + 5, x - 5 : x + 5] = k * 3  # non-sequential on purpose
    return lab


def make_formats(root: Path) -> dict[str, np.ndarray]:
    """One labelled image per format / bit depth the challenge uses; returns the labels."""
    img_dir, lab_dir = root / "labeled" / "images", root / "labeled" / "labels"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = {}
    shapes = {
        "u16": (90, 120),
        "rgb": (100, 80),
        "rgba": (64, 64),
        "gray8": (70, 90),
        "f32": (80, 80),
        "multi": (96, 96),
        "jpg": (64, 96),
        "png16": (72, 72),
        "gray_alpha": (64, 80),
    }
    for name, (h, w) in shapes.items():
        lab = blobs(h, w, 6, hash(name) % 1000)
        fg = lab > 0
        if name == "u16":
            tifffile.imwrite(
                img_dir / "u16.tif", (fg * 40000 + rng.integers(0, 900, (h, w))).astype(np.uint16)
            )
        elif name == "rgb":
            iio.imwrite(img_dir / "rgb.png", np.stack([fg * 200 + 20] * 3, -1).astype(np.uint8))
        elif name == "rgba":
            iio.imwrite(
                img_dir / "rgba.png",
                np.dstack([np.stack([fg * 200 + 20] * 3, -1), np.full((h, w), 255)]).astype(
                    np.uint8
                ),
            )
        elif name == "gray8":
            iio.imwrite(img_dir / "gray8.bmp", (fg * 150 + 30).astype(np.uint8))
        elif name == "f32":
            tifffile.imwrite(
                img_dir / "f32.tiff", (fg * 0.8 + rng.random((h, w)) * 0.1).astype(np.float32)
            )
        elif name == "multi":  # 5-channel, channel-first stack, its channel axis declared
            tifffile.imwrite(
                img_dir / "multi.tif",
                np.stack([fg * (c + 1) * 1000 + 5 for c in range(5)]).astype(np.uint16),
                metadata={"axes": "CYX"},
            )
        elif name == "jpg":
            iio.imwrite(img_dir / "jpg.jpg", np.stack([fg * 200 + 20] * 3, -1).astype(np.uint8))
        elif name == "png16":
            iio.imwrite(img_dir / "png16.png", (fg * 50000 + 100).astype(np.uint16))
        elif name == "gray_alpha":  # PNG mode LA: grey plus an opaque alpha
            from PIL import Image

            grey_alpha = np.dstack([fg * 150 + 30, np.full((h, w), 255)]).astype(np.uint8)
            Image.fromarray(grey_alpha, mode="LA").save(img_dir / "gray_alpha.png")
        tifffile.imwrite(lab_dir / f"{name}_label.tiff", lab)
        labels[name] = lab
    return labels


def test_synth_round_trip(store_dir, synth_src):
    store = CellStore(store_dir)
    assert set(store.manifest["split"]) == {"labeled", "unlabeled", "test"}
    assert len(store) == 16
    assert set(store.manifest["modality"]) == {
        "fluorescence",
        "brightfield",
        "phase_contrast",
        "dic",
    }
    for row in store.manifest.itertuples():
        src_img = read_array(row.source_path)
        expected = normalize_image(src_img, 1, 99)
        got = store.image(row.id)
        assert got.dtype == np.uint8 and got.shape == (row.height, row.width, 3)
        np.testing.assert_array_equal(got, expected)
        if row.label_path:
            lab = store.label(row.id)
            src_lab = tifffile.imread(row.label_path)
            assert lab.dtype == np.int32
            np.testing.assert_array_equal(lab, relabel_sequential(src_lab)[0])
            assert row.n_instances == lab.max() > 0
        else:
            assert row.n_instances == -1
    # windows read only their part and equal slices of the whole
    item = store.ids("labeled")[0]
    np.testing.assert_array_equal(
        store.image(item, (10, 60, 20, 90)), store.image(item)[10:60, 20:90]
    )
    np.testing.assert_array_equal(store.label(item, (5, 50, 5, 50)), store.label(item)[5:50, 5:50])
    assert len(store.items(split="labeled", modality="fluorescence")) == 2


def test_every_format_and_bit_depth(ray_session, tmp_path):
    labels = make_formats(tmp_path / "src")
    result = ingest(tmp_path / "src", tmp_path / "store", progress=False)
    assert sorted(result.added) == sorted(labels)
    store = CellStore(tmp_path / "store")
    for name, lab in labels.items():
        img = store.image(name)
        assert img.shape == lab.shape + (3,) and img.dtype == np.uint8
        fg = lab > 0
        # normalisation keeps cells brighter than background in every channel that has signal
        assert img[fg].mean() > img[~fg].mean() + 50, name
        np.testing.assert_array_equal(store.label(name), relabel_sequential(lab)[0])
    # grey with alpha is grey: the alpha is dropped, not kept as a second channel
    grey = store.image("gray_alpha")
    assert (grey == grey[:, :, :1]).all()
    assert store.row("u16").modality == "unknown"


def test_plain_folder_and_modality_option(ray_session, tmp_path):
    src = tmp_path / "plain"
    src.mkdir()
    for i in range(3):
        iio.imwrite(src / f"im{i}.png", (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8))
    ingest(src, tmp_path / "store", modality="phase_contrast", progress=False)
    store = CellStore(tmp_path / "store")
    assert store.ids("unlabeled") == ["im0", "im1", "im2"]
    assert set(store.manifest["modality"]) == {"phase_contrast"}


def _copy_src(synth_src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(synth_src, dst)
    return dst


def _first(folder: Path, pattern: str = "*") -> Path:
    return sorted(folder.glob(pattern))[0]


def corrupt_image(src: Path) -> str:
    p = _first(src / "labeled" / "images")
    p.write_bytes(b"this is not an image")
    return p.name


def label_shape_mismatch(src: Path) -> str:
    p = _first(src / "labeled" / "labels")
    tifffile.imwrite(p, np.ones((7, 9), np.int32))
    return "differs from its image"


def label_not_integer(src: Path) -> str:
    p = _first(src / "labeled" / "labels")
    lab = tifffile.imread(p).astype(np.float32)
    lab[0, 0] = 0.5
    tifffile.imwrite(p, lab)
    return "integer instance map"


def label_negative(src: Path) -> str:
    p = _first(src / "labeled" / "labels")
    lab = tifffile.imread(p)
    lab[0, 0] = -3
    tifffile.imwrite(p, lab)
    return "negative values"


def image_without_label(src: Path) -> str:
    _first(src / "labeled" / "labels").unlink()
    return "labelled image without a label"


def label_without_image(src: Path) -> str:
    _first(src / "labeled" / "images").unlink()
    return "label without an image"


def duplicate_id(src: Path) -> str:
    """Two images of one name in one folder (in two folders, both are kept: see
    test_an_image_name_used_by_training_and_tuning_keeps_both)."""
    p = _first(src / "labeled" / "images")
    twin = ".bmp" if p.suffix.lower() != ".bmp" else ".png"
    iio.imwrite(p.with_suffix(twin), np.full((64, 64), 7, np.uint8))
    return "duplicate id"


BAD_CASES = [
    corrupt_image,
    label_shape_mismatch,
    label_not_integer,
    label_negative,
    image_without_label,
    label_without_image,
    duplicate_id,
]


@pytest.mark.parametrize("breaker", BAD_CASES, ids=lambda f: f.__name__)
def test_bad_input_is_refused_and_store_unchanged(ray_session, synth_src, tmp_path, breaker):
    src = _copy_src(synth_src, tmp_path)
    store = tmp_path / "store"
    ingest(src, store, progress=False)
    before = tree_digest(store)
    expected = breaker(src)
    # touch every image so a successful re-ingest would rewrite the store
    with pytest.raises(IngestError) as exc:
        ingest(src, store, IngestConfig(high_percentile=98), progress=False)
    msg = str(exc.value)
    assert expected in msg
    assert str(src) in msg  # the offending file is named by its path
    assert "nothing was written" in msg
    assert tree_digest(store) == before
    assert not list(tmp_path.glob(".store.staging-*"))


def test_skip_bad_ingests_the_rest_and_reports(ray_session, synth_src, tmp_path):
    src = _copy_src(synth_src, tmp_path)
    bad_name = corrupt_image(src)
    result = ingest(src, tmp_path / "store", skip_bad=True, progress=False)
    assert len(result.skipped) == 1 and bad_name in result.skipped[0][0]
    store = CellStore(tmp_path / "store")
    assert Path(bad_name).stem not in store and len(store) == 15
    report = pd.read_json(tmp_path / "store" / "ingest_report.json", typ="series")
    assert bad_name in str(report["skipped"])


def test_empty_source_and_missing_folder(ray_session, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="no images found") as exc:
        ingest(tmp_path / "empty", tmp_path / "store", progress=False)
    assert "--skip-bad" not in str(exc.value)  # it cannot help here
    with pytest.raises(IngestError, match="does not exist") as exc:
        ingest(tmp_path / "nope", tmp_path / "store", progress=False)
    assert "--skip-bad" not in str(exc.value)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(IngestError, match="source is a file, not a folder"):
        ingest(tmp_path / "file.png", tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()


def test_incremental_reingest(ray_session, synth_src, tmp_path):
    src = _copy_src(synth_src, tmp_path)
    store = tmp_path / "store"
    first = ingest(src, store, progress=False)
    assert len(first.added) == 16
    again = ingest(src, store, progress=False)
    assert len(again.unchanged) == 16 and not again.added and not again.updated
    # change one image, add one, and check only those are (re)written
    changed = _first(src / "unlabeled" / "images")
    old_array = CellStore(store).row(changed.stem).image_array
    img = read_array(changed)
    inverted = (img.max() - img).astype(img.dtype)
    if changed.suffix in (".tif", ".tiff"):
        tifffile.imwrite(changed, inverted)
    else:
        iio.imwrite(changed, inverted, extension=changed.suffix)
    iio.imwrite(src / "unlabeled" / "images" / "new_one.png", np.full((50, 60), 9, np.uint8))
    third = ingest(src, store, progress=False)
    assert third.updated == [changed.stem] and third.added == ["new_one"]
    assert len(third.unchanged) == 15
    s = CellStore(store)
    assert s.row(changed.stem).image_array != old_array
    assert not (store / old_array).exists()  # superseded array garbage-collected
    # removing a source file keeps the item unless --prune
    (src / "unlabeled" / "images" / "new_one.png").unlink()
    assert "new_one" in CellStore(store) and not ingest(src, store, progress=False).removed
    assert ingest(src, store, prune=True, progress=False).removed == ["new_one"]
    assert "new_one" not in CellStore(store)
    # a file that is still there but now unreadable is skipped, not pruned: its item stays,
    # with the arrays it had (before, --skip-bad --prune dropped it)
    broken = _first(src / "test" / "images")
    kept = CellStore(store).row(broken.stem)
    broken.write_bytes(b"")
    res = ingest(src, store, prune=True, skip_bad=True, progress=False)
    assert [p for p, _ in res.skipped] == [str(broken)] and not res.removed
    assert CellStore(store).row(broken.stem).image_array == kept.image_array
    assert (store / kept.image_array).is_dir()
    # ...and said: the item no longer matches its file (a label of another shape, too)
    assert res.kept == [broken.stem] and "1 kept as stored before" in res.summary()
    assert json.loads((store / INGEST_REPORT).read_text())["kept"] == [broken.stem]
    label = sorted((src / "test" / "labels").iterdir())[-1]
    tifffile.imwrite(label, np.ones((7, 9), np.uint16))
    res = ingest(src, store, skip_bad=True, progress=False)
    assert sorted(res.kept) == sorted([broken.stem, label.stem.removesuffix("_label")])


def test_reingest_reports_what_changed_besides_pixels(ray_session, synth_src, tmp_path):
    """A new modality or chunking on a re-ingest is an update (was reported unchanged, and
    the chunking kept); an unknown --split is refused before anything is read."""
    src = _copy_src(synth_src, tmp_path)
    store = tmp_path / "store"
    ingest(src, store, progress=False)
    before = CellStore(store).manifest
    other = sorted(before.loc[before["modality"] != "fluorescence", "id"])
    assert 0 < len(other) < 16
    again = ingest(src, store, modality="fluorescence", progress=False)
    assert sorted(again.updated) == other and len(again.unchanged) == 16 - len(other)
    assert set(CellStore(store).manifest["modality"]) == {"fluorescence"}
    rechunked = ingest(src, store, IngestConfig(chunk=64), modality="fluorescence", progress=False)
    assert len(rechunked.updated) == 16
    import zarr

    s = CellStore(store)
    stored = zarr.open_array(str(store / s.row(s.ids()[0]).image_array), mode="r")
    assert stored.chunks[:2] == (64, 64)
    with pytest.raises(IngestError, match="unknown split 'labelled'"):
        ingest(src, store, split="labelled", progress=False)


def test_interrupted_commit_leaves_previous_store(ray_session, synth_src, tmp_path, monkeypatch):
    src = _copy_src(synth_src, tmp_path)
    store = tmp_path / "store"
    ingest(src, store, progress=False)
    manifest_before = (store / MANIFEST).read_bytes()
    images_before = {i: CellStore(store).image(i) for i in CellStore(store).ids()}

    import cellst.data.store as store_mod

    real_write = store_mod.atomic_write_bytes

    def interrupted(path, data):
        if Path(path).name == MANIFEST:  # Ctrl-C at the worst moment: arrays moved, not this
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(store_mod, "atomic_write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt, match="interrupted, the store is unchanged"):
        ingest(src, store, IngestConfig(low_percentile=5), progress=False)
    monkeypatch.undo()
    assert (store / MANIFEST).read_bytes() == manifest_before
    with CellStore(store) as s:
        for i, img in images_before.items():
            np.testing.assert_array_equal(s.image(i), img)
    assert not list(tmp_path.glob(".store.staging-*"))
    # the next ingest completes and cleans up the orphaned arrays
    ingest(src, store, IngestConfig(low_percentile=5), progress=False)
    s = CellStore(store)
    live = set(s.manifest["image_array"]) | set(s.manifest["label_array"]) - {""}
    on_disk = {
        f"{g}/{p.name}" for g in ("images", "labels") for p in (store / g).iterdir() if p.is_dir()
    }
    assert on_disk == live


def test_scan_reports_layout_problems_together(tmp_path, synth_src):
    src = _copy_src(synth_src, tmp_path)
    image_without_label(src)
    duplicate_id(src)
    _, problems = scan_source(src)
    reasons = " ".join(r for _, r in problems)
    assert "without a label" in reasons and "duplicate id" in reasons


def test_labels_cellst_predicted_are_refused_as_ground_truth(tmp_path):
    """`cellst segment` writes NAME_label.tiff beside each image: ingesting that folder made
    every image labelled by the model's own output, without a word. Such files (cellst's
    Software tag; `predict --out` files also record their model) are named as problems, and
    an image whose only label is one is not also called unlabelled; the user's own label
    beside them still pairs. With every label predicted, the images are unlabelled."""
    from cellst.data.images import write_label_tiff

    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    lab = np.zeros((32, 32), np.uint16)
    lab[4:12, 4:12], lab[16:28, 16:28] = 1, 2
    for name in ("a", "b", "c"):
        tifffile.imwrite(src / f"{name}.tif", rng.integers(0, 4000, (32, 32), dtype=np.uint16))
    write_label_tiff(src / "a_label.tiff", lab)  # as `cellst segment` writes it
    write_label_tiff(src / "b_label.tiff", lab, model_id="0123abcd")  # as `predict --out`
    tifffile.imwrite(src / "c_label.tiff", lab)  # the user's own
    items, problems = scan_source(src)
    assert sorted(Path(p).name for p, why in problems if "a prediction cellst wrote" in why) == [
        "a_label.tiff",
        "b_label.tiff",
    ], problems
    assert len(problems) == 2, problems  # nothing else: a and b are not "without a label"
    by_id = {it.id: it for it in items}
    assert by_id["c"].label.endswith("c_label.tiff")
    assert not by_id["a"].label and not by_id["b"].label
    (src / "c_label.tiff").unlink()
    items, problems = scan_source(src)
    assert len(problems) == 2 and {it.split for it in items} == {"unlabeled"}, problems


def test_nan_and_infinite_pixels_normalise_without_warnings():
    """A float image with NaN (masked) and infinite (saturated) pixels: NaN is background
    (0), +inf the brightest (255), -inf 0; the finite pixels are normalised as if those were
    absent, with no numpy RuntimeWarning (there used to be one per channel)."""
    import warnings

    rng = np.random.default_rng(0)
    img = rng.uniform(100, 1000, (64, 64)).astype(np.float32)
    bad = img.copy()
    bad[:8] = np.nan
    bad[8:12] = np.inf
    bad[12:14] = -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = normalize_image(bad, 1, 99)
    assert out.dtype == np.uint8
    assert (out[:8] == 0).all() and (out[8:12] == 255).all() and (out[12:14] == 0).all()
    rest = normalize_image(img[14:], 1, 99)  # the finite rows alone set the range
    assert np.array_equal(out[14:], rest)
    # a constant image (a degenerate range: scaled from its maximum) keeps the same rule
    flat = np.full((16, 16), 5.0, np.float32)
    flat[:4], flat[4:6], flat[6:8] = np.nan, np.inf, -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = normalize_image(flat, 1, 99)
    assert (out[:4] == 0).all() and (out[4:6] == 255).all() and (out[6:8] == 0).all()
    assert (out[8:] == 255).all()


def test_a_float_image_of_a_small_range_keeps_its_contrast():
    """A float image whose values lie within a thousandth (0.001-0.0011) counted as flat
    (an absolute 1e-3 threshold) and was stored with 25 grey levels; the same image times
    1000 got 256. Its range now counts relative to its magnitude."""
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float64).reshape(64, 64)
    small = (0.001 + 0.0001 * ramp).astype(np.float32)
    large = small * 1000
    out = normalize_image(small, 1, 99)
    assert len(np.unique(out)) > 200 and out.min() == 0 and out.max() == 255
    assert np.abs(out.astype(int) - normalize_image(large, 1, 99)).max() <= 1
    flat = np.full((16, 16), 0.25, np.float32)  # truly flat: still the degenerate rule
    assert (normalize_image(flat, 1, 99) == 255).all()


@pytest.mark.parametrize(
    ("folder", "split"),
    [
        ("Training-labeled", "labeled"),
        ("train-unlabeled-part1", "unlabeled"),
        ("TrainUnlabeled", "unlabeled"),
        ("Tuning", "test"),
        ("Testing", "test"),
        ("val", "test"),
        ("val2017", "test"),
        ("Evaluation", "test"),
        ("testset", "test"),
        ("labeled", "labeled"),
        ("plates_untested", "plates_untested"),  # was "test": "test" inside a word
        ("interval_5min", "interval_5min"),  # was "test" too ("val")
        ("relabeled by hand", "relabeled_by_hand"),  # was "labeled"
    ],
)
def test_a_folder_name_means_a_split_by_its_words(folder, split):
    from cellst.data.ingest import split_of_folder

    assert split_of_folder(folder) == split


def test_a_palette_png_label_is_read_as_its_indices(ray_session, tmp_path):
    """Labelling tools save instance maps as indexed PNGs: the ids are the palette indices
    (before, the palette's RGB colours were read and refused as "shape (64, 64, 3)")."""
    from PIL import Image

    src = tmp_path / "src" / "labeled"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    iio.imwrite(
        src / "images" / "a.png", (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)
    )
    ids = np.zeros((64, 64), np.uint8)
    ids[4:20, 4:20], ids[30:50, 30:50] = 1, 2
    pal = Image.fromarray(ids, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    pal.save(src / "labels" / "a_label.png")
    ingest(tmp_path / "src", tmp_path / "store", progress=False)
    label = CellStore(tmp_path / "store").label("a")
    np.testing.assert_array_equal(label, ids.astype(label.dtype))


def _challenge_pair(folder: Path, name: str, suffix: str, seed: int) -> np.ndarray:
    """One labelled image NAME.suffix in folder/images with folder/labels/NAME_label.tiff."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    lab = blobs(64, 64, 4, seed)
    iio.imwrite(folder / "images" / f"{name}{suffix}", ((lab > 0) * 200 + seed).astype(np.uint8))
    tifffile.imwrite(folder / "labels" / f"{name}_label.tiff", lab)
    return lab


def test_an_image_name_used_by_training_and_tuning_keeps_both(ray_session, tmp_path):
    """The challenge's Tuning images reuse Training-labeled's names (cell_00001 ...): both
    are ingested, the training image keeping its name and the tuning one prefixed with its
    folder; a name used twice in one folder skips only the file it names."""
    src = tmp_path / "NeurIPS22-CellSeg"
    train = {n: _challenge_pair(src / "Training-labeled", n, ".png", s)
             for s, n in enumerate(["cell_00001", "cell_00002"])}  # fmt: skip
    tune = {n: _challenge_pair(src / "Tuning", n, ".tiff", 10 + s)
            for s, n in enumerate(["cell_00001", "cell_00003"])}  # fmt: skip
    items, problems = scan_source(src)
    assert problems == []
    assert {(it.id, it.split, it.renamed_from) for it in items} == {
        ("cell_00001", "labeled", ""),
        ("cell_00002", "labeled", ""),
        ("tuning-cell_00001", "test", "cell_00001"),
        ("cell_00003", "test", ""),
    }
    result = ingest(src, tmp_path / "store", progress=False)
    assert result.renamed == [(str(src / "Tuning" / "images" / "cell_00001.tiff"),
                               "tuning-cell_00001")]  # fmt: skip
    store = CellStore(tmp_path / "store")
    assert np.array_equal(relabel_sequential(store.label("cell_00001"))[0],
                          relabel_sequential(train["cell_00001"])[0])  # fmt: skip
    assert np.array_equal(relabel_sequential(store.label("tuning-cell_00001"))[0],
                          relabel_sequential(tune["cell_00001"])[0])  # fmt: skip
    assert store.ids("test") == ["cell_00003", "tuning-cell_00001"]
    # two files of one name in one folder: only the second (the one named) is skipped
    iio.imwrite(
        src / "Training-labeled" / "images" / "cell_00002.bmp", np.full((64, 64), 7, np.uint8)
    )
    with pytest.raises(IngestError, match="duplicate id 'cell_00002'"):
        ingest(src, tmp_path / "store2", progress=False)
    result = ingest(src, tmp_path / "store2", skip_bad=True, progress=False)
    assert [Path(p).name for p, _ in result.skipped] == ["cell_00002.png"]
    assert "cell_00002" in CellStore(tmp_path / "store2")


def test_a_prefixed_id_stays_when_the_other_folders_image_of_its_name_goes(ray_session, tmp_path):
    """``tuning-cell_00001`` was prefixed because ``Training-labeled`` had a cell_00001.
    With that training image deleted, a re-ingest gave the tuning image the bare id, which
    moved the stored training item into the test split: refused, and with ``--prune
    --skip-bad`` the tuning item, whose file is still there, was deleted while the gone
    training item was kept. Now the tuning image keeps its stored id, and prune drops the
    training item alone; an item whose file was skipped is never pruned."""
    src = tmp_path / "NeurIPS22-CellSeg"
    for s, n in enumerate(["cell_00001", "cell_00002"]):
        _challenge_pair(src / "Training-labeled", n, ".png", s)
    tune = _challenge_pair(src / "Tuning", "cell_00001", ".tiff", 10)
    store = tmp_path / "store"
    ingest(src, store, progress=False)
    assert CellStore(store).ids("test") == ["tuning-cell_00001"]
    (src / "Training-labeled" / "images" / "cell_00001.png").unlink()
    (src / "Training-labeled" / "labels" / "cell_00001_label.tiff").unlink()
    result = ingest(src, store, prune=True, progress=False)
    s = CellStore(store)
    assert result.removed == ["cell_00001"] and result.renamed == []
    assert s.ids() == ["cell_00002", "tuning-cell_00001"]
    assert s.row("tuning-cell_00001").split == "test"
    assert np.array_equal(relabel_sequential(s.label("tuning-cell_00001"))[0],
                          relabel_sequential(tune)[0])  # fmt: skip
    # a tuning image that became unreadable is skipped, and its stored item kept, by file
    (src / "Tuning" / "images" / "cell_00001.tiff").write_bytes(b"II*\x00" + b"\x00" * 20)
    result = ingest(src, store, prune=True, skip_bad=True, progress=False)
    assert "tuning-cell_00001" in CellStore(store) and result.kept == ["tuning-cell_00001"]


def test_an_item_never_moves_into_or_out_of_the_test_split(ray_session, tmp_path):
    """Ingesting another folder whose image has a stored item's name into the test split is
    refused naming both; ``--skip-bad`` keeps the stored item as it was."""
    _challenge_pair(tmp_path / "a" / "labeled", "cell_00001", ".png", 1)
    _challenge_pair(tmp_path / "b" / "Tuning", "cell_00001", ".png", 2)
    store = tmp_path / "store"
    ingest(tmp_path / "a", store, progress=False)
    before = CellStore(store).label("cell_00001")
    with pytest.raises(IngestError, match=r"split 'labeled' of the store .*to split 'test'"):
        ingest(tmp_path / "b", store, progress=False)
    with pytest.raises(IngestError, match="no images to ingest|split 'labeled'"):
        ingest(tmp_path / "b", store, skip_bad=True, progress=False)
    s = CellStore(store)
    assert s.row("cell_00001").split == "labeled" and np.array_equal(s.label("cell_00001"), before)


def test_modalities_rows_match_whole_names_and_unmatched_rows_are_warned(ray_session, tmp_path):
    src = tmp_path / "plain"
    src.mkdir()
    for name in ("phase.gray", "phase", "tune 1"):
        iio.imwrite(src / f"{name}.png", np.full((64, 64), 9, np.uint8))
    (src / "modalities.csv").write_text(
        "name,modality\nphase.gray,phase_contrast\ntune 1.png,dic\ngray_8,fluorescence\n"
    )
    result = ingest(src, tmp_path / "store", progress=False)
    mods = CellStore(tmp_path / "store").manifest.set_index("id")["modality"].to_dict()
    assert mods == {"phase.gray": "phase_contrast", "phase": "unknown", "tune 1": "dic"}
    assert len(result.warnings) == 1 and "'gray_8' names no image" in result.warnings[0]


def test_one_split_folder_by_itself_and_a_plain_folder_with_labels_are_labelled(
    ray_session, tmp_path
):
    """``cellst ingest Training-labeled`` (images/ + labels/) is that split, not two folders
    of images; a plain folder whose images have labels is labelled; ``--split labeled`` on
    images without labels is refused at ingest, naming an image."""
    src = tmp_path / "Training-labeled"
    _challenge_pair(src, "cell_00001", ".png", 1)
    _challenge_pair(src, "cell_00002", ".png", 2)
    items, problems = scan_source(src)
    assert problems == [] and {(it.id, it.split, bool(it.label)) for it in items} == {
        ("cell_00001", "labeled", True),
        ("cell_00002", "labeled", True),
    }
    plain = tmp_path / "plain"
    (plain / "labels").mkdir(parents=True)
    iio.imwrite(plain / "a.png", np.full((64, 64), 5, np.uint8))
    tifffile.imwrite(plain / "labels" / "a_label.tiff", blobs(64, 64, 3, 0))
    items, problems = scan_source(plain)
    assert problems == [] and [(it.split, bool(it.label)) for it in items] == [("labeled", True)]
    bare = tmp_path / "bare"
    bare.mkdir()
    iio.imwrite(bare / "b.png", np.full((64, 64), 5, np.uint8))
    assert [it.split for it in scan_source(bare)[0]] == ["unlabeled"]
    _, problems = scan_source(bare, split="labeled")
    assert [(Path(p).name, "without a label" in why) for p, why in problems] == [("b.png", True)]


def test_an_ome_tiffs_id_and_label_name_leave_out_its_ome(tmp_path):
    """``X.ome.tif`` is item ``X`` with label ``X_label.tiff`` (or ``X.ome_label.tiff``, as
    cellst wrote it before); ``X.tif`` beside it is a clash named at once."""
    from cellst.data.layout import image_name

    assert [image_name(n) for n in ("a.ome.tif", "a.OME.TIFF", "a.b.png", "a.ome.png", "a.b")] == [
        "a",
        "a",
        "a.b",
        "a.ome",  # only an OME-TIFF's .ome
        "a.b",
    ]
    src = tmp_path / "Training-labeled"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    for name in ("x", "y"):
        tifffile.imwrite(src / "images" / f"{name}.ome.tif", np.full((64, 64), 5, np.uint8))
    tifffile.imwrite(src / "labels" / "x_label.tiff", blobs(64, 64, 3, 0))
    tifffile.imwrite(src / "labels" / "y.ome_label.tiff", blobs(64, 64, 3, 1))
    items, problems = scan_source(src)
    assert problems == []
    assert {(it.id, Path(it.label).name) for it in items} == {
        ("x", "x_label.tiff"),
        ("y", "y.ome_label.tiff"),
    }
    tifffile.imwrite(src / "images" / "x.tif", np.full((64, 64), 5, np.uint8))
    _, problems = scan_source(src)
    assert problems and any("x.tif" in where or "x.tif" in why for where, why in problems)


def test_an_image_and_its_label_pair_across_unicode_forms(tmp_path):
    """An accented image name written decomposed (NFD, as macOS does) and its label
    written composed (NFC) pair; they were "labelled image without a label" and "label
    without an image". The item keeps its image's own name."""
    nfd, nfc = "Zelle_e\u0301", "Zelle_\u00e9"
    src = tmp_path / "Training-labeled"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    tifffile.imwrite(src / "images" / f"{nfd}.tif", np.full((64, 64), 5, np.uint8))
    tifffile.imwrite(src / "labels" / f"{nfc}_label.tiff", blobs(64, 64, 3, 0))
    items, problems = scan_source(src)
    assert problems == []
    assert [(it.id, Path(it.label).name) for it in items] == [(nfd, f"{nfc}_label.tiff")]
    # two images whose names differ only in Unicode form are one name twice (were 2 items)
    tifffile.imwrite(src / "images" / f"{nfc}.png", np.full((64, 64), 5, np.uint8))
    _, problems = scan_source(src)
    assert [(Path(p).name, why.split(":")[0]) for p, why in problems] == [
        (f"{nfc}.png", f"duplicate id {nfc!r}")
    ]


def test_a_store_of_an_earlier_cellst_gets_the_ome_tiffs_new_id_in_place_of_the_old(
    ray_session, tmp_path
):
    """An item an earlier cellst stored as ``x.ome`` (from ``x.ome.tif``) becomes ``x`` at
    the next ingest: one item, not the same image twice, and the ingest says so."""
    from cellst.data.store import write_manifest

    src = tmp_path / "src"
    src.mkdir()
    tifffile.imwrite(src / "x.ome.tif", np.full((64, 64), 5, np.uint8))
    tifffile.imwrite(src / "y.tif", np.full((64, 64), 9, np.uint8))
    store = tmp_path / "store"
    ingest(src, store, progress=False)
    old = CellStore(store, lease=False).manifest
    assert sorted(old["id"]) == ["x", "y"]
    write_manifest(store, old.replace({"id": {"x": "x.ome"}}))  # as an earlier cellst wrote it
    result = ingest(src, store, progress=False)
    assert sorted(CellStore(store, lease=False).manifest["id"]) == ["x", "y"]
    assert result.removed == ["x.ome"] and result.added == ["x"] and result.unchanged == ["y"]
    assert any("'x.ome' is now item 'x'" in w for w in result.warnings), result.warnings


def test_a_binary_mask_as_ground_truth_is_refused_naming_the_file(ray_session, tmp_path):
    """A 0/255 mask of several cells is one 'cell' to training: refused with the way out."""
    src = tmp_path / "src"
    lab = _challenge_pair(src / "labeled", "mask", ".png", 1)
    tifffile.imwrite(
        src / "labeled" / "labels" / "mask_label.tiff", ((lab > 0) * 255).astype(np.uint8)
    )
    with pytest.raises(
        IngestError, match=r"mask_label.tiff: label is a binary mask \(\d+ separate"
    ):
        ingest(src, tmp_path / "store", progress=False)
    assert not (tmp_path / "store" / "manifest.parquet").exists()


def test_images_one_folder_too_deep_are_named_not_silently_left_out(ray_session, tmp_path):
    src = tmp_path / "src"
    _challenge_pair(src / "Training-labeled", "cell_00001", ".png", 1)
    deep = src / "train-unlabeled-part1" / "release-part1"
    deep.mkdir(parents=True)
    for i in range(2):
        iio.imwrite(deep / f"unlabeled_{i}.png", np.full((64, 64), 7, np.uint8))
    result = ingest(src, tmp_path / "store", progress=False)
    assert result.added == ["cell_00001"]
    assert [w.split(": ")[:2] for w in result.warnings] == [[str(deep), "2 image(s) not ingested"]]


def test_folders_named_like_files_are_named_not_silently_passed_over(ray_session, tmp_path):
    """``a.png/``, ``X_label.tiff/`` and ``modalities.csv/`` as folders (an unzip gone
    wrong): the image's label and the modality table were left out unsaid."""
    src = tmp_path / "src"
    _challenge_pair(src / "labeled", "cell_1", ".png", 1)
    iio.imwrite(src / "labeled" / "images" / "cell_3.png", np.full((64, 64), 7, np.uint8))
    odd = [
        src / "labeled" / "images" / "cell_2.png",
        src / "labeled" / "labels" / "cell_3_label.tiff",
        src / "modalities.csv",
    ]
    for folder in odd:
        folder.mkdir()
    with pytest.raises(IngestError) as exc:  # the missing label says where it went
        ingest(src, tmp_path / "store", progress=False)
    assert f"expected {odd[1]}, which is a folder, not a file" in str(exc.value)
    result = ingest(src, tmp_path / "store", skip_bad=True, progress=False)
    said = {w.split(": ")[0]: w for w in result.warnings}
    for folder in odd:
        assert "a folder named like a file" in said.get(str(folder), ""), result.warnings


def test_another_folder_or_a_missing_labels_folder_never_replaces_stored_items_unasked(
    ray_session, tmp_path
):
    """A second plate with the first one's names, or the first plate again without its
    labels/ folder, was ingested as "updated", losing the stored images or labels; both are
    refused naming the item (``--skip-bad`` keeps the stored ones), ``replace`` allows
    them, and the same plate in a moved folder, an image edited there, is no replacement."""
    store = tmp_path / "store"
    plate1 = {n: _challenge_pair(tmp_path / "plate1", n, ".png", s)
              for s, n in enumerate(["a", "b"])}  # fmt: skip
    _challenge_pair(tmp_path / "plate2", "a", ".png", 7)
    ingest(tmp_path / "plate1", store, progress=False)
    with pytest.raises(IngestError, match=r"item 'a' of the store is another image .*--replace"):
        ingest(tmp_path / "plate2", store, progress=False)
    res = ingest(tmp_path / "plate2", store, skip_bad=True, progress=False)
    assert res.kept == ["a"] and not res.updated
    assert np.array_equal(CellStore(store).label("a") > 0, plate1["a"] > 0)
    # the first plate, its labels/ folder left behind
    unlabelled = tmp_path / "copy"
    shutil.copytree(tmp_path / "plate1" / "images", unlabelled)
    with pytest.raises(IngestError, match=r"item 'b' is labelled in the store .*unlabel it"):
        ingest(unlabelled, store, progress=False)
    assert CellStore(store).row("b").label_array
    # the plate in a moved folder, one image edited there: an update, nothing refused (the
    # unchanged image shows the folder moved)
    shutil.copytree(tmp_path / "plate1", tmp_path / "moved")
    edited = tmp_path / "moved" / "images" / "b.png"
    iio.imwrite(edited, (iio.imread(edited) // 2).astype(np.uint8))
    moved = ingest(tmp_path / "moved", store, progress=False)
    assert sorted(moved.updated) == ["a", "b"]
    assert CellStore(store).row("a").source_path == str(tmp_path / "moved/images/a.png")
    # asked for: the second plate replaces the first
    assert ingest(tmp_path / "plate2", store, replace=True, progress=False).updated == ["a"]
    assert CellStore(store).row("a").source_path == str(tmp_path / "plate2/images/a.png")


def test_an_image_renamed_into_the_test_split_is_refused_as_shared_with_training(
    ray_session, tmp_path
):
    """An image renamed from labeled/ into test/ left its old item in the store, so one
    image was both training and test data; it is refused naming both items and that the
    old file is gone, and the kept items whose files are gone are warned about."""
    src = tmp_path / "src"
    _challenge_pair(src / "labeled", "a", ".png", 1)
    _challenge_pair(src / "labeled", "b", ".png", 2)
    _challenge_pair(src / "test", "c", ".png", 3)
    store = tmp_path / "store"
    ingest(src, store, progress=False)
    for kind, name in (("images", "{}.png"), ("labels", "{}_label.tiff")):
        (src / "labeled" / kind / name.format("a")).rename(src / "test" / kind / name.format("t"))
    with pytest.raises(
        IngestError, match=r"test item 't' is the same image as labeled item 'a' .*gone"
    ):
        ingest(src, store, progress=False)
    assert "t" not in CellStore(store)
    res = ingest(src, store, skip_bad=True, progress=False)
    assert "t" not in CellStore(store) and [Path(p).name for p, _ in res.skipped] == ["t.png"]
    assert any("whose image file is gone are kept (a: " in w for w in res.warnings)
    # --prune drops the stale item, and the renamed image is a test item
    res = ingest(src, store, prune=True, progress=False)
    assert res.removed == ["a"] and CellStore(store).ids("test") == ["c", "t"]


def test_a_reingest_stages_again_an_item_whose_arrays_are_gone(ray_session, tmp_path):
    """An array deleted from the store by hand: a re-ingest called its item unchanged and
    kept naming the missing array; it now stages it again from its file, and says so."""
    lab = _challenge_pair(tmp_path / "src" / "labeled", "a", ".png", 1)
    _challenge_pair(tmp_path / "src" / "labeled", "b", ".png", 2)
    store = tmp_path / "store"
    ingest(tmp_path / "src", store, progress=False)
    row = CellStore(store).row("a")
    shutil.rmtree(store / row.image_array)
    shutil.rmtree(store / row.label_array)
    res = ingest(tmp_path / "src", store, progress=False)
    assert res.updated == ["a"] and res.unchanged == ["b"]
    assert any(
        "missing from the store were staged again from their files (a)" in w for w in res.warnings
    )
    s = CellStore(store)
    assert s.image("a").shape[:2] == (64, 64)
    assert np.array_equal(s.label("a") > 0, lab > 0)
