"""Where MLflow runs go (the ``tracking`` section); kept free of heavy imports."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrackingConfig(BaseModel):
    """Where and whether a stage logs to MLflow."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

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


# --------------------------------------------------------------------------- resolution
