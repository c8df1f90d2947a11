"""Tests for the synthetic multi-modality microscopy generator (cellst.data.synth)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy.ndimage import binary_fill_holes
from skimage.color import rgb2gray
from skimage.filters import gaussian, threshold_otsu
from skimage.measure import label as cc_label
from skimage.morphology import remove_small_objects

from cellst.data.synth import MODALITIES, image_extension, synth_image, synthesize_dataset

SPLITS = ("labeled", "unlabeled", "test")
PREFIX = {"labeled": "cell", "unlabeled": "unlabeled", "test": "test"}
N = {"labeled": 8, "unlabeled": 5, "test": 4}
SIZE = (64, 160)


def read_image(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        return tifffile.imread(path)
    with Image.open(path) as im:
        return np.asarray(im)


def read_split(root: Path, split: str) -> dict[str, Path]:
    return {p.stem: p for p in sorted((root / split / "images").iterdir())}


def instance_f1(gt: np.ndarray, pred: np.ndarray, thr: float = 0.5) -> float:
    """Instance F1 with one-to-one matches at IoU > thr (unique for thr >= 0.5)."""
    n_gt, n_pred = int(gt.max()), int(pred.max())
    if n_gt == 0 and n_pred == 0:
        return 1.0
    if n_gt == 0 or n_pred == 0:
        return 0.0
    both = (gt > 0) & (pred > 0)
    pairs = gt[both].astype(np.int64) * (n_pred + 1) + pred[both]
    uniq, inter = np.unique(pairs, return_counts=True)
    g, p = uniq // (n_pred + 1), uniq % (n_pred + 1)
    area_g = np.bincount(gt.ravel(), minlength=n_gt + 1)
    area_p = np.bincount(pred.ravel(), minlength=n_pred + 1)
    iou = inter / (area_g[g] + area_p[p] - inter)
    tp = int(np.count_nonzero(iou > thr))
    return 2.0 * tp / (n_gt + n_pred)


def otsu_baseline(image: np.ndarray, modality: str) -> np.ndarray:
    """Smooth, Otsu threshold with the modality's polarity, fill holes, connected components.

    Cells are bright in fluorescence, dark in brightfield and phase contrast; for DIC the
    relief magnitude ``|I - median|`` (smoothed) is thresholded.
    """
    img = rgb2gray(image) if image.ndim == 3 else image.astype(np.float64)
    if modality == "dic":
        img = gaussian(np.abs(img - np.median(img)), 2.0, preserve_range=True)
    else:
        img = gaussian(img, 1.0, preserve_range=True)
    fg = img > threshold_otsu(img)
    if modality in ("brightfield", "phase_contrast"):
        fg = ~fg
    fg = binary_fill_holes(fg)
    fg = remove_small_objects(fg, max_size=15)
    return cc_label(fg, connectivity=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "data"
    summary = synthesize_dataset(
        root, N["labeled"], N["unlabeled"], N["test"], seed=7, min_size=SIZE[0],
        max_size=SIZE[1], progress=False,
    )  # fmt: skip
    return root, summary


def test_layout_and_names(dataset):
    root, summary = dataset
    assert summary["out"] == str(root)
    assert summary["n_images"] == sum(N.values())
    for split in SPLITS:
        names = sorted(read_split(root, split))
        assert names == [f"{PREFIX[split]}_{i:05d}" for i in range(1, N[split] + 1)]
        assert summary["splits"][split]["n"] == N[split]
        labels_dir = root / split / "labels"
        if split == "unlabeled":
            assert not labels_dir.exists()
        else:
            assert sorted(p.name for p in labels_dir.iterdir()) == [
                f"{n}_label.tiff" for n in names
            ]
    params = json.loads((root / "synth.json").read_text())
    assert params["seed"] == 7 and params["n_labeled"] == N["labeled"]
    leftovers = [p for p in root.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []


def test_modalities_csv_covers_every_image(dataset):
    root, _ = dataset
    with open(root / "modalities.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["name", "modality"]
    table = dict(rows[1:])
    assert len(table) == len(rows) - 1
    stems = {s for split in SPLITS for s in read_split(root, split)}
    assert set(table) == stems
    assert set(table.values()) <= set(MODALITIES)
    for split in SPLITS:  # every split holds every modality (n >= 4)
        assert {table[s] for s in read_split(root, split)} == set(MODALITIES)


def test_dtypes_channels_and_shapes(dataset):
    root, _ = dataset
    with open(root / "modalities.csv", newline="") as fh:
        table = {r["name"]: r["modality"] for r in csv.DictReader(fh)}
    seen_ext = set()
    for split in SPLITS:
        for stem, path in read_split(root, split).items():
            img = read_image(path)
            mod = table[stem]
            ext = path.suffix.lower()
            seen_ext.add(ext)
            if mod == "fluorescence":
                assert ext == ".tif" and img.dtype == np.uint16 and img.ndim == 2
                assert 0 < img.max() < 65535
            elif mod == "brightfield":
                assert ext in (".png", ".jpg") and img.dtype == np.uint8
                assert img.ndim == 3 and img.shape[2] == 3
            elif mod == "phase_contrast":
                assert ext == ".bmp" and img.dtype == np.uint8 and img.ndim == 2
            else:
                assert ext in (".tiff", ".png") and img.dtype == np.uint16 and img.ndim == 2
            h, w = img.shape[:2]
            assert SIZE[0] <= h <= SIZE[1] and SIZE[0] <= w <= SIZE[1]
            if split != "unlabeled":
                lab = tifffile.imread(root / split / "labels" / f"{stem}_label.tiff")
                assert lab.dtype == np.int32 and lab.shape == (h, w)
                ids = np.unique(lab)
                n = int(lab.max())
                assert n > 0 and np.array_equal(ids, np.arange(n + 1))
    assert {".tif", ".png", ".bmp", ".tiff"} <= seen_ext


def test_file_formats_rotate():
    assert [image_extension("brightfield", k) for k in range(1, 11)].count(".jpg") == 2
    assert image_extension("dic", 3) == ".png" and image_extension("dic", 1) == ".tiff"
    assert image_extension("fluorescence", 5) == ".tif"
    assert image_extension("phase_contrast", 2) == ".bmp"


def _arrays(root: Path, split: str) -> dict[str, np.ndarray]:
    out = {}
    for stem, path in read_split(root, split).items():
        out[stem] = read_image(path)
        lab = root / split / "labels" / f"{stem}_label.tiff"
        if lab.exists():
            out[stem + "_label"] = tifffile.imread(lab)
    return out


def test_determinism_and_prefix_stability(tmp_path):
    kw = {"min_size": 48, "max_size": 96, "progress": False}
    a = synthesize_dataset(tmp_path / "a", 4, 2, 2, seed=3, **kw)
    synthesize_dataset(tmp_path / "b", 4, 2, 2, seed=3, **kw)
    synthesize_dataset(tmp_path / "c", 4, 2, 2, seed=4, **kw)
    synthesize_dataset(tmp_path / "d", 6, 3, 5, seed=3, **kw)
    assert a["splits"]["labeled"]["n"] == 4
    differs = False
    for split in SPLITS:
        ra, rb = _arrays(tmp_path / "a", split), _arrays(tmp_path / "b", split)
        rc, rd = _arrays(tmp_path / "c", split), _arrays(tmp_path / "d", split)
        assert ra.keys() == rb.keys() == rc.keys()
        for k in ra:
            assert np.array_equal(ra[k], rb[k]), k  # same seed: identical
            assert np.array_equal(ra[k], rd[k]), k  # more images: earlier ones unchanged
            differs |= ra[k].shape != rc[k].shape or not np.array_equal(ra[k], rc[k])
    assert differs  # a different seed gives different data


@pytest.mark.parametrize("modality", MODALITIES)
def test_synth_image_contract(modality):
    rng = np.random.default_rng(0)
    img, lab = synth_image(rng, modality, (96, 128), density=0.5, radius_range=(5, 12))
    assert img.shape[:2] == lab.shape == (96, 128)
    assert lab.dtype == np.int32
    n = int(lab.max())
    assert n > 0 and np.array_equal(np.unique(lab), np.arange(n + 1))
    assert np.bincount(lab.ravel())[1:].min() >= 15
    img2, lab2 = synth_image(np.random.default_rng(0), modality, (96, 128), 0.5, (5, 12))
    assert np.array_equal(img, img2) and np.array_equal(lab, lab2)


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        synth_image(np.random.default_rng(0), "xray", (64, 64))
    with pytest.raises(ValueError):
        synthesize_dataset(tmp_path, 1, 0, 0, modalities=("xray",), progress=False)


def _touching(lab: np.ndarray) -> bool:
    for a, b in ((lab[1:, :], lab[:-1, :]), (lab[:, 1:], lab[:, :-1])):
        if np.any((a > 0) & (b > 0) & (a != b)):
            return True
    return False


@pytest.mark.parametrize("modality", MODALITIES)
def test_dense_images_have_touching_cells(modality):
    rng = np.random.default_rng(11)
    _, lab = synth_image(rng, modality, (192, 192), density=0.8)
    assert _touching(lab)
    # each instance is one 4-connected piece
    assert int(cc_label(lab, background=0, connectivity=1).max()) == int(lab.max())


def test_otsu_baseline_is_learnable_but_not_trivial(tmp_path):
    root = tmp_path / "data"
    synthesize_dataset(root, 24, 0, 0, seed=0, min_size=128, max_size=256, progress=False)
    with open(root / "modalities.csv", newline="") as fh:
        table = {r["name"]: r["modality"] for r in csv.DictReader(fh)}
    per_mod: dict[str, list[float]] = {m: [] for m in MODALITIES}
    for stem, path in read_split(root, "labeled").items():
        gt = tifffile.imread(root / "labeled" / "labels" / f"{stem}_label.tiff")
        per_mod[table[stem]].append(instance_f1(gt, otsu_baseline(read_image(path), table[stem])))
    scores = [f for v in per_mod.values() for f in v]
    mean_f1 = float(np.mean(scores))
    detail = ", ".join(f"{m}={np.mean(v):.3f}" for m, v in per_mod.items())
    print(f"\nOtsu+CC baseline instance F1 (IoU>0.5): mean={mean_f1:.3f} ({detail})")
    assert 0.2 < mean_f1 < 0.9


def test_a_new_dataset_replaces_an_earlier_one_whole_and_a_users_folder_is_refused(tmp_path):
    """Synthesising a smaller dataset into the folder of a larger one kept the larger one's
    other images beside the new ones (and a modalities.csv naming only the new ones): two
    datasets mixed. The folder is replaced whole; a folder that is not one is refused."""
    from typer.testing import CliRunner

    from cellst.cli import app

    out = tmp_path / "data"
    kw = {"seed": 1, "min_size": 64, "max_size": 64, "progress": False}
    synthesize_dataset(out, 3, 2, 1, **kw)
    synthesize_dataset(out, 1, 0, 0, **kw)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "labeled/images/cell_00001.tif",
        "labeled/labels/cell_00001_label.tiff",
        "modalities.csv",
        "synth.json",
    ], files
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    res = CliRunner().invoke(app, ["synth", str(mine), "--n-labeled", "1", "--n-unlabeled", "0"])
    assert res.exit_code == 1 and "holds no synthetic dataset" in res.output, res.output
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_users_files_in_an_earlier_dataset_are_never_deleted(tmp_path):
    """Synthesising again into an earlier dataset's folder deleted everything in it, the
    user's own files too (notes, a folder of corrected labels, an image added by hand).
    Such a folder is refused in one line naming them, and nothing in it changes."""
    from typer.testing import CliRunner

    from cellst.cli import app

    out = tmp_path / "data"
    synthesize_dataset(out, 2, 0, 1, seed=1, min_size=64, max_size=64, progress=False)
    (out / "notes.txt").write_text("keep")
    shutil.copytree(out / "test" / "labels", out / "test" / "labels_corrected")
    shutil.copy(out / "labeled" / "images" / "cell_00001.tif", out / "labeled/images/mine.tif")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    args = ["synth", str(out), "--n-labeled", "1", "--n-unlabeled", "0", "--n-test", "0"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    line = res.output.strip()
    assert "\n" not in line and "holds files cellst synth did not write" in line, res.output
    assert "(labeled/images/mine.tif, notes.txt, test/labels_corrected)" in line
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
