"""The classical baseline (cellst.metrics.baseline): Otsu + distance-transform watershed."""

from __future__ import annotations

import numpy as np
import pytest

from cellst.data.synth import synth_image
from cellst.metrics.baseline import detect_polarity, threshold_watershed
from cellst.metrics.instance import image_scores


def _synth(modality: str, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    return synth_image(np.random.default_rng(seed), modality, (192, 192), density=0.2)


def _f1(label: np.ndarray, pred: np.ndarray) -> float:
    return float(image_scores(label, pred)["f1"])


def test_finds_bright_cells_on_dark_background():
    image, label = _synth("fluorescence")
    pred = threshold_watershed(image)
    assert pred.shape == label.shape and pred.dtype == np.int32
    assert _f1(label, pred) > 0.5
    # instances are numbered 1..N without gaps
    assert np.array_equal(np.unique(pred), np.arange(int(pred.max()) + 1))


def test_finds_dark_stained_cells_on_light_rgb_background():
    image, label = _synth("brightfield")
    assert image.ndim == 3 and image.shape[2] == 3
    assert _f1(label, threshold_watershed(image)) > 0.4


def test_polarity_comes_from_the_image_not_the_modality():
    """Inverting a light-on-dark image gives a dark-on-light one: same cells found."""
    image, label = _synth("fluorescence")
    inverted = image.max() - image
    pred = threshold_watershed(image)
    pred_inv = threshold_watershed(inverted)
    assert np.array_equal(pred > 0, pred_inv > 0)
    assert _f1(label, pred_inv) == pytest.approx(_f1(label, pred))
    # the decision matters: forcing the wrong side segments the background instead
    assert _f1(label, threshold_watershed(image, polarity="dark")) < 0.5 * _f1(label, pred)


def test_detect_polarity_bright_dark_and_relief():
    x = np.zeros((64, 64))
    x[20:30, 20:30] = 1.0
    assert detect_polarity(x) == "bright"
    assert detect_polarity(-x) == "dark"
    relief = x.copy()
    relief[40:50, 40:50] = -1.0  # as many pixels darker as brighter than the background
    assert detect_polarity(relief) == "relief"


def test_relief_contrast_finds_cells():
    image, label = _synth("dic")
    assert _f1(label, threshold_watershed(image)) > 0.5


def test_splits_touching_cells():
    yy, xx = np.mgrid[:64, :96]
    image = ((yy - 32) ** 2 + (xx - 34) ** 2 < 15**2) | ((yy - 32) ** 2 + (xx - 62) ** 2 < 15**2)
    pred = threshold_watershed(image.astype(np.float32))
    assert pred.max() == 2
    assert (pred[32, 34] > 0) and (pred[32, 62] > 0) and pred[32, 34] != pred[32, 62]


@pytest.mark.parametrize(
    "image",
    [np.zeros((48, 48)), np.full((48, 48), 7, np.uint16), np.full((48, 48, 3), 200, np.uint8)],
    ids=["zeros", "constant-uint16", "constant-rgb"],
)
def test_empty_image_gives_no_cells(image):
    pred = threshold_watershed(image)
    assert pred.shape == (48, 48) and pred.dtype == np.int32
    assert pred.max() == 0


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"got \(4, 8, 8, 3\)"):
        threshold_watershed(np.zeros((4, 8, 8, 3)))  # a stack, not one image
    with pytest.raises(ValueError, match="NaN"):
        threshold_watershed(np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match="polarity"):
        threshold_watershed(np.zeros((8, 8)), polarity="up")  # type: ignore[arg-type]
