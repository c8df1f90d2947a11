"""A classical cell segmentation baseline: Otsu threshold + distance-transform watershed.

What a learned model has to beat: no training, no labels, one image at a time. The image is
smoothed and thresholded with Otsu's method, holes are filled, and touching cells are split
by a watershed of the Euclidean distance transform seeded at its local maxima.

Which side of the threshold holds the cells is read from the image itself, never from a
modality name (see :func:`detect_polarity`): bright cells on a dark background (as in
fluorescence), dark cells on a light one (stained brightfield), or both at once (relief
contrast, as in DIC, or phase contrast with its bright halos), where the absolute deviation
from the local background is thresholded instead.

The default parameters were chosen on synthetic images of development seeds only
(``cellst.data.synth``), never on a benchmark's test split.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage as ndi

__all__ = ["RELIEF_BALANCE", "Polarity", "detect_polarity", "threshold_watershed"]

Polarity = Literal["auto", "bright", "dark", "relief"]

#: both tails at least this large relative to each other make an image "relief" contrast
RELIEF_BALANCE = 0.5


def _to_gray(image: ArrayLike) -> np.ndarray:
    """A float64 ``(H, W)`` image from ``(H, W)``, ``(H, W, 1)``, RGB or RGBA input."""
    img = np.asarray(image)
    if img.dtype == bool or not np.issubdtype(img.dtype, np.number):
        raise ValueError(f"image must be numeric, got dtype {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3 and img.shape[2] in (3, 4):
        from skimage.color import rgb2gray

        gray = rgb2gray(img[:, :, :3].astype(np.float64))
    elif img.ndim == 2:
        gray = img.astype(np.float64)
    else:
        raise ValueError(
            f"image must be (H, W), (H, W, 1), RGB (H, W, 3) or RGBA (H, W, 4); got {img.shape}"
        )
    if not np.isfinite(gray).all():
        raise ValueError("image holds NaN or infinite values")
    return gray


def _background_level(values: np.ndarray, bins: int = 256) -> float:
    """The histogram mode: the grey level of the flat, frequent background."""
    counts, edges = np.histogram(values, bins=bins)
    counts = ndi.uniform_filter1d(counts.astype(np.float64), 3, mode="nearest")
    k = int(np.argmax(counts))
    return float(0.5 * (edges[k] + edges[k + 1]))


def detect_polarity(detail: ArrayLike) -> Literal["bright", "dark", "relief"]:
    """Whether cells are brighter or darker than the background, or both (relief contrast).

    Parameters
    ----------
    detail : array_like
        ``(H, W)`` image with its slowly varying background (illumination) removed, e.g.
        ``smooth - gaussian(smooth, 20)``.

    Returns
    -------
    str
        ``"bright"``, ``"dark"`` or ``"relief"``.

    Notes
    -----
    The background level is the histogram mode. Pixels that deviate from it by more than
    an Otsu threshold of the absolute deviation are counted above and below it: the side
    with more of them holds the cells, unless both sides are about as large (the smaller
    at least :data:`RELIEF_BALANCE` times the larger), which is relief contrast.
    """
    from skimage.filters import threshold_otsu

    d = np.asarray(detail, dtype=np.float64)
    dev = d - _background_level(d)
    mag = np.abs(dev)
    if float(mag.max()) <= 0:
        return "bright"
    t = threshold_otsu(mag)
    above = int(np.count_nonzero(dev > t))
    below = int(np.count_nonzero(dev < -t))
    if min(above, below) >= RELIEF_BALANCE * max(above, below, 1):
        return "relief"
    return "bright" if above >= below else "dark"


def _auto_min_distance(mask: np.ndarray, dist: np.ndarray) -> int:
    """Seed spacing from the image: the median, over objects, of the inscribed radius."""
    objects, n = ndi.label(mask)
    if n == 0:
        return 3
    radii = ndi.maximum(dist, objects, np.arange(1, n + 1))
    return int(max(2, round(float(np.median(radii)))))


def threshold_watershed(
    image: ArrayLike,
    *,
    polarity: Polarity = "auto",
    sigma: float = 1.0,
    background_sigma: float = 20.0,
    relief_sigma: float = 3.0,
    min_distance: int | None = None,
    min_size: int = 15,
) -> np.ndarray:
    """Segment cells with an Otsu threshold and a distance-transform watershed.

    Parameters
    ----------
    image : array_like
        ``(H, W)`` grey-level, ``(H, W, 1)``, RGB ``(H, W, 3)`` or RGBA ``(H, W, 4)`` image
        of any numeric dtype (colour is converted with :func:`skimage.color.rgb2gray`).
    polarity : {"auto", "bright", "dark", "relief"}, optional
        Cells brighter than the background, darker, or both (relief contrast: the absolute
        deviation from the local background is thresholded). ``"auto"`` decides from the
        image with :func:`detect_polarity`.
    sigma : float, optional
        Standard deviation (pixels) of the Gaussian smoothing before thresholding.
    background_sigma : float, optional
        Standard deviation (pixels) of the Gaussian that estimates the local background
        (uneven illumination) for the polarity decision and relief contrast.
    relief_sigma : float, optional
        Standard deviation (pixels) of the smoothing of the relief magnitude, which fills
        the flat tops of cells between their bright and dark edges.
    min_distance : int, optional
        Smallest distance (pixels) between two watershed seeds. Default: the median, over
        the thresholded objects, of the largest inscribed-circle radius (a typical cell
        radius), so that a cell gets one seed.
    min_size : int, optional
        Objects and watershed regions smaller than this many pixels are dropped.

    Returns
    -------
    labels : (H, W) ndarray of int32
        Instance map: 0 is background, cells are numbered 1..N without gaps. A constant
        image gives no cells.

    Raises
    ------
    ValueError
        If the image has an unsupported shape or dtype, holds NaN or infinite values, or
        ``polarity`` is unknown.

    See Also
    --------
    skimage.filters.threshold_otsu, skimage.segmentation.watershed

    Examples
    --------
    >>> import numpy as np
    >>> img = np.zeros((64, 64))
    >>> img[10:25, 10:25] = 1.0
    >>> img[40:55, 30:50] = 1.0
    >>> int(threshold_watershed(img).max())
    2
    """
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import relabel_sequential, watershed

    if polarity not in ("auto", "bright", "dark", "relief"):
        raise ValueError(f"polarity must be auto, bright, dark or relief; got {polarity!r}")
    gray = _to_gray(image)
    empty = np.zeros(gray.shape, np.int32)
    span = float(gray.max() - gray.min()) if gray.size else 0.0
    if span <= 1e-12 * max(1.0, float(np.abs(gray).max(initial=0.0))):
        return empty
    smooth = gaussian(gray, sigma, preserve_range=True) if sigma > 0 else gray
    detail = smooth - gaussian(smooth, background_sigma, preserve_range=True)
    side = detect_polarity(detail) if polarity == "auto" else polarity
    if side == "relief":
        score = gaussian(np.abs(detail - _background_level(detail)), relief_sigma)
    else:
        score = smooth if side == "bright" else -smooth
    if float(score.max() - score.min()) <= 0:
        return empty
    mask = ndi.binary_fill_holes(score > threshold_otsu(score))
    mask = remove_small_objects(mask, max_size=max(0, min_size - 1))
    if not mask.any():
        return empty
    dist = ndi.distance_transform_edt(mask)
    md = _auto_min_distance(mask, dist) if min_distance is None else max(1, int(min_distance))
    objects, _ = ndi.label(mask)
    peaks = peak_local_max(
        gaussian(dist, 1.0, preserve_range=True),
        min_distance=md,
        labels=objects,
        exclude_border=False,
    )
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    labels = watershed(-dist, markers, mask=mask).astype(np.int32)
    unseeded = mask & (labels == 0)  # an object without a seed stays one cell
    if unseeded.any():
        extra, _ = ndi.label(unseeded)
        labels = np.where(unseeded, extra + labels.max(), labels).astype(np.int32)
    small = np.bincount(labels.ravel()) < min_size
    small[0] = False
    labels[small[labels]] = 0
    return relabel_sequential(labels)[0].astype(np.int32)
