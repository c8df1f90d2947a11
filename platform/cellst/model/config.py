"""Schemas of the model, augmentation and loss sections, free of torch and MONAI.

:class:`cellst.experiment.ExperimentConfig` and the CLI read configurations without
importing the network code (seconds of torch and MONAI imports); the modules that use the
sections (:mod:`cellst.model.networks`, :mod:`cellst.model.augment`,
:mod:`cellst.model.loss`) re-export them under their old names.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from cellst.config import Section

__all__ = ["AugmentConfig", "LossConfig", "ModelConfig", "ModelName"]

ModelName = Literal["hovernet-lite", "hovernet-fast", "hovernet-original"]


class ModelConfig(Section):
    """Which network to build. ``width`` only affects ``hovernet-lite``."""

    name: ModelName = Field("hovernet-lite", description="network architecture")
    width: int = Field(16, ge=4, le=128, description="hovernet-lite base channels (1/2 resolution)")
    full_res: bool = Field(
        False,
        description="hovernet-lite only: finish each branch at full resolution (a stride-1 stem "
        "and one full-resolution conv per branch) instead of upsampling its 1/2-resolution "
        "output; sharper borders between small touching cells, at a higher cost per pixel",
    )
    in_channels: int = Field(3, ge=1, le=16, description="input image channels")
    pretrained_url: str | None = Field(
        None,
        description="hovernet-fast/original only: URL or path of preact-ResNet50 encoder weights "
        "(MONAI HoVerNet pretrained_url)",
    )
    freeze_encoder: bool = Field(False, description="do not train the encoder weights")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout probability inside the network")
    decoder_padding: bool = Field(
        False, description="hovernet-fast only: padded decoder convs, output size == input size"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.name == "hovernet-lite" and self.pretrained_url is not None:
            raise ValueError(
                "pretrained_url is only supported for hovernet-fast/hovernet-original "
                "(MONAI preact-ResNet50 encoder weights); hovernet-lite trains from scratch"
            )
        if self.full_res and self.name != "hovernet-lite":
            raise ValueError(f"full_res only applies to hovernet-lite, not {self.name}")
        if self.decoder_padding and self.name != "hovernet-fast":
            raise ValueError(f"decoder_padding only applies to hovernet-fast, not {self.name}")
        return self

    def architecture(self) -> dict[str, object]:
        """The fields that determine the parameter tensors (checkpoint compatibility)."""
        arch: dict[str, object] = {"name": self.name, "in_channels": self.in_channels}
        if self.name == "hovernet-lite":
            arch["width"] = self.width
            if self.full_res:  # (absent when off: earlier checkpoints stay compatible)
                arch["full_res"] = True
        else:
            arch["decoder_padding"] = self.decoder_padding
        return arch


Range = tuple[float, float]


def _prob(default: float, what: str) -> Any:
    return Field(default, ge=0.0, le=1.0, description=f"probability of {what}")


class AugmentConfig(Section):
    """Probabilities and ranges of every augmentation (defaults: seed paper / ST++)."""

    #: the fields of the ``strong`` preset alone, which only pseudo-labelled crops get: a
    #: training without pseudo-labels computes the same whatever they hold, so its
    #: fingerprint leaves them out (:func:`cellst.fingerprint.config_fingerprint`)
    STRONG_FIELDS: ClassVar[tuple[str, ...]] = (
        "jitter_prob",
        "jitter_brightness",
        "jitter_contrast",
        "jitter_saturation",
        "jitter_hue",
        "grayscale_prob",
        "blur_prob",
        "blur_sigma",
        "cutout_prob",
        "cutout_area",
        "cutout_ratio",
    )

    # standard (NeurIPS 2022 CellSeg baseline)
    scale_intensity: bool = Field(
        False,
        description="min-max scale each crop to [0, 1]; off by default because stored images are "
        "already percentile-normalised and inference feeds image / 255",
    )
    flip_prob: float = _prob(0.5, "a random axis flip")
    rotate90_prob: float = _prob(0.5, "a random 90/180/270 degree rotation")
    noise_prob: float = _prob(0.25, "additive Gaussian noise")
    noise_std: float = Field(0.1, ge=0, description="max std of the noise (sampled in [0, std])")
    contrast_prob: float = _prob(0.25, "a random gamma contrast change")
    contrast_gamma: Range = Field((1.0, 2.0), description="gamma range")
    smooth_prob: float = _prob(0.25, "Gaussian smoothing")
    smooth_sigma: Range = Field((1.0, 2.0), description="sigma range (each axis)")
    hist_shift_prob: float = _prob(0.25, "a random histogram shift")
    hist_shift_points: int = Field(3, ge=3, description="control points of the histogram shift")
    zoom_prob: float = _prob(0.15, "a random zoom (keep size)")
    zoom_range: Range = Field((0.8, 1.5), description="min and max zoom factor")
    # strong (ST++ on pseudo-labelled images), applied after the standard pipeline
    jitter_prob: float = _prob(0.8, "colour jitter")
    jitter_brightness: float = Field(0.5, ge=0, description="brightness factor in [1-b, 1+b]")
    jitter_contrast: float = Field(0.5, ge=0, description="contrast factor in [1-c, 1+c]")
    jitter_saturation: float = Field(0.5, ge=0, description="saturation factor in [1-s, 1+s]")
    jitter_hue: float = Field(0.25, ge=0, le=0.5, description="hue shift in [-h, h] turns")
    grayscale_prob: float = _prob(0.2, "conversion to greyscale")
    blur_prob: float = _prob(0.5, "Gaussian blur")
    blur_sigma: Range = Field((0.1, 2.0), description="blur sigma range (each axis)")
    cutout_prob: float = _prob(0.5, "Cutout")
    cutout_area: Range = Field((0.02, 0.4), description="cut-out area as a fraction of the crop")
    cutout_ratio: Range = Field((0.3, 1 / 0.3), description="cut-out aspect ratio (h / w) range")

    @field_validator(
        "contrast_gamma", "smooth_sigma", "zoom_range", "blur_sigma", "cutout_area", "cutout_ratio"
    )
    @classmethod
    def _ordered(cls, v: Range) -> Range:
        lo, hi = v
        if lo > hi:
            raise ValueError(f"range must be (low, high) with low <= high, got {v}")
        if lo < 0:
            raise ValueError(f"range must be non-negative, got {v}")
        return v

    @field_validator("smooth_sigma", "blur_sigma", "zoom_range", "cutout_ratio")
    @classmethod
    def _positive(cls, v: Range) -> Range:
        if v[0] <= 0:
            raise ValueError(f"range must be positive, got {v}")
        return v

    @field_validator("cutout_area")
    @classmethod
    def _fraction(cls, v: Range) -> Range:
        if v[1] > 1:
            raise ValueError(f"cut-out area fractions must be <= 1, got {v}")
        return v


class LossConfig(Section):
    """Weights of the HoVer-Net loss terms (defaults: MONAI HoVerNetLoss)."""

    hv_mse: float = Field(2.0, ge=0, description="weight of the HV map MSE")
    hv_mse_grad: float = Field(1.0, ge=0, description="weight of the HV Sobel-gradient MSE")
    np_ce: float = Field(1.0, ge=0, description="weight of the NP cross-entropy")
    np_dice: float = Field(1.0, ge=0, description="weight of the NP Dice loss")
