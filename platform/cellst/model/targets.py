"""HoVer-Net training targets from instance label maps.

:func:`hover_maps` reproduces :class:`monai.transforms.ComputeHoVerMaps` exactly: for every
instance, the horizontal (x) and vertical (y) offsets of its pixels from the instance
centroid, with negative offsets divided by the largest negative magnitude and positive ones
by the largest positive offset (so each side spans [-1, 0] and [0, 1] independently), channel
0 horizontal, channel 1 vertical, background 0. MONAI loops over ``regionprops`` and rewrites
the whole map for every cell (O(cells x pixels)); here everything is one vectorised pass over
the foreground pixels (bincount centroids, per-label extents from ``find_objects``), with the
same float64 arithmetic, so the result is bit-identical up to the final float32 cast.
(Unlike MONAI, labels above 2**24 are handled correctly: MONAI compares labels after a
float32 cast, which merges large neighbouring label values.)
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage as ndi

__all__ = ["hover_maps", "make_targets", "np_target"]


def _as_label(label: np.ndarray) -> np.ndarray:
    label = np.asarray(label)
    if label.ndim == 3 and label.shape[0] == 1:
        label = label[0]
    if label.ndim != 2:
        raise ValueError(f"expected an (H, W) instance label map, got shape {label.shape}")
    if label.dtype == bool:
        return label.astype(np.int32)
    if not np.issubdtype(label.dtype, np.integer):
        raise TypeError(f"instance label map must have an integer dtype, got {label.dtype}")
    return label


def hover_maps(label: np.ndarray) -> np.ndarray:
    """Horizontal/vertical centroid-offset maps ``(2, H, W)`` float32 of an ``(H, W)`` label map.

    Equal to ``monai.transforms.ComputeHoVerMaps()(label[None])``. Non-sequential labels,
    touching instances and disconnected pieces of one label (one instance, as in MONAI) are
    fine; 0 is background; negative labels are rejected.
    """
    label = _as_label(label)
    h, w = label.shape
    out = np.zeros((2, h, w), dtype=np.float32)
    fg = label.ravel() != 0
    flat = np.flatnonzero(fg)
    if flat.size == 0:
        return out
    lab = label.ravel()[flat]
    if lab.min() < 0:
        raise ValueError("instance label map has negative labels")
    max_label = int(lab.max())
    if max_label > 4 * flat.size + 65536:
        # huge, sparse label values: relabel compactly so bincount/find_objects stay small
        _, lab = np.unique(lab, return_inverse=True)
        lab = lab.reshape(-1) + 1
        compact = np.zeros(h * w, dtype=np.intp)
        compact[flat] = lab
        label = compact.reshape(h, w)
        max_label = int(lab.max())
    else:
        lab = lab.astype(np.intp, copy=False)
    rows, cols = np.divmod(flat, w)

    n = max_label + 1
    count = np.bincount(lab, minlength=n).astype(np.float64)
    present = count > 0
    count[~present] = 1.0
    # sums of integer coordinates are exact in float64, so sum / count == coords.mean()
    cy = np.bincount(lab, weights=rows, minlength=n) / count
    cx = np.bincount(lab, weights=cols, minlength=n) / count

    # per-label extents (min/max row and column) from the bounding boxes
    ymin = np.zeros(n)
    ymax = np.zeros(n)
    xmin = np.zeros(n)
    xmax = np.zeros(n)
    objs = ndi.find_objects(label, max_label=max_label)
    ids = np.flatnonzero(present[1:]) + 1
    for i in ids:
        sy, sx = objs[i - 1]
        ymin[i], ymax[i] = sy.start, sy.stop - 1
        xmin[i], xmax[i] = sx.start, sx.stop - 1
    # same expressions as MONAI: dist / -amin(dist) for dist < 0, dist / amax(dist) for dist > 0
    neg_y, pos_y = -(ymin - cy), ymax - cy
    neg_x, pos_x = -(xmin - cx), xmax - cx

    for ch, coord, centre, neg, pos in ((0, cols, cx, neg_x, pos_x), (1, rows, cy, neg_y, pos_y)):
        d = coord - centre[lab]
        scale = np.where(d < 0, neg[lab], pos[lab])
        np.divide(d, scale, out=d, where=d != 0)
        out[ch].ravel()[flat] = d
    return out


def np_target(label: np.ndarray) -> np.ndarray:
    """Foreground mask ``(H, W)`` uint8 (1 = any instance) of an instance label map."""
    return (_as_label(label) > 0).astype(np.uint8)


def make_targets(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """HoVer-Net targets of a batch of instance maps ``(B, H, W)`` or ``(B, 1, H, W)``.

    Returns ``np_onehot`` ``(B, 2, H, W)`` float32 (channel 0 background, 1 foreground) and
    ``hv`` ``(B, 2, H, W)`` float32 (:func:`hover_maps`), on the device of ``labels``. The
    work is done per item on CPU numpy (a few ms per 256x256 crop).
    """
    if labels.ndim == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 3:
        raise ValueError(
            f"expected labels of shape (B, H, W) or (B, 1, H, W), got {tuple(labels.shape)}"
        )
    lab = labels.detach().cpu().numpy()
    hv = (
        np.stack([hover_maps(item) for item in lab])
        if len(lab)
        else np.zeros((0, 2, *lab.shape[1:]))
    )
    fg = torch.from_numpy(lab > 0).to(torch.float32)
    np_onehot = torch.stack([1.0 - fg, fg], dim=1)
    return {
        "np_onehot": np_onehot.to(labels.device),
        "hv": torch.from_numpy(hv.astype(np.float32, copy=False)).to(labels.device),
    }
