"""Each epoch's metrics into MLflow, logged by the Ray Train controller once it holds the
epoch's checkpoint.

A worker that logged its epoch before Ray Train had registered the checkpoint left the
epoch in MLflow although a kill at that moment discarded it: the resumed run trained the
epoch again and logged it a second time, so the history held two values per metric at
that step. The controller calls :meth:`EpochMetricsToMLflow.after_report` after its
checkpoint manager has registered the report's checkpoint, so an epoch is logged exactly
when a resumed run would not train it again.

The epoch's per-step metrics (``step_*``, every ``train.log_every_steps``) go the same way:
rank 0 writes them into the epoch's Ray checkpoint (:data:`STEP_METRICS_FILE`, beside the
training state, not into the run's cellst checkpoints) and the callback logs them, with
their own steps and times, just before the epoch's.

A kill between keeping an epoch and logging it would leave a kept epoch out of MLflow for
good: each epoch's training state also records what it logs, and a resumed run logs the
restored epoch if MLflow lacks it (:func:`log_restored_epoch`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.train import UserCallback

from cellst.fs import atomic_write_json

if TYPE_CHECKING:
    from cellst.tracking.buffered import BufferedMetricLogger

#: in an epoch's Ray checkpoint: ``[[step, time in ms, {name: value}], ...]`` of its steps
STEP_METRICS_FILE = "step_metrics.json"
#: the same records in a diverged epoch's report (which has no checkpoint)
STEP_METRICS = "step_metrics"


def write_step_metrics(folder: str | Path, records: list[tuple[int, int, dict]]) -> None:
    """Keep an epoch's per-step ``(step, time in ms, metrics)`` records in ``folder``."""
    atomic_write_json(Path(folder) / STEP_METRICS_FILE, [list(r) for r in records])


def read_step_metrics(checkpoint) -> list[tuple[int, int, dict[str, float]]]:
    """The per-step ``(step, time in ms, metrics)`` records a Ray ``checkpoint`` holds, for
    :meth:`~cellst.tracking.buffered.BufferedMetricLogger.log_steps`; [] without any."""
    try:
        path = f"{checkpoint.path}/{STEP_METRICS_FILE}"
        with checkpoint.filesystem.open_input_stream(path) as fh:
            records = json.loads(fh.read())
    except (FileNotFoundError, OSError, ValueError):  # an older run's, or none logged
        return []
    return [(int(step), int(ts), dict(metrics)) for step, ts, metrics in records]


def epoch_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of one epoch's report (what MLflow can chart)."""
    return {
        k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }


def log_restored_epoch(
    logger: BufferedMetricLogger, epoch: int, logged: dict[str, Any] | None
) -> bool:
    """Log the epoch a resumed run restored, if MLflow lacks it.

    An epoch is logged right after it is kept (by the controller once it registered the
    checkpoint, or by the loop in local mode once it saved the resume state); a kill between
    the two left a kept epoch that no run trains again, and so would never log.
    ``logged`` is what the epoch's training state recorded for MLflow (``metrics`` and
    per-step ``steps``); ``logger`` a :class:`~cellst.tracking.buffered.BufferedMetricLogger`
    of the run. Nothing is logged when MLflow cannot say (a server down, records waiting
    to be sent). Returns whether the epoch was logged here.
    """
    if not logged or not epoch or logger.has_metric_at("epoch", epoch) is not False:
        return False
    logger.log_steps(logged.get("steps") or [])
    logger.log(logged.get("metrics") or {}, epoch)
    return True


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
        if not metrics or "epoch" not in metrics[0]:
            return
        if self._logger is None:
            from cellst.tracking.buffered import BufferedMetricLogger

            self._logger = BufferedMetricLogger(*self.args, **self.kwargs)
        if checkpoint is None:  # a diverged epoch: no scores, but the losses that led there
            self._logger.log_steps(metrics[0].get(STEP_METRICS) or [])
            return
        self._logger.log_steps(read_step_metrics(checkpoint))
        self._logger.log(epoch_metrics(metrics[0]), int(metrics[0]["epoch"]))

    def __getstate__(self) -> dict[str, Any]:  # sent to the controller without a logger
        return {**self.__dict__, "_logger": None}
