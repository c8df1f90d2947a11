"""Instance label images as QuPath GeoJSON detections, with exact pixel-edge polygons.

Each instance becomes one GeoJSON ``Feature`` whose polygon follows the pixel edges of its
mask in full-resolution pixel coordinates (origin top-left, ``x`` = column, ``y`` = row;
pixel ``(r, c)`` covers ``[c, c + 1] x [r, r + 1]``), so the polygon rasterises back to the
mask exactly, holes included. The geometry is built by GEOS (:mod:`shapely`): every row of
an instance is cut into runs of pixels, each run (stacked with the same run in the rows
below) is a rectangle, and the union of an instance's rectangles is its outline. An instance whose pixels form several parts (or touch
only at a corner) becomes a ``MultiPolygon``, so no pixel is lost.

QuPath (0.4 and later) imports the file with *File > Import objects from file*; it reads
``properties.objectType``, ``properties.classification`` and ``properties.measurements``
(a name -> number object) and ignores the other properties. Centroids among the
measurements are in the polygons' frame (see :data:`PIXEL_CENTRE_COLUMNS`); bounding boxes
already are (the tables' are half-open pixel indices, i.e. pixel edges).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import shapely

from cellst.export.measure import check_label
from cellst.fs import atomic_write_text

__all__ = ["instance_geometries", "label_to_features", "write_geojson"]

_DEFAULT_COLOR = (255, 200, 0)
#: measurement columns in pixel-index coordinates (pixel ``(r, c)`` centred at ``(r, c)``,
#: as scikit-image and the cell tables give them): in the GeoJSON they are shifted by half a
#: pixel to its pixel-edge frame, where that pixel's centre is ``(r + 0.5, c + 0.5)``, so a
#: centroid agrees with its polygon (and with QuPath's own Centroid X / Y)
PIXEL_CENTRE_COLUMNS = ("centroid_x", "centroid_y")


def _polygonal(geom: shapely.Geometry) -> shapely.Geometry:
    """``geom`` as a valid Polygon or MultiPolygon (``make_valid`` only when GEOS needs it)."""
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    if isinstance(geom, shapely.GeometryCollection):
        parts = [g for g in shapely.get_parts(geom) if isinstance(g, shapely.Polygon)]
        parts += [
            p
            for g in shapely.get_parts(geom)
            if isinstance(g, shapely.MultiPolygon)
            for p in g.geoms
        ]
        geom = parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)
    return geom


def instance_geometries(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixel-edge outline of every instance of ``label``.

    Parameters
    ----------
    label : (H, W) ndarray of int
        Instance map, 0 = background.

    Returns
    -------
    ids : (N,) ndarray of int64
        The instance ids, ascending.
    geometries : (N,) ndarray of shapely geometries
        A valid Polygon (or MultiPolygon when the instance has several parts) per id, with
        integer vertices, no repeated collinear vertices, holes as interior rings and
        exterior rings counter-clockwise in ``(x, y)``.
    """
    label = check_label(label)
    h, w = label.shape
    padded = np.zeros((h, w + 2), dtype=label.dtype)
    padded[:, 1:-1] = label
    # every change along a row is a run boundary at x = column; a run starts at a boundary
    # whose right-hand pixel is an instance and ends at the next boundary of the same row
    # (each row ends at background, so the next boundary is always in that row)
    rows, xs = np.nonzero(padded[:, 1:] != padded[:, :-1])
    after = padded[rows, xs + 1]
    start = np.flatnonzero(after[:-1] != 0)
    run_id, y, x0, x1 = after[start].astype(np.int64), rows[start], xs[start], xs[start + 1]
    if not len(start):  # no instance
        return np.zeros(0, dtype=np.int64), np.empty(0, dtype=object)
    # identical runs of one instance in consecutive rows make one taller rectangle:
    # fewer rectangles for GEOS to union (about 1/3 fewer on typical cells)
    order = np.lexsort((y, x1, x0, run_id))
    run_id, y, x0, x1 = run_id[order], y[order], x0[order], x1[order]
    first_row = np.ones(len(y), dtype=bool)
    first_row[1:] = (
        (run_id[1:] != run_id[:-1])
        | (x0[1:] != x0[:-1])
        | (x1[1:] != x1[:-1])
        | (y[1:] != y[:-1] + 1)
    )
    top = np.flatnonzero(first_row)
    bottom = np.r_[top[1:], len(y)] - 1
    run_id = run_id[top]
    boxes = shapely.box(x0[top], y[top], x1[top], y[bottom] + 1)
    ids, first = np.unique(run_id, return_index=True)
    last = np.r_[first[1:], len(run_id)]
    geoms = np.empty(len(ids), dtype=object)
    for i, (a, b) in enumerate(zip(first, last, strict=True)):
        geoms[i] = shapely.union_all(boxes[a:b])
    geoms = shapely.simplify(geoms, 0.0)  # drop the collinear vertices left by the union
    geoms = np.array([_polygonal(g) for g in geoms], dtype=object)
    geoms = shapely.orient_polygons(geoms, exterior_cw=False)
    return ids, geoms


def _rings(polygon: shapely.Polygon) -> list[list[list[int]]]:
    """GeoJSON rings (exterior then holes) of a polygon with integer vertices."""
    rings = [polygon.exterior, *polygon.interiors]
    return [np.rint(np.asarray(r.coords)).astype(np.int64).tolist() for r in rings]


