"""How ST++'s training budget is shared between its stages: the epochs and crops per
epoch of the re-training stages (4 and 6) against stage 1's, and the training crops of each
stage, which a supervised baseline at equal compute needs (``benchmarks/bench_stpp.py``).

The one place that says how stages 4 and 6 train differently from stage 1; configuration
only (no torch, no Ray).
"""

from __future__ import annotations

import math

from cellst.experiment import ExperimentConfig
from cellst.stpp.experiment import StppExperimentConfig


def retrain_crops(crops: int, pseudo_weight: float, max_factor: float = 4.0) -> int:
    """Crops per epoch of a re-training stage that keeps stage 1's labelled crops per epoch."""
    factor = min(1.0 / (1.0 - pseudo_weight), max_factor) if pseudo_weight < 1 else 1.0
    return int(math.ceil(crops * factor))


def retrain_schedule(cfg: StppExperimentConfig) -> tuple[int, int]:
    """Epochs and crops per epoch of a re-training stage (4 or 6) of ``cfg``."""
    crops = cfg.data.crops_per_epoch
    if cfg.stpp.scale_retrain_crops:
        crops = retrain_crops(crops, cfg.train.pseudo_weight)
    return cfg.stpp.retrain_epochs or cfg.train.epochs, crops


def apply_retrain_schedule(training: ExperimentConfig, cfg: StppExperimentConfig) -> None:
    """Give ``training`` (a copy of ``cfg``'s base config) the re-training stages' schedule:
    :func:`retrain_schedule`'s epochs and crops, and ``stpp.retrain_lr`` and
    ``stpp.retrain_ema_decay`` where set.

    The one place that says how stages 4 and 6 train differently from stage 1, so that a
    baseline given "ST++'s schedule" (``benchmarks/bench_stpp.py``) trains as they do.
    """
    training.train.epochs, training.data.crops_per_epoch = retrain_schedule(cfg)
    if cfg.stpp.retrain_lr is not None:
        training.train.lr = cfg.stpp.retrain_lr
    if cfg.stpp.retrain_ema_decay is not None:
        training.train.ema_decay = cfg.stpp.retrain_ema_decay


def training_crops(cfg: StppExperimentConfig) -> dict[str, int]:
    """Training crops (epochs x crops per epoch) of the three training stages of ``cfg``:
    the compute a supervised-only baseline needs for an equal-compute comparison."""
    crops, epochs = cfg.data.crops_per_epoch, cfg.train.epochs
    re_epochs, re_crops = retrain_schedule(cfg)
    return {
        "supervised": epochs * crops,
        "retrain_reliable": re_epochs * re_crops,
        "retrain_all": re_epochs * re_crops,
    }
