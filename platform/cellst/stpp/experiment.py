"""The experiment run by the ST++ pipeline: every section of an experiment plus ``stpp``."""

from __future__ import annotations

from pathlib import Path

from pydantic import model_validator

from cellst.experiment import ExperimentConfig
from cellst.stpp.config import stpp_problems


class StppExperimentConfig(ExperimentConfig):
    """An experiment checked for ST++ (snapshots, names) when it is built."""

    @model_validator(mode="after")
    def _stpp_consistent(self) -> StppExperimentConfig:
        problems = stpp_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # -- derived names ----------------------------------------------------------------------
    @property
    def pipeline_name(self) -> str:
        return self.stpp.name or self.name

    @property
    def pipeline_dir(self) -> Path:
        return Path(self.stpp.run_dir).absolute() / self.pipeline_name

    @property
    def set_prefix(self) -> str:
        return self.stpp.set_prefix or self.pipeline_name

    def base(self) -> ExperimentConfig:
        """The plain experiment (``stpp`` at its defaults), as training and prediction take it."""
        data = self.model_dump(mode="json", exclude={"stpp"})
        return ExperimentConfig.model_validate(data)
