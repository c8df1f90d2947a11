"""How a training divides its work: the processes that step and the steps of an epoch.

Pure arithmetic on the configuration, shared by the driver (:mod:`cellst.train.trainer`,
which sizes the crop stream and fits the cluster) and every worker
(:mod:`cellst.train.loop`, which steps that often), below both.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for annotations only
    from cellst.experiment import ExperimentConfig


def training_ranks(cfg: ExperimentConfig) -> int:
    """Processes that step: ``train.num_workers``, or 1 where that is 0 (local mode)."""
    return max(1, cfg.train.num_workers)


def steps_per_epoch(cfg: ExperimentConfig) -> int:
    """Optimizer steps of each worker per epoch: ``data.crops_per_epoch`` crops in full
    batches over all workers (rounded up, so every rank steps equally often)."""
    t = cfg.train
    return max(1, math.ceil(cfg.data.crops_per_epoch / (training_ranks(cfg) * t.batch_size)))
