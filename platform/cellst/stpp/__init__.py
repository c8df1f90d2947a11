"""ST++ self-training on Ray: durable stages, reliability scoring, MLflow nested runs.

``run_stpp`` (and ``cellst stpp CONFIG``) runs supervised training, reliability scoring of
the unlabelled items across snapshots, two rounds of pseudo-labelling and re-training, and
a final test-split comparison; see :mod:`cellst.stpp.pipeline`.

Names are imported lazily, so ``cellst.experiment`` can import
:class:`cellst.stpp.config.StppConfig` without an import cycle.
"""

from __future__ import annotations

from cellst._lazy import lazy_getattr

_NAMES = {
    "QUICK_OVERRIDES": "config",
    "StppConfig": "config",
    "load_stpp_config": "experiment",
    "stpp_problems": "experiment",
    "StppExperimentConfig": "experiment",
    "STAGES": "outputs",
    "StppResult": "pipeline",
    "StppStopped": "pipeline",
    "pipeline_status": "pipeline",
    "run_stpp": "pipeline",
    "item_reliability": "reliability",
    "score_items": "reliability",
    "split_reliable": "reliability",
    "StageBook": "stages",
    "StageRecord": "stages",
}
__all__ = sorted(_NAMES)


__getattr__ = lazy_getattr(__name__, _NAMES)
