"""Benchmark: HoVer watershed post-processing of one 2048 x 2048 map with ~2,400 cells.

Inputs are built from a synthetic ground truth (``cellst.data.synth.synth_image`` labels):
nuclear probability = Gaussian-smoothed foreground + N(0, 0.05) noise, HoVer maps = the exact
training target (``hover_maps``, equal to MONAI's ``ComputeHoVerMaps``) + N(0, 0.05) noise.

Times :func:`cellst.postprocess.hover_to_instances` (best of 3, with a per-stage profile),
MONAI's ``HoVerNetInstanceMapPostProcessing`` with the same parameters (one run, it is slow)
and the tiled path (``tile=1024, overlap=256``), and prints the speed-up, the agreement F1
between cellst and MONAI (IoU 0.5) and the F1 of each against the ground truth. Targets are
reported, not asserted. ``--smoke`` runs the same comparison on a 512 x 512 map (~150 cells,
tiles of 256 with overlap 64) in seconds, for CI; the targets are not checked there. Run:

    .venv/bin/python benchmarks/bench_postprocess.py [--smoke]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from scipy import ndimage as ndi

from cellst.data.synth import synth_image
from cellst.metrics.instance import match_instances
from cellst.model.targets import hover_maps
from cellst.postprocess import (
    PostprocessConfig,
    hover_to_instances,
    hover_to_instances_tiled,
    relabel_sequential,
)
from cellst.postprocess.hover import _hover_core

SIZE = 2048
SMOKE_SIZE = 512
DENSITY = 0.42
RADIUS_RANGE = (13.0, 17.0)  # gives ~2,400 cells at this density
NOISE = 0.05
REPEATS = 3
TARGET_SPEEDUP = 20.0
MIN_AGREEMENT = 0.98


def make_inputs(seed: int = 0, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground truth, nuclear probability and HoVer maps (float32)."""
    rng = np.random.default_rng(seed)
    _, gt = synth_image(rng, "fluorescence", (size, size), DENSITY, RADIUS_RANGE)
    prob = ndi.gaussian_filter((gt > 0).astype(np.float32), 1.0)
    prob = np.clip(prob + rng.normal(0, NOISE, prob.shape), 0, 1).astype(np.float32)
    hv = hover_maps(gt) + rng.normal(0, NOISE, (2, size, size)).astype(np.float32)
    return gt, prob, hv


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = np.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (seconds), for CI")
    args = ap.parse_args(argv)
    size = SMOKE_SIZE if args.smoke else SIZE
    tile, overlap = (256, 64) if args.smoke else (1024, 256)
    cfg = PostprocessConfig()
    params = cfg.hover_kwargs()
    t0 = time.perf_counter()
    gt, prob, hv = make_inputs(size=size)
    print(
        f"input: {size}x{size}, {gt.max()} cells, foreground {np.mean(gt > 0):.0%} "
        f"(built in {time.perf_counter() - t0:.1f} s)"
    )
    print(f"parameters: {params}")

    hover_to_instances(prob[:256, :256], hv[:, :256, :256], **params)  # warm-up
    t_ours, ours = best_of(lambda: hover_to_instances(prob, hv, **params), REPEATS)

    stages: dict[str, float] = {}
    h, v = np.ascontiguousarray(hv[0]), np.ascontiguousarray(hv[1])
    _hover_core(prob, h, v, cfg, timings=stages)
    profile = ", ".join(f"{k} {1e3 * s:.0f}" for k, s in stages.items())
    print(f"cellst stages (ms): {profile}")

    t_tiled, tiled = best_of(
        lambda: hover_to_instances_tiled(prob, hv, tile=tile, overlap=overlap, **params), 1
    )

    from monai.apps.pathology.transforms.post.array import HoVerNetInstanceMapPostProcessing

    monai_post = HoVerNetInstanceMapPostProcessing(
        activation=lambda x: x,  # the input already is a probability
        mask_threshold=cfg.mask_threshold,
        min_object_size=cfg.min_object_size,
        sobel_kernel_size=cfg.sobel_kernel,
        marker_threshold=cfg.marker_threshold,
        marker_radius=cfg.marker_radius,
        watershed_connectivity=1,
    )  # distance smoothing: MONAI's default GaussianSmooth(sigma=1) = distance_sigma 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_monai, (_, monai_map) = best_of(lambda: monai_post(prob[None], hv), 1)
    monai_map = relabel_sequential(np.asarray(monai_map)[0])

    agree = match_instances(monai_map, ours)
    identical = bool(np.array_equal(monai_map, ours))
    tiled_vs = match_instances(ours, tiled)
    speedup = t_monai / t_ours
    print()
    print(f"{'method':<40}{'time (s)':>10}{'instances':>11}{'F1 vs GT':>10}")
    for name, t, m in [
        (f"cellst hover_to_instances (best of {REPEATS})", t_ours, ours),
        (f"cellst tiled ({tile}, overlap {overlap})", t_tiled, tiled),
        ("MONAI HoVerNetInstanceMapPost.", t_monai, monai_map),
    ]:
        f1 = match_instances(gt, m).f1
        print(f"{name:<40}{t:>10.3f}{int(m.max()):>11}{f1:>10.4f}")
    print()
    print(f"speed-up vs MONAI: {speedup:.1f}x (target >= {TARGET_SPEEDUP:.0f}x)")
    print(
        f"agreement cellst vs MONAI: F1 {agree.f1:.4f} (target >= {MIN_AGREEMENT}); "
        f"identical maps up to ids: {identical}"
    )
    print(f"tiled vs untiled: F1 {tiled_vs.f1:.4f}, instances {tiled.max()} vs {ours.max()}")
    if args.smoke:
        print("targets not checked (smoke sizes)")
        return
    ok = speedup >= TARGET_SPEEDUP and agree.f1 >= MIN_AGREEMENT
    print("targets met" if ok else "TARGETS NOT MET")


if __name__ == "__main__":
    main()
