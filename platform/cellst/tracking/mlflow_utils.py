"""A thin MLflow layer shared by every cellst stage.

Where runs go
-------------
* ``TrackingConfig.tracking_uri`` when set, else ``$MLFLOW_TRACKING_URI``, else an embedded
  SQLite database ``<run_dir>/mlflow.db``. Relative SQLite paths are made absolute (Ray
  workers and Tune trials run in other working directories). Plain paths and ``file:`` URIs
  are refused: MLflow 3.17 only allows the file store with ``MLFLOW_ALLOW_FILE_STORE=true``.
* Artifacts of new experiments go to ``TrackingConfig.artifact_root`` when set; for a SQLite
  store to ``mlartifacts/`` next to the database file (``<run_dir>/mlartifacts`` for the
  embedded default); for an ``http(s)`` server to the server's default (usually its proxied
  ``mlflow-artifacts:/`` store); for other databases to ``<run_dir>/mlartifacts``. An
  experiment's artifact location is fixed when it is created, so nothing ever lands in
  ``./mlruns`` of the current directory.

Global state
------------
MLflow's fluent API keeps the tracking URI in a module global *and* in the environment
variable ``MLFLOW_TRACKING_URI`` (so that subprocesses inherit it). :func:`start_run` sets
both for the duration of the run and restores the previous values afterwards, so one run
cannot redirect the next one.

The ``log_*`` helpers act on the active run of the calling thread and are silent no-ops
when there is none (that is how ``TrackingConfig(enabled=False)`` disables everything).

When the server fails
---------------------
Tracking is best-effort once a run has started: requests wait at most
``TrackingConfig.timeout_s`` with one quick retry (MLflow's default is 7 retries over about
4 minutes), and what the server cannot take (metrics, params, tags, artifact files, the
run's end status) is kept in ``<run_dir>/tracking-pending.jsonl`` and sent when it answers
again (:class:`~cellst.tracking.buffered.BufferedMetricLogger`); other losses (tables,
figures) are said in one line. Nothing here raises because of the server after
:func:`start_run` has begun the run. Beginning it, however, needs the server: a server that
is down then raises :class:`~cellst.tracking.buffered.TrackingUnavailable` naming the URI
(:func:`check_tracking` finds this before any work starts).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import subprocess
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import pandas as pd
import yaml
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

import cellst
from cellst.data.layout import MANIFEST, is_store, manifest_sha256, manifest_version
from cellst.fs import file_lock
from cellst.tracking.buffered import (
    DEFAULT_TIMEOUT_S,
    BufferedMetricLogger,
    TrackingUnavailable,
    classify,
    http_limits,
    say,
)
from cellst.tracking.config import (
    SUPERSEDED_TAG,
    TrackingConfig,
    _normalise_uri,
    _sqlite_path,
    resolve_tracking,
)

log = logging.getLogger(__name__)


def quiet_mlflow() -> None:
    """MLflow's INFO lines (database migrations, system-metrics monitor) out of the terminal,
    and the monitor's warning per failed sample (a tracking outage is said once, by
    :class:`~cellst.tracking.buffered.BufferedMetricLogger`), unless ``CELLST_VERBOSE=1``."""
    if os.environ.get("CELLST_VERBOSE", "0") != "1":
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)


#: MLflow's limit on a parameter value (``mlflow.utils.validation.MAX_PARAM_VAL_LENGTH``)
MAX_PARAM_VALUE_LENGTH = 6000
#: MLflow's limit on params (and tags) per ``log_batch`` request
MAX_PARAMS_PER_BATCH = 100

#: what a tracking call raises when the store fails (requests' errors are OSErrors)
TRACKING_ERRORS = (MlflowException, OSError)
#: the journal of each run started by :func:`start_run` in this process, by run id
_journals: dict[str, BufferedMetricLogger] = {}


@contextlib.contextmanager
def _sqlite_lock(uri: str) -> Iterator[None]:
    """Serialise database creation between processes for a local SQLite store."""
    db = _sqlite_path(uri) if urlparse(uri).scheme.lower() == "sqlite" else None
    if db is None:
        yield
        return
    with file_lock(db + ".lock"):
        yield


def ensure_experiment(uri: str, name: str, artifact_location: str | None = None) -> str:
    """Return the id of experiment ``name``, creating it with ``artifact_location`` if missing.

    Idempotent and safe when several processes race: creation is serialised with a file lock
    for SQLite stores, and an "already exists" answer (from another client of a server) is
    followed by a re-read. A deleted experiment of that name is restored. The artifact
    location of an existing experiment is never changed.
    """
    with _sqlite_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                return client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise MlflowException(f"experiment {name!r} exists but cannot be read")
        if exp.lifecycle_stage == "deleted":
            log.warning("restoring deleted MLflow experiment %r (%s)", name, exp.experiment_id)
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id


# --------------------------------------------------------------------------- runs


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """``git rev-parse HEAD`` of the repository holding the cellst package, or "unknown"."""
    try:
        pkg_dir = Path(cellst.__file__).resolve().parent
        out = subprocess.run(
            ["git", "-C", str(pkg_dir), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        sha = out.stdout.strip()
        if out.returncode == 0 and len(sha) >= 7:
            return sha
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return "unknown"


def default_tags() -> dict[str, str]:
    """Tags every new cellst run gets: ``cellst.version`` and ``git.commit``."""
    return {"cellst.version": str(cellst.__version__), "git.commit": git_commit()}


@dataclass
class DisabledRunInfo:
    """The few ``RunInfo`` fields a disabled run offers (all empty)."""

    run_name: str | None = None
    run_id: None = None
    experiment_id: None = None
    artifact_uri: None = None
    status: str = "DISABLED"


@dataclass
class DisabledRunData:
    """Empty stand-in for ``RunData``."""

    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class DisabledRun:
    """What :func:`start_run` yields when tracking is disabled: ``.info``/``.data`` like an
    ``mlflow.ActiveRun``, with ``info.run_id`` None."""

    info: DisabledRunInfo = field(default_factory=DisabledRunInfo)
    data: DisabledRunData = field(default_factory=DisabledRunData)


def _uri_state() -> tuple[str | None, str | None]:
    from mlflow.tracking._tracking_service import utils as tracking_utils

    return tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")


def _restore_uri_state(state: tuple[str | None, str | None]) -> None:
    module_uri, env_uri = state
    mlflow.set_tracking_uri(module_uri)  # None resets (and unsets the env variable)
    if env_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = env_uri


@contextlib.contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for the block, then restore the previous URI
    (module global and ``MLFLOW_TRACKING_URI``)."""
    state = _uri_state()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        _restore_uri_state(state)


