"""ST++ reliability: how stable each unlabelled item's prediction is across training snapshots.

ST++ (Yang et al., CVPR 2022, ``select_reliable``) predicts every unlabelled image with the
checkpoints saved at about 1/3, 2/3 and the end of supervised training, scores each earlier
checkpoint's prediction against the final one's and averages the scores; stable images are
the reliable ones. For instance segmentation the agreement of two instance maps is

* ``instance_f1`` (default, the seed paper): the F1 at IoU 0.5 of a one-to-one matching of
  the two maps' instances (:func:`cellst.metrics.instance.match_instances`);
* ``mask_iou`` (as the original ST++ on semantic masks): the IoU of the two nuclear
  (foreground) masks.

Two empty maps agree perfectly (score 1); an empty map against a non-empty one scores 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cellst.data.store import CellStore, StoreError
from cellst.metrics.instance import match_instances

MEASURES = ("instance_f1", "mask_iou")


def agreement(a: np.ndarray, b: np.ndarray, measure: str = "instance_f1") -> float:
    """Agreement of two instance maps of the same shape, in [0, 1] (1: identical)."""
    if a.shape != b.shape:
        raise ValueError(f"instance maps differ in shape: {a.shape} vs {b.shape}")
    if measure == "instance_f1":
        if not a.any() and not b.any():
            return 1.0
        return float(match_instances(b, a, iou_threshold=0.5).f1)
    if measure == "mask_iou":
        fa, fb = a > 0, b > 0
        union = int(np.count_nonzero(fa | fb))
        return 1.0 if union == 0 else float(np.count_nonzero(fa & fb) / union)
    raise ValueError(f"unknown reliability measure {measure!r}; choose from {MEASURES}")


def item_reliability(maps: Sequence[np.ndarray], measure: str = "instance_f1") -> list[float]:
    """Agreement of each earlier snapshot's map with the last one (the final snapshot)."""
    if len(maps) < 2:
        raise ValueError(f"reliability needs at least two snapshot predictions, got {len(maps)}")
    final = np.asarray(maps[-1])
    return [agreement(np.asarray(m), final, measure) for m in maps[:-1]]


def _score_rows(
    store_root: str, sets: Sequence[str], ids: Sequence[str], measure: str
) -> list[dict]:
    store = CellStore(store_root)
    rows = []
    for item in ids:
        maps = [store.pseudo_label(s, item) for s in sets]
        per = item_reliability(maps, measure)
        row = {"id": item, "modality": store.row(item).modality, "score": float(np.mean(per))}
        row.update({f"agree_{s}": v for s, v in zip(sets[:-1], per, strict=True)})
        row["n_instances_final"] = int(len(np.unique(maps[-1])) - (maps[-1] == 0).any())
        rows.append(row)
    return rows


