"""Validation during training: whole-image inference + HoVer post-processing + challenge F1
(the same steps as the post-processing calibration and sweeps: :mod:`cellst.postprocess.calibrate`)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from cellst.config import EvaluateConfig
from cellst.data.store import CellStore
from cellst.inference.predictor import InferenceConfig
from cellst.metrics.instance import summarize
from cellst.postprocess import PostprocessConfig
from cellst.postprocess.calibrate import predict_val_maps, score_item


def split_train_val(items: pd.DataFrame, fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split of labelled items, stratified by modality.

    Every modality with at least two items gives at least one to validation (when
    ``fraction > 0``); a store with a single labelled item validates on it.

    The training ids come sorted; the validation ids come interleaved by modality (one of
    each modality in turn, each modality's in id order), so that the first ``n`` of them,
    which a validation of ``train.val_max_items``, a calibration of
    ``train.calibrate_max_items`` or a sweep of ``tune.max_items`` scores, cover as many
    modalities as ``n`` allows. (Sorted, a prefix of 4 of 6 items left out a whole
    modality on most seeds, and the best checkpoint was chosen without it.)
    """
    if fraction <= 0 or len(items) < 2:
        ids = items["id"].tolist()
        return ids, ([] if fraction <= 0 else ids)
    rng = np.random.default_rng(seed)
    train: list[str] = []
    per_modality: list[list[str]] = []
    for _, group in items.groupby("modality", sort=True):
        ids = sorted(group["id"])
        rng.shuffle(ids)
        n_val = int(round(fraction * len(ids)))
        n_val = min(max(n_val, 1 if len(ids) >= 2 else 0), len(ids) - 1)
        per_modality.append(sorted(ids[:n_val]))
        train += ids[n_val:]
    rounds = itertools.zip_longest(*per_modality)
    return sorted(train), [i for one_round in rounds for i in one_round if i is not None]


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    store: CellStore,
    ids: Sequence[str],
    infer: InferenceConfig,
    post: PostprocessConfig,
    device: torch.device,
    keep: int = 0,
    evaluate: EvaluateConfig | None = None,
) -> tuple[dict[str, float], list[tuple[str, np.ndarray]], list[float]]:
    """Mean challenge scores of ``model`` on ``ids`` (``val_f1``, ``val_pq``, ...).

    ``evaluate`` (the config's ``evaluate`` section: IoU threshold, boundary rule) makes
    ``val_f1`` mean what ``cellst evaluate``'s F1 means. Returns the metrics (with
    ``val_f1_se``, the standard error of ``val_f1``, from two items on), the first ``keep``
    predictions (for overlay figures) and each item's F1 in the order of ``ids`` (for
    :func:`cellst.train.selection.update_best`).
    """
    ev = evaluate or EvaluateConfig()
    was_training = model.training
    model.eval()
    rows, kept = [], []
    try:  # an item that fails leaves the model in the mode it came in
        maps = predict_val_maps(model, store, ids, infer, device)
        for item, item_maps in zip(ids, maps, strict=True):
            scores, pred = score_item(item_maps, post, ev)
            rows.append({"id": item, "modality": store.row(item).modality, **scores})
            if len(kept) < keep:
                kept.append((item, pred))
    finally:
        model.train(was_training)
    summary = summarize(rows, by="modality")
    metrics = {
        f"val_{k}": float(summary[k] or 0.0)
        for k in ("f1", "precision", "recall", "dq", "sq", "pq")
    }
    # per modality, named as ``cellst compare`` and the ST++ test metrics name them
    for modality, block in summary.get("per_modality", {}).items():
        metrics[f"val_f1/{modality}"] = float(block["f1"] or 0.0)
    if len(rows) >= 2:  # the noise of val_f1: its standard error over the images
        f1s = np.array([r["f1"] for r in rows], dtype=float)
        metrics["val_f1_se"] = float(f1s.std(ddof=1) / np.sqrt(len(f1s)))
    return metrics, kept, [float(r["f1"]) for r in rows]
