"""The ST++ pipeline's MLflow parent run: created once, re-attached by every later attempt,
with one child run per stage under it.

Creating the parent needs the tracking server (a clear error before any stage runs);
everything after that is best-effort, as all cellst tracking is: what the server cannot
take now is kept in the pipeline folder's pending file and sent by a later run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from cellst.data.store import CellStore
from cellst.stpp.experiment import StppExperimentConfig
from cellst.stpp.report import table_metrics
from cellst.stpp.stages import StageRecord, pipeline_lock, read_meta, update_meta
from cellst.tracking.config import LOCK_TAG

#: a finished pipeline's parent-run tags (``stopped_after`` of an earlier --until cleared)
COMPLETED_TAGS = {"cellst.stpp.completed": "true", "cellst.stpp.stopped_after": "none"}


class ParentRun:
    """The parent run of the pipeline in ``pipeline_dir`` (``run_id`` None until opened,
    and always with tracking off)."""

    def __init__(self, cfg: StppExperimentConfig, pipeline_dir: Path):
        self.cfg = cfg
        self.dir = pipeline_dir
        self.tracking = cfg.tracking  # resolved by :meth:`resolve`
        self.uri: str | None = None
        self.run_id: str | None = None
        #: one line for the user about the parent run, or empty
        self.note = ""

    def resolve(self) -> None:
        """Fix the tracking URI, artifact root and experiment (the pipeline folder's own
        store unless ``tracking`` names a server)."""
        if not self.cfg.tracking.enabled:
            return
        from cellst.tracking import resolve_tracking

        uri, artifacts, experiment = resolve_tracking(self.cfg.tracking, self.dir, self.cfg.name)
        self.uri = uri
        self.tracking = self.cfg.tracking.model_copy(
            update={"tracking_uri": uri, "artifact_root": artifacts, "experiment": experiment}
        )

    def open(self, store: CellStore) -> None:
        """Create the parent run, or re-attach the one of an earlier attempt, and mark it
        RUNNING (:class:`~cellst.tracking.TrackingUnavailable` if it cannot be created)."""
        if not self.tracking.enabled:
            return
        from mlflow.tracking import MlflowClient

        from cellst.tracking import log_config, set_tags, start_run, store_tags
        from cellst.tracking.mlflow_utils import guarded

        tags = {**store_tags(store), "cellst.stage": "stpp", "cellst.stpp.pipeline": str(self.dir)}
        tags[LOCK_TAG] = str(pipeline_lock(self.dir).resolve())  # held while it runs
        with start_run(
            self.tracking,
            self.dir,
            self.cfg.name,
            f"{self.cfg.pipeline_name}-stpp",
            run_id=self._earlier_run(),
            tags=tags,
        ) as run:
            self.run_id = run.info.run_id
            update_meta(self.dir, parent_run_id=self.run_id, tracking_uri=self.uri)
            with _quiet_param_warnings():
                log_config(self.logged_config())
            set_tags({"cellst.stpp.attempt_started": time.strftime("%Y-%m-%d %H:%M:%S")})
        # the parent stays RUNNING while the stages run as its children (best-effort: a
        # failure is one line, the stages run all the same)
        guarded(
            "the parent run's RUNNING status",
            MlflowClient(self.uri).update_run,
            self.run_id,
            status="RUNNING",
        )

    def logged_config(self) -> StppExperimentConfig:
        """The configuration as the pipeline runs it: the stages' trainings run in the
        pipeline folder (not ``train.run_dir``) and log to the resolved tracking."""
        cfg = self.cfg.model_copy(deep=True)
        cfg.train.run_dir = str(self.dir / "train")
        cfg.tracking = self.tracking
        return cfg

    def _earlier_run(self) -> str | None:
        """The parent run of an earlier attempt on the same server, if it can be read."""
        from mlflow.tracking import MlflowClient

        from cellst.tracking.buffered import http_limits

        meta = read_meta(self.dir)
        run_id = meta.get("parent_run_id") if meta.get("tracking_uri") == self.uri else None
        if not run_id:
            return None
        try:
            with http_limits(self.tracking.timeout_s):
                client = MlflowClient(self.uri)
                run = client.get_run(run_id)
                if run.info.lifecycle_stage == "deleted":
                    return None
                there = client.get_experiment(run.info.experiment_id).name
        except Exception:  # noqa: BLE001 - a run that cannot be read is replaced
            return None
        if there != self.tracking.experiment:
            self.note = (
                f"the pipeline's runs stay in MLflow experiment {there!r}, where it started; "
                f"tracking.experiment={self.tracking.experiment!r} applies to a new pipeline "
                "(another stpp.name or stpp.run_dir)"
            )
        return run_id

    def close(self, status: str, tags: dict | None = None) -> None:
        """End the parent run with ``status`` (best-effort, journalled when the server is
        down)."""
        if not self.run_id:
            return
        from cellst.tracking import BufferedMetricLogger

        journal = BufferedMetricLogger(
            self.uri,
            self.run_id,
            self.dir,
            timeout_s=self.tracking.timeout_s,
            retry_every_s=self.tracking.retry_every_s,
        )
        journal.set_tags(tags or {})
        journal.set_terminated(status)
        journal.close()

    def finish(self, records: list[StageRecord], report: pd.DataFrame | None) -> None:
        """Log the stage summary and the final F1 table on the parent run, and end it.

        With the server down, one line says so and the end of the run is kept in the
        pending file (the table is in ``report.csv`` all the same).
        """
        if not self.run_id:
            return
        from cellst.tracking import TrackingUnavailable
        from cellst.tracking.buffered import say

        try:
            self._log_final(records, report)
        except TrackingUnavailable as exc:
            say(f"tracking: {exc}; the final table was not logged (see {self.dir})")
            self.close("FINISHED", COMPLETED_TAGS)

    def _log_final(self, records: list[StageRecord], report: pd.DataFrame | None) -> None:
        from cellst.tracking import log_metrics, log_table, set_tags, start_run

        with start_run(self.tracking, self.dir, self.cfg.name, None, run_id=self.run_id):
            stages = pd.DataFrame(
                [
                    {
                        "stage": r.key,
                        "status": r.status,
                        "seconds": r.seconds,
                        "attempts": r.attempts,
                        "mlflow_run_id": r.mlflow_run_id,
                    }
                    for r in records
                ]
            )
            log_table(stages, "stages.csv")
            rel = next((r.outputs for r in records if r.name == "reliability"), None)
            if rel:
                log_metrics(
                    {"n_reliable": len(rel["reliable"]), "n_unreliable": len(rel["unreliable"])}
                )
            if report is not None:
                log_table(report, "final/f1_table.csv")
                log_metrics(table_metrics(report))
            set_tags(COMPLETED_TAGS)

    @contextlib.contextmanager
    def child(self, rec: StageRecord, replaces: str | None = None) -> Iterator[str | None]:
        """A stage's child run (re-attached when the stage resumes); yields its id.
        ``replaces``: the child run of an earlier attempt this one replaces (a stage run
        again from scratch), tagged with the new one's id so ``cellst compare`` says so."""
        from cellst.tracking import mark_superseded, start_run

        with start_run(
            self.tracking,
            self.dir,
            self.cfg.name,
            f"{self.cfg.pipeline_name}-{rec.key}",
            parent_run_id=self.run_id,
            run_id=rec.mlflow_run_id,
            tags={
                "cellst.stage": f"stpp.{rec.name}",
                "cellst.stpp.stage": rec.key,
                "cellst.stpp.pipeline": str(self.dir),
            },
        ) as run:
            mark_superseded(self.tracking, self.dir, self.cfg.name, replaces, run.info.run_id)
            yield run.info.run_id


@contextlib.contextmanager
def _quiet_param_warnings() -> Iterator[None]:
    """A re-run with a changed config cannot re-log params (immutable); say so once."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        yield
    changed = [w for w in caught if "MLflow params are immutable" in str(w.message)]
    if changed:
        print(
            f"note: {len(changed)} config value(s) differ from the first attempt's params of "
            f"the MLflow parent run; the resolved config is in config.yaml"
        )
