"""Inference stage: whole-image prediction and distributed batch prediction (`cellst predict`)."""

from cellst.inference.predictor import InferenceConfig, predict_maps

__all__ = ["InferenceConfig", "predict_maps"]
