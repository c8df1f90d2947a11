"""Ray Tune sweeps of post-processing and training settings (``cellst tune``).

See :mod:`cellst.tune.sweep`. Names are imported lazily so that
:class:`cellst.experiment.ExperimentConfig` can import :class:`cellst.tune.config.TuneConfig`
without importing Ray Tune.
"""

from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cellst.tune.{_NAMES[name]}"), name)
    globals()[name] = value
    return value