@contextlib.contextmanager
def start_run(
    cfg: TrackingConfig,
    run_dir: str | Path,
    experiment_default: str,
    run_name: str | None,
    *,
    nested: bool = False,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun | DisabledRun]:
    """Start (or resume) an MLflow run for the duration of a ``with`` block.

    Parameters
    ----------
    cfg : TrackingConfig
        Tracking section; ``enabled=False`` yields a :class:`DisabledRun` and touches nothing.
    run_dir : path
        The stage's output directory (see :func:`resolve_tracking`).
    experiment_default : str
        Experiment name when ``cfg.experiment`` is None.
    run_name : str or None
        Display name of the run.
    nested : bool
        Start the run as a child of the active run of this thread.
    parent_run_id : str, optional
        Parent run id for a child started in another process (a Tune trial, a Ray task);
        the parent must live in the same tracking store.
    tags : mapping, optional
        Extra tags (values are str'ed). New runs also get :func:`default_tags`.
    run_id : str, optional
        Resume this run instead of creating one (re-attach after a restart or from another
        process); only ``tags`` are added then.

    Yields
    ------
    mlflow.ActiveRun or DisabledRun
        The run ends FINISHED, or FAILED (KILLED on KeyboardInterrupt) when the block raises.
        System metrics are sampled only for the outermost run of a process.
    """
    quiet_mlflow()
    if not cfg.enabled:
        yield DisabledRun(DisabledRunInfo(run_name=run_name))
        return

    uri, artifact_location, experiment = resolve_tracking(cfg, run_dir, experiment_default)
    state = _uri_state()
    mlflow.set_tracking_uri(uri)
    try:
        with http_limits(cfg.timeout_s):
            try:
                experiment_id = ensure_experiment(uri, experiment, artifact_location)
                outer = mlflow.active_run() is None
                all_tags: dict[str, str] = {} if run_id else default_tags()
                all_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
                run = mlflow.start_run(
                    run_id=run_id,
                    experiment_id=None if run_id else experiment_id,
                    run_name=run_name,
                    nested=nested or (run_id is not None and not outer),
                    parent_run_id=None if run_id else parent_run_id,
                    tags=all_tags,
                    log_system_metrics=bool(cfg.system_metrics and outer),
                )
            except TRACKING_ERRORS as exc:
                raise TrackingUnavailable(
                    f"MLflow tracking at {uri} cannot start run {run_name or run_id!r} "
                    f"({classify(exc)[1]})"
                ) from None
            journal = BufferedMetricLogger(
                uri,
                run.info.run_id,
                run_dir,
                timeout_s=cfg.timeout_s,
                retry_every_s=cfg.retry_every_s,
            )
            _journals[run.info.run_id] = journal
            status = RunStatus.FINISHED
            try:
                yield run
            except KeyboardInterrupt:
                status = RunStatus.KILLED
                raise
            except BaseException:
                status = RunStatus.FAILED
                raise
            finally:
                _journals.pop(run.info.run_id, None)
                if any(r.info.run_id == run.info.run_id for r in _active_stack()):
                    _end_run(run.info.run_id, RunStatus.to_string(status), journal)
                journal.close()
    finally:
        _restore_uri_state(state)


