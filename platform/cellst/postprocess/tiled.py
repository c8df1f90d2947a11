"""Tiled HoVer post-processing for images too large to process (or hold) at once.

The image is covered by overlapping ``tile x tile`` windows whose starts advance by
``tile - overlap`` (the last window is aligned to the image end). Every window is processed
with :func:`cellst.postprocess.hover_to_instances`; the cut between two neighbouring windows
is the middle of their overlap, which splits the image into disjoint *core* regions, one per
window. An instance found in a window is kept only if its centroid lies in that window's core
(tested in exact integer arithmetic, so no instance is kept twice or lost to rounding), and it
is written only over pixels that are still unlabelled.

Why this equals the untiled result (up to instance ids): every core lies at least
``overlap / 2`` pixels inside its window (except at the image edge, where the window edge *is*
the image edge). A cell whose centroid lies in a core and whose extent from its centroid,
plus the filter halo (Sobel ``k // 2``, Gaussian tail, opening), stays below ``overlap / 2``
is seen by that window exactly as by the full image. The one non-local step of the algorithm
is the global min-max normalisation: that of the HoVer maps cancels out (see
:mod:`cellst.postprocess.hover`), and that of the Sobel responses is done with the *global*
extremes, computed in a first pass over the tile cores (each core extended by the Sobel
radius, so the responses there are exact) and passed to every window. Tiling therefore does
not change the result when the overlap exceeds about twice the largest cell radius plus the
halo; clusters of touching cells larger than that can differ near the cuts.

Memory stays bounded by one window's intermediates plus the int32 output (preallocated, or
an ``out`` array such as a ``numpy.memmap``). Inputs can be anything that supports 2-D/3-D
slicing and ``.shape`` (numpy arrays, memmaps, zarr or h5py arrays): only one window is read
at a time, as float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cellst.postprocess.hover import (
    PostprocessConfig,
    _hover_core,
    _sobel_responses,
    hover_to_instances,
)

__all__ = ["hover_to_instances_tiled", "postprocess_hover", "resize_labels", "tile_layout"]


def tile_layout(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Windows and cores of one axis.

    Parameters
    ----------
    length : int
        Image size along the axis.
    tile, overlap : int
        Window size and overlap (``0 <= overlap < tile``).

    Returns
    -------
    list of (start, stop, core_start, core_stop)
        Windows ``[start, stop)`` in increasing order; the cores ``[core_start, core_stop)``
        partition ``[0, length)``.
    """
    if length <= tile:
        return [(0, length, 0, length)]
    stride = tile - overlap
    n = -(-(length - tile) // stride) + 1
    starts = [min(i * stride, length - tile) for i in range(n)]
    starts = sorted(set(starts))
    cuts = [0]
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        cuts.append((b + a + tile) // 2)  # middle of the overlap [b, a + tile)
    cuts.append(length)
    return [(s, s + tile, cuts[i], cuts[i + 1]) for i, s in enumerate(starts)]


def _shape2d(nuclear_prob: Any, hv: Any) -> tuple[int, int]:
    shape = tuple(int(s) for s in nuclear_prob.shape)
    if len(shape) != 2:
        raise ValueError(f"nuclear_prob must be (H, W), got shape {shape}")
    hv_shape = tuple(int(s) for s in hv.shape)
    if hv_shape != (2, *shape):
        raise ValueError(f"hv must be (2, H, W) with (H, W) = {shape}, got {hv_shape}")
    return shape  # type: ignore[return-value]


def _read(arr: Any, *index: slice | int) -> np.ndarray:
    """One window of a sliceable array as a C-contiguous float32 numpy array."""
    return np.ascontiguousarray(np.asarray(arr[index]), dtype=np.float32)


def hover_to_instances_tiled(
    nuclear_prob: Any,
    hv: Any,
    tile: int = 2048,
    overlap: int = 256,
    *,
    out: np.ndarray | None = None,
    **params: Any,
) -> np.ndarray:
    """:func:`~cellst.postprocess.hover_to_instances` over overlapping tiles, stitched.

    Parameters
    ----------
    nuclear_prob : array_like
        (H, W) foreground probability; any array supporting slicing and ``.shape`` (numpy,
        memmap, zarr, h5py); read one window at a time.
    hv : array_like
        (2, H, W) HoVer maps (channel 0 horizontal, 1 vertical), sliceable likewise.
    tile, overlap : int
        Window side and overlap (validated as ``PostprocessConfig.tile`` and
        ``tile_overlap``). The result equals the untiled one, up to instance ids, when the
        overlap exceeds the largest cell (cluster) diameter plus twice the filter halo.
    out : numpy.ndarray, optional
        Zero-filled (H, W) int32 array to write into (e.g. a ``numpy.memmap``); allocated
        when omitted.
    **params
        ``mask_threshold``, ``marker_threshold``, ``sobel_kernel``, ``min_object_size``,
        ``marker_radius``, ``distance_sigma`` as in :class:`PostprocessConfig`.

    Returns
    -------
    numpy.ndarray
        (H, W) int32 instance map (``out`` when given), labels ``1..N`` without gaps,
        numbered tile by tile.
    """
    cfg = PostprocessConfig(tile=tile, tile_overlap=overlap, **params)
    height, width = _shape2d(nuclear_prob, hv)
    if out is None:
        out = np.zeros((height, width), dtype=np.int32)
    elif out.shape != (height, width) or out.dtype != np.int32:
        raise ValueError(f"out must be int32 of shape {(height, width)}")
    if height <= tile and width <= tile:
        out[...] = hover_to_instances(
            _read(nuclear_prob, slice(None), slice(None)),
            _read(hv, slice(None)),
            **cfg.hover_kwargs(),
        )
        return out

    rows = tile_layout(height, tile, overlap)
    cols = tile_layout(width, tile, overlap)
    rad = cfg.sobel_kernel // 2

    # pass 1: global extremes of the HoVer maps and of their Sobel responses (core pixels)
    sob = [np.inf, -np.inf, np.inf, -np.inf]
    hv_ext = [np.inf, -np.inf, np.inf, -np.inf]
    for _, _, cy0, cy1 in rows:
        for _, _, cx0, cx1 in cols:
            wy0, wy1 = max(0, cy0 - rad), min(height, cy1 + rad)
            wx0, wx1 = max(0, cx0 - rad), min(width, cx1 + rad)
            h = _read(hv, 0, slice(wy0, wy1), slice(wx0, wx1))
            v = _read(hv, 1, slice(wy0, wy1), slice(wx0, wx1))
            core = (slice(cy0 - wy0, cy1 - wy0), slice(cx0 - wx0, cx1 - wx0))
            hc, vc = h[core], v[core]
            hv_ext = [
                min(hv_ext[0], float(hc.min())),
                max(hv_ext[1], float(hc.max())),
                min(hv_ext[2], float(vc.min())),
                max(hv_ext[3], float(vc.max())),
            ]
            sh, sv = _sobel_responses(h, v, cfg.sobel_kernel)
            sh, sv = sh[core], sv[core]
            sob = [
                min(sob[0], float(sh.min())),
                max(sob[1], float(sh.max())),
                min(sob[2], float(sv.min())),
                max(sob[3], float(sv.max())),
            ]
    if hv_ext[0] == hv_ext[1] or hv_ext[2] == hv_ext[3]:
        return out  # constant HoVer channel: no instances (MONAI: "Not a valid hover map")
    sobel_range = (sob[0], sob[1], sob[2], sob[3])

    # pass 2: process every window, keep the instances whose centroid lies in its core
    next_id = 0
    written: list[np.ndarray] = []  # pixels written per kept instance, tile by tile
    for y0, y1, cy0, cy1 in rows:
        for x0, x1, cx0, cx1 in cols:
            prob = _read(nuclear_prob, slice(y0, y1), slice(x0, x1))
            h = _read(hv, 0, slice(y0, y1), slice(x0, x1))
            v = _read(hv, 1, slice(y0, y1), slice(x0, x1))
            lab = _hover_core(prob, h, v, cfg, sobel_range=sobel_range)
            del prob, h, v
            flat = lab.ravel()
            idx = np.flatnonzero(flat)
            if idx.size == 0:
                continue
            ids = flat[idx]
            n = int(ids.max())
            ys, xs = np.divmod(idx, lab.shape[1])
            ys += y0
            xs += x0
            cnt = np.bincount(ids, minlength=n + 1)
            sy = np.bincount(ids, weights=ys, minlength=n + 1).astype(np.int64)
            sx = np.bincount(ids, weights=xs, minlength=n + 1).astype(np.int64)
            # centroid in [c0, c1)  <=>  c0 * cnt <= sum < c1 * cnt  (exact in int64)
            keep = (sy >= cy0 * cnt) & (sy < cy1 * cnt) & (sx >= cx0 * cnt) & (sx < cx1 * cnt)
            keep &= cnt > 0
            lut = (np.cumsum(keep) * keep).astype(np.int32)
            nkeep = int(np.count_nonzero(keep))
            lut[keep] += next_id
            new = lut[ids]
            sel = new > 0
            ys, xs, new = ys[sel], xs[sel], new[sel]
            free = out[ys, xs] == 0  # never overwrite an instance kept by an earlier tile
            out[ys[free], xs[free]] = new[free]
            written.append(np.bincount(new[free] - next_id, minlength=nkeep + 1)[1:])
            next_id += nkeep

    # labels must stay 1..N: drop the ids that lost all their pixels (only possible when a
    # cell or cluster is larger than the overlap)
    if next_id:
        present = np.concatenate([[False], *(c > 0 for c in written)])
        if not present[1:].all():
            lut = (np.cumsum(present) * present).astype(np.int32)
            for _, _, cy0, cy1 in rows:
                for _, _, cx0, cx1 in cols:
                    out[cy0:cy1, cx0:cx1] = lut[out[cy0:cy1, cx0:cx1]]
    return out


def postprocess_hover(
    nuclear_prob: Any,
    hv: Any,
    config: PostprocessConfig | None = None,
    shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Instance map with the parameters of ``config``, tiled when the image exceeds a tile.

    Parameters
    ----------
    nuclear_prob : array_like
        (H, W) foreground probability.
    hv : array_like
        (2, H, W) HoVer maps.
    config : PostprocessConfig, optional
        Defaults to ``PostprocessConfig()``.
    shape : (int, int), optional
        The image's own size, when the maps are of an upsampled copy of it (cell-size
        rescaling, ``inference.rescale_diameter``): the maps are post-processed at their
        size, with ``min_object_size`` scaled by the area ratio, and the labels resized
        back to ``shape`` (nearest neighbour).

    Returns
    -------
    numpy.ndarray
        Instance map of ``shape`` (default (H, W)), int32, labels ``1..N``.
    """
    cfg = config or PostprocessConfig()
    height, width = _shape2d(nuclear_prob, hv)
    rescaled = shape is not None and (int(shape[0]), int(shape[1])) != (height, width)
    if rescaled:
        area = height * width / (int(shape[0]) * int(shape[1]))
        cfg = cfg.model_copy(update={"min_object_size": round(cfg.min_object_size * area)})
    if height <= cfg.tile and width <= cfg.tile:
        label = hover_to_instances(np.asarray(nuclear_prob), np.asarray(hv), **cfg.hover_kwargs())
    else:
        label = hover_to_instances_tiled(
            nuclear_prob, hv, cfg.tile, cfg.tile_overlap, **cfg.hover_kwargs()
        )
    return resize_labels(label, shape) if rescaled else label


def resize_labels(label: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``label`` resized to ``shape`` by nearest neighbour, relabelled ``1..N`` (a cell
    smaller than a pixel of the new grid can vanish)."""
    from skimage.segmentation import relabel_sequential
    from skimage.transform import resize

    out = resize(
        label, tuple(int(n) for n in shape[:2]), order=0, preserve_range=True, anti_aliasing=False
    )
    return relabel_sequential(out.astype(np.int32))[0]
