"""Which epoch's checkpoint is ``best``: the latest one whose validation F1 is within noise
of the highest.

On the validation split of a weakly labelled dataset (two to six images) the epoch with the
highest validation F1 is often an early one that happened to suit those images: on four
``bench_stpp`` seeds (12 labelled images, 4 validated), the highest-F1 epoch scored 0.611
test F1 on average where the last epoch scored 0.702. The rule here is a one-standard-error
rule that prefers the longer-trained model: a later epoch takes the ``best`` name unless the
highest-scoring epoch so far beats it by more than ``within_se`` standard errors of their
paired per-image difference. With many validation images the standard error is small and
the rule picks the highest F1, as before; with one image it always picks the latest epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def paired_se(a: Sequence[float], b: Sequence[float]) -> float:
    """Standard error of the mean per-image difference ``a - b``.

    Parameters
    ----------
    a, b : sequence of float
        Per-image scores of two models on the same images, in the same order.

    Returns
    -------
    float
        ``std(a - b, ddof=1) / sqrt(n)``; ``inf`` for fewer than two images (the noise of
        one image cannot be estimated, so no difference is significant).
    """
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same images, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return math.inf
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float(d.std(ddof=1) / math.sqrt(len(d)))


def initial_best() -> dict[str, Any]:
    """The selection state before any validation (kept in the training state for resume)."""
    return {"val_f1": -1.0, "epoch": 0, "top_f1": -1.0, "top_epoch": 0, "top_items": None}


def update_best(
    best: dict[str, Any],
    epoch: int,
    val_f1: float,
    item_f1: Sequence[float],
    within_se: float,
) -> dict[str, Any]:
    """The selection state after validating ``epoch``.

    Parameters
    ----------
    best : dict
        The state so far (:func:`initial_best`, or one saved by an earlier version, which
        held only ``val_f1`` and ``epoch``).
    epoch : int
        The epoch just validated.
    val_f1 : float
        Its mean validation F1.
    item_f1 : sequence of float
        Its F1 on each validation image, in the fixed validation order.
    within_se : float
        A later epoch becomes ``best`` unless the top epoch beats it by more than this many
        paired standard errors. 0: the highest validation F1, earliest on ties.

    Returns
    -------
    dict
        ``val_f1`` and ``epoch`` of the ``best`` checkpoint, and ``top_f1``, ``top_epoch``,
        ``top_items`` of the highest-scoring epoch.
    """
    if within_se < 0:
        raise ValueError(f"within_se must be >= 0, got {within_se}")
    top_f1 = float(best.get("top_f1", best["val_f1"]))
    top_items = best.get("top_items")
    out = dict(best)
    out.setdefault("top_epoch", best["epoch"])
    if val_f1 > top_f1:
        out.update(val_f1=val_f1, epoch=epoch, top_f1=val_f1, top_epoch=epoch)
        out["top_items"] = [float(f) for f in item_f1]
        return out
    if within_se > 0 and top_items is not None and len(top_items) == len(item_f1):
        se = paired_se(top_items, item_f1)
        if top_f1 - val_f1 <= within_se * se:
            out.update(val_f1=val_f1, epoch=epoch)
    return out
