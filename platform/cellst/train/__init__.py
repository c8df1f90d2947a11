"""Training stage: Ray Train DDP of HoVer-Net on the crop stream, with MLflow tracking."""

from cellst.train.config import TrainConfig

__all__ = ["TrainConfig"]
