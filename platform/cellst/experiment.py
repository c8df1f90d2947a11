"""The whole-experiment configuration: one section per stage of the data flow.

Each stage owns its section's model (ingest, data streams, model, augmentation, loss,
inference, post-processing, batch prediction, segmentation of image files, evaluation,
ST++, Tune sweeps); this module only assembles them, so stage modules can import
:class:`cellst.config.Section` without import cycles. The schemas live in torch- and
Ray-free modules, so loading a configuration imports neither.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from pydantic import Field, field_validator

from cellst.config import (
    DataConfig,
    EvaluateConfig,
    IngestConfig,
    Section,
    check_folder_name,
    load_yaml_config,
)
from cellst.inference.config import InferenceConfig, PredictConfig, SegmentConfig
from cellst.model.config import AugmentConfig, LossConfig, ModelConfig
from cellst.postprocess.config import PostprocessConfig
from cellst.stpp.config import StppConfig
from cellst.tracking.config import TrackingConfig
from cellst.train.config import TrainConfig
from cellst.tune.config import TuneConfig

__all__ = ["ExperimentConfig", "load_config"]


class ExperimentConfig(Section):
    """A whole experiment; sections a command does not use keep their defaults."""

    name: str = Field("cellst", min_length=1, description="experiment name (MLflow experiment)")

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v: str) -> str:
        return check_folder_name(v)  # it names run folders: {name}-train, ...

    store: str | None = Field(None, description="path of the zarr image store")
    ingest: IngestConfig = IngestConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    loss: LossConfig = LossConfig()
    inference: InferenceConfig = InferenceConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    predict: PredictConfig = PredictConfig()
    segment: SegmentConfig = SegmentConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    stpp: StppConfig = StppConfig()
    tune: TuneConfig = TuneConfig()


E = TypeVar("E", bound=ExperimentConfig)


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    model: type[E] = ExperimentConfig,  # type: ignore[assignment]
) -> E:
    """The experiment in the YAML file ``path`` (None: the defaults), with ``--set``
    ``overrides`` applied, validated as ``model``.

    Raises
    ------
    ConfigError
        With one line per invalid field, each naming the field's dotted path.
    """
    return load_yaml_config(path, overrides, model)
