"""Deterministic synthetic multi-modality microscopy with exact instance labels.

The generator mimics the four imaging modalities of the NeurIPS 2022 Cell Segmentation
challenge (fluorescence, stained brightfield, phase contrast and DIC) and writes the
challenge folder layout::

    OUT/labeled/images/cell_00001.tif      OUT/labeled/labels/cell_00001_label.tiff
    OUT/unlabeled/images/unlabeled_00001.png
    OUT/test/images/test_00001.bmp         OUT/test/labels/test_00001_label.tiff
    OUT/modalities.csv                     OUT/synth.json

Cells are random ellipses with irregular outlines (low-frequency radial harmonics), random
size, orientation and eccentricity, placed from sparse to confluent.  Overlapping cells are
resolved by giving every contested pixel to the cell whose (normalised, elliptical) centre
distance is smallest, so touching cells stay separate instances and no cell is hidden.  The
image is rendered from the same geometry (a dome-shaped height map per cell, a nucleus, a
chromatin texture) through a simple physical model of each modality, followed by optical
blur, uneven illumination and shot/read noise.

Everything is a pure function of a :class:`numpy.random.Generator`; the dataset writer
derives one generator per image from ``(seed, split, index)`` with
:class:`numpy.random.SeedSequence`, so adding images never changes earlier ones.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.measure import label as cc_label

from cellst.data.images import label_file_name
from cellst.data.modalities import MODALITIES_FILE
from cellst.fs import atomic_write, staged_dir

__all__ = [
    "MODALITIES",
    "SPLITS",
    "SynthError",
    "image_extension",
    "synth_image",
    "synthesize_dataset",
]

MODALITIES: tuple[str, ...] = ("fluorescence", "brightfield", "phase_contrast", "dic")
SPLITS: tuple[str, ...] = ("labeled", "unlabeled", "test")

_SPLIT_CODE = {"labeled": 0, "unlabeled": 1, "test": 2}
_SPLIT_PREFIX = {"labeled": "cell", "unlabeled": "unlabeled", "test": "test"}
_MIN_CELL_PX = 15
_RADIUS_RANGE = (5.0, 30.0)


class SynthError(ValueError):
    """A request ``cellst synth`` refuses (bad sizes or counts, a folder it must not
    replace); the message names the value or the folder."""


# Optical-density stain vectors (RGB) for Beer-Lambert rendering of stained brightfield.
_HEMATOXYLIN = np.array([0.650, 0.704, 0.286])
_EOSIN = np.array([0.072, 0.990, 0.105])
_DAB = np.array([0.268, 0.570, 0.776])


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian-filtered white noise."""
    field = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    std = float(field.std())
    return field / std if std > 0 else field


def _coarse_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int = 4) -> np.ndarray:
    """Very low-frequency unit-variance noise: Gaussian-RBF interpolation of a tiny random grid.

    Separable (``Wy grid Wx^T``), so it costs O(H * W * cells) rather than a full zoom.
    """
    h, w = shape
    grid = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)

    def weights(n: int) -> np.ndarray:
        pos = (np.arange(n, dtype=np.float32) + 0.5) / n * cells + 1.0  # grid units
        d = pos[:, None] - np.arange(cells + 3, dtype=np.float32)[None, :]
        wts = np.exp(-0.5 * (d / 0.8) ** 2)
        return wts / wts.sum(1, keepdims=True)

    # explicit broadcasting instead of BLAS: OpenBLAS worker threads would spin on a busy host
    rows = (weights(h)[:, :, None] * grid[None, :, :]).sum(1)  # (h, cells + 3)
    wx = weights(w)
    up = np.zeros((h, w), np.float32)
    for k in range(cells + 3):
        up += rows[:, k, None] * wx[None, :, k]
    std = float(up.std())
    return (up - up.mean()) / std if std > 0 else up - up.mean()


