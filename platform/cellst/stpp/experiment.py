"""The experiment run by the ST++ pipeline: every section of an experiment plus ``stpp``,
with the checks that span sections, and its loader."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import model_validator

from cellst.config import NAME_RE, ConfigError
from cellst.experiment import ExperimentConfig, load_config
from cellst.stpp.config import QUICK_OVERRIDES

__all__ = ["StppExperimentConfig", "load_stpp_config", "stpp_problems"]


def stpp_problems(cfg: ExperimentConfig) -> list[str]:
    """What makes an experiment unfit for ST++ (checks across sections); empty when fine."""
    out = []
    t = cfg.train
    epochs = t.snapshot_epochs()
    if len(epochs) < 2 or epochs[-1] != t.epochs:
        out.append(
            f"ST++ scores reliability with at least two snapshots, the last one at the end of "
            f"training; train.epochs={t.epochs} with train.snapshot_fractions="
            f"{[round(f, 3) for f in t.snapshot_fractions]} gives snapshot epochs {epochs} "
            f"(raise train.epochs or add fractions; the largest must be 1.0)"
        )
    for key in ("pseudo_set", "init_checkpoint"):
        if getattr(t, key) is not None:
            out.append(f"train.{key} is set by the ST++ pipeline for each stage; leave it empty")
    if NAME_RE.match(cfg.name) is None and cfg.stpp.name is None:
        out.append(f"the experiment name {cfg.name!r} cannot name a pipeline folder; set stpp.name")
    return out


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
        """The plain experiment (``stpp`` at its defaults), as training and prediction take it.

        Only what was set (in the YAML file, with ``--set`` or by code) is set in the copy:
        a field set explicitly means something (the calibration holds such
        ``postprocess.*`` fields, :func:`cellst.postprocess.calibrate.search_postprocess`),
        and a copy of every field would have held them all."""
        data = self.model_dump(mode="json", exclude={"stpp"}, exclude_unset=True)
        return ExperimentConfig.model_validate(data)

    def training_base(self) -> ExperimentConfig:
        """The plain experiment with ``stpp`` as configured: what a stage's training runs
        and logs (its params then tell a fine-tune, ``stpp.fresh_init: false``, from a fresh
        start). A training never reads ``stpp``; fingerprints leave it out
        (:func:`cellst.stpp.inputs.training_hash`)."""
        return ExperimentConfig.model_validate(self.model_dump(mode="json", exclude_unset=True))


def load_stpp_config(
    path: str | Path | None, overrides: Sequence[str] = (), quick: bool = False
) -> StppExperimentConfig:
    """Load an ST++ experiment; ``quick`` applies :data:`QUICK_OVERRIDES` before ``overrides``.

    Raises
    ------
    ConfigError
        Naming every invalid field (fractions, snapshot settings...), before anything runs.
    """
    every = [*(QUICK_OVERRIDES if quick else ()), *overrides]
    cfg = load_config(path, every, model=StppExperimentConfig)
    if not cfg.store:
        raise ConfigError(
            "no store configured: set `store: PATH` in the config or --set store=PATH"
        )
    return cfg