def _end_run(run_id: str, status: str, journal: BufferedMetricLogger) -> None:
    """End the active run; when the server cannot take the status now, the journal keeps it
    (behind any records still waiting) and the run leaves the stack all the same."""
    if journal.down is None and not journal.pending.exists():
        try:
            mlflow.end_run(status)
            return
        except TRACKING_ERRORS as exc:  # end_run pops the run before it calls the server
            if not journal.note_failure(exc):
                say(f"tracking: the end of run {run_id} was not recorded ({classify(exc)[1]})")
                _leave_stack(run_id)
                return
    _leave_stack(run_id)
    journal.set_terminated(status)


def _leave_stack(run_id: str) -> None:
    """What ``mlflow.end_run`` does besides telling the server (MLflow 3.17 internals): take
    the run off this thread's active-run stack and stop its system-metrics monitor."""
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()
    if stack and stack[-1].info.run_id == run_id:
        os.environ.pop("MLFLOW_RUN_ID", None)
        stack.pop()
        fluent._last_active_run_id.set(run_id)
    monitor = fluent.run_id_to_system_metrics_monitor.pop(run_id, None)
    if monitor is not None:
        with contextlib.suppress(Exception):
            monitor.finish()


def check_tracking(cfg: TrackingConfig, run_dir: str | Path, experiment_default: str) -> None:
    """Fail fast, in one line naming the URI, when the tracking server does not answer.

    Only servers (``http(s)``) are asked, once, with the short timeout; local stores are
    created when the run starts. Raises :class:`TrackingUnavailable`.
    """
    if not cfg.enabled:
        return
    uri = resolve_tracking(cfg, run_dir, experiment_default)[0]
    if urlparse(uri).scheme.lower() not in ("http", "https"):
        return
    try:
        with http_limits(cfg.timeout_s):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except TRACKING_ERRORS as exc:
        transient, reason = classify(exc)
        what = "is unavailable" if transient else "refuses requests"
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} {what} ({reason}); start it, set "
            "tracking.tracking_uri to a running server, or tracking.enabled=false"
        ) from None


def _journal() -> tuple[str | None, BufferedMetricLogger | None]:
    """The active run's id and, when :func:`start_run` began it here, its journal."""
    run = mlflow.active_run()
    if run is None:
        return None, None
    return run.info.run_id, _journals.get(run.info.run_id)


def guarded(what: str, fn, *args, **kwargs) -> bool:
    """Call MLflow best-effort: a failure (or a server known to be down) is one line saying
    what was not logged. Returns whether it was logged."""
    _, journal = _journal()
    if journal is not None and journal.down is not None:
        say(f"tracking: {what} not logged (server {journal.uri} unavailable: {journal.down})")
        return False
    try:
        with http_limits(journal.timeout_s if journal else DEFAULT_TIMEOUT_S):
            fn(*args, **kwargs)
        return True
    except TRACKING_ERRORS as exc:
        if journal is not None:
            journal.note_failure(exc)
        say(f"tracking: {what} not logged ({classify(exc)[1]})")
        return False


def _active_stack() -> list[mlflow.ActiveRun]:
    from mlflow.tracking.fluent import _active_run_stack

    return list(_active_run_stack.get())


def active_run_id() -> str | None:
    """Id of this thread's active MLflow run, or None (tracking disabled / outside a run)."""
    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


