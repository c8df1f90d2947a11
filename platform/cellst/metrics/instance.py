"""Instance-segmentation scores of the NeurIPS 2022 Cell Segmentation challenge, vectorized.

The challenge ranks submissions by the mean over images of the per-image F1 score at
IoU >= 0.5, as computed by the official ``baseline/compute_metric.py`` of the
JunMa11/NeurIPS-CellSeg repository (adapted from StarDist's ``matching.py``). This module
reproduces that computation exactly and fast:

* cells touching the 2-pixel image border are dropped from both masks (unless
  ``count_boundary=True``) and the remaining labels are made sequential;
* the number of instances of a mask is the number of distinct non-zero labels (the official
  script takes ``np.max`` of the sequentially relabelled mask, which is the same number);
* IoU of every overlapping pair is ``overlap / (n_pred + n_true - overlap)`` in float64, the
  same expression as the official one, so comparisons with the threshold are bit-identical;
* the official script counts true positives with a linear sum assignment on the cost
  ``-(iou >= th) - iou / (2 * n_min)``. The tie-break term sums to at most 0.5 over any
  assignment, so the assignment maximises the number of pairs with IoU >= th: the true
  positives are the size of a maximum-cardinality matching in the sparse bipartite graph whose
  edges are the pairs with IoU >= th, which is what we compute (Hopcroft-Karp);
* ``F1 = 2 P R / (P + R)`` with ``P = TP / n_pred`` and ``R = TP / n_gt``; all three are 0 when
  ``TP == 0`` (also when the ground truth is empty);
* images of 25 Mpx or more are scored patch-wise on a grid of 2000 x 2000 patches (the image is
  zero-padded to a multiple of 2000, the border removal applies to each patch), summing the
  counts of all patches, as the official script does for the challenge's whole-slide images.

Panoptic-quality terms are provided as well: ``DQ = TP / (TP + FP / 2 + FN / 2)`` (equal to
F1), ``SQ`` the mean IoU of the matched pairs (0 when none) and ``PQ = DQ * SQ``. For
``iou_threshold >= 0.5`` SQ does not depend on which maximum matching is chosen: a pair with
IoU > 0.5 shares neither of its cells with any other pair of IoU >= 0.5, so only pairs of IoU
exactly 0.5 can compete, and they all have the same IoU. Below 0.5 the matched IoUs are those of
one maximum-cardinality matching, which need not be the one the official assignment picks.

Two knowing departures from the official script, neither of which changes precision, recall
or F1: when the prediction is empty the official script reports ``fp = fn = 0``, here
``fn = n_gt`` (and symmetrically the counts are always ``fp = n_pred - tp``,
``fn = n_gt - tp``); in the patch path the official script pads the prediction with the ground
truth's dtype (which can wrap large prediction labels) and fails with ``NameError`` when
boundary cells are counted, here neither happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

__all__ = [
    "BOUNDARY_WIDTH",
    "LARGE_IMAGE_PIXELS",
    "PATCH_SIZE",
    "MatchResult",
    "image_scores",
    "match_instances",
    "remove_boundary_cells",
    "summarize",
]

#: Images with at least this many pixels are scored patch-wise (official: ``>= 25_000_000``).
LARGE_IMAGE_PIXELS = 25_000_000
#: Side of the square patches of the large-image path (official ``roi_size``).
PATCH_SIZE = 2000
#: Cells with a pixel this close to the image border are ignored unless counted explicitly.
BOUNDARY_WIDTH = 2

#: Score keys averaged by :func:`summarize`.
SCORE_KEYS = ("f1", "precision", "recall", "dq", "sq", "pq")


@dataclass(frozen=True)
class MatchResult:
    """One-to-one matching of ground-truth and predicted instances at an IoU threshold.

    Attributes
    ----------
    tp, fp, fn : int
        Matched pairs, unmatched predictions (``n_pred - tp``), unmatched ground-truth cells
        (``n_gt - tp``).
    n_gt, n_pred : int
        Number of distinct non-zero labels in the ground truth and in the prediction.
    ious : np.ndarray
        float64 IoU of each matched pair, shape ``(tp,)``.
    gt_labels, pred_labels : np.ndarray
        Labels (as given in the input masks) of the matched pairs, shape ``(tp,)``.
    """

    tp: int
    fp: int
    fn: int
    n_gt: int
    n_pred: int
    ious: np.ndarray = field(repr=False)
    gt_labels: np.ndarray = field(repr=False)
    pred_labels: np.ndarray = field(repr=False)

    @property
    def precision(self) -> float:
        """``tp / n_pred``, 0 when there is no true positive."""
        return self.tp / self.n_pred if self.tp else 0.0

    @property
    def recall(self) -> float:
        """``tp / n_gt``, 0 when there is no true positive."""
        return self.tp / self.n_gt if self.tp else 0.0

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall, 0 when there is no true positive."""
        return _f1(self.tp, self.n_gt, self.n_pred)


