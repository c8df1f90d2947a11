"""QuPath GeoJSON: read written files back with json + shapely and rasterise every polygon."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import shapely
from shapely.geometry import shape
from skimage.draw import disk
from skimage.measure import label as connected

from cellst.data.synth import synth_image
from cellst.export import cell_table, label_to_features, write_geojson

H, W = 30, 40


def _rasterise(geom: shapely.Geometry, shape_hw: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies inside ``geom`` (pixel (r, c) has centre (c + .5, r + .5))."""
    rows, cols = np.mgrid[0 : shape_hw[0], 0 : shape_hw[1]]
    return shapely.contains_xy(geom, cols + 0.5, rows + 0.5)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _scene() -> np.ndarray:
    """Tiny, holed, nested, border, split, diagonal and concave instances with sparse ids."""
    label = np.zeros((H, W), dtype=np.uint16)
    label[5, 5] = 1  # a single pixel
    label[8:10, 2:4] = 2  # 2x2
    label[10:21, 10:21] = 3  # a square ring ...
    label[13:18, 13:18] = 0  # ... with a hole ...
    label[15, 15] = 4  # ... holding another cell
    label[0:3, 0:4] = 5  # top-left corner
    label[H - 4 :, W - 3 :] = 6  # bottom-right corner
    label[24:26, 2:5] = 7  # one id, two disconnected parts
    label[24:26, 8:10] = 7
    label[2, 30] = label[3, 31] = label[4, 32] = 8  # pixels touching only at corners
    label[22:29, 20:27] = 1000  # a C shape (concave) with a large id
    label[24:27, 22:27] = 0
    label[disk((8, 24), 4)] = 11
    return label


def _read(path) -> dict:
    text = path.read_text(encoding="utf-8")

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)  # strict JSON: no NaN/Infinity


def test_written_file_is_exact_valid_and_qupath_shaped(tmp_path) -> None:
    label = _scene()
    path = write_geojson(label, tmp_path / "cells.geojson", image_id="scene")
    assert path == tmp_path / "cells.geojson"
    assert [p.name for p in tmp_path.iterdir()] == ["cells.geojson"]
    data = _read(path)
    assert data["type"] == "FeatureCollection"
    ids = [int(i) for i in np.unique(label) if i]
    assert [f["properties"]["label"] for f in data["features"]] == ids

    for feature in data["features"]:
        assert feature["type"] == "Feature"
        props = feature["properties"]
        assert props["objectType"] == "detection"
        assert props["image_id"] == "scene"
        lab = props["label"]
        # QuPath reads an object's "name" (not "label"): the id that joins NAME_cells.csv
        assert props["name"] == str(lab)
        mask = label == lab
        assert props["measurements"] == {"area": float(mask.sum())}
        geom = shape(feature["geometry"])
        assert geom.is_valid, lab
        parts = connected(mask, connectivity=1).max()
        expected_type = "Polygon" if parts == 1 else "MultiPolygon"
        assert feature["geometry"]["type"] == expected_type, lab
        coords = shapely.get_coordinates(geom)
        assert coords.min() >= 0 and coords[:, 0].max() <= W and coords[:, 1].max() <= H
        assert np.array_equal(coords, np.round(coords))  # on pixel corners
        raster = _rasterise(geom, label.shape)
        assert _iou(raster, mask) >= 0.95, lab
        assert np.array_equal(raster, mask), lab  # pixel-edge polygons are exact
        assert geom.area == mask.sum()


