"""Per-cell measurement tables: known shapes, raw intensities, Parquet/CSV round trips."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from skimage.draw import disk

from cellst.export import cell_table, combine_tables, write_cell_tables, write_image_table
from cellst.export.measure import table_columns

H, W = 40, 50
# per-cell constant raw values of channel 0 (uint16, far above 255: no normalisation)
CH0 = {1: 1000, 2: 40000, 5: 65535, 7: 3, 9: 12345}


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """Label with a disc, a rectangle at the top-right corner, a ring with a hole, a single
    pixel and a bar on the bottom edge; a 2-channel uint16 image of known values."""
    label = np.zeros((H, W), dtype=np.uint16)
    label[disk((15, 15), 6)] = 1
    label[0:5, 40:50] = 2
    label[25:36, 20:32] = 5
    label[28:33, 23:29] = 0  # the hole
    label[38, 2] = 7
    label[H - 1, 45:49] = 9
    image = np.zeros((H, W, 2), dtype=np.uint16)
    image[..., 0] = 7  # background, must not leak into any cell
    for lab, value in CH0.items():
        image[label == lab, 0] = value
    image[..., 1] = 50
    disc = label == 1
    image[disc & (np.arange(W)[None, :] < 15), 1] = 100
    image[disc & (np.arange(W)[None, :] >= 15), 1] = 300
    return label, image


def test_shapes_positions_and_border() -> None:
    label, image = _scene()
    df = cell_table(label, image, image_id="scene")
    assert df["label"].tolist() == [1, 2, 5, 7, 9]
    assert (df["image_id"] == "scene").all()
    row = df.set_index("label")

    disc = label == 1
    assert row.loc[1, "area"] == disc.sum()
    assert row.loc[1, ["centroid_y", "centroid_x"]].tolist() == pytest.approx([15.0, 15.0])
    assert row.loc[1, ["bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x"]].tolist() == [
        10,
        10,
        21,
        21,
    ]
    assert row.loc[1, "eccentricity"] < 0.1
    assert row.loc[1, "equivalent_diameter"] == pytest.approx(math.sqrt(4 * disc.sum() / math.pi))

    assert row.loc[2, "area"] == 50
    assert row.loc[2, ["centroid_y", "centroid_x"]].tolist() == pytest.approx([2.0, 44.5])
    assert row.loc[2, ["bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x"]].tolist() == [
        0,
        40,
        5,
        50,
    ]
    assert row.loc[2, "solidity"] == pytest.approx(1.0)

    assert row.loc[5, "area"] == 11 * 12 - 5 * 6  # the hole is not counted
    assert row.loc[5, "solidity"] < 0.85
    assert row.loc[7, "area"] == 1
    assert row.loc[7, ["centroid_y", "centroid_x"]].tolist() == [38.0, 2.0]

    touches = row["touches_border"]
    assert touches.dtype == bool
    assert touches.to_dict() == {1: False, 2: True, 5: False, 7: False, 9: True}


def test_intensities_are_raw_values_per_channel() -> None:
    label, image = _scene()
    row = cell_table(label, image).set_index("label")
    for lab, value in CH0.items():
        for stat in ("mean", "min", "max"):
            assert row.loc[lab, f"{stat}_intensity_c0"] == value
    disc = label == 1
    assert row.loc[1, "min_intensity_c1"] == 100
    assert row.loc[1, "max_intensity_c1"] == 300
    assert row.loc[1, "mean_intensity_c1"] == pytest.approx(image[disc, 1].astype(float).mean())
    assert row.loc[2, "mean_intensity_c1"] == 50
    assert "mean_intensity_c2" not in row.columns


def test_grayscale_float_and_no_image() -> None:
    label, image = _scene()
    gray = cell_table(label, image[..., 0].astype(np.float32) / 4)
    assert [c for c in gray.columns if "intensity" in c] == [
        "mean_intensity_c0",
        "min_intensity_c0",
        "max_intensity_c0",
    ]
    assert gray.set_index("label").loc[5, "mean_intensity_c0"] == 65535 / 4
    bare = cell_table(label)
    assert not any("intensity" in c for c in bare.columns)
    assert bare["area"].tolist() == gray["area"].tolist()


def test_empty_label_has_all_columns_and_dtypes() -> None:
    label, image = _scene()
    full = cell_table(label, image, image_id="a")
    empty = cell_table(np.zeros((H, W), dtype=np.int32), image, image_id="a")
    assert len(empty) == 0
    assert list(empty.columns) == list(full.columns) == list(table_columns(2))
    assert empty.dtypes.astype(str).to_dict() == full.dtypes.astype(str).to_dict()
    assert full["label"].dtype == np.int64 and full["area"].dtype == np.float64


@pytest.mark.parametrize(
    ("label", "image", "message"),
    [
        (np.zeros((2, 4, 4), dtype=np.int32), None, "2-D"),
        (np.zeros((4, 4), dtype=np.float32), None, "integer dtype"),
        (np.zeros((4, 4), dtype=bool), None, "integer dtype"),
        (np.full((4, 4), -1, dtype=np.int32), None, "negative"),
        (np.zeros((4, 4), dtype=np.int32), np.zeros((4, 5)), "spatial shape"),
        (np.zeros((4, 4), dtype=np.int32), np.zeros((4, 4, 2, 2)), r"\(H, W\) or \(H, W, C\)"),
        (np.zeros((4, 4), dtype=np.int32), np.zeros((4, 4), dtype=bool), "numeric dtype"),
    ],
)
def test_bad_input_is_a_value_error(label, image, message) -> None:
    with pytest.raises(ValueError, match=message):
        cell_table(label, image)


def _read_pair(out, stem: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pq.read_table(out / f"{stem}.parquet").to_pandas(), pd.read_csv(out / f"{stem}.csv")


def test_write_tables_round_trip_and_run_table(tmp_path) -> None:
    label, image = _scene()
    a = cell_table(label, image, image_id="imgA")
    b = cell_table(label[::-1].copy(), image[::-1], image_id="imgB")
    empty = cell_table(np.zeros((H, W), dtype=np.int32), image, image_id="imgC")
    written = write_cell_tables({"imgA": a, "imgB": b, "imgC": empty}, tmp_path)

    names = {f"img{k}_cells.{ext}" for k in "ABC" for ext in ("parquet", "csv")}
    names |= {"cells.parquet", "cells.csv"}
    assert set(written) == names
    assert {p.name for p in tmp_path.iterdir()} == names  # no temporary file is left over
    assert all(written[n] == tmp_path / n for n in names)

    for name, df in (("imgA", a), ("imgB", b), ("imgC", empty)):
        parquet, csv = _read_pair(tmp_path, f"{name}_cells")
        pd.testing.assert_frame_equal(parquet, df)
        assert list(csv.columns) == list(df.columns)
        assert len(csv) == len(df)
        if len(df):
            pd.testing.assert_frame_equal(csv, df, check_dtype=False, rtol=1e-12)
            assert csv["touches_border"].dtype == bool

    run_parquet, run_csv = _read_pair(tmp_path, "cells")
    per_image = [pq.read_table(tmp_path / f"img{k}_cells.parquet").to_pandas() for k in "AB"]
    pd.testing.assert_frame_equal(run_parquet, pd.concat(per_image, ignore_index=True))
    assert run_parquet["image_id"].tolist() == ["imgA"] * len(a) + ["imgB"] * len(b)
    pd.testing.assert_frame_equal(run_csv, run_parquet, check_dtype=False, rtol=1e-12)


def test_streaming_writes_then_combine(tmp_path) -> None:
    label, image = _scene()
    gray = cell_table(label, image[..., 0], image_id="g")  # one channel
    two = cell_table(label, image, image_id="t")  # two channels
    write_image_table(gray, tmp_path, "g")
    write_image_table(two, tmp_path, "t")
    written = combine_tables(tmp_path)
    assert set(written) == {"cells.parquet", "cells.csv"}
    run = pd.read_parquet(tmp_path / "cells.parquet")
    assert len(run) == len(gray) + len(two)
    assert list(run.columns) == list(table_columns(2))
    assert run.loc[run["image_id"] == "g", "mean_intensity_c1"].isna().all()
    assert run.loc[run["image_id"] == "t", "mean_intensity_c1"].notna().all()
    assert run["label"].dtype == np.int64 and run["touches_border"].dtype == bool

    # rerunning combine does not read the run table back into itself
    combine_tables(tmp_path)
    assert len(pd.read_parquet(tmp_path / "cells.parquet")) == len(run)


def test_combine_without_images_writes_empty_run_table(tmp_path) -> None:
    combine_tables(tmp_path)
    run = pd.read_parquet(tmp_path / "cells.parquet")
    assert len(run) == 0
    assert list(run.columns) == list(table_columns(0))


@pytest.mark.parametrize("name", ["", "a/b", "..", "."])
def test_bad_image_name(tmp_path, name) -> None:
    label, _ = _scene()
    with pytest.raises(ValueError, match="invalid image name"):
        write_cell_tables({name: cell_table(label)}, tmp_path)
    assert not list(tmp_path.iterdir())


def test_repeated_image_name(tmp_path) -> None:
    label, _ = _scene()
    df = cell_table(label)
    with pytest.raises(ValueError, match="repeated image names: x"):
        write_cell_tables([("x", df), ("x", df)], tmp_path)