def _geometry(geom: shapely.Geometry) -> dict[str, Any]:
    """A GeoJSON geometry object for a Polygon or MultiPolygon."""
    if isinstance(geom, shapely.Polygon):
        return {"type": "Polygon", "coordinates": _rings(geom)}
    return {"type": "MultiPolygon", "coordinates": [_rings(p) for p in geom.geoms]}


def _measurement_rows(measurements: pd.DataFrame, ids: np.ndarray) -> dict[int, dict[str, float]]:
    """Label id -> {column: finite number} from a measurement table (one row per label)."""
    if "label" not in measurements.columns:
        raise ValueError("measurements must have a 'label' column")
    labels = measurements["label"].to_numpy()
    if len(np.unique(labels)) != len(labels):
        raise ValueError("measurements have repeated labels")
    missing = np.setdiff1d(ids, labels.astype(np.int64))
    if len(missing):
        shown = ", ".join(str(int(i)) for i in missing[:10])
        raise ValueError(f"measurements have no row for label(s) {shown}")
    numeric = [
        c
        for c in measurements.columns
        if c != "label"
        and (
            pd.api.types.is_numeric_dtype(measurements[c])
            or pd.api.types.is_bool_dtype(measurements[c])
        )
    ]
    values = measurements[numeric].astype("float64").to_numpy()
    rows: dict[int, dict[str, float]] = {}
    for lab, row in zip(labels.astype(np.int64).tolist(), values.tolist(), strict=True):
        # JSON has no NaN/inf: a missing value is left out rather than written invalid
        rows[lab] = {c: v for c, v in zip(numeric, row, strict=True) if math.isfinite(v)}
    return rows


def label_to_features(
    label: np.ndarray,
    measurements: pd.DataFrame | None = None,
    image_id: str = "",
    classification: str | None = None,
    color: tuple[int, int, int] = _DEFAULT_COLOR,
) -> list[dict[str, Any]]:
    """One QuPath detection GeoJSON ``Feature`` per instance of a label image.

    Parameters
    ----------
    label : (H, W) ndarray of int
        Instance map, 0 = background. Ids are kept.
    measurements : pandas.DataFrame, optional
        A table with a ``label`` column and one row per instance (such as
        :func:`cellst.export.measure.cell_table`); its numeric and boolean columns become
        the feature's ``measurements`` (non-finite values are left out). Without it the
        measurements are the pixel ``area``.
    image_id : str
        Stored as ``properties.image_id`` when not empty.
    classification : str, optional
        QuPath class name given to every detection, shown in ``color`` (RGB).

    Returns
    -------
    list of dict
        GeoJSON Features, ascending by label id; ``properties`` holds
        ``objectType: "detection"``, ``label`` and ``measurements``.

    Raises
    ------
    ValueError
        When ``label`` is not a 2-D non-negative integer map, or ``measurements`` lack a
        ``label`` column, repeat a label or miss one of the instances.
    """
    label = check_label(label)
    ids, geoms = instance_geometries(label)
    if measurements is not None:
        rows = _measurement_rows(measurements, ids)
        for row in rows.values():  # pixel-index centres (the table's) to the polygons' frame
            for column in PIXEL_CENTRE_COLUMNS:
                if column in row:
                    row[column] += 0.5
    else:
        # the outline's area is the exact pixel count
        rows = {int(i): {"area": float(a)} for i, a in zip(ids, shapely.area(geoms), strict=True)}
    properties_extra: dict[str, Any] = {}
    if classification is not None:
        properties_extra["classification"] = {
            "name": str(classification),
            "color": [int(c) for c in color],
        }
    if image_id:
        properties_extra["image_id"] = str(image_id)
    features = []
    for i, geom in zip(ids.tolist(), geoms, strict=True):
        # QuPath's importer reads "name" (not "label"): the id that joins NAME_cells.csv
        properties = {
            "objectType": "detection",
            "name": str(int(i)),
            "label": int(i),
            **properties_extra,
        }
        properties["measurements"] = rows[int(i)]
        features.append({"type": "Feature", "geometry": _geometry(geom), "properties": properties})
    return features


def write_geojson(
    label: np.ndarray,
    path: str | os.PathLike[str],
    measurements: pd.DataFrame | None = None,
    image_id: str = "",
    classification: str | None = None,
) -> Path:
    """Write the instances of ``label`` as a GeoJSON ``FeatureCollection`` for QuPath.

    Parameters are those of :func:`label_to_features`; ``path`` is written atomically.

    Returns
    -------
    Path
        ``path``.
    """
    features = label_to_features(label, measurements, image_id, classification)
    collection = {"type": "FeatureCollection", "cellst": {"image": image_id}}
    collection["features"] = features
    text = json.dumps(collection, separators=(",", ":"))
    return atomic_write_text(path, text + "\n")


def is_cellst_geojson(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a GeoJSON file :func:`write_geojson` wrote (so it may be
    replaced): its ``cellst`` member (a GeoJSON foreign member, which QuPath ignores) comes
    before the features, so only the file's start is read."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return head.startswith(b'{"type":"FeatureCollection","cellst":')
