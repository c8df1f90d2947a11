"""Benchmark: challenge F1 of one 2048 x 2048 image with ~2,400 cells.

Compares :func:`cellst.metrics.image_scores` with the straightforward port of the official
evaluation script (``tests/reference_metric.py``: per-pixel overlap accumulation, dense IoU
matrix, linear sum assignment, per-label boundary removal). Both must give the same F1.
Prints the best-of-3 times, their ratio and whether the 0.2 s target is met; exits 1 when the
two disagree. ``--smoke`` runs the same comparison on a 512 x 512 image with ~150 cells (seconds,
for CI; the target is not checked there). Run:

    .venv/bin/python benchmarks/bench_metric.py [--smoke]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import reference_metric as ref  # noqa: E402
from cellst.metrics import image_scores  # noqa: E402

SIZE = 2048
N_CELLS = 2400
SMOKE_SIZE, SMOKE_CELLS = 512, 150
TARGET_S = 0.2
REPEATS = 3


def make_gt(rng: np.random.Generator, size: int = SIZE, n_cells: int = N_CELLS) -> np.ndarray:
    """Voronoi cells of random seeds, cut to disks of random radius around their seed."""
    seeds = rng.integers(0, size, (n_cells, 2))
    markers = np.zeros((size, size), dtype=np.int32)
    markers[seeds[:, 0], seeds[:, 1]] = np.arange(1, n_cells + 1)
    dist, (ri, ci) = ndi.distance_transform_edt(markers == 0, return_indices=True)
    gt = markers[ri, ci]
    radius = rng.uniform(8, 20, n_cells + 1)
    gt[dist > radius[gt]] = 0
    return gt


def make_pred(rng: np.random.Generator, gt: np.ndarray) -> np.ndarray:
    """gt with a smooth random displacement, eroded boundaries, merges, splits, relabelled."""
    n, size = int(gt.max()), gt.shape[0]
    # smooth displacement field of up to ~3 px
    coarse = rng.normal(0, 1.5, (2, 17, 17))
    field = [ndi.zoom(c, size / 17, order=1)[:size, :size] for c in coarse]
    rr, cc = np.mgrid[:size, :size]
    r = np.clip(np.rint(rr + field[0]), 0, size - 1).astype(np.intp)
    c = np.clip(np.rint(cc + field[1]), 0, size - 1).astype(np.intp)
    pred = gt[r, c].astype(np.int64)
    # erode 30% of the cells by one pixel
    eroded = rng.random(n + 1) < 0.3
    edge = np.zeros(pred.shape, dtype=bool)
    edge[1:] |= pred[1:] != pred[:-1]
    edge[:-1] |= pred[:-1] != pred[1:]
    edge[:, 1:] |= pred[:, 1:] != pred[:, :-1]
    edge[:, :-1] |= pred[:, :-1] != pred[:, 1:]
    pred[edge & eroded[pred]] = 0
    # merge ~3% of touching pairs
    a, b = pred[:, :-1].ravel(), pred[:, 1:].ravel()
    touching = np.unique(np.stack([a, b])[:, (a > 0) & (b > 0) & (a != b)], axis=1)
    pick = touching[:, rng.random(touching.shape[1]) < 0.03]
    lut = np.arange(n + 1)
    lut[pick[1]] = pick[0]
    pred = lut[pred]
    # split 5% of the cells along a random direction through their centroid
    split = rng.random(n + 1) < 0.05
    split[0] = False
    counts = np.maximum(np.bincount(pred.ravel(), minlength=n + 1), 1)
    cy = np.bincount(pred.ravel(), rr.ravel(), minlength=n + 1) / counts
    cx = np.bincount(pred.ravel(), cc.ravel(), minlength=n + 1) / counts
    theta = rng.uniform(0, np.pi, n + 1)
    side = (rr - cy[pred]) * np.cos(theta[pred]) + (cc - cx[pred]) * np.sin(theta[pred]) > 0
    pred = np.where(split[pred] & side, pred + n, pred)
    # random non-sequential labels
    perm = np.zeros(2 * n + 1, dtype=np.int32)
    perm[1:] = rng.choice(np.arange(1, 10 * n), size=2 * n, replace=False)
    return perm[pred]


def best_of(fn, repeats: int = REPEATS) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (seconds), for CI")
    args = ap.parse_args(argv)
    size, n_cells = (SMOKE_SIZE, SMOKE_CELLS) if args.smoke else (SIZE, N_CELLS)
    rng = np.random.default_rng(2022)
    gt = make_gt(rng, size, n_cells)
    pred = make_pred(rng, gt)
    n_gt = np.unique(gt).size - 1
    n_pred = np.unique(pred).size - 1
    print(f"image {size}x{size}: {n_gt} gt cells, {n_pred} predicted cells")

    t_fast, fast = best_of(lambda: image_scores(gt, pred))
    t_ref, want = best_of(lambda: ref.compute_image_metrics(gt.copy(), pred.copy()))
    print(f"cellst.metrics.image_scores : {t_fast * 1000:8.1f} ms (best of {REPEATS})")
    print(f"reference port (official)   : {t_ref * 1000:8.1f} ms (best of {REPEATS})")
    print(f"speed-up                    : {t_ref / t_fast:8.1f}x")
    verdict = (
        "not checked (smoke sizes)" if args.smoke else "met" if t_fast <= TARGET_S else "NOT met"
    )
    print(f"target {TARGET_S:.1f} s                : {verdict}")
    same = (fast["tp"], fast["n_gt"], fast["n_pred"]) == (
        want["tp"],
        want["true_num"],
        want["pred_num"],
    ) and abs(fast["f1"] - want["f1"]) <= 1e-12
    print(
        f"F1 cellst {fast['f1']:.6f} (tp {fast['tp']}, gt {fast['n_gt']}, pred {fast['n_pred']}) "
        f"| reference {want['f1']:.6f} (tp {want['tp']}) | {'same' if same else 'DIFFERENT'}"
    )
    print(f"PQ {fast['pq']:.6f} (DQ {fast['dq']:.6f} x SQ {fast['sq']:.6f})")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
