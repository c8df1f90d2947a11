"""Training augmentation: the seed paper's MONAI pipeline plus ST++'s strong augmentation.

:func:`build_augment` returns a :class:`monai.transforms.Compose` over dicts with

* ``"image"``: ``(C, H, W)`` float (or uint8), C in {1, 3} (grey images are repeated to RGB);
* ``"label"``: ``(1, H, W)`` or ``(H, W)`` integer instance map;
* ``"ignore"`` (optional): ``(1, H, W)`` mask, 1 = pixel excluded from the loss;

and produces plain tensors ``image`` ``(3, crop, crop)`` float32, ``label`` ``(1, crop,
crop)`` int32 and ``ignore`` ``(1, crop, crop)`` float32 (zeros unless the input had one or
the strong preset's Cutout fired).

``standard`` preset (defaults = the NeurIPS 2022 CellSeg MONAI baseline): ScaleIntensity
(min-max to [0, 1]), SpatialPad + RandSpatialCrop to ``crop``, RandAxisFlip, RandRotate90,
RandGaussianNoise, RandAdjustContrast, RandGaussianSmooth, RandHistogramShift, RandZoom
(area for the image, nearest for label and ignore, keep_size). Spatial transforms act on all
three keys with nearest interpolation for label/ignore, so the label stays an exact integer
instance map.

``strong`` preset (for pseudo-labelled images, as ST++ / FixMatch): the standard pipeline
followed by colour jitter (brightness, contrast, saturation, hue; random order), random
greyscale, Gaussian blur and Cutout with per-pixel random values, whose region is written to
``ignore`` so the loss skips it (ST++ sets the cut-out mask pixels to its ignore index 255).

Every probability and range is a field of :class:`AugmentConfig`, so a sweep can change it.
Determinism: ``build_augment(..., seed=s)`` or ``compose.set_random_state(seed=s)``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any, Literal

import numpy as np
import torch
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandAxisFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandHistogramShiftd,
    RandomizableTransform,
    RandRotate90d,
    RandSpatialCropd,
    RandZoomd,
    ScaleIntensityd,
    SpatialPadd,
)

from cellst.model.config import AugmentConfig

__all__ = [
    "AugmentConfig",
    "RandColorJitterd",
    "RandCutoutd",
    "RandGrayscaled",
    "build_augment",
]

IMAGE, LABEL, IGNORE = "image", "label", "ignore"
_LABEL_VALUES = "_label_values"
KEYS = (IMAGE, LABEL, IGNORE)
Range = tuple[float, float]
# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale
_LUMA = (0.299, 0.587, 0.114)


# ---------------------------------------------------------------------------------------------
# custom transforms
# ---------------------------------------------------------------------------------------------


def _plain(x: Any) -> torch.Tensor:
    """A plain (non-Meta) tensor view of an array or tensor."""
    if isinstance(x, torch.Tensor):
        return x.as_tensor() if hasattr(x, "as_tensor") else x
    return torch.as_tensor(np.ascontiguousarray(x))


class _Prepare(MapTransform):
    """Tensors with channels: image float32 (3, H, W), label int32 (1, H, W), ignore float32."""

    def __init__(self) -> None:
        super().__init__(keys=KEYS, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = _plain(d[IMAGE])
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3:
            raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        elif image.shape[0] == 4:
            image = image[:3]  # drop alpha
        elif image.shape[0] != 3:
            raise ValueError(f"image must have 1, 3 or 4 channels, got shape {tuple(image.shape)}")
        d[IMAGE] = image.to(torch.float32).contiguous()

        label = _plain(d[LABEL])
        if label.ndim == 2:
            label = label[None]
        if label.ndim != 3 or label.shape[0] != 1 or label.shape[1:] != image.shape[1:]:
            raise ValueError(
                f"label must be (1, H, W) matching the image {tuple(image.shape)}, "
                f"got {tuple(label.shape)}"
            )
        if label.dtype.is_floating_point or label.dtype.is_complex or label.dtype == torch.bool:
            raise TypeError(f"label must be an integer instance map, got dtype {label.dtype}")
        label = label.to(torch.int64)  # (torch lacks reductions on some unsigned dtypes)
        if label.numel() and int(label.max()) > np.iinfo(np.int32).max:
            raise ValueError("label values exceed int32; relabel the instances sequentially")
        d[LABEL] = label.to(torch.int32).contiguous()

        if d.get(IGNORE) is None:
            d[IGNORE] = torch.zeros_like(d[LABEL], dtype=torch.float32)
        else:
            ignore = _plain(d[IGNORE])
            if ignore.ndim == 2:
                ignore = ignore[None]
            if tuple(ignore.shape) != tuple(label.shape):
                raise ValueError(f"ignore must be shaped like the label, got {tuple(ignore.shape)}")
            d[IGNORE] = (ignore > 0).to(torch.float32)
        return d


class _Finalize(MapTransform):
    """Plain tensors of the output dtypes; the label is rounded back to int32."""

    def __init__(self) -> None:
        super().__init__(keys=KEYS)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d[IMAGE] = _plain(d[IMAGE]).to(torch.float32).contiguous()
        label = _plain(d[LABEL])
        if label.dtype.is_floating_point:  # defensive: nearest resampling keeps exact integers
            label = torch.round(label)
        d[LABEL] = label.to(torch.int32).contiguous()
        d[IGNORE] = (_plain(d[IGNORE]) > 0.5).to(torch.float32).contiguous()
        return d


_FLOAT32_EXACT = 2**24  # integers up to this are exact in float32


class _CompactLabel(MapTransform):
    """Before RandZoom (which resamples in float32): replace labels >= 2**24 by their index in
    the sorted table of label values, kept under ``_LABEL_VALUES`` for :class:`_RestoreLabel`."""

    def __init__(self) -> None:
        super().__init__(keys=LABEL)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = _plain(d[LABEL])
        if label.numel() and int(label.max()) >= _FLOAT32_EXACT:
            values, inverse = torch.unique(label, return_inverse=True)
            d[LABEL] = inverse.to(torch.int32).reshape(label.shape)
            d[_LABEL_VALUES] = values
        return d


class _RestoreLabel(MapTransform):
    """Map labels compacted by :class:`_CompactLabel` back to their values (exact int32)."""

    def __init__(self) -> None:
        super().__init__(keys=LABEL)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        values = d.pop(_LABEL_VALUES, None)
        label = _plain(d[LABEL])
        if label.dtype.is_floating_point:
            label = torch.round(label)
        label = label.to(torch.int64)
        if values is not None:
            label = values.to(torch.int64)[label]
        d[LABEL] = label.to(torch.int32)
        return d


def _luma(img: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, dtype=img.dtype, device=img.device).view(3, 1, 1)
    return (img * w).sum(0, keepdim=True)


class RandColorJitterd(RandomizableTransform, MapTransform):
    """torchvision-style ColorJitter on a (3, H, W) float image in [0, 1].

    Brightness ``img * b``, contrast ``blend(img, mean grey)``, saturation
    ``blend(img, grey)``, hue rotation of the chroma plane in YIQ space by ``2 pi h``
    (a linear approximation of an HSV hue shift), in a random order; the result is clipped to
    [0, 1] after each step, as torchvision does.
    """

    def __init__(
        self,
        keys: str = IMAGE,
        prob: float = 0.8,
        brightness: float = 0.5,
        contrast: float = 0.5,
        saturation: float = 0.5,
        hue: float = 0.25,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.brightness, self.contrast, self.saturation, self.hue = (
            brightness,
            contrast,
            saturation,
            hue,
        )
        self._factors = (1.0, 1.0, 1.0, 0.0)
        self._order = np.arange(4)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return

        def factor(amount: float) -> float:
            return float(self.R.uniform(max(0.0, 1.0 - amount), 1.0 + amount))

        self._factors = (
            factor(self.brightness),
            factor(self.contrast),
            factor(self.saturation),
            float(self.R.uniform(-self.hue, self.hue)),
        )
        self._order = self.R.permutation(4)

    def _apply(self, img: torch.Tensor) -> torch.Tensor:
        b, c, s, h = self._factors
        for op in self._order:
            if op == 0:
                img = img * b
            elif op == 1:
                img = c * img + (1 - c) * _luma(img).mean()
            elif op == 2:
                img = s * img + (1 - s) * _luma(img)
            else:
                img = _hue_rotate(img, h)
            img = img.clamp(0.0, 1.0)
        return img

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = self._apply(_plain(d[key]).to(torch.float32))
        return d


def _hue_rotate(img: torch.Tensor, turns: float) -> torch.Tensor:
    """Rotate the chroma (I, Q) of an RGB image by ``turns`` full turns in YIQ space."""
    rgb2yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]],
        dtype=torch.float64,
    )
    a = 2 * math.pi * turns
    rot = torch.tensor(
        [[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]],
        dtype=torch.float64,
    )
    m = (torch.linalg.inv(rgb2yiq) @ rot @ rgb2yiq).to(img.dtype)
    return torch.einsum("ij,jhw->ihw", m, img)


class RandGrayscaled(RandomizableTransform, MapTransform):
    """Replace a (3, H, W) image by its luma, repeated to 3 channels."""

    def __init__(self, keys: str = IMAGE, prob: float = 0.2) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = _plain(d[key]).to(torch.float32)
            d[key] = _luma(img).expand(3, -1, -1).contiguous()
        return d


class RandCutoutd(RandomizableTransform, MapTransform):
    """ST++ Cutout: a random rectangle of the image gets per-pixel uniform random values in
    ``value_range`` and is marked 1 in ``ignore_key`` (the label is left unchanged).

    The rectangle's area is ``U(area) * H * W`` and aspect ratio ``h / w = U(ratio)``;
    sizes that do not fit are redrawn (as ST++ does), and after 10 failures clipped.
    """

    def __init__(
        self,
        image_key: str = IMAGE,
        ignore_key: str = IGNORE,
        prob: float = 0.5,
        area: Range = (0.02, 0.4),
        ratio: Range = (0.3, 1 / 0.3),
        value_range: Range = (0.0, 1.0),
    ) -> None:
        MapTransform.__init__(self, [image_key, ignore_key])
        RandomizableTransform.__init__(self, prob)
        self.image_key, self.ignore_key = image_key, ignore_key
        self.area, self.ratio, self.value_range = area, ratio, value_range
        self.box: tuple[int, int, int, int] | None = None

    def randomize_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Draw ``(y, x, h, w)`` of a rectangle inside a ``height x width`` image."""
        eh = ew = 1
        for _ in range(10):
            size = self.R.uniform(*self.area) * height * width
            ratio = self.R.uniform(*self.ratio)
            ew, eh = int(math.sqrt(size / ratio)), int(math.sqrt(size * ratio))
            if eh <= height and ew <= width:
                break
        eh, ew = min(max(eh, 1), height), min(max(ew, 1), width)
        y = int(self.R.randint(0, height - eh + 1))
        x = int(self.R.randint(0, width - ew + 1))
        return y, x, eh, ew

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        self.box = None
        if not self._do_transform:
            return d
        img = _plain(d[self.image_key]).to(torch.float32).clone()
        c, height, width = img.shape
        y, x, eh, ew = self.box = self.randomize_box(height, width)
        lo, hi = self.value_range
        values = self.R.uniform(lo, hi, size=(c, eh, ew)).astype(np.float32)
        img[:, y : y + eh, x : x + ew] = torch.from_numpy(values)
        d[self.image_key] = img
        ignore = d.get(self.ignore_key)
        ignore = (
            torch.zeros((1, height, width), dtype=torch.float32)
            if ignore is None
            else _plain(ignore).to(torch.float32).clone()
        )
        ignore[:, y : y + eh, x : x + ew] = 1.0
        d[self.ignore_key] = ignore
        return d


