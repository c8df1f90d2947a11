"""Per-cell measurement tables: one row per instance of a label image, as Parquet and CSV.

Every measurement comes from :func:`skimage.measure.regionprops_table`; this module only
picks the properties, gives them stable column names and fixed dtypes (so tables of many
images concatenate cleanly) and writes them. Intensities are measured on the *source*
image as given (raw values of any dtype, before the normalisation the model sees), one
set of columns per channel.

Files written by :func:`write_cell_tables`::

    OUT/NAME_cells.parquet  OUT/NAME_cells.csv    one per image
    OUT/cells.parquet       OUT/cells.csv         the whole run (all images concatenated)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.measure import regionprops_table

from cellst.fs import atomic_write, atomic_write_parquet
from cellst.provenance import csv_begins_with

__all__ = [
    "RUN_TABLE",
    "TABLE_SUFFIX",
    "cell_table",
    "check_label",
    "combine_tables",
    "is_cellst_table",
    "table_columns",
    "write_cell_tables",
    "write_image_table",
]

#: suffix of the per-image table files (``NAME_cells.parquet`` / ``NAME_cells.csv``)
TABLE_SUFFIX = "_cells"
#: stem of the per-run table files (``cells.parquet`` / ``cells.csv``)
RUN_TABLE = "cells"

# regionprops_table column -> stable cellst column, in output order, with its dtype
_SHAPE_COLUMNS: dict[str, tuple[str, str]] = {
    "label": ("label", "int64"),
    "centroid-0": ("centroid_y", "float64"),
    "centroid-1": ("centroid_x", "float64"),
    "bbox-0": ("bbox_min_y", "int64"),
    "bbox-1": ("bbox_min_x", "int64"),
    "bbox-2": ("bbox_max_y", "int64"),
    "bbox-3": ("bbox_max_x", "int64"),
    "area": ("area", "float64"),
    "perimeter": ("perimeter", "float64"),
    "equivalent_diameter_area": ("equivalent_diameter", "float64"),
    "eccentricity": ("eccentricity", "float64"),
    "solidity": ("solidity", "float64"),
    "orientation": ("orientation", "float64"),
}
_SHAPE_PROPS = ("label", "centroid", "bbox", "area", "perimeter", "equivalent_diameter_area")
_SHAPE_PROPS += ("eccentricity", "solidity", "orientation")
# regionprops intensity property -> cellst column prefix (``mean_intensity_c0`` ...)
_INTENSITY_PROPS = {
    "intensity_mean": "mean_intensity",
    "intensity_min": "min_intensity",
    "intensity_max": "max_intensity",
}


def check_label(label: np.ndarray, name: str = "label") -> np.ndarray:
    """Check that ``label`` is a 2-D non-negative integer instance map and return it.

    Instance ids are kept as they are (no relabelling), so tables and polygons written
    from the same label image refer to the same ids.

    Raises
    ------
    ValueError
        When ``label`` is not 2-D, not of an integer dtype (bool is refused), or negative.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{name} must be a 2-D instance map, got shape {label.shape}")
    if label.dtype == bool or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"{name} must have an integer dtype, got {label.dtype}")
    if label.size and label.min() < 0:
        raise ValueError(f"{name} has negative values (min {label.min()})")
    return label