# --------------------------------------------------------------------------- helpers


def _as_labels(mask: Any, name: str) -> np.ndarray:
    """Validate a label image: integer (or bool, or integral float), non-negative."""
    arr = np.asarray(mask)
    if arr.dtype == bool:
        return arr.view(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
            raise TypeError(f"{name}: label image of dtype {arr.dtype} has non-integer values")
        arr = arr.astype(np.int64)
    elif not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name}: label image must have an integer dtype, got {arr.dtype}")
    if arr.size == 0:
        return arr
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise ValueError(f"{name}: label image has negative labels")
    if arr.dtype == np.uint64:
        if int(arr.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"{name}: labels must fit in int64")
        arr = arr.astype(np.int64)
    return arr


def _border_labels(mask: np.ndarray, width: int) -> np.ndarray:
    """Labels with a pixel in the outer ``width`` rows/columns (0 included if present)."""
    if width <= 0 or mask.size == 0:
        return np.zeros(0, dtype=np.int64)
    strips = [mask[:width].ravel(), mask[-width:].ravel()]
    strips += [mask[:, :width].ravel(), mask[:, -width:].ravel()]
    return np.unique(np.concatenate(strips))


def _compact(
    mask: np.ndarray, drop: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relabel ``mask`` to ``0..n`` in increasing label order, dropping the labels ``drop``.

    Returns the relabelled int32 (int64 beyond 2**31 - 1 labels) array, the original label
    of each new label ``1..n`` and its pixel count.
    """
    flat = mask.ravel()
    if flat.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return np.zeros(mask.shape, dtype=np.int32), empty, empty
    max_label = int(flat.max())
    if max_label <= 2 * flat.size + 65536:
        # dense lookup table over label values
        counts = np.bincount(flat, minlength=max_label + 1)
        keep = counts > 0
        keep[0] = False
        if drop is not None and drop.size:
            keep[drop] = False
        labels = np.flatnonzero(keep)
        lut_dtype = np.int32 if labels.size < 2**31 else np.int64
        lut = np.zeros(max_label + 1, dtype=lut_dtype)
        lut[labels] = np.arange(1, labels.size + 1, dtype=lut_dtype)
        return lut[mask], labels, counts[labels]
    # huge label values: sort-based
    values, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    keep = values != 0
    if drop is not None and drop.size:
        keep &= ~np.isin(values, drop)
    n_kept = int(keep.sum())
    lut_dtype = np.int32 if n_kept < 2**31 else np.int64
    lut = np.zeros(values.size, dtype=lut_dtype)
    lut[keep] = np.arange(1, n_kept + 1, dtype=lut_dtype)
    return lut[inverse].reshape(mask.shape), values[keep].astype(np.int64), counts[keep]


def _f1(tp: int, n_gt: int, n_pred: int) -> float:
    """Official F1 (same float operations): 0 if ``tp == 0``."""
    if tp == 0:
        return 0.0
    precision = tp / n_pred
    recall = tp / n_gt
    return 2 * (precision * recall) / (precision + recall)


def _check_threshold(iou_threshold: float) -> float:
    th = float(iou_threshold)
    if not 0.0 < th <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    return th


def _match_compact(
    gt: np.ndarray,
    gt_sizes: np.ndarray,
    pred: np.ndarray,
    pred_sizes: np.ndarray,
    th: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximum matching of IoU >= th pairs between two compact (``0..n``) label images.

    Returns the 0-based gt and pred indices of the matched pairs and their IoUs.
    """
    n_gt, n_pred = gt_sizes.size, pred_sizes.size
    none = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
    if n_gt == 0 or n_pred == 0:
        return none
    g = gt.ravel()
    p = pred.ravel()
    stride = n_pred + 1
    n_bins = (n_gt + 1) * stride
    if n_bins <= 2 * g.size + 65536:
        # dense overlap table, background row/column sliced off
        key_dtype = np.intp if n_bins >= 2**31 else np.int32
        key = g.astype(key_dtype)
        key *= stride
        key += p
        table = np.bincount(key.ravel(), minlength=n_bins).reshape(n_gt + 1, stride)[1:, 1:]
        gi, pj = np.nonzero(table)
        overlap = table[gi, pj]
    else:
        # sparse: unique (gt, pred) pairs among the pixels labelled in both
        both = (g > 0) & (p > 0)
        key = g[both].astype(np.int64) * stride + p[both]
        pairs, overlap = np.unique(key, return_counts=True)
        gi = pairs // stride - 1
        pj = pairs % stride - 1
    overlap = overlap.astype(np.int64)
    # same expression as the official _intersection_over_union (exact integers, one division)
    iou = overlap / (pred_sizes[pj].astype(np.int64) + gt_sizes[gi] - overlap)
    edge = iou >= th
    gi, pj, iou = gi[edge], pj[edge], iou[edge]
    if gi.size == 0:
        return none
    if np.unique(gi).size == gi.size and np.unique(pj).size == pj.size:
        return gi.astype(np.int64), pj.astype(np.int64), iou  # already a matching
    graph = csr_matrix((np.ones(gi.size, np.int8), (gi, pj)), shape=(n_gt, n_pred))
    match = maximum_bipartite_matching(graph, perm_type="column")
    rows = np.flatnonzero(match >= 0)
    cols = match[rows].astype(np.int64)
    # look the IoU of each matched pair up among the edges
    edge_keys = gi.astype(np.int64) * n_pred + pj
    order = np.argsort(edge_keys, kind="stable")
    pos = np.searchsorted(edge_keys[order], rows * n_pred + cols)
    return rows.astype(np.int64), cols, iou[order[pos]]


def _match_region(
    gt: np.ndarray, pred: np.ndarray, count_boundary: bool, th: float
) -> tuple[int, int, int, np.ndarray]:
    """Boundary removal, relabelling and matching of one image (or patch).

    Returns ``(tp, n_gt, n_pred, matched_ious)``.
    """
    drop_gt = None if count_boundary else _border_labels(gt, BOUNDARY_WIDTH)
    drop_pred = None if count_boundary else _border_labels(pred, BOUNDARY_WIDTH)
    g, _, g_sizes = _compact(gt, drop_gt)
    p, _, p_sizes = _compact(pred, drop_pred)
    gi, _, ious = _match_compact(g, g_sizes, p, p_sizes, th)
    return int(gi.size), int(g_sizes.size), int(p_sizes.size), ious


def _patch(mask: np.ndarray, i: int, j: int, size: int) -> np.ndarray:
    """Patch ``(i, j)`` of the grid of ``size`` patches, zero-padded to ``size x size``."""
    part = mask[i * size : (i + 1) * size, j * size : (j + 1) * size]
    if part.shape == (size, size):
        return part
    out = np.zeros((size, size), dtype=mask.dtype)
    out[: part.shape[0], : part.shape[1]] = part
    return out


# --------------------------------------------------------------------------- public API


def remove_boundary_cells(mask: np.ndarray, width: int = BOUNDARY_WIDTH) -> np.ndarray:
    """Remove the cells touching the image border and relabel the rest sequentially.

    Vectorized equivalent of the official ``remove_boundary_cells`` followed by
    ``skimage.segmentation.relabel_sequential``.

    Parameters
    ----------
    mask : np.ndarray
        2-D label image, 0 = background. Not modified.
    width : int, optional
        Cells with any pixel in the outer ``width`` rows or columns are removed (official: 2).

    Returns
    -------
    np.ndarray
        int32 label image with labels ``1..n`` in the order of the original labels.
    """
    labels = _as_labels(mask, "mask")
    if labels.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {labels.shape}")
    out, _, _ = _compact(labels, _border_labels(labels, int(width)))
    return out.astype(np.int32, copy=False)


def match_instances(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> MatchResult:
    """Match ground-truth and predicted instances one-to-one at IoU >= ``iou_threshold``.

    The number of matched pairs is the number of true positives of the official challenge
    script (a maximum-cardinality matching among the pairs with IoU >= threshold, which is what
    its linear sum assignment maximises). No border removal is done here.

    Parameters
    ----------
    gt, pred : np.ndarray
        Label images of the same shape (any dimension); 0 = background. Labels need not be
        sequential and may be any non-negative integers.
    iou_threshold : float, optional
        Minimum IoU of a matched pair, in (0, 1].

    Returns
    -------
    MatchResult
        Counts, matched IoUs and the labels of the matched pairs.
    """
    th = _check_threshold(iou_threshold)
    g = _as_labels(gt, "gt")
    p = _as_labels(pred, "pred")
    if g.shape != p.shape:
        raise ValueError(f"gt shape {g.shape} differs from pred shape {p.shape}")
    gc, g_labels, g_sizes = _compact(g)
    pc, p_labels, p_sizes = _compact(p)
    gi, pj, ious = _match_compact(gc, g_sizes, pc, p_sizes, th)
    tp, n_gt, n_pred = int(gi.size), int(g_sizes.size), int(p_sizes.size)
    return MatchResult(
        tp=tp,
        fp=n_pred - tp,
        fn=n_gt - tp,
        n_gt=n_gt,
        n_pred=n_pred,
        ious=ious,
        gt_labels=g_labels[gi],
        pred_labels=p_labels[pj],
    )


def cell_matches(
    gt: np.ndarray,
    pred: np.ndarray,
    count_boundary: bool = False,
    iou_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Per-cell match results of one image: which predicted cell each ground-truth cell got.

    One row per ground-truth cell (``gt_label``, its matched ``pred_label`` or 0, ``iou`` of
    the pair or 0.0, ``matched``) and one per unmatched predicted cell (``gt_label`` 0).
    Cells touching the 2-pixel border are left out unless ``count_boundary``, as in
    :func:`image_scores`. Labels are the files' own ids. The matching is
    :func:`match_instances` on the whole image (the
    per-image scores of images of :data:`LARGE_IMAGE_PIXELS` or more are patch-wise).
    """
    g = _as_labels(gt, "gt")
    p = _as_labels(pred, "pred")
    if g.shape != p.shape:
        raise ValueError(f"gt shape {g.shape} differs from pred shape {p.shape}")
    if not count_boundary:  # drop border cells, keeping the files' own label ids
        g = np.where(np.isin(g, _border_labels(g, BOUNDARY_WIDTH)), 0, g)
        p = np.where(np.isin(p, _border_labels(p, BOUNDARY_WIDTH)), 0, p)
    m = match_instances(g, p, iou_threshold)
    pairs = {
        int(a): (int(b), float(iou))
        for a, b, iou in zip(m.gt_labels, m.pred_labels, m.ious, strict=True)
    }
    rows = []
    for gid in np.unique(g[g > 0]).tolist():
        pid, iou = pairs.get(gid, (0, 0.0))
        rows.append({"gt_label": gid, "pred_label": pid, "iou": iou, "matched": pid != 0})
    matched_pred = {b for b, _ in pairs.values()}
    for pid in np.unique(p[p > 0]).tolist():
        if pid not in matched_pred:
            rows.append({"gt_label": 0, "pred_label": pid, "iou": 0.0, "matched": False})
    return rows


def image_scores(
    gt: np.ndarray,
    pred: np.ndarray,
    count_boundary: bool = False,
    iou_threshold: float = 0.5,
) -> dict[str, float | int]:
    """Challenge scores of one image, as the official evaluation script computes them.

    Parameters
    ----------
    gt, pred : np.ndarray
        2-D label images of the same shape; 0 = background.
    count_boundary : bool, optional
        Keep the cells touching the 2-pixel image border (official ``--count_bd_cells``).
        By default they are removed from both masks.
    iou_threshold : float, optional
        IoU a predicted cell needs with a ground-truth cell to be a true positive.

    Returns
    -------
    dict
        ``precision``, ``recall``, ``f1``, ``dq``, ``sq``, ``pq`` (float) and ``tp``, ``fp``,
        ``fn``, ``n_gt``, ``n_pred`` (int). Images of :data:`LARGE_IMAGE_PIXELS` pixels or more
        are scored patch-wise (:data:`PATCH_SIZE`), summing the counts over patches.
    """
    th = _check_threshold(iou_threshold)
    g = _as_labels(gt, "gt")
    p = _as_labels(pred, "pred")
    if g.ndim != 2:
        raise ValueError(f"label images must be 2-D, got shape {g.shape}")
    if g.shape != p.shape:
        raise ValueError(f"gt shape {g.shape} differs from pred shape {p.shape}")
    if g.size < LARGE_IMAGE_PIXELS:
        tp, n_gt, n_pred, ious = _match_region(g, p, count_boundary, th)
    else:
        size = PATCH_SIZE
        n_rows = -(-g.shape[0] // size)
        n_cols = -(-g.shape[1] // size)
        tp = n_gt = n_pred = 0
        parts = []
        for i in range(n_rows):
            for j in range(n_cols):
                res = _match_region(
                    _patch(g, i, j, size), _patch(p, i, j, size), count_boundary, th
                )
                tp += res[0]
                n_gt += res[1]
                n_pred += res[2]
                parts.append(res[3])
        ious = np.concatenate(parts)
    return _scores(tp, n_gt, n_pred, ious)


def _scores(tp: int, n_gt: int, n_pred: int, ious: np.ndarray) -> dict[str, float | int]:
    fp, fn = n_pred - tp, n_gt - tp
    f1 = _f1(tp, n_gt, n_pred)
    dq = tp / (tp + 0.5 * fp + 0.5 * fn) if tp else 0.0
    sq = float(ious.sum() / ious.size) if tp else 0.0
    return {
        "precision": tp / n_pred if tp else 0.0,
        "recall": tp / n_gt if tp else 0.0,
        "f1": f1,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "n_gt": n_gt,
        "n_pred": n_pred,
        "dq": dq,
        "sq": sq,
        "pq": dq * sq,
    }


def _block(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"count": len(rows)}
    for key in SCORE_KEYS:
        values = [float(r[key]) for r in rows]
        out[key] = float(np.mean(values)) if values else None
    f1s = [float(r["f1"]) for r in rows]
    out["f1_median"] = float(np.median(f1s)) if f1s else None
    return out


def summarize(rows: list[dict[str, Any]], by: str = "modality") -> dict[str, Any]:
    """Mean scores over images, overall and per group.

    Parameters
    ----------
    rows : list of dict
        Per-image rows as returned by :func:`image_scores`, optionally with a ``by`` key.
    by : str, optional
        Row key to group on; rows whose value is missing or None are only in the overall means.

    Returns
    -------
    dict
        ``count``, the means ``f1`` (the challenge score), ``precision``, ``recall``, ``dq``,
        ``sq``, ``pq``, the median ``f1_median`` (None for no rows), and ``per_<by>``: the same
        block for each group, keyed by the group's name as a string.
    """
    rows = list(rows)
    out = _block(rows)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        key = row.get(by)
        if key is not None:
            groups.setdefault(str(key), []).append(row)
    out[f"per_{by}"] = {key: _block(groups[key]) for key in sorted(groups)}
    return out
