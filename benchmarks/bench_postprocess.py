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
import sys
import time
import warnings

import numpy as np
from scipy import ndimage as ndi

from cellst.data.synth import synth_image
from cellst.metrics.instance import match_instances
from cellst.model.targets import hover_maps
from cellst.postprocess import (
    PostprocessConfig,
    hover_steps,
    hover_to_instances,
    hover_to_instances_tiled,
    relabel_sequential,
)
from cellst.postprocess.hover import (
    _STRUCT4,
    _STRUCT8,
    _binary_opening,
    _fill_holes8,
    _gauss_kernel,
    _hover_core,
    _label_min_size,
    _separable,
    _sobel_responses,
    _watershed_masked,
    sobel_kernels,
)

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


#: a hand-written step earns its place only if it is this much faster than the library call
EARNS_ITS_PLACE = 1.5


def _same(a, b) -> str:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return "no (shape)"
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        err = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
        return "yes" if err <= 1e-4 else f"no (max error {err:.1e})"
    return "yes" if np.array_equal(a, b) else f"no ({int(np.sum(a != b))} pixels)"


def step_table(
    prob: np.ndarray, hv: np.ndarray, cfg: PostprocessConfig, repeats: int, judge: bool
) -> bool:
    """Each hand-written step of ``_hover_core`` against the public library call it replaces,
    on the intermediate arrays of this very input: time, speed ratio and equal output.

    A step keeps its hand-written code only where it is at least ``EARNS_ITS_PLACE`` times
    faster at the full size (``judge``); returns whether every pair gave the same output."""
    from skimage.morphology import disk, opening, remove_small_objects
    from skimage.segmentation import relabel_sequential as sk_relabel
    from skimage.segmentation import watershed

    h, v = np.ascontiguousarray(hv[0]), np.ascontiguousarray(hv[1])
    steps = hover_steps(prob, hv, **cfg.hover_kwargs())  # the maps each step works on
    fg = prob >= cfg.mask_threshold
    comp, mlab = steps.mask, steps.markers
    fgc = comp > 0
    smooth, deriv = sobel_kernels(cfg.sobel_kernel)
    g = ((1 - steps.border) * fgc).astype(np.float32)
    raw_markers = (steps.border < np.float32(cfg.marker_threshold)) & fgc
    filled = _fill_holes8(raw_markers)
    opened = _binary_opening(filled, cfg.marker_radius)
    gk = _gauss_kernel(cfg.distance_sigma)
    dist = steps.distance  # the relief the watershed floods
    boxes = ndi.find_objects(comp)

    def ws_ours():
        out = np.zeros(comp.shape, np.int32)
        for i, sl in enumerate(boxes, 1):
            m = comp[sl] == i
            out[sl][m] = _watershed_masked(dist[sl], mlab[sl], m)[m]
        return out

    def ws_public_per_component():
        out = np.zeros(comp.shape, np.int32)
        for i, sl in enumerate(boxes, 1):
            m = comp[sl] == i
            r = watershed(dist[sl], markers=mlab[sl] * m, mask=m, connectivity=1)
            out[sl][m] = r[m]
        return out

    def corr(img, w0, w1, mode):
        return ndi.correlate1d(ndi.correlate1d(img, w0, axis=0, mode=mode), w1, axis=1, mode=mode)

    def small_removed(mask):
        try:
            keep = remove_small_objects(mask, max_size=cfg.min_object_size - 1, connectivity=1)
        except TypeError:  # scikit-image < 0.26: min_size (objects smaller than it go)
            keep = remove_small_objects(mask, min_size=cfg.min_object_size, connectivity=1)
        return ndi.label(keep, structure=_STRUCT4, output=np.int32)[0]

    pairs = [
        (
            "mask: label, drop small",
            lambda: _label_min_size(fg, cfg.min_object_size, _STRUCT4)[0],
            "skimage remove_small_objects + ndi.label",
            lambda: small_removed(fg),
        ),
        (
            "border: Sobel of h and v",
            lambda: _sobel_responses(h, v, cfg.sobel_kernel),
            "ndi.correlate1d x4 (mirror)",
            lambda: (corr(h, smooth, deriv, "mirror"), corr(v, deriv, smooth, "mirror")),
        ),
        (
            "distance: Gaussian of g",
            lambda: _separable(g, gk, gk, "constant"),
            "ndi.correlate1d x2 (constant)",
            lambda: corr(g, gk, gk, "constant"),
        ),
        (
            "markers: fill holes",
            lambda: _fill_holes8(raw_markers),
            "ndi.binary_fill_holes (8-conn.)",
            lambda: ndi.binary_fill_holes(raw_markers, structure=_STRUCT8),
        ),
        (
            "markers: opening",
            lambda: _binary_opening(filled, cfg.marker_radius),
            "skimage opening(disk, mode=reflect)",
            lambda: opening(filled, disk(cfg.marker_radius), mode="reflect"),
        ),
        (
            "markers: label, drop small",
            lambda: _label_min_size(opened, cfg.min_object_size, _STRUCT4)[0],
            "skimage remove_small_objects + ndi.label",
            lambda: small_removed(opened),
        ),
        (
            "watershed per component",
            ws_ours,
            "skimage watershed per component",
            ws_public_per_component,
        ),
        (
            "relabel sequential",
            lambda: relabel_sequential(mlab),
            "skimage relabel_sequential",
            lambda: sk_relabel(mlab)[0],
        ),
    ]
    print()
    print(
        f"{'step (cellst, hand-written)':<28}{'ms':>8}   {'library call':<42}{'ms':>8}"
        f"{'ratio':>7}  same  verdict"
    )
    all_same = True
    for name, ours, lib_name, lib in pairs:
        t_o, r_o = best_of(ours, repeats)
        t_l, r_l = best_of(lib, repeats)
        if isinstance(r_o, tuple):
            same = (
                "yes" if all(_same(a, b) == "yes" for a, b in zip(r_o, r_l, strict=True)) else "no"
            )
        else:
            same = _same(r_o, r_l)
        ratio = t_l / t_o
        if not judge:
            verdict = "not judged at smoke size"
        else:
            verdict = "keeps its place" if ratio >= EARNS_ITS_PLACE else "use the library"
        all_same = all_same and same == "yes"
        print(
            f"{name:<28}{1e3 * t_o:>8.1f}   {lib_name:<42}{1e3 * t_l:>8.1f}{ratio:>6.1f}x"
            f"  {same:<4}  {verdict}"
        )
    return all_same