def _illumination(rng: np.random.Generator, shape: tuple[int, int], strength: float) -> np.ndarray:
    """Smooth multiplicative illumination: linear gradient + off-centre vignetting + drift."""
    h, w = shape
    y = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :]
    ang = rng.uniform(0, 2 * np.pi)
    grad = np.cos(ang) * x + np.sin(ang) * y
    cy, cx = rng.uniform(-0.4, 0.4, size=2)
    vign = (x - cx) ** 2 + (y - cy) ** 2
    field = (
        1.0
        + strength * rng.uniform(0.3, 1.0) * grad
        - strength * rng.uniform(0.2, 0.8) * vign
        + 0.25 * strength * _coarse_noise(rng, shape, 3)
    )
    return np.clip(field / field.mean(), 0.3, 2.0).astype(np.float32)


def _place_centres(
    rng: np.random.Generator,
    shape: tuple[int, int],
    n_target: int,
    radii: np.ndarray,
    overlap: float,
    cluster: float,
) -> np.ndarray:
    """Greedy hard-core placement of up to ``n_target`` centres.

    Candidates are drawn from an inhomogeneous (clustered) intensity, then accepted in order
    when no accepted neighbour lies closer than ``overlap * (r_i + r_j)``.  Neighbour look-up
    uses a KD-tree, so the loop is over candidates with tiny per-candidate work.
    """
    h, w = shape
    if n_target <= 0:
        return np.empty((0, 3))
    n_cand = int(n_target * 4 + 16)
    pts = np.empty((0, 2))
    if cluster > 0:
        intensity = np.exp(cluster * _coarse_noise(rng, (max(8, h // 16), max(8, w // 16)), 3))
        intensity /= intensity.max()
        while len(pts) < n_cand:
            c = rng.uniform((0, 0), (h, w), size=(n_cand, 2))
            iy = np.minimum((c[:, 0] / h * intensity.shape[0]).astype(int), intensity.shape[0] - 1)
            ix = np.minimum((c[:, 1] / w * intensity.shape[1]).astype(int), intensity.shape[1] - 1)
            keep = rng.random(n_cand) < intensity[iy, ix]
            pts = np.concatenate([pts, c[keep]])
        pts = pts[:n_cand]
    else:
        pts = rng.uniform((0, 0), (h, w), size=(n_cand, 2))
    cand_r = radii[rng.integers(0, len(radii), size=n_cand)]
    tree = cKDTree(pts)
    neigh = tree.query_ball_point(pts, r=overlap * 2.0 * float(cand_r.max()))
    accepted = np.zeros(n_cand, dtype=bool)
    order: list[int] = []
    for i in range(n_cand):
        nb = neigh[i]
        if len(nb) > 1:
            nb = np.asarray(nb)
            nb = nb[accepted[nb]]
            if nb.size:
                d = np.hypot(*(pts[nb] - pts[i]).T)
                if np.any(d < overlap * (cand_r[nb] + cand_r[i])):
                    continue
        accepted[i] = True
        order.append(i)
        if len(order) >= n_target:
            break
    idx = np.asarray(order, dtype=int)
    return np.column_stack([pts[idx], cand_r[idx]]) if idx.size else np.empty((0, 3))


def _rasterise(
    rng: np.random.Generator,
    shape: tuple[int, int],
    cells: np.ndarray,
    eccentricity: float,
    irregularity: float,
    align: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Paint cells; contested pixels go to the cell with the smallest normalised distance.

    Returns
    -------
    label : (H, W) int32 raw cell index + 1 (not yet cleaned)
    rho : (H, W) float32 normalised distance to the owning cell's centre (1 at its outline)
    rho_nuc : (H, W) float32 normalised distance to the owning cell's nucleus centre
    own_area : (n + 1,) int64 in-frame area each cell would have on its own
    """
    h, w = shape
    n = len(cells)
    label = np.zeros(shape, np.int32)
    rho = np.full(shape, np.inf, np.float32)
    rho_nuc = np.full(shape, np.inf, np.float32)
    own_area = np.zeros(n + 1, np.int64)
    if n == 0:
        return label, rho, rho_nuc, own_area

    base_angle = rng.uniform(0, np.pi)
    angles = np.where(
        rng.random(n) < align,
        base_angle + rng.normal(0, 0.25, n),
        rng.uniform(0, np.pi, n),
    )
    q = 1.0 - eccentricity * rng.beta(2.0, 3.0, n)  # minor/major axis ratio
    q = np.clip(q, 0.35, 1.0)
    a_ax = cells[:, 2] / np.sqrt(q)
    b_ax = cells[:, 2] * np.sqrt(q)
    n_harm = 5
    ks = np.arange(2, 2 + n_harm)
    amps = irregularity * rng.normal(0, 1, (n, n_harm)) / ks**0.9
    amps = np.clip(amps, -0.25, 0.25)
    phases = rng.uniform(0, 2 * np.pi, (n, n_harm))
    scale = np.abs(amps).sum(1)
    amps = np.where(scale[:, None] > 0.45, amps * (0.45 / np.maximum(scale, 1e-9))[:, None], amps)
    # nucleus: smaller ellipse, offset from the centre, same orientation
    nuc_s = rng.uniform(0.35, 0.65, n)
    nuc_off = rng.uniform(-0.25, 0.25, (n, 2)) * (1 - nuc_s)[:, None]

    for i in range(n):
        cy, cx, _ = cells[i]
        a, b = a_ax[i], b_ax[i]
        reach = a * (1.0 + np.abs(amps[i]).sum()) + 1.5
        y0, y1 = max(0, int(cy - reach)), min(h, int(cy + reach) + 2)
        x0, x1 = max(0, int(cx - reach)), min(w, int(cx + reach) + 2)
        if y1 <= y0 or x1 <= x0:
            continue
        dy = (np.arange(y0, y1, dtype=np.float32) - cy)[:, None]
        dx = (np.arange(x0, x1, dtype=np.float32) - cx)[None, :]
        c, s = np.cos(angles[i]), np.sin(angles[i])
        u = (dx * c + dy * s) / a
        v = (dy * c - dx * s) / b
        r = np.sqrt(u * u + v * v)
        theta = np.arctan2(v, u)
        pert = 1.0
        for k in range(n_harm):
            pert = pert + amps[i, k] * np.cos(ks[k] * theta + phases[i, k])
        r_eff = r / pert
        inside = r_eff < 1.0
        own = int(np.count_nonzero(inside))
        if own == 0:
            continue
        own_area[i + 1] = own
        sub_rho = rho[y0:y1, x0:x1]
        win = inside & (r_eff < sub_rho)
        sub_rho[win] = r_eff[win]
        label[y0:y1, x0:x1][win] = i + 1
        un = (u - nuc_off[i, 0]) / nuc_s[i]
        vn = (v - nuc_off[i, 1]) / nuc_s[i]
        rn = np.sqrt(un * un + vn * vn) / pert
        rho_nuc[y0:y1, x0:x1][win] = rn[win]
    return label, rho, rho_nuc, own_area


def _clean_labels(label: np.ndarray, own_area: np.ndarray, min_keep: float) -> np.ndarray:
    """Keep each cell's largest 4-connected piece, drop tiny/mostly-hidden cells, relabel."""
    comp = cc_label(label, background=0, connectivity=1)
    n_comp = int(comp.max())
    if n_comp == 0:
        return label
    comp_size = np.bincount(comp.ravel(), minlength=n_comp + 1)
    comp_owner = np.zeros(n_comp + 1, np.int64)
    comp_owner[comp.ravel()] = label.ravel()
    ids = np.arange(1, n_comp + 1)
    # largest component per owner: sort by (owner, -size), first of each owner wins
    order = np.lexsort((-comp_size[ids], comp_owner[ids]))
    owners_sorted = comp_owner[ids][order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = owners_sorted[1:] != owners_sorted[:-1]
    keep_comp = np.zeros(n_comp + 1, dtype=bool)
    keep_comp[ids[order][first]] = True
    kept_size = np.zeros(len(own_area), np.int64)
    kept_size[comp_owner[keep_comp]] = comp_size[keep_comp]
    ok = (kept_size >= _MIN_CELL_PX) & (kept_size >= min_keep * own_area)
    ok[0] = False
    new_id = np.zeros(len(own_area), np.int32)
    new_id[ok] = np.arange(1, int(ok.sum()) + 1, dtype=np.int32)
    comp_new = np.where(keep_comp, new_id[comp_owner], 0).astype(np.int32)
    return comp_new[comp]


# ---------------------------------------------------------------------------------------------
# modality renderers: all take the geometry and return float images before quantisation
# ---------------------------------------------------------------------------------------------


def _dome(rho: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Height profile sqrt(1 - rho^2) inside cells, 0 outside."""
    return np.where(fg, np.sqrt(np.clip(1.0 - rho * rho, 0.0, 1.0)), 0.0).astype(np.float32)


def _per_cell(rng: np.random.Generator, n: int, sigma: float, lo: float, hi: float) -> np.ndarray:
    """Log-normal per-cell factor (index 0 = background = 0)."""
    vals = np.zeros(n + 1, np.float32)
    vals[1:] = np.clip(rng.lognormal(0.0, sigma, n), lo, hi)
    return vals


def _render_fluorescence(
    rng: np.random.Generator,
    lab: np.ndarray,
    rho: np.ndarray,
    rho_nuc: np.ndarray,
    r0: float,
) -> np.ndarray:
    shape = lab.shape
    n = int(lab.max())
    fg = lab > 0
    dome = _dome(rho, fg)
    bright = _per_cell(rng, n, rng.uniform(0.25, 0.55), 0.3, 2.5)[lab]
    cytoplasmic = rng.random() < 0.35  # cytoplasm stain: dark nucleus inside a bright cell
    chrom = _smooth_noise(rng, shape, rng.uniform(0.8, 1.8))
    blotch = _smooth_noise(rng, shape, max(1.5, 0.35 * r0))
    tex_amp = rng.uniform(0.1, 0.35)
    texture = np.clip(1.0 + tex_amp * chrom + 0.15 * blotch, 0.2, None)
    profile = rng.uniform(0.25, 0.7) + (1 - 0.5 * rng.uniform(0.25, 0.7)) * dome
    body = bright * profile * texture
    if cytoplasmic:
        nuc = np.clip(1.0 - rho_nuc, 0.0, 0.15) / 0.15
        body *= 1.0 - rng.uniform(0.3, 0.6) * nuc
    else:
        # nucleoli: a few bright specks from thresholded fine noise
        specks = np.clip(_smooth_noise(rng, shape, 1.2) - 2.2, 0, None)
        body += bright * 0.6 * specks * fg
    body = ndi.gaussian_filter(body, rng.uniform(0.6, 1.6))
    illum = _illumination(rng, shape, rng.uniform(0.15, 0.5))
    body *= illum
    top = float(np.percentile(body[fg], 99.9)) if fg.any() else 1.0
    peak = rng.uniform(8000.0, 45000.0) / max(top, 1e-6)  # brightest cells reach 8k..45k DN
    bg = rng.uniform(600.0, 2500.0)
    autofl = 1.0 + 0.1 * _smooth_noise(rng, shape, 8.0)  # out-of-focus haze
    signal = bg * autofl * illum + peak * body
    gain = rng.uniform(1.5, 6.0)  # DN per photo-electron
    counts = rng.poisson(np.clip(signal, 0, None) / gain).astype(np.float32) * gain
    counts += rng.normal(0.0, rng.uniform(15.0, 60.0), shape).astype(np.float32)
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)


def _render_brightfield(
    rng: np.random.Generator,
    lab: np.ndarray,
    rho: np.ndarray,
    rho_nuc: np.ndarray,
    r0: float,
) -> np.ndarray:
    shape = lab.shape
    n = int(lab.max())
    fg = lab > 0
    dome = _dome(rho, fg)
    nuc_core = np.clip((1.0 - rho_nuc) / 0.12, 0.0, 1.0) * fg
    chrom = _smooth_noise(rng, shape, rng.uniform(0.8, 1.5))
    texture = np.clip(1.0 + rng.uniform(0.15, 0.35) * chrom, 0.3, None)
    h_conc = _per_cell(rng, n, 0.3, 0.4, 2.0)[lab]
    c_conc = _per_cell(rng, n, 0.35, 0.3, 2.5)[lab]
    scheme = rng.choice(["he", "ihc", "h_only"], p=[0.5, 0.3, 0.2])
    h_od = rng.uniform(0.5, 1.1) * h_conc * (nuc_core * texture + 0.08 * dome)
    cyto = fg * (0.35 + 0.65 * dome) * (1.0 + 0.15 * chrom)
    if scheme == "he":
        c_vec, c_od = _EOSIN, rng.uniform(0.15, 0.45) * c_conc * cyto
    elif scheme == "ihc":
        c_vec, c_od = _DAB, rng.uniform(0.25, 0.6) * c_conc * cyto
    else:
        c_vec, c_od = _HEMATOXYLIN, rng.uniform(0.08, 0.2) * c_conc * cyto
    stroma = np.clip(0.03 + 0.02 * _smooth_noise(rng, shape, 10.0), 0, None)
    od = (
        h_od[..., None] * _HEMATOXYLIN
        + c_od[..., None] * c_vec
        + stroma[..., None] * _EOSIN * (scheme == "he")
    ).astype(np.float32)
    sigma = rng.uniform(0.5, 1.4)
    od = ndi.gaussian_filter(od, (sigma, sigma, 0))
    white = rng.uniform(205.0, 235.0) * rng.uniform(0.94, 1.0, 3).astype(np.float32)
    illum = _illumination(rng, shape, rng.uniform(0.05, 0.2))
    illum *= min(1.0, 245.0 / float(white.max() * illum.max()))  # light, unsaturated background
    rgb = white * illum[..., None] * np.exp(-od)
    rgb += rng.normal(0.0, rng.uniform(1.5, 4.0), rgb.shape).astype(np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _height_map(
    rng: np.random.Generator, lab: np.ndarray, rho: np.ndarray, rho_nuc: np.ndarray
) -> np.ndarray:
    n = int(lab.max())
    fg = lab > 0
    dome = _dome(rho, fg)
    height = _per_cell(rng, n, 0.25, 0.5, 2.0)[lab]
    nuc = _dome(np.minimum(rho_nuc, 1.0), fg & (rho_nuc < 1.0))
    return height * (dome**0.7 + rng.uniform(0.2, 0.5) * nuc)


def _render_phase_contrast(
    rng: np.random.Generator,
    lab: np.ndarray,
    rho: np.ndarray,
    rho_nuc: np.ndarray,
    r0: float,
) -> np.ndarray:
    shape = lab.shape
    fg = lab > 0
    opl = _height_map(rng, lab, rho, rho_nuc)
    opl = opl * np.clip(1.0 + 0.2 * _smooth_noise(rng, shape, 1.5), 0.3, None) * fg
    opl = ndi.gaussian_filter(opl, 0.7)
    halo_sigma = max(2.0, rng.uniform(0.25, 0.5) * r0)
    highpass = opl - ndi.gaussian_filter(opl, halo_sigma)
    highpass /= max(float(np.percentile(np.abs(highpass), 99.5)), 1e-6)
    bg = rng.uniform(90.0, 150.0)
    contrast = rng.uniform(0.3, 0.5)
    img = bg * (1.0 - contrast * np.tanh(highpass))
    img = ndi.gaussian_filter(img, rng.uniform(0.6, 1.2))
    img *= _illumination(rng, shape, rng.uniform(0.1, 0.35))
    img += rng.normal(0.0, rng.uniform(2.0, 6.0), shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _render_dic(
    rng: np.random.Generator,
    lab: np.ndarray,
    rho: np.ndarray,
    rho_nuc: np.ndarray,
    r0: float,
) -> np.ndarray:
    shape = lab.shape
    fg = lab > 0
    h = _height_map(rng, lab, rho, rho_nuc)
    h = h * np.clip(1.0 + 0.06 * _smooth_noise(rng, shape, 2.0), 0.3, None) * fg
    h = ndi.gaussian_filter(h * max(3.0, 0.5 * r0), rng.uniform(0.8, 1.5))
    ang = rng.uniform(0, 2 * np.pi)
    shear = np.cos(ang) * ndi.sobel(h, axis=1) + np.sin(ang) * ndi.sobel(h, axis=0)
    shear /= max(float(np.percentile(np.abs(shear), 99.5)), 1e-6)
    bias = rng.uniform(0.0, 0.1)  # small amplitude (absorption) component
    mid = rng.uniform(0.35, 0.55) * 65535.0
    img = mid * (1.0 + rng.uniform(0.35, 0.6) * np.tanh(shear) - bias * h / (h.max() + 1e-6))
    img *= _illumination(rng, shape, rng.uniform(0.05, 0.2))
    img += rng.normal(0.0, rng.uniform(0.006, 0.02) * mid, shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 65535).astype(np.uint16)


_RENDERERS = {
    "fluorescence": _render_fluorescence,
    "brightfield": _render_brightfield,
    "phase_contrast": _render_phase_contrast,
    "dic": _render_dic,
}


def synth_image(
    rng: np.random.Generator,
    modality: str,
    shape: tuple[int, int],
    density: float | None = None,
    radius_range: tuple[float, float] = _RADIUS_RANGE,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one synthetic microscopy image with its exact instance label map.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of all randomness; the output is a pure function of its state.
    modality : str
        One of :data:`MODALITIES`.
    shape : tuple of int
        ``(H, W)`` of the output.
    density : float, optional
        Target fraction of the field covered by cells, ``0 < density <= 1`` (sparse ~0.05,
        confluent ~0.8).  Drawn at random when None.
    radius_range : tuple of float
        Range of the equivalent cell radius in pixels.  A typical radius is drawn per image
        (log-uniform) and individual cells vary around it.

    Returns
    -------
    image : numpy.ndarray
        ``fluorescence``: uint16 (H, W); ``brightfield``: uint8 (H, W, 3) RGB;
        ``phase_contrast``: uint8 (H, W); ``dic``: uint16 (H, W).
    label : numpy.ndarray
        int32 (H, W) instance map, 0 = background, cells numbered 1..N without gaps.
        Touching cells are distinct instances; every cell has at least 15 pixels.
    """
    if modality not in _RENDERERS:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    h, w = (int(shape[0]), int(shape[1]))
    if h < 8 or w < 8:
        raise ValueError(f"shape too small: {shape}")
    rmin, rmax = float(radius_range[0]), float(radius_range[1])
    if not 0 < rmin <= rmax:
        raise ValueError(f"invalid radius_range {radius_range}")
    if density is None:
        kind = rng.choice(3, p=[0.25, 0.4, 0.35])
        density = float(rng.uniform(*[(0.04, 0.15), (0.15, 0.45), (0.45, 0.85)][kind]))
    density = float(np.clip(density, 0.0, 1.0))

    r0 = float(np.exp(rng.uniform(np.log(rmin), np.log(rmax))))
    size_sd = rng.uniform(0.1, 0.3)
    pool = np.clip(r0 * rng.lognormal(0.0, size_sd, 4096), rmin, rmax)
    mean_area = float(np.pi * np.mean(pool**2))
    n_target = int(round(density * h * w / mean_area))
    if density > 0:
        n_target = max(n_target, 1)
    # denser images allow more overlap (confluent polygonal cells); sparse ones cluster
    overlap = float(np.interp(density, [0.05, 0.5, 0.85], [1.05, 0.8, 0.55]))
    cluster = float(rng.uniform(0.0, 1.5) * (density < 0.5))
    shape_kw = {
        "eccentricity": rng.uniform(0.1, 0.7),
        "irregularity": rng.uniform(0.02, 0.1),
        "align": rng.uniform(0.0, 0.6),
    }
    for _ in range(10):  # retry only when a tiny field ends up without any valid cell
        cells = _place_centres(rng, (h, w), n_target, pool, overlap, cluster)
        raw, rho, rho_nuc, own_area = _rasterise(rng, (h, w), cells, **shape_kw)
        lab = _clean_labels(raw, own_area, min_keep=0.35)
        if n_target == 0 or lab.max() > 0:
            break
    fg = lab > 0
    rho = np.where(fg, rho, 1.0).astype(np.float32)
    rho_nuc = np.where(fg, rho_nuc, np.inf).astype(np.float32)
    image = _RENDERERS[modality](rng, lab, rho, rho_nuc, r0)
    return image, lab.astype(np.int32, copy=False)


# ---------------------------------------------------------------------------------------------
# dataset writer
# ---------------------------------------------------------------------------------------------


def image_extension(modality: str, k: int) -> str:
    """File extension of the ``k``-th (1-based, per split) image of ``modality``.

    fluorescence -> ``.tif`` (uint16); brightfield -> ``.png`` (RGB), every 5th ``.jpg``;
    phase_contrast -> ``.bmp`` (8-bit gray); dic -> ``.tiff`` (uint16), every 3rd a 16-bit
    ``.png``.
    """
    if modality == "fluorescence":
        return ".tif"
    if modality == "brightfield":
        return ".jpg" if k % 5 == 0 else ".png"
    if modality == "phase_contrast":
        return ".bmp"
    if modality == "dic":
        return ".png" if k % 3 == 0 else ".tiff"
    raise ValueError(f"unknown modality {modality!r}")


_atomic_write = atomic_write  # write(tmp) to a sibling, then rename (cellst.fs)


def _save_image(path: Path, image: np.ndarray) -> None:
    ext = path.suffix.lower()
    if ext in (".tif", ".tiff"):
        _atomic_write(path, lambda p: tifffile.imwrite(p, image, compression="zlib"))
        return
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}[ext]
    kwargs: dict[str, Any] = {"quality": 95} if fmt == "JPEG" else {}
    if fmt == "PNG":
        kwargs["compress_level"] = 3
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kwargs)
    _atomic_write(path, lambda p: p.write_bytes(buf.getvalue()))


def _save_label(path: Path, label: np.ndarray) -> None:
    lab = label.astype(np.int32, copy=False)
    _atomic_write(path, lambda p: tifffile.imwrite(p, lab, compression="zlib"))


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODE[split], index]))


def synthesize_dataset(
    out: Path,
    n_labeled: int,
    n_unlabeled: int,
    n_test: int,
    seed: int = 0,
    min_size: int = 256,
    max_size: int = 1024,
    modalities: Sequence[str] = MODALITIES,
    progress: bool = True,
) -> dict:
    """Write a synthetic dataset in the NeurIPS 2022 Cell Segmentation folder layout.

    Parameters
    ----------
    out : pathlib.Path
        Output root; created if missing. A folder of an earlier dataset is replaced whole;
        any other non-empty folder, or one holding files besides the dataset, is refused.
    n_labeled, n_unlabeled, n_test : int
        Number of images per split (``labeled`` and ``test`` also get label files).
    seed : int
        Dataset seed.  Image ``i`` of split ``s`` uses ``SeedSequence([seed, s, i])``, so the
        same seed gives byte-identical arrays and adding images keeps earlier ones unchanged.
    min_size, max_size : int
        Height and width of each image are drawn independently from ``[min_size, max_size]``.
    modalities : sequence of str
        Modalities to use, assigned round-robin by index within each split.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    dict
        ``{"out": str, "seed": int, "n_images": int, "splits": {split: {"n": int,
        "modalities": {modality: int}, "formats": {ext: int}}}}``.
    """
    out = Path(out)
    mods = tuple(modalities)
    if not mods:
        raise SynthError("at least one modality is required")
    for m in mods:
        if m not in _RENDERERS:
            raise SynthError(f"unknown modality {m!r}; expected one of {MODALITIES}")
    if not 8 <= min_size <= max_size:
        raise SynthError(f"need 8 <= min_size <= max_size, got {min_size}, {max_size}")
    counts = {"labeled": int(n_labeled), "unlabeled": int(n_unlabeled), "test": int(n_test)}
    if any(v < 0 for v in counts.values()):
        raise SynthError(f"negative image count: {counts}")

    _check_target(out)
    with staged_dir(out) as stage:  # a killed run leaves the earlier dataset, or none
        summary = _write_dataset(stage, counts, mods, seed, min_size, max_size, progress)
    summary["out"] = str(out)
    return summary


def _written_by_synth(rel: Path) -> bool:
    """Whether ``rel`` (a path inside a dataset folder) is one that :func:`synthesize_dataset`
    writes: ``synth.json``, ``modalities.csv``, the split folders, and their images and
    labels by name (``labeled/images/cell_00001.png``, ``test/labels/test_00002_label.tiff``)."""
    parts = rel.parts
    if len(parts) == 1:
        return parts[0] in ("synth.json", MODALITIES_FILE, *SPLITS)
    if parts[0] not in SPLITS or parts[1] not in ("images", "labels") or len(parts) > 3:
        return False
    if len(parts) == 2:
        return True
    prefix = re.escape(_SPLIT_PREFIX[parts[0]])
    name = r"_label\.tiff" if parts[1] == "labels" else r"\.(tif|tiff|png|jpg|bmp)"
    return re.fullmatch(rf"{prefix}_\d{{5}}{name}", parts[2]) is not None


def _check_target(out: Path) -> None:
    """Refuse to write over a folder that is not an earlier synthetic dataset, or that
    holds files besides one: it is replaced whole (an earlier dataset of other sizes would
    otherwise keep images the new one does not have, and mix with it), and a user's own
    files in it (notes, corrected labels, an image added by hand) would go with it."""
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out} is a file; give a folder for the synthetic dataset")
    if out.is_dir() and any(out.iterdir()) and not (out / "synth.json").is_file():
        raise SynthError(
            f"{out} is not empty and holds no synthetic dataset of cellst (no synth.json); "
            "give a new or empty folder"
        )
    if out.is_dir():
        foreign = sorted(p.relative_to(out) for p in out.rglob("*"))
        foreign = [p for p in foreign if not _written_by_synth(p)]
        others = [str(p) for p in foreign if not any(q in p.parents for q in foreign)]
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if others[3:] else "")
            raise SynthError(
                f"{out} holds files cellst synth did not write ({shown}); writing the dataset "
                "again replaces the folder whole, so move them out or give a new folder"
            )