def score_items(
    store: str | Path | CellStore,
    sets: Sequence[str],
    ids: Sequence[str] | None = None,
    measure: str = "instance_f1",
    use_ray: bool = False,
    items_per_task: int = 8,
) -> pd.DataFrame:
    """Score items from pseudo-label sets written by each snapshot (in snapshot order).

    Parameters
    ----------
    store : path or CellStore
    sets : sequence of str
        One pseudo-label set per snapshot, the final snapshot last.
    ids : sequence of str, optional
        Items to score (default: the items of the final snapshot's set).
    measure : ``instance_f1`` or ``mask_iou``
    use_ray : bool
        Score in Ray tasks (``items_per_task`` items each) instead of in this process.

    Returns
    -------
    pandas.DataFrame
        One row per item: ``id``, ``modality``, ``score`` (mean agreement with the final
        snapshot), ``agree_<set>`` per earlier snapshot and ``n_instances_final``; ordered by
        :func:`rank`.
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown reliability measure {measure!r}; choose from {MEASURES}")
    store = store if isinstance(store, CellStore) else CellStore(store)
    if len(sets) < 2:
        raise ValueError(f"reliability needs at least two snapshot sets, got {list(sets)}")
    if ids is None:
        ids = store.pseudo_items(sets[-1])["id"].tolist()
    ids = list(ids)
    for s in sets:
        have = set(store.pseudo_items(s)["id"]) if s in store.pseudo_sets() else set()
        missing = [i for i in ids if i not in have]
        if missing:
            raise StoreError(f"pseudo-label set {s!r} lacks items {missing[:5]} to score")
    root = str(store.root)
    if use_ray and len(ids) > items_per_task:
        import ray

        task = ray.remote(num_cpus=0.5)(_score_rows)
        chunks = [ids[i : i + items_per_task] for i in range(0, len(ids), items_per_task)]
        rows = [
            r
            for part in ray.get([task.remote(root, list(sets), c, measure) for c in chunks])
            for r in part
        ]
    else:
        rows = _score_rows(root, list(sets), ids, measure)
    columns = ["id", "modality", "score", *[f"agree_{s}" for s in sets[:-1]], "n_instances_final"]
    return rank(pd.DataFrame(rows, columns=columns))


def rank(scores: pd.DataFrame) -> pd.DataFrame:
    """Most reliable first (score descending, ties by id), with a 1-based ``rank`` column."""
    out = scores.sort_values(["score", "id"], ascending=[False, True], kind="stable")
    out = out.reset_index(drop=True)
    out["rank"] = np.arange(1, len(out) + 1)
    return out


def _check_fraction(fraction: float) -> None:
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")


def n_reliable(n: int, fraction: float) -> int:
    """How many of ``n`` items are reliable: ``floor(fraction * n)``, kept in [1, n - 1].

    As ST++ (``len(ids) // 2`` at fraction 0.5: 2 of 5, not 3). Both groups are non-empty
    whenever ``n >= 2``; a single item is reliable.
    """
    _check_fraction(fraction)
    if n <= 1:
        return n
    return int(min(max(int(np.floor(fraction * n + 1e-9)), 1), n - 1))


def split_reliable(
    scores: pd.DataFrame, fraction: float, by: str | None = None
) -> tuple[list[str], list[str], float]:
    """The top ``fraction`` of the ranked items as reliable, the rest as unreliable.

    Parameters
    ----------
    scores : DataFrame
        ``id`` and ``score`` columns (and ``by``'s), as :func:`score_items` returns.
    fraction : float
        Share of the items kept as reliable (:func:`n_reliable`).
    by : str, optional
        A column (``"modality"``) whose groups are ranked and split each on its own: the top
        ``floor(fraction * n)`` of every group of ``n`` items is reliable (the most reliable
        item overall where that leaves none). Agreement is lower on some modalities for
        every image (dense or low-contrast ones), so a single ranking can leave a modality
        out of the first re-training. None: one ranking over all items (ST++).

    Returns ``(reliable_ids, unreliable_ids, cutoff)``, each list most reliable first, where
    ``cutoff`` is the lowest reliable score (the threshold drawn on the histogram).
    """
    ranked = rank(scores)
    if by is not None:
        if by not in ranked.columns:
            raise ValueError(f"scores have no column {by!r} to split by")
        _check_fraction(fraction)
        # floor per group, so every group keeps an unreliable item for the second round
        within = ranked.groupby(by, sort=False).cumcount()
        size = ranked.groupby(by, sort=False)["id"].transform("size")
        keep = within < np.floor(fraction * size + 1e-9)
        if not keep.any() and len(ranked):
            keep.iloc[0] = True
    else:
        keep = ranked["rank"] <= n_reliable(len(ranked), fraction)
    reliable = ranked["id"][keep].tolist()
    unreliable = ranked["id"][~keep].tolist()
    cutoff = float(ranked["score"][keep].min()) if keep.any() else float("nan")
    return reliable, unreliable, cutoff