def _channels_last(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``image`` as ``(H, W, C)`` after checking its spatial shape against ``shape``."""
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
    if tuple(image.shape[:2]) != tuple(shape):
        raise ValueError(
            f"image spatial shape {tuple(image.shape[:2])} differs from label shape {tuple(shape)}"
        )
    if image.dtype == bool or not (
        np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
    ):
        raise ValueError(f"image must have a numeric dtype, got {image.dtype}")
    return image if image.ndim == 3 else image[:, :, None]


def table_columns(n_channels: int) -> dict[str, str]:
    """Column name -> dtype of a cell table for an image with ``n_channels`` channels."""
    columns = {"image_id": "str"}
    columns.update(dict(_SHAPE_COLUMNS.values()))
    for prefix in _INTENSITY_PROPS.values():
        columns.update({f"{prefix}_c{k}": "float64" for k in range(n_channels)})
    columns["touches_border"] = "bool"
    return columns


def cell_table(
    label: np.ndarray,
    image: np.ndarray | None = None,
    image_id: str = "",
) -> pd.DataFrame:
    """Measure every instance of a label image: shape, position and raw intensities.

    Parameters
    ----------
    label : (H, W) ndarray of int
        Instance map, 0 = background. Ids need not be sequential and are kept.
    image : (H, W) or (H, W, C) ndarray, optional
        The source image, in its original dtype and value range; per-channel intensity
        columns are added when given.
    image_id : str
        Written to the ``image_id`` column of every row.

    Returns
    -------
    pandas.DataFrame
        One row per instance, sorted by ``label``, with columns ``image_id``, ``label``,
        ``centroid_y``, ``centroid_x``, ``bbox_min_y``, ``bbox_min_x``, ``bbox_max_y``,
        ``bbox_max_x`` (exclusive, pixel units), ``area``, ``perimeter``,
        ``equivalent_diameter``, ``eccentricity``, ``solidity``, ``orientation``
        (radians, skimage convention), ``mean_intensity_c{k}``, ``min_intensity_c{k}``,
        ``max_intensity_c{k}`` for each channel ``k`` (float64 of the raw values) and
        ``touches_border``. An empty label gives an empty frame with the same columns.

    Raises
    ------
    ValueError
        When ``label`` is not a 2-D non-negative integer map, or ``image`` is not numeric
        or its height and width differ from the label's.
    """
    label = check_label(label)
    properties = list(_SHAPE_PROPS)
    intensity = None
    n_channels = 0
    if image is not None:
        intensity = _channels_last(image, label.shape)
        n_channels = intensity.shape[2]
        properties += list(_INTENSITY_PROPS)
    raw = regionprops_table(label, intensity_image=intensity, properties=properties)

    data: dict[str, np.ndarray] = {new: raw[old] for old, (new, _) in _SHAPE_COLUMNS.items()}
    for prop, prefix in _INTENSITY_PROPS.items():
        for k in range(n_channels):
            data[f"{prefix}_c{k}"] = raw[f"{prop}-{k}"]
    h, w = label.shape
    data["touches_border"] = (
        (data["bbox_min_y"] == 0)
        | (data["bbox_min_x"] == 0)
        | (data["bbox_max_y"] == h)
        | (data["bbox_max_x"] == w)
    )
    columns = table_columns(n_channels)
    n = len(data["label"])
    data["image_id"] = np.full(n, str(image_id), dtype=object)
    frame = pd.DataFrame({name: data[name] for name in columns})
    return frame.astype(columns).sort_values("label", ignore_index=True)


def _check_name(name: str) -> str:
    """Refuse image names that are empty or would write outside the output folder."""
    name = str(name)
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"invalid image name {name!r} for a table file")
    return name


def is_cellst_table(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` (``.csv`` or ``.parquet``) holds a cell table as cellst writes it:
    its columns begin with :func:`table_columns`' shape columns, in order. Another tool's
    ``cells.csv`` does not, and a run must not replace it unasked."""
    path = Path(path)
    expected = list(table_columns(0))[:-1]  # without touches_border, which ends the table
    if path.suffix != ".parquet":
        return csv_begins_with(path, expected)
    import pyarrow.parquet as pq

    try:
        names = list(pq.read_schema(path).names)
    except (OSError, ValueError):  # not a table at all (pyarrow's errors are both)
        return False
    return names[: len(expected)] == expected


def _write_pair(df: pd.DataFrame, out_dir: Path, stem: str) -> dict[str, Path]:
    """Write ``df`` as ``stem.parquet`` and ``stem.csv`` in ``out_dir``, atomically."""
    parquet = atomic_write_parquet(df, out_dir / f"{stem}.parquet")
    csv = atomic_write(out_dir / f"{stem}.csv", lambda tmp: df.to_csv(tmp, index=False))
    return {parquet.name: parquet, csv.name: csv}


def write_image_table(
    df: pd.DataFrame, out_dir: str | os.PathLike[str], name: str
) -> dict[str, Path]:
    """Write one image's table as ``NAME_cells.parquet`` and ``NAME_cells.csv``.

    Lets a streaming caller write each image as soon as it is measured; call
    :func:`combine_tables` at the end for the per-run table.

    Returns
    -------
    dict
        File name -> path of the two files written.
    """
    return _write_pair(df, Path(out_dir), _check_name(name) + TABLE_SUFFIX)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate cell tables; images with fewer channels get NaN in the extra columns."""
    n_channels = 0
    for df in frames:
        while f"mean_intensity_c{n_channels}" in df.columns:
            n_channels += 1
    columns = table_columns(n_channels)
    filled = [df for df in frames if len(df)] or frames[:1]
    if not filled:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})
    out = pd.concat(filled, ignore_index=True)
    out = out.reindex(columns=list(columns) + [c for c in out.columns if c not in columns])
    return out.astype(columns)


def combine_tables(
    out_dir: str | os.PathLike[str], names: Iterable[str] | None = None
) -> dict[str, Path]:
    """Build the per-run ``cells.parquet`` / ``cells.csv`` from the per-image Parquet files.

    Parameters
    ----------
    out_dir : path-like
        The folder of the per-image ``NAME_cells.parquet`` files.
    names : iterable of str, optional
        The images of this run: only their tables are combined, so the run table holds
        neither an earlier run's images nor a user's own ``*_cells.parquet`` files. None:
        every ``*_cells.parquet`` in ``out_dir``.

    Concatenates the tables sorted by file name; with none the run table is empty but has
    all columns.

    Returns
    -------
    dict
        File name -> path of the two files written.
    """
    out_dir = Path(out_dir)
    if names is not None:
        paths = sorted(out_dir / f"{_check_name(n)}{TABLE_SUFFIX}.parquet" for n in names)
    else:
        paths = sorted(
            p
            for p in out_dir.glob(f"*{TABLE_SUFFIX}.parquet")
            if not p.name.startswith(".") and p.is_file()
        )
    frames = [pd.read_parquet(p) for p in paths]
    return _write_pair(_concat(frames), out_dir, RUN_TABLE)


def write_cell_tables(
    tables: Mapping[str, pd.DataFrame] | Iterable[tuple[str, pd.DataFrame]],
    out_dir: str | os.PathLike[str],
) -> dict[str, Path]:
    """Write per-image tables and the per-run table that concatenates them.

    Parameters
    ----------
    tables : mapping or iterable of (name, DataFrame)
        Image name -> its :func:`cell_table`. The name becomes the file stem
        ``NAME_cells``; it must not contain a path separator.
    out_dir : path-like
        Output folder, created if needed.

    Returns
    -------
    dict
        File name (``NAME_cells.parquet``, ``NAME_cells.csv``, ..., ``cells.parquet``,
        ``cells.csv``) -> path. Every file is written atomically.

    Raises
    ------
    ValueError
        On an invalid or repeated image name.
    """
    items = list(tables.items() if isinstance(tables, Mapping) else tables)
    names = [_check_name(name) for name, _ in items]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"repeated image names: {', '.join(repeated)}")
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    for name, df in zip(names, (df for _, df in items), strict=True):
        written.update(write_image_table(df, out_dir, name))
    written.update(_write_pair(_concat([df for _, df in items]), out_dir, RUN_TABLE))
    return written
