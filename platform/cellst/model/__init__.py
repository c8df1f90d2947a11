"""The model side of cellst: HoVer-Net networks, checkpoints, targets, augmentation, loss.

Names are imported lazily, so the torch-free section schemas
(:mod:`cellst.model.config`) can be read without importing torch and MONAI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cellst._lazy import lazy_getattr

_NAMES = {
    "AugmentConfig": "config",
    "LossConfig": "config",
    "ModelConfig": "config",
    "build_augment": "augment",
    "CheckpointError": "checkpoint_files",
    "is_checkpoint": "checkpoint_files",
    "load_into": "checkpoint",
    "load_model": "checkpoint",
    "read_checkpoint_info": "checkpoint_files",
    "save_checkpoint": "checkpoint",
    "unwrap_model": "checkpoint",
    "HoVerLoss": "loss",
    "HV_KEY": "networks",
    "NP_KEY": "networks",
    "build_model": "networks",
    "count_parameters": "networks",
    "hover_maps": "targets",
    "make_targets": "targets",
    "np_target": "targets",
}
__all__ = [
    "AugmentConfig",
    "CheckpointError",
    "HV_KEY",
    "HoVerLoss",
    "LossConfig",
    "ModelConfig",
    "NP_KEY",
    "build_augment",
    "build_model",
    "count_parameters",
    "hover_maps",
    "is_checkpoint",
    "load_into",
    "load_model",
    "make_targets",
    "np_target",
    "read_checkpoint_info",
    "save_checkpoint",
    "unwrap_model",
]

if TYPE_CHECKING:
    from cellst.model.augment import build_augment
    from cellst.model.checkpoint import load_into, load_model, save_checkpoint, unwrap_model
    from cellst.model.checkpoint_files import CheckpointError, is_checkpoint, read_checkpoint_info
    from cellst.model.config import AugmentConfig, LossConfig, ModelConfig
    from cellst.model.loss import HoVerLoss
    from cellst.model.networks import HV_KEY, NP_KEY, build_model, count_parameters
    from cellst.model.targets import hover_maps, make_targets, np_target

__getattr__ = lazy_getattr(__name__, _NAMES)
