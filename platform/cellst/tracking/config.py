"""Where MLflow runs go (the ``tracking`` section); kept free of heavy imports."""

from __future__ import annotations

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
