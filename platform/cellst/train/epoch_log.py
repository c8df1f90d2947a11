"""Each epoch's metrics into MLflow, logged by the Ray Train controller once it holds the
epoch's checkpoint.

A worker that logged its epoch before Ray Train had registered the checkpoint left the
epoch in MLflow although a kill at that moment discarded it: the resumed run trained the
epoch again and logged it a second time, so the history held two values per metric at
that step. The controller calls :meth:`EpochMetricsToMLflow.after_report` after its
checkpoint manager has registered the report's checkpoint, so an epoch is logged exactly
when a resumed run would not train it again.

Per-step metrics (``step_*``) are still logged live by the worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.train import UserCallback


def epoch_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of one epoch's report (what MLflow can chart)."""
    return {
        k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }


class EpochMetricsToMLflow(UserCallback):
    """Log rank 0's metrics of each checkpointed report to one MLflow run, best-effort
    (:class:`cellst.tracking.buffered.BufferedMetricLogger`: a dead server costs a file
    append, and what is kept is sent when the run is run again).

    Parameters
    ----------
    tracking_uri, run_id : str or None
        Where to log; either None logs nothing.
    run_dir : path
        The run folder, which keeps records a dead server could not take.
    timeout_s, retry_every_s
        As :class:`~cellst.tracking.buffered.BufferedMetricLogger`'s.
    """

    def __init__(
        self,
        tracking_uri: str | None,
        run_id: str | None,
        run_dir: str | Path,
        *,
        timeout_s: int,
        retry_every_s: float,
    ):
        self.args = (tracking_uri, run_id, str(run_dir))
        self.kwargs = {"timeout_s": timeout_s, "retry_every_s": retry_every_s}
        self._logger = None  # made in the controller's process, on the first report

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if checkpoint is None or not metrics or "epoch" not in metrics[0]:
            return  # a report without a checkpoint (a diverged epoch) holds no epoch's scores
        if self._logger is None:
            from cellst.tracking.buffered import BufferedMetricLogger

            self._logger = BufferedMetricLogger(*self.args, **self.kwargs)
        self._logger.log(epoch_metrics(metrics[0]), int(metrics[0]["epoch"]))

    def __getstate__(self) -> dict[str, Any]:  # sent to the controller without a logger
        return {**self.__dict__, "_logger": None}