def test_holes_are_interior_rings_and_stay_outside() -> None:
    label = _scene()
    features = {f["properties"]["label"]: f for f in label_to_features(label)}
    ring = shape(features[3]["geometry"])
    assert len(ring.interiors) == 1
    assert shapely.Polygon(ring.interiors[0]).area == 5 * 5
    hole = np.zeros(label.shape, dtype=bool)
    hole[13:18, 13:18] = True
    assert not _rasterise(ring, label.shape)[hole].any()
    inner = shape(features[4]["geometry"])
    assert inner.bounds == (15.0, 15.0, 16.0, 16.0)
    assert ring.disjoint(shapely.Point(15.5, 15.5))
    # the single pixel and 2x2 cells are exactly their squares
    assert shape(features[1]["geometry"]).equals(shapely.box(5, 5, 6, 6))
    assert shape(features[2]["geometry"]).equals(shapely.box(2, 8, 4, 10))
    assert len(shapely.get_coordinates(shape(features[2]["geometry"]))) == 5  # no extra vertices
    # the split cell keeps both parts, the diagonal cell keeps all three pixels
    assert len(shape(features[7]["geometry"]).geoms) == 2
    assert shape(features[8]["geometry"]).area == 3


def test_measurements_come_from_the_cell_table(tmp_path) -> None:
    label = _scene()
    image = np.stack([label * 10 + 3, np.full(label.shape, 60000)], axis=-1).astype(np.uint16)
    table = cell_table(label, image, image_id="scene")
    table["no_value"] = np.nan  # not representable in JSON: left out
    path = write_geojson(label, tmp_path / "m.geojson", measurements=table, classification="Cell")
    features = _read(path)["features"]
    rows = table.set_index("label")
    for feature in features:
        props = feature["properties"]
        assert props["classification"]["name"] == "Cell"
        assert len(props["classification"]["color"]) == 3
        m = props["measurements"]
        row = rows.loc[props["label"]]
        assert "no_value" not in m and "image_id" not in m and "label" not in m
        assert m["area"] == row["area"]
        assert m["mean_intensity_c0"] == props["label"] * 10 + 3
        assert m["max_intensity_c1"] == 60000
        assert m["touches_border"] == float(row["touches_border"])
        assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
        # the centroid is the polygon's own, in its pixel-edge frame (the table's + 0.5)
        centroid = shape(feature["geometry"]).centroid
        assert (m["centroid_x"], m["centroid_y"]) == pytest.approx((centroid.x, centroid.y))
        assert m["centroid_x"] == pytest.approx(row["centroid_x"] + 0.5)
        assert (m["bbox_min_x"], m["bbox_max_y"]) == (row["bbox_min_x"], row["bbox_max_y"])
    border = {
        f["properties"]["label"]
        for f in features
        if f["properties"]["measurements"]["touches_border"]
    }
    assert border == {5, 6}


def test_synthetic_image_polygons_match_every_instance() -> None:
    _, label = synth_image(np.random.default_rng(3), "fluorescence", (128, 128), density=0.5)
    ids = np.unique(label)[1:]
    features = label_to_features(label)
    assert len(features) == len(ids) > 5
    for feature, lab in zip(features, ids, strict=True):
        assert feature["properties"]["label"] == lab
        geom = shape(feature["geometry"])
        assert geom.is_valid
        mask = label == lab
        assert _iou(_rasterise(geom, label.shape), mask) == 1.0


def test_empty_label_and_bad_input(tmp_path) -> None:
    empty = np.zeros((8, 8), dtype=np.int32)
    assert label_to_features(empty) == []
    assert _read(write_geojson(empty, tmp_path / "e.geojson"))["features"] == []

    label = _scene()
    table = cell_table(label)
    with pytest.raises(ValueError, match="no row for label"):
        label_to_features(label, table[table["label"] != 3])
    with pytest.raises(ValueError, match="'label' column"):
        label_to_features(label, table.drop(columns="label"))
    with pytest.raises(ValueError, match="repeated labels"):
        label_to_features(label, pd.concat([table, table]))
    with pytest.raises(ValueError, match="integer dtype"):
        label_to_features(label.astype(np.float32))
    with pytest.raises(ValueError, match="2-D"):
        label_to_features(label[None])
    with pytest.raises(ValueError, match="negative"):
        write_geojson(label.astype(np.int32) - 1, tmp_path / "bad.geojson")
    assert not (tmp_path / "bad.geojson").exists()
