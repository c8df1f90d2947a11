"""The model side of cellst: HoVer-Net networks, checkpoints, targets, augmentation, loss."""

from cellst.model.augment import AugmentConfig, build_augment
from cellst.model.checkpoint import (
    CheckpointError,
    load_into,
    load_model,
    read_checkpoint_info,
    save_checkpoint,
    unwrap_model,
)
from cellst.model.loss import HoVerLoss, LossConfig
from cellst.model.networks import HV_KEY, NP_KEY, ModelConfig, build_model, count_parameters
from cellst.model.targets import hover_maps, make_targets, np_target

__all__ = [
    "HV_KEY",
    "NP_KEY",
    "AugmentConfig",
    "CheckpointError",
    "HoVerLoss",
    "LossConfig",
    "ModelConfig",
    "build_augment",
    "build_model",
    "count_parameters",
    "hover_maps",
    "load_into",
    "load_model",
    "make_targets",
    "np_target",
    "read_checkpoint_info",
    "save_checkpoint",
    "unwrap_model",
]