# --------------------------------------------------------------------------- logging


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested mapping into dotted keys with string values.

    Values are ``str``'ed and cut to MLflow's 6000-character limit; an empty sub-mapping is
    kept as ``"{}"``.

    >>> flatten_params({"a": {"b": 1, "c": [1, 2]}, "d": None})
    {'a.b': '1', 'a.c': '[1, 2]', 'd': 'None'}
    """
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name))
        else:
            text = "{}" if isinstance(value, Mapping) else str(value)
            out[name] = text[:MAX_PARAM_VALUE_LENGTH]
    return out


def log_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Log params to the active run in batches of <= 100; returns what was logged.

    Params already logged with the same value are skipped (so resumed runs can log their
    config again); a param logged before with another value is kept and a warning names it
    (MLflow params are immutable).
    """
    run_id, journal = _journal()
    if run_id is None:
        return {}
    existing: dict[str, str] = {}
    if journal is None or journal.down is None:
        try:
            existing = MlflowClient().get_run(run_id).data.params
        except TRACKING_ERRORS as exc:  # unknown: the server keeps equal values anyway
            if journal is not None:
                journal.note_failure(exc)
    todo: dict[str, str] = {}
    for key, value in params.items():
        value = str(value)[:MAX_PARAM_VALUE_LENGTH]
        if key in existing:
            if existing[key] != value:
                warnings.warn(
                    f"param {key!r} was logged as {existing[key]!r}; new value {value!r} is "
                    "not logged (MLflow params are immutable)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            continue
        todo[key] = value
    if journal is not None:
        journal.log_params(todo)
        return todo
    items = list(todo.items())
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        guarded("params", mlflow.log_params, dict(items[i : i + MAX_PARAMS_PER_BATCH]))
    return todo


def log_config(cfg_model: BaseModel, artifact_file: str = "config.yaml") -> None:
    """Log a pydantic config as flattened params plus its resolved YAML artifact."""
    if mlflow.active_run() is None:
        return
    data = cfg_model.model_dump(mode="json")
    log_params(flatten_params(data))
    text = yaml.safe_dump(data, sort_keys=False)
    _, journal = _journal()
    if journal is not None:
        journal.log_text(text, artifact_file)
    else:
        guarded(artifact_file, mlflow.log_text, text, artifact_file)


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
    """Log metrics to the active run; non-finite values are skipped with a warning.

    MLflow itself would store NaN (as a flag) and clamp +-inf to +-1.8e308, which spoils
    charts and comparisons. Returns the metrics actually logged.
    """
    run_id, journal = _journal()
    if run_id is None:
        return {}
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        v = float(value)
        if math.isfinite(v):
            clean[str(key)] = v
        else:
            warnings.warn(f"metric {key!r} is not finite; not logged", RuntimeWarning, stacklevel=2)
    if clean and journal is not None:
        journal.log(clean, step or 0)
    elif clean:
        guarded("metrics", mlflow.log_metrics, clean, step=step)
    return clean


def log_table(df: pd.DataFrame, artifact_file: str) -> None:
    """Log a DataFrame as an artifact of the active run.

    ``*.json`` uses ``mlflow.log_table`` (shown as a table in the UI; note that MLflow
    *appends* to an existing table of that name); ``*.parquet`` is written with pyarrow;
    anything else is written as CSV (overwriting).
    """
    if mlflow.active_run() is None:
        return
    if artifact_file.endswith(".json"):
        guarded(artifact_file, mlflow.log_table, df, artifact_file)
        return
    artifact_path, _, name = artifact_file.rpartition("/")
    with tempfile.TemporaryDirectory(prefix="cellst-table-") as tmp:
        local = Path(tmp) / name
        if name.endswith(".parquet"):
            df.to_parquet(local, index=False)
        else:
            df.to_csv(local, index=False)
        guarded(artifact_file, mlflow.log_artifact, str(local), artifact_path or None)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """``mlflow.log_artifact`` on the active run; no-op outside a run. Best-effort: a file
    the server cannot take now is uploaded later (it must still exist then)."""
    run_id, journal = _journal()
    if journal is not None:
        journal.log_artifact(path, artifact_path)
    elif run_id is not None:
        guarded(str(path), mlflow.log_artifact, str(path), artifact_path)


def mark_superseded(
    cfg: TrackingConfig,
    run_dir: str | Path,
    experiment: str,
    old_run_id: str | None,
    new_run_id: str | None,
) -> bool:
    """Tag ``old_run_id``, which a re-run replaced, with :data:`SUPERSEDED_TAG` naming
    ``new_run_id``, so that ``cellst compare`` shows it as superseded rather than beside
    the new run as its equal (its artifacts name checkpoints that now hold the new model).

    Best-effort, within ``tracking.timeout_s`` and without retries: nothing is done where
    the old run cannot be found (the embedded store inside ``run_dir``, removed with it) or
    the server does not answer now. Returns whether the tag was sent (or kept to send).
    """
    if not (cfg.enabled and old_run_id and new_run_id) or old_run_id == new_run_id:
        return False
    uri = resolve_tracking(cfg, run_dir, experiment)[0]
    try:
        with http_limits(cfg.timeout_s, retries=0):
            MlflowClient(tracking_uri=uri).get_run(old_run_id)
    except Exception:  # noqa: BLE001 - gone with its store, or no answer: nothing to mark
        return False
    logger = BufferedMetricLogger(
        uri, old_run_id, run_dir, timeout_s=cfg.timeout_s, retry_every_s=cfg.retry_every_s
    )
    logger.set_tags({SUPERSEDED_TAG: new_run_id})
    return True


def supersede_earlier_children(
    cfg: TrackingConfig,
    run_dir: str | Path,
    experiment: str,
    parent_run_id: str | None,
    tag: str,
    value: str,
    new_run_id: str | None,
) -> list[str]:
    """Mark the other child runs of ``parent_run_id`` whose ``tag`` is ``value`` as
    superseded by ``new_run_id`` (:func:`mark_superseded`): a Tune trial that a resumed
    sweep runs again (it ended just before the interrupt, after Tune last saved its state)
    was in MLflow twice, both FINISHED, as equals. Best-effort; returns the ids marked."""
    if not (cfg.enabled and parent_run_id and new_run_id):
        return []
    uri = resolve_tracking(cfg, run_dir, experiment)[0]
    try:
        with http_limits(cfg.timeout_s, retries=0):
            client = MlflowClient(tracking_uri=uri)
            exp_id = client.get_run(parent_run_id).info.experiment_id
            found = client.search_runs(
                [exp_id],
                filter_string=(
                    f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{tag}` = '{value}'"
                ),
            )
    except Exception:  # noqa: BLE001 - no answer now: nothing marked
        return []
    old = [r.info.run_id for r in found if r.info.run_id != new_run_id]
    return [r for r in old if mark_superseded(cfg, run_dir, experiment, r, new_run_id)]


def set_tags(tags: Mapping[str, Any]) -> None:
    """Set tags (values str'ed) on the active run; no-op outside a run."""
    run_id, journal = _journal()
    if run_id is None or not tags:
        return
    if journal is not None:
        journal.set_tags(tags)
    else:
        guarded("tags", mlflow.set_tags, {str(k): str(v) for k, v in tags.items()})


def store_tags(store: Any) -> dict[str, Any]:
    """Tags identifying an image store and the manifest version a run reads.

    Parameters
    ----------
    store : CellStore or path
        An open :class:`~cellst.data.store.CellStore` gives the version it pinned (what the
        run really reads, even if an ingest commits a new one meanwhile); a path gives the
        store's current version.

    Returns
    -------
    dict
        ``store.path``; with a manifest also ``store.version`` (the store's version id,
        :attr:`CellStore.version`), ``store.manifest_sha256`` and ``store.items``.
    """
    if hasattr(store, "manifest_sha256"):  # an open CellStore: its pinned version
        return {
            "store.path": str(store.root),
            "store.version": store.version,
            "store.manifest_sha256": store.manifest_sha256,
            "store.items": len(store.manifest),
        }
    root = Path(store).expanduser().absolute()
    tags: dict[str, Any] = {"store.path": str(root)}
    if not is_store(root):
        return tags
    data = (root / MANIFEST).read_bytes()
    tags["store.version"] = manifest_version(data)  # as CellStore.version
    tags["store.manifest_sha256"] = manifest_sha256(data)
    tags["store.items"] = len(pd.read_parquet(io.BytesIO(data)))
    return tags


# --------------------------------------------------------------------------- queries


def runs_table(
    uri: str,
    experiment: str,
    filter_string: str = "",
    order_by: list[str] | None = None,
) -> pd.DataFrame:
    """Runs of ``experiment`` as a DataFrame (``mlflow.search_runs`` columns: ``run_id``,
    ``status``, ``params.*``, ``metrics.*``, ``tags.*``...).

    An empty DataFrame when the experiment (or a local SQLite database) does not exist; a
    missing database is not created.
    """
    uri = _normalise_uri(uri)
    if urlparse(uri).scheme.lower() == "sqlite":
        db = _sqlite_path(uri)
        if db is not None and not Path(db).is_file():
            return pd.DataFrame()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame()
    with use_tracking_uri(uri):
        return mlflow.search_runs(
            experiment_ids=[exp.experiment_id],
            filter_string=filter_string,
            order_by=order_by,
            output_format="pandas",
        )
