"""Ray Tune sweeps of post-processing and training settings (``cellst tune``).

See :mod:`cellst.tune.sweep`. Names are imported lazily so that
:class:`cellst.experiment.ExperimentConfig` can import :class:`cellst.tune.config.TuneConfig`
without importing Ray Tune.
"""

from __future__ import annotations

from cellst._lazy import lazy_getattr

_NAMES = {
    "Distribution": "config",
    "TuneConfig": "config",
    "load_tune_config": "space",
    "space_problems": "space",
    "SweepResult": "sweep",
    "run_sweep": "sweep",
    "score_postprocess": "sweep",
}
__all__ = sorted(_NAMES)


__getattr__ = lazy_getattr(__name__, _NAMES)
