"""Straightforward port of the NeurIPS 2022 Cell Segmentation challenge metric (the oracle).

This is a line-by-line port of the per-image computation in the official evaluation script,
``baseline/compute_metric.py`` of the JunMa11/NeurIPS-CellSeg repository (itself adapted from
StarDist's ``matching.py``), kept deliberately simple so that the tests can compare
:mod:`cellst.metrics.instance` against it. Differences from the original:

* ``_label_overlap`` uses ``np.add.at`` instead of a numba-jitted loop (same result);
* the per-image body of ``main()`` is the function :func:`compute_image_metrics`, with the
  large-image threshold and patch size as parameters so tests can exercise the patch path on
  small images;
* in the patch path with ``count_bd_cells=True`` the original raises ``NameError`` (``gt_roi``
  is only assigned inside ``if not args.count_bd_cells``); here the raw patch is used instead.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage import segmentation

LARGE_IMAGE_PIXELS = 25_000_000
ROI_SIZE = 2000


def _label_overlap(x, y):
    """Pixel overlaps between the masks in x and y, a ``[x.max()+1, y.max()+1]`` matrix."""
    x = x.ravel()
    y = y.ravel()
    overlap = np.zeros((1 + x.max(), 1 + y.max()), dtype=np.uint)
    np.add.at(overlap, (x, y), 1)
    return overlap


def _intersection_over_union(masks_true, masks_pred):
    """Intersection over union of all mask pairs (0 = background)."""
    overlap = _label_overlap(masks_true, masks_pred)
    n_pixels_pred = np.sum(overlap, axis=0, keepdims=True)
    n_pixels_true = np.sum(overlap, axis=1, keepdims=True)
    iou = overlap / (n_pixels_pred + n_pixels_true - overlap)
    iou[np.isnan(iou)] = 0.0
    return iou


def _true_positive(iou, th):
    """Number of true positives at threshold th (optimal assignment)."""
    n_min = min(iou.shape[0], iou.shape[1])
    costs = -(iou >= th).astype(float) - iou / (2 * n_min)
    true_ind, pred_ind = linear_sum_assignment(costs)
    match_ok = iou[true_ind, pred_ind] >= th
    tp = match_ok.sum()
    return tp


def eval_tp_fp_fn(masks_true, masks_pred, threshold=0.5):
    num_inst_gt = np.max(masks_true)
    num_inst_seg = np.max(masks_pred)
    if num_inst_seg > 0:
        iou = _intersection_over_union(masks_true, masks_pred)[1:, 1:]
        tp = _true_positive(iou, threshold)
        fp = num_inst_seg - tp
        fn = num_inst_gt - tp
    else:
        tp = 0
        fp = 0
        fn = 0
    return tp, fp, fn


def remove_boundary_cells(mask):
    """We do not consider boundary cells during evaluation (modifies ``mask`` in place)."""
    W, H = mask.shape
    bd = np.ones((W, H))
    bd[2 : W - 2, 2 : H - 2] = 0
    bd_cells = np.unique(mask * bd)
    for i in bd_cells[1:]:
        mask[mask == i] = 0
    new_label, _, _ = segmentation.relabel_sequential(mask)
    return new_label


def compute_image_metrics(
    gt,
    seg,
    threshold=0.5,
    count_bd_cells=False,
    large_image_pixels=LARGE_IMAGE_PIXELS,
    roi_size=ROI_SIZE,
):
    """The per-image body of the official ``main()``: counts, precision, recall and F1."""
    gt = np.array(gt)
    seg = np.array(seg)
    if np.prod(gt.shape) < large_image_pixels:
        if not count_bd_cells:
            gt = remove_boundary_cells(gt.astype(np.int32))
            seg = remove_boundary_cells(seg.astype(np.int32))
        gt, _, _ = segmentation.relabel_sequential(gt)
        seg, _, _ = segmentation.relabel_sequential(seg)
        cell_true_num = np.max(gt)
        cell_pred_num = np.max(seg)
        tp, fp, fn = eval_tp_fp_fn(gt, seg, threshold=threshold)
    else:
        H, W = gt.shape
        if H % roi_size != 0:
            n_H = H // roi_size + 1
            new_H = roi_size * n_H
        else:
            n_H = H // roi_size
            new_H = H
        if W % roi_size != 0:
            n_W = W // roi_size + 1
            new_W = roi_size * n_W
        else:
            n_W = W // roi_size
            new_W = W
        gt_pad = np.zeros((new_H, new_W), dtype=gt.dtype)
        seg_pad = np.zeros((new_H, new_W), dtype=gt.dtype)
        gt_pad[:H, :W] = gt
        seg_pad[:H, :W] = seg
        tp = 0
        fp = 0
        fn = 0
        cell_true_num = 0
        cell_pred_num = 0
        for i in range(n_H):
            for j in range(n_W):
                gt_roi = gt_pad[
                    roi_size * i : roi_size * (i + 1), roi_size * j : roi_size * (j + 1)
                ]
                seg_roi = seg_pad[
                    roi_size * i : roi_size * (i + 1), roi_size * j : roi_size * (j + 1)
                ]
                if not count_bd_cells:
                    gt_roi = remove_boundary_cells(gt_roi)
                    seg_roi = remove_boundary_cells(seg_roi)
                gt_roi, _, _ = segmentation.relabel_sequential(gt_roi)
                seg_roi, _, _ = segmentation.relabel_sequential(seg_roi)
                cell_true_num += np.max(gt_roi)
                cell_pred_num += np.max(seg_roi)
                tp_i, fp_i, fn_i = eval_tp_fp_fn(gt_roi, seg_roi, threshold=threshold)
                tp += tp_i
                fp += fp_i
                fn += fn_i
    if tp == 0:
        precision = 0
        recall = 0
        f1 = 0
    else:
        precision = tp / cell_pred_num
        recall = tp / cell_true_num
        f1 = 2 * (precision * recall) / (precision + recall)
    return {
        "true_num": int(cell_true_num),
        "pred_num": int(cell_pred_num),
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }
