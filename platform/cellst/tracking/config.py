"""Where MLflow runs go (the ``tracking`` section); kept free of heavy imports."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field

from cellst.config import Section

#: tag of a run that a re-run replaced (``train --force``, a changed sweep): its successor's
#: run id (:func:`cellst.tracking.mlflow_utils.mark_superseded`; ``cellst compare`` shows it)
SUPERSEDED_TAG = "cellst.superseded_by"
#: tag of a run whose process holds a file lock while it runs (a training's run folder, an
#: ST++ pipeline): the lock file's path. A RUNNING run whose lock file exists and is free
#: was killed (MLflow never heard of it ending); ``cellst compare`` shows it as KILLED
LOCK_TAG = "cellst.lock"


class TrackingConfig(Section):
    """Where and whether a stage logs to MLflow, and how long it waits for a server."""

    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else "
        "sqlite:///<run_dir>/mlflow.db",
    )
    artifact_root: str | None = Field(
        None,
        description="artifact location of new experiments; None: mlartifacts/ next to a "
        "SQLite database, the server default for http(s)",
    )
    experiment: str | None = Field(
        None, description="MLflow experiment name; None: the experiment config's name"
    )
    system_metrics: bool = Field(True, description="log CPU/GPU/memory system metrics")
    enabled: bool = Field(True, description="False: log nothing, touch no files")
    timeout_s: int = Field(
        10,
        ge=1,
        le=600,
        description="seconds one request to a tracking server may take (one quick retry); "
        "what the server cannot take is kept in the run folder and sent later",
    )
    retry_every_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="while the tracking server is unreachable, seconds between attempts "
        "(records are only appended to <run folder>/tracking-pending.jsonl meanwhile)",
    )


def ui_command(uri: str | None) -> str | None:
    """How a user looks at the runs of ``uri``: the ``mlflow ui`` command for an embedded
    SQLite store, the address itself for a tracking server; None without tracking."""
    if not uri:
        return None
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri '{uri}'"
    return f"open {uri} in a browser (MLflow tracking server)"


# ----------------------------------------------------------------------------- where runs go
_SERVER_SCHEMES = {"http", "https", "databricks", "databricks-uc", "uc"}


def _sqlite_path(uri: str) -> str | None:
    """The database path of a ``sqlite:///`` URI as written (None for in-memory databases)."""
    rest = uri[len("sqlite://") :]
    if not rest.startswith("/"):
        return None
    path = rest[1:].split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return path


def _normalise_uri(uri: str) -> str:
    """Make SQLite URIs absolute; refuse the file store MLflow 3.17 no longer allows."""
    uri = uri.strip()
    scheme = urlparse(uri).scheme.lower()
    if scheme == "sqlite":
        path = _sqlite_path(uri)
        if path is None or os.path.isabs(path):
            return uri
        query = uri.split("?", 1)[1] if "?" in uri else ""
        absolute = "sqlite:///" + os.path.abspath(path)
        return f"{absolute}?{query}" if query else absolute
    if scheme in ("", "file") or len(scheme) == 1:  # a bare path (or a Windows drive)
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
            raise ValueError(
                f"tracking URI {uri!r} names the MLflow file store, which MLflow 3.17 refuses "
                "unless MLFLOW_ALLOW_FILE_STORE=true; use 'sqlite:///<path>/mlflow.db' or an "
                "http(s) tracking server"
            )
    return uri


def _normalise_artifact_root(root: str) -> str:
    """Absolute local path for a path-like root; URIs (``s3://``, ``file:``...) unchanged."""
    scheme = urlparse(root).scheme
    if scheme and len(scheme) > 1:
        return root
    return str(Path(root).expanduser().absolute())


def resolve_tracking(
    cfg: TrackingConfig, run_dir: str | Path, default_experiment: str
) -> tuple[str, str | None, str]:
    """Resolve the tracking URI, the artifact location of new experiments and the experiment.

    Pure: touches no files.

    Parameters
    ----------
    cfg : TrackingConfig
        The tracking section of a stage's configuration.
    run_dir : path
        The stage's output directory (home of the embedded SQLite store).
    default_experiment : str
        Experiment name used when ``cfg.experiment`` is None.

    Returns
    -------
    uri : str
        Absolute tracking URI.
    artifact_location : str or None
        Artifact location for experiments created now; None leaves it to the server.
    experiment : str
        Experiment name.
    """
    run_dir = Path(run_dir).expanduser().absolute()
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri.strip():
        uri = "sqlite:///" + str(run_dir / "mlflow.db")
    uri = _normalise_uri(uri)
    scheme = urlparse(uri).scheme.lower()

    artifact_location: str | None
    if cfg.artifact_root:
        artifact_location = _normalise_artifact_root(cfg.artifact_root)
    elif scheme == "sqlite":
        db = _sqlite_path(uri)
        base = Path(db).parent if db is not None else run_dir
        artifact_location = str(base / "mlartifacts")
    elif scheme in _SERVER_SCHEMES:
        artifact_location = None
    else:
        artifact_location = str(run_dir / "mlartifacts")
    experiment = cfg.experiment or default_experiment
    if not experiment:
        raise ValueError("experiment name is empty")
    return uri, artifact_location, experiment


def store_inside(cfg: TrackingConfig, run_dir: str | Path, experiment: str) -> bool:
    """Whether the tracking store is the database embedded in ``run_dir`` (the default:
    ``run_dir/mlflow.db``), so that removing the folder would remove its runs' records."""
    uri = resolve_tracking(cfg, run_dir, experiment)[0]
    db = _sqlite_path(uri) if uri.startswith("sqlite:") else None
    return db is not None and Path(db).absolute() == Path(run_dir).absolute() / "mlflow.db"