def calibration_threads(smoke: bool) -> bool:
    """Time the calibration search that ends every training
    (:func:`cellst.postprocess.calibrate.search_postprocess`) on one thread and on its
    default number, on the same maps side by side; print both and whether they agree."""
    from cellst.postprocess.calibrate import ValMaps, search_postprocess

    n, size = (3, 128) if smoke else (8, 384)
    maps = [ValMaps(p, h, g) for g, p, h in (make_inputs(seed=i, size=size) for i in range(n))]
    post = PostprocessConfig()
    t1, one = best_of(lambda: search_postprocess(maps, post, workers=1), 1)
    tn, many = best_of(lambda: search_postprocess(maps, post), 1)
    same = (one.settings, one.after, one.trials) == (many.settings, many.after, many.trials)
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"calibration search, {n} maps of {size}x{size}, {one.trials} trials: 1 thread "
        f"{t1:.2f} s, default threads ({cpus} CPUs) {tn:.2f} s: {t1 / tn:.2f}x, "
        f"same result: {'yes' if same else 'NO'}"
    )
    return same


def main(argv: list[str] | None = None) -> int:
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
    steps_same = step_table(prob, hv, cfg, REPEATS, judge=not args.smoke)

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
    cal_same = calibration_threads(smoke=args.smoke)
    if not steps_same:
        print("a hand-written step and its library call gave DIFFERENT OUTPUT")
        return 1
    if not cal_same:
        print("the calibration search gave a DIFFERENT RESULT on several threads")
        return 1
    if args.smoke:
        print("targets not checked (smoke sizes)")
        return 0
    ok = speedup >= TARGET_SPEEDUP and agree.f1 >= MIN_AGREEMENT
    print("targets met" if ok else "TARGETS NOT MET")
    return 0


if __name__ == "__main__":
    sys.exit(main())
