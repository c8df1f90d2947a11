"""Benchmark: HoVer-Net HV targets, cellst ``hover_maps`` vs MONAI ``ComputeHoVerMaps``.

Two cases: a whole 2048 x 2048 image with ~2,400 cells (MONAI run once: it rewrites the whole
map for every cell) and a 256 x 256 training crop with ~40 cells (the per-crop case inside the
training loop; also timed as ``make_targets`` of a batch of 8 crops). Prints times, the
speed-up and the max abs difference from MONAI; exits 1 when cellst and MONAI disagree.
``--smoke`` runs the same comparison at tiny sizes (a 256 x 256 image, 64 x 64 crops) in
seconds, for CI. Run:

    .venv/bin/python benchmarks/bench_targets.py [--smoke]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from monai.transforms import ComputeHoVerMaps
from scipy import ndimage as ndi

from cellst.model.targets import hover_maps, make_targets


def make_label(rng: np.random.Generator, size: int, n_cells: int) -> np.ndarray:
    """Voronoi cells of random seeds cut to disks of radius 8-20 (touching and isolated)."""
    seeds = rng.integers(0, size, (n_cells, 2))
    markers = np.zeros((size, size), dtype=np.int32)
    markers[seeds[:, 0], seeds[:, 1]] = np.arange(1, n_cells + 1)
    dist, (ri, ci) = ndi.distance_transform_edt(markers == 0, return_indices=True)
    label = markers[ri, ci]
    radius = rng.uniform(8, 20, n_cells + 1)
    label[dist > radius[label]] = 0
    return label


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


#: max abs difference from MONAI's maps that still counts as the same
TOLERANCE = 1e-5


def case(name: str, label: np.ndarray, monai_repeats: int, ours_repeats: int) -> bool:
    """Time both on ``label``, print one line; True when the maps agree."""
    n = len(np.unique(label)) - 1
    t_ref, ref = best_of(lambda: np.asarray(ComputeHoVerMaps()(label[None])), monai_repeats)
    t_ours, ours = best_of(lambda: hover_maps(label), ours_repeats)
    diff = float(np.abs(np.asarray(ours) - np.asarray(ref)).max())
    print(
        f"{name:>10s} {label.shape[0]}x{label.shape[1]}, {n:5d} cells: "
        f"MONAI {t_ref * 1e3:9.1f} ms | cellst {t_ours * 1e3:7.2f} ms | "
        f"speed-up {t_ref / t_ours:7.1f}x | max |diff| {diff:.1e}"
    )
    return diff <= TOLERANCE


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (seconds), for CI")
    args = ap.parse_args(argv)
    # (image side, cells), (crop side, cells), repeats of (image, crop, batch)
    image, crop = ((256, 40), (64, 4)) if args.smoke else ((2048, 2400), (256, 40))
    reps = (1, 2, 2) if args.smoke else (3, 20, 10)
    rng = np.random.default_rng(0)
    print(f"torch threads: {torch.get_num_threads()}")
    ok = case("image", make_label(rng, *image), monai_repeats=1, ours_repeats=reps[0])
    crops = [make_label(rng, *crop) for _ in range(8)]
    ok &= case("crop", crops[0], monai_repeats=2 if args.smoke else 5, ours_repeats=reps[1])
    batch = torch.from_numpy(np.stack(crops))
    t, _ = best_of(lambda: make_targets(batch), reps[2])
    print(f"make_targets of a batch of 8 {crop[0]}x{crop[0]} crops: {t * 1e3:.2f} ms")
    if args.smoke:
        print("smoke sizes: speed-ups printed, not meaningful at these sizes")
    print("cellst and MONAI maps: " + ("same" if ok else f"DIFFERENT (> {TOLERANCE:g})"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
