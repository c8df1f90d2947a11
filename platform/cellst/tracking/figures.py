"""Figures for run reports: segmentation overlays, histograms and curves.

Figures are built on :class:`matplotlib.figure.Figure` with an Agg canvas, never through
``pyplot``, so no global figure registry fills up in long-running workers and no GUI backend
is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from skimage.segmentation import find_boundaries

from cellst.fs import atomic_write

#: largest image side drawn in an overlay panel; bigger inputs are subsampled
OVERLAY_MAX_SIDE = 768
_FILL_ALPHA = 0.35


def new_figure(figsize: tuple[float, float], dpi: int = 100) -> Figure:
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def instance_colors(n: int, seed: int = 0) -> np.ndarray:
    """``(n + 1, 3)`` float RGB lookup table: row 0 (background) black, rows 1..n bright,
    random-looking but deterministic colours (the same id always gets the same colour)."""
    rng = np.random.default_rng(seed)
    hsv = np.stack(
        [rng.random(n + 1), rng.uniform(0.65, 1.0, n + 1), rng.uniform(0.8, 1.0, n + 1)],
        axis=1,
    )
    from matplotlib.colors import hsv_to_rgb

    rgb = hsv_to_rgb(hsv)
    rgb[0] = 0.0
    return rgb


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Any 2-D/3-D numeric image to ``(H, W, 3) uint8`` for display."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8:
        return img
    from cellst.data.images import normalize_image

    return normalize_image(img)


def _subsample(arrays: Sequence[np.ndarray], max_side: int) -> list[np.ndarray]:
    h, w = arrays[0].shape[:2]
    stride = max(1, int(np.ceil(max(h, w) / max_side)))
    if stride == 1:
        return list(arrays)
    return [a[::stride, ::stride] for a in arrays]


def overlay_rgb(image: np.ndarray, label: np.ndarray, alpha: float = _FILL_ALPHA) -> np.ndarray:
    """``image`` with each instance of ``label`` tinted in its colour and outlined.

    Returns float RGB in [0, 1] of shape ``(H, W, 3)``.
    """
    lab = np.asarray(label).astype(np.int64, copy=False)
    base = _to_rgb_uint8(image).astype(np.float32) / 255.0
    if lab.max(initial=0) <= 0:
        return base
    lut = instance_colors(int(lab.max())).astype(np.float32)
    color = lut[np.clip(lab, 0, None)]
    inside = (lab > 0)[..., None]
    out = np.where(inside, (1 - alpha) * base + alpha * color, base)
    edges = find_boundaries(lab, mode="inner", background=0)
    out[edges] = color[edges]
    return np.clip(out, 0.0, 1.0)


def overlay_figure(
    image: np.ndarray,
    label: np.ndarray,
    pred: np.ndarray,
    title: str = "",
    max_side: int = OVERLAY_MAX_SIDE,
) -> Figure:
    """Three panels: image | ground-truth instances | predicted instances.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W, 3) uint8``; other layouts/dtypes are normalised for display.
    label, pred : numpy.ndarray
        ``(H, W)`` integer instance maps (0 = background).
    title : str
        Figure title.
    max_side : int
        Larger images are subsampled (nearest) to at most this side before drawing.

    Returns
    -------
    matplotlib.figure.Figure
    """
    label = np.asarray(label)
    pred = np.asarray(pred)
    rgb = _to_rgb_uint8(image)
    if label.shape != rgb.shape[:2] or pred.shape != rgb.shape[:2]:
        raise ValueError(
            f"image {rgb.shape[:2]}, label {label.shape} and prediction {pred.shape} differ"
        )
    n_label = int(np.unique(label[label > 0]).size)
    n_pred = int(np.unique(pred[pred > 0]).size)
    rgb, label, pred = _subsample([rgb, label, pred], max_side)
    h, w = label.shape
    panel_w = float(np.clip(w / 100.0, 3.0, 6.0))
    panel_h = panel_w * h / w
    fig = new_figure((3 * panel_w, panel_h + (0.6 if title else 0.35)))
    axes = fig.subplots(1, 3, sharex=True, sharey=True)
    panels = [
        (rgb, "image"),
        (overlay_rgb(rgb, label), f"label ({n_label} cells)"),
        (overlay_rgb(rgb, pred), f"prediction ({n_pred} cells)"),
    ]
    for ax, (data, name) in zip(axes, panels, strict=True):
        ax.imshow(data, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def histogram_figure(
    values: Sequence[float] | np.ndarray,
    title: str,
    xlabel: str,
    threshold: float | None = None,
    bins: int | str = "auto",
) -> Figure:
    """Histogram of the finite ``values``, with a dashed vertical line at ``threshold``."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    fig = new_figure((6.0, 4.0))
    ax = fig.subplots()
    if v.size:
        if isinstance(bins, str):
            edges = np.histogram_bin_edges(v, bins=bins)
            bins = int(min(max(len(edges) - 1, 1), 100))
        ax.hist(v, bins=bins, color="#4c72b0", edgecolor="white", linewidth=0.5)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if threshold is not None:
        ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold = {threshold:g}")
        ax.legend(loc="best", fontsize=9)
    ax.set_title(f"{title} (n={v.size})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return fig


def curve_figure(
    x: Sequence[float] | np.ndarray,
    ys: Mapping[str, Sequence[float]],
    xlabel: str,
    ylabel: str,
    title: str,
) -> Figure:
    """One line per entry of ``ys`` against ``x``, with a legend."""
    xs = np.asarray(x, dtype=np.float64)
    fig = new_figure((6.0, 4.0))
    ax = fig.subplots()
    for name, y in ys.items():
        yv = np.asarray(y, dtype=np.float64)
        if yv.shape != xs.shape:
            raise ValueError(f"curve {name!r} has {yv.shape} points, x has {xs.shape}")
        ax.plot(xs, yv, marker="o" if xs.size <= 30 else None, markersize=3, label=str(name))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ys:
        ax.legend(loc="best", fontsize=9)
    return fig


def close_figure(fig: Figure) -> None:
    """Release a figure's artists (figures here are not registered with pyplot)."""
    fig.clear()


def log_figure(fig: Figure, artifact_file: str, close: bool = True) -> None:
    """Log ``fig`` to the active MLflow run (no-op outside a run), then close it."""
    import mlflow

    from cellst.tracking.mlflow_utils import guarded

    try:
        if mlflow.active_run() is not None:  # best-effort: a failure is said in one line
            guarded(artifact_file, mlflow.log_figure, fig, artifact_file)
    finally:
        if close:
            close_figure(fig)


def save_figure(fig: Figure, path: str | Path, dpi: int | None = None) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (temporary file + rename)."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    return path