def _write_dataset(
    out: Path,
    counts: dict[str, int],
    mods: tuple[str, ...],
    seed: int,
    min_size: int,
    max_size: int,
    progress: bool,
) -> dict[str, Any]:
    """Write the dataset into the (staging) folder ``out``; its summary."""
    jobs = []
    for split in SPLITS:
        if counts[split] == 0:
            continue
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        if split != "unlabeled":
            (out / split / "labels").mkdir(parents=True, exist_ok=True)
        per_mod: dict[str, int] = {}
        for i in range(counts[split]):
            mod = mods[i % len(mods)]
            per_mod[mod] = per_mod.get(mod, 0) + 1
            name = f"{_SPLIT_PREFIX[split]}_{i + 1:05d}"
            jobs.append((split, i, name, mod, image_extension(mod, per_mod[mod])))

    summary: dict[str, Any] = {
        "out": str(out),
        "seed": int(seed),
        "n_images": len(jobs),
        "splits": {s: {"n": counts[s], "modalities": {}, "formats": {}} for s in SPLITS},
    }
    iterator: Any = jobs
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(jobs, desc="synthesizing", unit="img")
    rows = []
    for split, i, name, mod, ext in iterator:
        rng = _image_rng(seed, split, i)
        shape = (
            int(rng.integers(min_size, max_size + 1)),
            int(rng.integers(min_size, max_size + 1)),
        )
        image, label = synth_image(rng, mod, shape)
        _save_image(out / split / "images" / f"{name}{ext}", image)
        if split != "unlabeled":
            _save_label(out / split / "labels" / label_file_name(name), label)
        rows.append((name, mod))
        s = summary["splits"][split]
        s["modalities"][mod] = s["modalities"].get(mod, 0) + 1
        s["formats"][ext] = s["formats"].get(ext, 0) + 1

    def _write_csv(p: Path) -> None:
        with open(p, "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(["name", "modality"])
            wr.writerows(rows)

    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / MODALITIES_FILE, _write_csv)
    params = {
        "generator": "cellst.data.synth",
        "version": 1,
        "seed": int(seed),
        "n_labeled": counts["labeled"],
        "n_unlabeled": counts["unlabeled"],
        "n_test": counts["test"],
        "min_size": int(min_size),
        "max_size": int(max_size),
        "modalities": list(mods),
        "radius_range": list(_RADIUS_RANGE),
        "density": "random per image: sparse 0.04-0.15 (25%), medium 0.15-0.45 (40%), "
        "dense 0.45-0.85 (35%)",
        "seed_derivation": "SeedSequence([seed, split_code, index]); split_code "
        + json.dumps(_SPLIT_CODE),
    }
    _atomic_write(out / "synth.json", lambda p: p.write_text(json.dumps(params, indent=2) + "\n"))
    return summary