# ---------------------------------------------------------------------------------------------
# pipelines
# ---------------------------------------------------------------------------------------------


def build_augment(
    cfg: AugmentConfig | None = None,
    crop: int = 256,
    preset: Literal["standard", "strong"] = "standard",
    seed: int | None = None,
) -> Compose:
    """The training augmentation of ``preset`` producing ``crop x crop`` samples.

    ``seed`` (optional) fixes the random state of every random transform.
    """
    cfg = cfg or AugmentConfig()
    if crop <= 0:
        raise ValueError(f"crop must be positive, got {crop}")
    if preset not in ("standard", "strong"):
        raise ValueError(f"preset must be 'standard' or 'strong', got {preset!r}")
    keys = list(KEYS)
    transforms: list[Any] = [_Prepare()]
    if cfg.scale_intensity:
        transforms.append(ScaleIntensityd(keys=IMAGE))
    transforms += [
        SpatialPadd(keys=keys, spatial_size=(crop, crop)),
        RandSpatialCropd(keys=keys, roi_size=(crop, crop), random_size=False),
        RandAxisFlipd(keys=keys, prob=cfg.flip_prob),
        RandRotate90d(keys=keys, prob=cfg.rotate90_prob, spatial_axes=(0, 1)),
        RandGaussianNoised(keys=IMAGE, prob=cfg.noise_prob, mean=0.0, std=cfg.noise_std),
        RandAdjustContrastd(keys=IMAGE, prob=cfg.contrast_prob, gamma=cfg.contrast_gamma),
        RandGaussianSmoothd(
            keys=IMAGE, prob=cfg.smooth_prob, sigma_x=cfg.smooth_sigma, sigma_y=cfg.smooth_sigma
        ),
        RandHistogramShiftd(
            keys=IMAGE, prob=cfg.hist_shift_prob, num_control_points=cfg.hist_shift_points
        ),
        _CompactLabel(),
        RandZoomd(
            keys=keys,
            prob=cfg.zoom_prob,
            min_zoom=cfg.zoom_range[0],
            max_zoom=cfg.zoom_range[1],
            mode=("area", "nearest", "nearest"),
            keep_size=True,
        ),
        _RestoreLabel(),
    ]
    if preset == "strong":
        transforms += [
            RandColorJitterd(
                IMAGE,
                prob=cfg.jitter_prob,
                brightness=cfg.jitter_brightness,
                contrast=cfg.jitter_contrast,
                saturation=cfg.jitter_saturation,
                hue=cfg.jitter_hue,
            ),
            RandGrayscaled(IMAGE, prob=cfg.grayscale_prob),
            RandGaussianSmoothd(
                keys=IMAGE, prob=cfg.blur_prob, sigma_x=cfg.blur_sigma, sigma_y=cfg.blur_sigma
            ),
            RandCutoutd(
                IMAGE, IGNORE, prob=cfg.cutout_prob, area=cfg.cutout_area, ratio=cfg.cutout_ratio
            ),
        ]
    transforms.append(_Finalize())
    compose = Compose(transforms)
    if seed is not None:
        compose.set_random_state(seed=seed)
    return compose
