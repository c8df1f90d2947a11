"""Tests of cellst.metrics against hand-made cases and the port of the official script."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import tifffile

import reference_metric as ref
from cellst.metrics import (
    evaluate_folders,
    evaluate_pairs,
    format_table,
    image_scores,
    load_label_folder,
    match_instances,
    remove_boundary_cells,
    summarize,
    write_report,
)
from cellst.metrics import instance as inst

# --------------------------------------------------------------------------- synthetic data


def squares(shape, boxes, dtype=np.int32, labels=None):
    """Label image with one rectangle (r0, c0, r1, c1) per label (later boxes overwrite)."""
    out = np.zeros(shape, dtype=dtype)
    labels = range(1, len(boxes) + 1) if labels is None else labels
    for lab, (r0, c0, r1, c1) in zip(labels, boxes, strict=True):
        out[r0:r1, c0:c1] = lab
    return out


def random_instances(rng, shape, n, rmin=3.0, rmax=9.0, dtype=np.int32):
    """Random jittered ellipses; later ones overwrite earlier ones (touching, cut cells)."""
    out = np.zeros(shape, dtype=dtype)
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    for lab in range(1, n + 1):
        cy, cx = rng.uniform(-4, shape[0] + 4), rng.uniform(-4, shape[1] + 4)
        a, b = rng.uniform(rmin, rmax, 2)
        t = rng.uniform(0, np.pi)
        y, x = rr - cy, cc - cx
        u = (x * np.cos(t) + y * np.sin(t)) / a
        v = (-x * np.sin(t) + y * np.cos(t)) / b
        jitter = rng.uniform(-0.15, 0.15, shape) if rng.random() < 0.5 else 0.0
        out[u * u + v * v + jitter <= 1.0] = lab
    return out


def perturb(rng, gt):
    """A plausible prediction: shift, erode/dilate, split, merge, drop, add and relabel cells."""
    shift = rng.integers(-1, 2, 2) * rng.integers(0, 4)
    pred = np.roll(gt, tuple(shift), axis=(0, 1)).astype(np.int64)
    labels = np.unique(pred)
    labels = labels[labels > 0]
    next_label = int(pred.max()) + 1
    for lab in labels:
        u = rng.random()
        cell = pred == lab
        if not cell.any():  # merged into another cell already
            continue
        if u < 0.1:  # drop
            pred[cell] = 0
        elif u < 0.2:  # split along a random line
            r, c = np.nonzero(cell)
            t = rng.uniform(0, np.pi)
            proj = r * np.cos(t) + c * np.sin(t)
            side = proj > np.quantile(proj, rng.uniform(0.3, 0.7))
            pred[r[side], c[side]] = next_label
            next_label += 1
        elif u < 0.3:  # merge with a neighbour (the label of a pixel just outside the cell)
            r, c = np.nonzero(cell)
            rr = np.clip(r + rng.integers(-2, 3), 0, gt.shape[0] - 1)
            cc = np.clip(c + rng.integers(-2, 3), 0, gt.shape[1] - 1)
            other = pred[rr, cc]
            other = other[(other > 0) & (other != lab)]
            if other.size:
                pred[pred == other[0]] = lab
        elif u < 0.4:  # erode: drop the pixels with a background 4-neighbour
            inner = cell.copy()
            inner[1:] &= cell[:-1]
            inner[:-1] &= cell[1:]
            inner[:, 1:] &= cell[:, :-1]
            inner[:, :-1] &= cell[:, 1:]
            pred[cell & ~inner] = 0
        elif u < 0.5:  # dilate into background
            grown = cell.copy()
            grown[1:] |= cell[:-1]
            grown[:-1] |= cell[1:]
            grown[:, 1:] |= cell[:, :-1]
            grown[:, :-1] |= cell[:, 1:]
            pred[grown & (pred == 0)] = lab
    for _ in range(rng.integers(0, 4)):  # false positives
        r, c = rng.integers(0, gt.shape[0] - 5), rng.integers(0, gt.shape[1] - 5)
        pred[r : r + rng.integers(2, 6), c : c + rng.integers(2, 6)] = next_label
        next_label += 1
    # random, non-sequential relabelling
    labels = np.unique(pred)
    labels = labels[labels > 0]
    new = rng.choice(np.arange(1, 60000), size=labels.size, replace=False)
    lut = np.zeros(int(pred.max()) + 1, dtype=np.int64)
    lut[labels] = new
    return lut[pred].astype(gt.dtype)


def assert_same_as_reference(gt, pred, **kwargs):
    count_boundary = kwargs.pop("count_boundary", False)
    th = kwargs.pop("iou_threshold", 0.5)
    got = image_scores(gt, pred, count_boundary=count_boundary, iou_threshold=th)
    want = ref.compute_image_metrics(
        gt.copy(), pred.copy(), threshold=th, count_bd_cells=count_boundary, **kwargs
    )
    assert got["tp"] == want["tp"]
    assert got["n_gt"] == want["true_num"]
    assert got["n_pred"] == want["pred_num"]
    for key in ("precision", "recall", "f1"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    return got


# --------------------------------------------------------------------------- hand-made cases


def test_perfect_prediction():
    gt = squares((64, 64), [(5, 5, 15, 15), (20, 20, 30, 35), (40, 10, 50, 20)])
    s = image_scores(gt, gt)
    assert (s["tp"], s["fp"], s["fn"], s["n_gt"], s["n_pred"]) == (3, 0, 0, 3, 3)
    assert s["f1"] == s["precision"] == s["recall"] == s["dq"] == 1.0
    assert s["sq"] == s["pq"] == 1.0


def test_shifted_cells_below_and_above_half_iou():
    gt = squares((64, 64), [(10, 10, 20, 20), (30, 30, 40, 40)])
    # first cell shifted by 2 columns: IoU 80 / 120 = 2/3; second by 4: IoU 60 / 140 < 0.5
    pred = squares((64, 64), [(10, 12, 20, 22), (30, 34, 40, 44)])
    s = image_scores(gt, pred)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 1)
    assert s["f1"] == pytest.approx(0.5)
    assert s["sq"] == pytest.approx(80 / 120)
    assert s["pq"] == pytest.approx(0.5 * 80 / 120)
    m = match_instances(gt, pred)
    assert m.tp == 1 and m.gt_labels.tolist() == [1] and m.pred_labels.tolist() == [1]
    assert_same_as_reference(gt, pred)


def test_split_cell_exact_half_iou_counts_once():
    gt = squares((64, 64), [(10, 10, 20, 30)])
    pred = squares((64, 64), [(10, 10, 20, 20), (10, 20, 20, 30)])  # IoU exactly 0.5 each
    s = assert_same_as_reference(gt, pred)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 0)
    assert s["precision"] == 0.5 and s["recall"] == 1.0 and s["sq"] == 0.5
    uneven = squares((64, 64), [(10, 10, 20, 22), (10, 22, 20, 30)])  # IoU 0.6 and 0.4
    s = assert_same_as_reference(gt, uneven)
    assert s["tp"] == 1 and s["sq"] == pytest.approx(0.6)


def test_merged_cells():
    gt = squares((64, 64), [(10, 10, 20, 20), (10, 20, 20, 30), (40, 40, 50, 50)])
    pred = squares((64, 64), [(10, 10, 20, 30), (40, 40, 50, 50)])
    s = assert_same_as_reference(gt, pred)
    assert (s["tp"], s["fp"], s["fn"], s["n_gt"], s["n_pred"]) == (2, 0, 1, 3, 2)
    pred2 = squares((64, 64), [(10, 10, 20, 32), (40, 40, 50, 50)])  # merged: IoUs 100/220
    s = assert_same_as_reference(gt, pred2)
    assert s["tp"] == 1


def test_empty_prediction_and_empty_ground_truth():
    gt = squares((64, 64), [(10, 10, 20, 20), (30, 30, 40, 40)])
    empty = np.zeros_like(gt)
    s = assert_same_as_reference(gt, empty)
    assert s["f1"] == 0.0 and s["tp"] == 0 and s["fn"] == 2 and s["fp"] == 0
    s = assert_same_as_reference(empty, gt)  # official: tp = 0, so F1 = 0
    assert s["f1"] == 0.0 and s["fp"] == 2 and s["n_gt"] == 0
    s = assert_same_as_reference(empty, empty)
    assert s["f1"] == s["sq"] == s["pq"] == 0.0 and s["n_gt"] == s["n_pred"] == 0


def test_boundary_cells_removed_unless_counted():
    # cell 1 touches row 1 (inside the 2-px border), cell 2 starts at row 2 (kept),
    # cell 3 touches the last column
    gt = squares((40, 40), [(1, 10, 8, 18), (2, 25, 9, 33), (20, 30, 28, 40)])
    pred = np.zeros_like(gt)
    pred[gt == 2] = 7
    s = assert_same_as_reference(gt, pred)
    assert (s["n_gt"], s["n_pred"], s["tp"], s["f1"]) == (1, 1, 1, 1.0)
    s = assert_same_as_reference(gt, pred, count_boundary=True)
    assert (s["n_gt"], s["n_pred"], s["tp"]) == (3, 1, 1)
    assert s["recall"] == pytest.approx(1 / 3)


def test_remove_boundary_cells_matches_official():
    rng = np.random.default_rng(1)
    for dtype in (np.uint8, np.uint16, np.int32, np.int64):
        mask = random_instances(rng, (50, 61), 25, dtype=dtype)
        before = mask.copy()
        out = remove_boundary_cells(mask)
        want = ref.remove_boundary_cells(mask.astype(np.int32))
        assert out.dtype == np.int32
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(mask, before)  # input untouched
    np.testing.assert_array_equal(remove_boundary_cells(np.ones((3, 3), int)), np.zeros((3, 3)))
    kept = remove_boundary_cells(squares((20, 20), [(0, 0, 3, 3), (8, 8, 10, 10)]), width=0)
    assert kept.max() == 2


def test_more_than_255_instances_int32():
    boxes = [
        (2 + 5 * (k // 20), 2 + 5 * (k % 20), 6 + 5 * (k // 20), 6 + 5 * (k % 20))
        for k in range(400)
    ]
    gt = squares((102, 102), boxes, dtype=np.int32)
    assert gt.max() == 400
    perm = np.random.default_rng(2).permutation(400) + 1000
    pred = squares((102, 102), boxes, dtype=np.int32, labels=perm)
    s = assert_same_as_reference(gt, pred, count_boundary=True)
    assert (s["tp"], s["n_gt"], s["n_pred"], s["f1"]) == (400, 400, 400, 1.0)
    s = assert_same_as_reference(gt, pred)  # last row/column of boxes reach the border
    assert s["f1"] == 1.0 and s["n_gt"] == 400 - 39
    m = match_instances(gt, pred)
    np.testing.assert_array_equal(m.pred_labels, perm[m.gt_labels - 1])


def test_non_sequential_and_huge_labels():
    boxes = [(5, 5, 15, 15), (20, 20, 30, 30), (35, 5, 45, 15)]
    gt = squares((50, 50), boxes, dtype=np.int64, labels=[5, 70_000, 2**31 - 1])
    pred = squares((50, 50), boxes, dtype=np.uint16, labels=[3, 1, 2])
    s = image_scores(gt, pred)
    assert (s["tp"], s["n_gt"], s["n_pred"], s["f1"]) == (3, 3, 3, 1.0)
    m = match_instances(gt, pred)
    assert sorted(zip(m.gt_labels.tolist(), m.pred_labels.tolist(), strict=True)) == [
        (5, 3),
        (70_000, 1),
        (2**31 - 1, 2),
    ]
    np.testing.assert_array_equal(m.ious, 1.0)
    relabelled = remove_boundary_cells(gt)
    assert relabelled.dtype == np.int32 and relabelled.max() == 3
    assert_same_as_reference(gt.astype(np.int32), pred.astype(np.int32))


def test_input_validation_and_dtypes():
    gt = squares((30, 30), [(5, 5, 15, 15)])
    with pytest.raises(ValueError, match="shape"):
        image_scores(gt, gt[:-1])
    with pytest.raises(ValueError, match="negative"):
        image_scores(gt, -gt)
    with pytest.raises(ValueError, match="iou_threshold"):
        image_scores(gt, gt, iou_threshold=0.0)
    with pytest.raises(TypeError):
        image_scores(gt, gt + 0.5)
    assert image_scores(gt > 0, gt.astype(np.float32))["f1"] == 1.0


def test_summarize_per_modality():
    rows = [
        {
            "f1": 1.0,
            "precision": 1.0,
            "recall": 1.0,
            "dq": 1.0,
            "sq": 0.8,
            "pq": 0.8,
            "modality": "a",
        },
        {
            "f1": 0.5,
            "precision": 0.4,
            "recall": 0.6,
            "dq": 0.5,
            "sq": 0.6,
            "pq": 0.3,
            "modality": "a",
        },
        {
            "f1": 0.0,
            "precision": 0.0,
            "recall": 0.0,
            "dq": 0.0,
            "sq": 0.0,
            "pq": 0.0,
            "modality": "b",
        },
        {"f1": 0.9, "precision": 0.9, "recall": 0.9, "dq": 0.9, "sq": 0.9, "pq": 0.81},
    ]
    out = summarize(rows)
    assert out["count"] == 4
    assert out["f1"] == pytest.approx(0.6)
    assert out["f1_median"] == pytest.approx(0.7)
    assert out["pq"] == pytest.approx((0.8 + 0.3 + 0.81) / 4)
    assert set(out["per_modality"]) == {"a", "b"}
    assert out["per_modality"]["a"]["count"] == 2
    assert out["per_modality"]["a"]["f1"] == pytest.approx(0.75)
    assert summarize([])["f1"] is None


# --------------------------------------------------------------------------- randomized oracle


@pytest.mark.parametrize("seed", range(30))
def test_random_pairs_match_reference(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(60, 160, 2))
    n = int(rng.integers(5, 120))
    dtype = [np.uint16, np.int32, np.uint32][seed % 3]
    gt = random_instances(rng, shape, n, rmin=2.0, rmax=float(rng.uniform(4, 12)), dtype=dtype)
    pred = perturb(rng, gt)
    th = [0.5, 0.5, 0.5, 0.3, 0.7, 0.15][seed % 6]
    count_boundary = seed % 4 == 1
    s = assert_same_as_reference(gt, pred, iou_threshold=th, count_boundary=count_boundary)
    assert s["fp"] == s["n_pred"] - s["tp"] and s["fn"] == s["n_gt"] - s["tp"]
    assert s["dq"] == pytest.approx(s["f1"])
    if s["tp"]:
        assert th <= s["sq"] <= 1.0


def test_many_tiny_cells_sparse_overlap_path():
    # (n_gt + 1) * (n_pred + 1) exceeds the dense-table limit for a 90 x 90 image
    rng = np.random.default_rng(7)
    gt = random_instances(rng, (90, 90), 700, rmin=0.8, rmax=2.5)
    pred = perturb(rng, gt)
    n_gt, n_pred = len(np.unique(gt)) - 1, len(np.unique(pred)) - 1
    assert (n_gt + 1) * (n_pred + 1) > 2 * gt.size + 65536
    assert_same_as_reference(gt, pred)
    assert_same_as_reference(gt, pred, iou_threshold=0.3, count_boundary=True)


@pytest.mark.parametrize("count_boundary", [False, True])
def test_large_image_patch_path(monkeypatch, count_boundary):
    rng = np.random.default_rng(11)
    gt = random_instances(rng, (150, 170), 90, rmin=3, rmax=8, dtype=np.int32)
    pred = perturb(rng, gt)
    monkeypatch.setattr(inst, "LARGE_IMAGE_PIXELS", 10_000)
    monkeypatch.setattr(inst, "PATCH_SIZE", 40)
    got = assert_same_as_reference(
        gt, pred, count_boundary=count_boundary, large_image_pixels=10_000, roi_size=40
    )
    monkeypatch.setattr(inst, "LARGE_IMAGE_PIXELS", 10**9)
    whole = image_scores(gt, pred, count_boundary=count_boundary)
    if not count_boundary:  # patch borders cut cells out: fewer cells than in one piece
        assert got["n_gt"] < whole["n_gt"]
    # exactly at the threshold the patch path is taken (official: small path if < threshold)
    monkeypatch.setattr(inst, "LARGE_IMAGE_PIXELS", gt.size)
    assert image_scores(gt, pred, count_boundary=count_boundary) == got


# --------------------------------------------------------------------------- folders and report


def _write(path, arr):
    tifffile.imwrite(path, arr)


def test_load_label_folder(tmp_path):
    for name in ["a_label.tiff", "b_label.tif", "c.tif", "d.tiff", "notes.txt", ".hidden.tif",
                 "e_label.PNG", "f.png"]:  # fmt: skip
        (tmp_path / name).write_bytes(b"")
    assert list(load_label_folder(tmp_path)) == ["a", "b", "c", "d", "e"]
    # an image beside its label (cellst segment's output): the plain TIFFs are images
    (tmp_path / "a.tif").write_bytes(b"")
    assert list(load_label_folder(tmp_path)) == ["a", "b", "e"]
    (tmp_path / "a_label.tif").write_bytes(b"")  # two labels of one name: which one?
    with pytest.raises(ValueError, match="'a'"):
        load_label_folder(tmp_path)
    with pytest.raises(NotADirectoryError):
        load_label_folder(tmp_path / "nope")
    # an OME-TIFF's ".ome" is not part of the name: its label, and cellst's older name of it
    ome = tmp_path / "ome"
    ome.mkdir()
    for name in ["x.ome.tif", "x_label.tiff", "y.ome_label.tiff", "z_label.ome.tif"]:
        (ome / name).write_bytes(b"")
    assert {k: v.name for k, v in load_label_folder(ome).items()} == {
        "x": "x_label.tiff",
        "y": "y.ome_label.tiff",
        "z": "z_label.ome.tif",
    }


def test_evaluate_folders_and_write_report(tmp_path):
    rng = np.random.default_rng(3)
    gt_dir, pred_dir, out_dir = tmp_path / "gt", tmp_path / "pred", tmp_path / "out"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gts = {name: random_instances(rng, (80, 90), 30, dtype=np.uint16) for name in "abc"}
    _write(gt_dir / "a_label.tiff", gts["a"])
    _write(gt_dir / "b_label.tiff", gts["b"])
    _write(gt_dir / "c.tif", gts["c"])
    _write(pred_dir / "a_label.tiff", gts["a"])  # perfect
    _write(pred_dir / "c_label.tiff", perturb(rng, gts["c"]))
    _write(pred_dir / "zzz_label.tiff", gts["c"])  # no ground truth
    report = evaluate_folders(gt_dir, pred_dir, modalities={"a": "brightfield", "c": "fluo"})

    assert [row["id"] for row in report["images"]] == ["a", "b", "c"]
    assert report["missing"] == ["b"] and report["extra"] == ["zzz"]
    rows = {row["id"]: row for row in report["images"]}
    assert rows["a"]["f1"] == 1.0 and rows["b"]["f1"] == 0.0 and rows["b"]["missing"]
    c_want = image_scores(gts["c"], tifffile.imread(pred_dir / "c_label.tiff"))
    assert rows["c"]["f1"] == c_want["f1"]
    assert report["f1"] == pytest.approx((1.0 + 0.0 + c_want["f1"]) / 3)
    assert set(report["per_modality"]) == {"brightfield", "fluo"}

    paths = write_report(report, out_dir)
    data = json.loads(paths["json"].read_text())
    for key in ("f1", "f1_median", "precision", "recall", "dq", "sq", "pq", "count"):
        assert key in data
    assert data["f1"] == pytest.approx(report["f1"])
    assert len(data["images"]) == 3 and data["per_modality"]["fluo"]["count"] == 1
    with open(paths["csv"], newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [r["id"] for r in csv_rows] == ["a", "b", "c"]
    assert float(csv_rows[2]["f1"]) == pytest.approx(c_want["f1"])
    assert csv_rows[1]["modality"] == "" and csv_rows[1]["missing"] == "True"
    assert sorted(p.name for p in out_dir.iterdir()) == ["metrics.csv", "metrics.json"]

    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=120).print(format_table(report))
    text = buf.getvalue()
    assert "brightfield" in text and "all" in text and "1 missing" in text


def test_evaluate_folders_shape_mismatch_names_file(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    _write(gt_dir / "img1_label.tiff", np.zeros((40, 50), np.uint16))
    _write(pred_dir / "img1_label.tiff", np.zeros((40, 51), np.uint16))
    with pytest.raises(ValueError, match=r"img1_label\.tiff.*\(40, 51\).*\(40, 50\)"):
        evaluate_folders(gt_dir, pred_dir)
    with pytest.raises(ValueError, match="no label images"):
        evaluate_folders(pred_dir / "..", pred_dir)


def test_evaluate_pairs_missing_and_mismatch():
    gt = squares((30, 30), [(5, 5, 15, 15)])
    report = evaluate_pairs([("x", gt, gt, "m"), ("y", gt, None, None)])
    assert report["missing"] == ["y"] and report["f1"] == 0.5
    assert report["per_modality"] == {"m": summarize([report["images"][0]])["per_modality"]["m"]}
    with pytest.raises(ValueError, match="'z'"):
        evaluate_pairs([("z", gt, gt[:, :-1], None)])
