"""MLflow tracking for cellst stages: run setup, config/metric/table logging and figures.

Names are imported lazily, so ``cellst.tracking.figures`` can be used without importing
MLflow (which takes seconds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cellst._lazy import lazy_getattr

__all__ = [
    "PENDING_FILE",
    "BufferedMetricLogger",
    "DisabledRun",
    "TrackingConfig",
    "TrackingUnavailable",
    "active_run_id",
    "check_tracking",
    "curve_figure",
    "default_tags",
    "ensure_experiment",
    "flatten_params",
    "git_commit",
    "histogram_figure",
    "log_artifact",
    "log_config",
    "log_figure",
    "log_metrics",
    "log_params",
    "log_table",
    "mark_superseded",
    "supersede_earlier_children",
    "overlay_figure",
    "pending_note",
    "resend_pending",
    "resolve_tracking",
    "runs_table",
    "save_figure",
    "set_tags",
    "start_run",
    "store_inside",
    "store_tags",
    "ui_command",
    "use_tracking_uri",
]
_FIGURES = {"curve_figure", "histogram_figure", "log_figure", "overlay_figure", "save_figure"}
_BUFFERED = {
    "PENDING_FILE",
    "BufferedMetricLogger",
    "TrackingUnavailable",
    "pending_note",
    "resend_pending",
}

if TYPE_CHECKING:
    from cellst.tracking.buffered import (
        PENDING_FILE,
        BufferedMetricLogger,
        TrackingUnavailable,
        pending_note,
        resend_pending,
    )
    from cellst.tracking.config import resolve_tracking, store_inside, ui_command
    from cellst.tracking.figures import (
        curve_figure,
        histogram_figure,
        log_figure,
        overlay_figure,
        save_figure,
    )
    from cellst.tracking.mlflow_utils import (
        DisabledRun,
        TrackingConfig,
        active_run_id,
        check_tracking,
        default_tags,
        ensure_experiment,
        flatten_params,
        git_commit,
        log_artifact,
        log_config,
        log_metrics,
        log_params,
        log_table,
        mark_superseded,
        runs_table,
        set_tags,
        start_run,
        store_tags,
        supersede_earlier_children,
        use_tracking_uri,
    )


__getattr__ = lazy_getattr(
    __name__,
    {
        n: "figures"
        if n in _FIGURES
        else "buffered"
        if n in _BUFFERED
        else "config"
        if n in ("resolve_tracking", "store_inside", "ui_command")
        else "mlflow_utils"
        for n in __all__
    },
)
