"""Inference stage: whole-image prediction, distributed batch prediction (`cellst predict`)
and in-process segmentation of image files (`cellst segment`).

Names are imported lazily, so the torch-free section schemas
(:mod:`cellst.inference.config`) can be read without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cellst._lazy import lazy_getattr

_NAMES = {"InferenceConfig": "config", "PredictConfig": "config", "predict_maps": "predictor"}
__all__ = [
    "InferenceConfig",
    "PredictConfig",
    "predict_maps",
]

if TYPE_CHECKING:
    from cellst.inference.config import InferenceConfig, PredictConfig
    from cellst.inference.predictor import predict_maps

__getattr__ = lazy_getattr(__name__, _NAMES)
