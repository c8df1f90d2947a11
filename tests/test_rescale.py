"""Cell-size rescaling (``inference.rescale_diameter``): small cells are segmented on an
upsampled copy of the image and the labels resized back to the image's size."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

from cellst.inference.predictor import InferenceConfig, median_cell_diameter, rescale_factor
from cellst.metrics.instance import match_instances
from cellst.model.targets import hover_maps
from cellst.postprocess import PostprocessConfig, postprocess_hover
from cellst.postprocess.calibrate import ValMaps, score_item


def _disks(shape: tuple[int, int], radius: int, step: int) -> np.ndarray:
    """Separate discs of ``radius`` on a grid ``step`` apart, labels 1..N."""
    label = np.zeros(shape, np.int32)
    n = 0
    for cy in range(step // 2, shape[0] - radius, step):
        for cx in range(step // 2, shape[1] - radius, step):
            n += 1
            label[disk((cy, cx), radius, shape=shape)] = n
    return label


def _maps(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What a perfect HoVer-Net predicts for ``label``."""
    return (label > 0).astype(np.float32), hover_maps(label).astype(np.float32)


def _upsampled(label: np.ndarray, scale: int) -> np.ndarray:
    return np.kron(label, np.ones((scale, scale), np.int32))


def test_median_cell_diameter():
    label = _disks((96, 96), 5, 24)
    areas = np.bincount(label.ravel())[1:]
    assert median_cell_diameter(label) == pytest.approx(np.sqrt(4 * np.median(areas) / np.pi))
    assert 9 < median_cell_diameter(label) < 11
    assert median_cell_diameter(np.zeros((8, 8), np.int32)) == 0.0


@pytest.mark.parametrize(
    ("diameter", "max_upscale", "expected"),
    [(None, 2.0, 1.0), (8.0, 2.0, 1.0), (15.0, 2.0, 1.5), (40.0, 2.0, 2.0), (40.0, 3.0, 3.0)],
)
def test_rescale_factor_brings_the_cells_to_the_diameter(diameter, max_upscale, expected):
    label = _disks((96, 96), 5, 24)  # median diameter about 10 px
    d = median_cell_diameter(label)
    cfg = InferenceConfig(rescale_diameter=diameter, max_upscale=max_upscale)
    factor = rescale_factor(*_maps(label), cfg)
    if diameter is not None and 1.0 < expected < max_upscale:
        expected = round(diameter / d * 8) / 8
    assert factor == expected


def test_no_cells_no_rescaling():
    empty = np.zeros((64, 64), np.int32)
    assert rescale_factor(*_maps(empty), InferenceConfig(rescale_diameter=30)) == 1.0


def test_upsampled_maps_are_post_processed_and_resized_back_to_the_image():
    label = _disks((80, 100), 5, 20)
    big = _upsampled(label, 2)
    out = postprocess_hover(*_maps(big), PostprocessConfig(), shape=label.shape)
    assert out.shape == label.shape and out.dtype == np.int32
    assert sorted(np.unique(out))[1:] == list(range(1, int(out.max()) + 1))  # 1..N
    res = match_instances(label, out, 0.5)
    assert res.tp == label.max() == out.max()
    # the calibration and validation scoring passes the label's shape
    scores, pred = score_item(ValMaps(*_maps(big), label), PostprocessConfig())
    assert pred.shape == label.shape and scores["f1"] == 1.0


def test_min_object_size_counts_pixels_of_the_image_not_of_the_upsampled_copy():
    label = _disks((80, 100), 5, 20)  # cells of about 80 px; 320 px in the 2x copy
    big = _upsampled(label, 2)
    post = PostprocessConfig(min_object_size=100)
    assert postprocess_hover(*_maps(label), post).max() == 0
    assert postprocess_hover(*_maps(big), post, shape=label.shape).max() == 0
    assert postprocess_hover(*_maps(big), post).max() == label.max()  # without the shape


def test_config_refuses_bad_values():
    from pydantic import ValidationError

    for bad in ({"rescale_diameter": 0}, {"max_upscale": 0.5}, {"max_upscale": 10}):
        with pytest.raises(ValidationError):
            InferenceConfig(**bad)
