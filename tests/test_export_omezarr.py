"""OME-Zarr export: real NGFF 0.5 groups checked by third-party clients (``ome-zarr``'s
reader, ``ome-zarr-models``' validator), and the export of a real ingested store."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Labels, Multiscales, Reader
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.image_label import ImageLabel
from skimage.measure import regionprops_table

from cellst.data.arrays import write_array
from cellst.data.store import CellStore, StoreError
from cellst.export.omezarr import (
    GROUND_TRUTH,
    SEGMENTATION,
    export_store,
    label_color,
    read_label_metadata,
    read_ome_zarr,
    write_ome_zarr,
)


def measure(label: np.ndarray, image: np.ndarray) -> pd.DataFrame:
    """Per-cell area and mean intensity (of the first channel)."""
    grey = image[..., 0] if image.ndim == 3 else image
    return pd.DataFrame(
        regionprops_table(label, grey, properties=("label", "area", "intensity_mean"))
    )


def blobs(shape: tuple[int, int], n: int, seed: int) -> np.ndarray:
    """An int32 instance map with ``n`` rectangles labelled 1..n."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.int32)
    for v in range(1, n + 1):
        y, x = rng.integers(0, shape[0] - 12), rng.integers(0, shape[1] - 12)
        label[y : y + 10, x : x + 10] = v
    return label


def nodes(path: Path) -> dict[str, object]:
    """ome-zarr's reader: every node it finds under ``path``, by its last path part."""
    return {n.zarr.basename(): n for n in Reader(parse_url(str(path)))()}


def validate(path: Path) -> Image:
    """ome-zarr-models' validation of the image group (labels included)."""
    return Image.from_zarr(zarr.open_group(path, mode="r"))


# ----------------------------------------------------------------------------- write / read
def test_round_trip_small_image_labels_and_properties(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (40, 50)).astype(np.float32)
    cells, other = blobs((40, 50), 3, 1), blobs((40, 50), 2, 2).astype(np.uint16)
    props = measure(cells, image)
    out = write_ome_zarr(
        tmp_path / "a.ome.zarr", image, {"cells": cells, "other": other}, {"cells": props}
    )

    back, labels = read_ome_zarr(out)
    assert back.shape == (40, 50, 1) and back.dtype == np.float32
    np.testing.assert_array_equal(back[..., 0], image)
    assert set(labels) == {"cells", "other"}
    np.testing.assert_array_equal(labels["cells"], cells)
    assert labels["other"].dtype == np.uint16
    np.testing.assert_array_equal(labels["other"], other)

    attrs = zarr.open_group(out, mode="r").attrs["ome"]
    assert attrs["version"] == "0.5"
    ms = attrs["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert [a["type"] for a in ms["axes"]] == ["channel", "space", "space"]
    assert len(ms["datasets"]) == 1
    assert ms["datasets"][0]["coordinateTransformations"] == [
        {"type": "scale", "scale": [1.0, 1.0, 1.0]}
    ]

    # ome-zarr's reader sees the image, the labels group and both label images
    found = nodes(out)
    img = found["a.ome.zarr"]
    assert img.load(Multiscales) is not None
    assert [d.shape for d in img.data] == [(1, 40, 50)]
    assert img.data[0].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(img.data[0])[0], image)
    assert found["labels"].load(Labels) is not None
    lab = found["cells"]
    assert lab.load(Label) is not None
    np.testing.assert_array_equal(np.asarray(lab.data[0])[0], cells)
    # image-label properties: one row per cell with the measurements
    expected = {
        int(r.label): {"area": float(r.area), "intensity_mean": pytest.approx(r.intensity_mean)}
        for r in props.itertuples()
    }
    assert lab.metadata["properties"] == expected
    assert set(lab.metadata["color"]) == {1, 2, 3}
    # a label image without measurements still has one property row per value
    assert sorted(found["other"].metadata["properties"]) == [1, 2]

    meta = read_label_metadata(out, "cells")
    assert meta["colors"][0] == {"label-value": 1, "rgba": label_color(1)}
    assert meta["source"] == {"image": "../../"}

    model = validate(out)
    assert model.labels.label_paths == ["cells", "other"]
    label_model = model.labels.get_image_labels_group("cells")
    assert isinstance(label_model, ImageLabel)
    assert [p.label_value for p in label_model.ome_attributes.image_label.properties] == [1, 2, 3]


def test_large_image_gets_a_pyramid_seen_by_ome_zarr(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (2100, 300, 3), dtype=np.uint8)
    cells = blobs((2100, 300), 20, 3)
    out = write_ome_zarr(tmp_path / "big.ome.zarr", image, {"cells": cells}, chunk=512)

    found = nodes(out)
    img, lab = found["big.ome.zarr"], found["cells"]
    assert [d.shape for d in img.data] == [(3, 2100, 300), (3, 1050, 150)]
    assert [d.dtype for d in img.data] == [np.uint8, np.uint8]
    assert [d.shape for d in lab.data] == [(1, 2100, 300), (1, 1050, 150)]
    assert [d.dtype for d in lab.data] == [np.int32, np.int32]
    np.testing.assert_array_equal(np.asarray(img.data[0]), image.transpose(2, 0, 1))
    # level 1 is the 2x2 mean of level 0, label level 1 the nearest (every second) pixel
    mean = image.reshape(1050, 2, 150, 2, 3).mean(axis=(1, 3))
    np.testing.assert_array_equal(np.asarray(img.data[1]), np.rint(mean).transpose(2, 0, 1))
    np.testing.assert_array_equal(np.asarray(lab.data[1])[0], cells[::2, ::2])
    scales = [t[0]["scale"] for t in img.metadata["coordinateTransformations"]]
    assert scales == [[1.0, 1.0, 1.0], [1.0, 2.0, 2.0]]
    # a mean level's pixel sits at the centre of the four it averages, half a level-0 pixel
    # in; the labels' every-second pixel is that level-0 pixel: no shift
    assert img.metadata["coordinateTransformations"][1][1] == {
        "type": "translation",
        "translation": [0.0, 0.5, 0.5],
    }
    assert [len(t) for t in lab.metadata["coordinateTransformations"]] == [1, 1]
    assert len(validate(out).ome_attributes.multiscales[0].datasets) == 2

    # at or under the threshold: a single level
    small = write_ome_zarr(tmp_path / "s.ome.zarr", image[:2048], pyramid_threshold=2048)
    assert [d.shape for d in nodes(small)["s.ome.zarr"].data] == [(3, 2048, 300)]


def _edit_attrs(path: Path, edit) -> None:
    meta = path / "zarr.json"
    doc = json.loads(meta.read_text())
    edit(doc["attributes"])
    meta.write_text(json.dumps(doc))


def test_validator_rejects_broken_metadata(tmp_path):
    image = np.zeros((32, 32), np.uint8)
    good = write_ome_zarr(tmp_path / "g.ome.zarr", image, {"cells": blobs((32, 32), 2, 0)})
    validate(good)

    # image axes that do not match the arrays
    bad = tmp_path / "axes.ome.zarr"
    shutil.copytree(good, bad)
    _edit_attrs(bad, lambda a: a["ome"]["multiscales"][0]["axes"].pop(0))
    with pytest.raises(ValueError, match="axes"):
        validate(bad)

    # a label image whose colours repeat a label value
    bad = tmp_path / "colors.ome.zarr"
    shutil.copytree(good, bad)

    def dup(a):
        colors = a["ome"]["image-label"]["colors"]
        colors[1]["label-value"] = colors[0]["label-value"]

    _edit_attrs(bad / "labels" / "cells", dup)
    with pytest.raises((ValueError, RuntimeError)):
        validate(bad)


def test_write_is_atomic_and_checks_inputs(tmp_path):
    image = np.full((16, 16, 2), 7, np.uint16)
    out = write_ome_zarr(tmp_path / "x.ome.zarr", image, {"cells": blobs((16, 16), 1, 0)})
    before = read_ome_zarr(out)[0]
    with pytest.raises(FileExistsError):
        write_ome_zarr(out, image * 2, overwrite=False)
    # a failure while the group is being built leaves the previous group and no staging
    with pytest.raises(ValueError, match="'label' column"):
        write_ome_zarr(out, image * 2, {"cells": blobs((16, 16), 1, 0)}, {"cells": [{"area": 3}]})
    np.testing.assert_array_equal(read_ome_zarr(out)[0], before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ome.zarr"]
    with pytest.raises(ValueError, match="shape"):
        write_ome_zarr(tmp_path / "y.ome.zarr", image, {"cells": np.zeros((8, 8), np.int32)})
    with pytest.raises(ValueError, match="integer"):
        write_ome_zarr(tmp_path / "y.ome.zarr", image, {"cells": np.zeros((16, 16))})
    assert not (tmp_path / "y.ome.zarr").exists()


# ----------------------------------------------------------------------------- store export
@pytest.fixture
def store_with_pseudo(store_dir, tmp_path) -> Path:
    """A copy of the session store with a pseudo-label set holding two items."""
    root = tmp_path / "store"
    shutil.copytree(store_dir, root)
    with CellStore(root) as store:
        ids = store.ids()[:2]
        sizes = [(int(store.row(i).height), int(store.row(i).width)) for i in ids]
    base = root / "pseudo" / "round1"
    base.mkdir(parents=True)
    (base / "set.json").write_text(json.dumps({"weights_sha256": "abc", "model_id": "m"}))
    for k, (item_id, shape) in enumerate(zip(ids, sizes, strict=True)):
        write_array(base / item_id, blobs(shape, 4 + k, k))
    return root


def test_export_store_matches_the_store_and_resumes(store_with_pseudo, tmp_path):
    out = tmp_path / "export"
    paths = export_store(store_with_pseudo, out, progress=False)

    with CellStore(store_with_pseudo) as store:
        ids = store.ids()
        assert [p.name for p in paths] == [f"{i}.ome.zarr" for i in ids]
        with_pseudo = set(ids[:2])
        assert all(store.row(i).label_array for i in with_pseudo)  # GT and pseudo together
        for item_id, path in zip(ids, paths, strict=True):
            image, labels = read_ome_zarr(path)
            np.testing.assert_array_equal(image, store.image(item_id))
            row = store.row(item_id)
            expected = ([GROUND_TRUTH] if row.label_array else []) + (
                ["round1"] if item_id in with_pseudo else []
            )
            assert list(labels) == expected
            if row.label_array:
                np.testing.assert_array_equal(labels[GROUND_TRUTH], store.label(item_id))
            if item_id in with_pseudo:
                np.testing.assert_array_equal(
                    labels["round1"], store.pseudo_label("round1", item_id)
                )
            # third-party clients open it too
            model = validate(path)
            found = nodes(path)
            assert found[path.name].data[0].shape == (3, row.height, row.width)
            for name in expected:
                assert found[name].data[0].dtype == np.int32
                # the cell table of cellst.export.measure, one row per cell
                props = found[name].metadata["properties"]
                lab = labels[name]
                assert {v: p["area"] for v, p in props.items()} == {
                    v: float((lab == v).sum()) for v in np.unique(lab) if v
                }
                assert {v: p["mean_intensity_c0"] for v, p in props.items()} == pytest.approx(
                    {v: image[..., 0][lab == v].mean() for v in np.unique(lab) if v}
                )
            assert (model.labels.label_paths if model.labels else []) == expected

        # resume: nothing changed, nothing rewritten
        stamps = {p: (p / "zarr.json").stat().st_mtime_ns for p in paths}
        assert export_store(store_with_pseudo, out, progress=False) == paths
        assert {p: (p / "zarr.json").stat().st_mtime_ns for p in paths} == stamps

        # a pseudo-label added to a third item: only that item is rewritten
        third = ids[2]
        shape = (int(store.row(third).height), int(store.row(third).width))
        write_array(store.pseudo_path("round1", third), blobs(shape, 3, 9))
        export_store(store_with_pseudo, out, progress=False)
        changed = {p for p in paths if (p / "zarr.json").stat().st_mtime_ns != stamps[p]}
        assert changed == {out / f"{third}.ome.zarr"}
        np.testing.assert_array_equal(
            read_ome_zarr(out / f"{third}.ome.zarr")[1]["round1"],
            store.pseudo_label("round1", third),
        )

        # overwrite rewrites the requested items only
        export_store(
            store_with_pseudo, out, items=[ids[0]], overwrite=True, measure=False, progress=False
        )
        assert (paths[0] / "zarr.json").stat().st_mtime_ns != stamps[paths[0]]
        assert "area" not in read_label_metadata(paths[0], "round1")["properties"][0]

    with pytest.raises(StoreError, match="nope"):
        export_store(store_with_pseudo, out, items=["nope"], progress=False)
    # a folder that is not a cellst export is never replaced without overwrite
    foreign = tmp_path / "foreign"
    (foreign / f"{ids[0]}.ome.zarr").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a cellst export; export into another"):
        export_store(store_with_pseudo, foreign, items=[ids[0]], progress=False)
    # nor is `cellst segment`'s output of an image of that name: its segmentation was lost
    segmented = tmp_path / "segmented" / f"{ids[0]}.ome.zarr"
    label = np.zeros((16, 16), np.int32)
    label[2:6, 2:6] = 1
    write_ome_zarr(
        segmented,
        np.zeros((16, 16), np.uint16),
        labels={SEGMENTATION: label},
        attributes={"cellst": {"command": "segment", "image": ids[0]}},
    )
    with pytest.raises(FileExistsError, match="is `cellst segment`'s output; export into"):
        export_store(store_with_pseudo, segmented.parent, items=[ids[0]], progress=False)
    np.testing.assert_array_equal(read_ome_zarr(segmented)[1][SEGMENTATION], label)


def test_export_store_without_pseudo(store_with_pseudo, tmp_path):
    with CellStore(store_with_pseudo) as store:
        first = store.ids()[0]
        has_gt = bool(store.row(first).label_array)
    [path] = export_store(
        store_with_pseudo, tmp_path / "e", items=[first], include_pseudo=False, progress=False
    )
    assert list(read_ome_zarr(path)[1]) == ([GROUND_TRUTH] if has_gt else [])


def test_import_is_light():
    """The exporter and the napari reader load neither the training stack nor Ray."""
    code = (
        "import sys, cellst.export.omezarr, cellst.napari.reader; "
        "print(sorted(m for m in ('torch', 'monai', 'ray', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_export_writes_groups_that_ome_zarr_reads(store_with_pseudo, tmp_path):
    """`cellst export` end to end, and its one-line refusals (not a store; a foreign folder)."""
    from typer.testing import CliRunner

    from cellst.cli import app

    runner = CliRunner()
    store = CellStore(store_with_pseudo, lease=False)
    one = store.ids("labeled")[0]
    out = tmp_path / "ome"
    res = runner.invoke(app, ["export", str(store_with_pseudo), "--out", str(out), "--item", one])
    assert res.exit_code == 0, res.output
    assert "1 OME-Zarr groups" in res.output
    node = list(Reader(parse_url(str(out / f"{one}.ome.zarr")))())[0]
    np.testing.assert_array_equal(np.moveaxis(np.asarray(node.data[0]), 0, -1), store.image(one))
    bad = runner.invoke(app, ["export", str(tmp_path), "--out", str(out)])
    assert bad.exit_code == 1 and "not a cellst store" in bad.output
    (tmp_path / "foreign" / f"{one}.ome.zarr").mkdir(parents=True)
    clash = runner.invoke(
        app, ["export", str(store_with_pseudo), "--out", str(tmp_path / "foreign"), "--item", one]
    )
    assert clash.exit_code == 1 and "Traceback" not in clash.output, clash.output


def test_cli_export_pixel_size_is_the_scale_viewers_read(store_with_pseudo, tmp_path):
    """--pixel-size / --unit become the multiscales' scale and axis units (as ome-zarr and
    ome-zarr-models read them); a new pixel size rewrites the export, the same skips it;
    a bad size or unit is refused in one line, exit 2, before any work."""
    from typer.testing import CliRunner

    from cellst.cli import app

    runner = CliRunner()
    one = CellStore(store_with_pseudo, lease=False).ids("labeled")[0]
    out = tmp_path / "ome"
    group = out / f"{one}.ome.zarr"
    args = ["export", str(store_with_pseudo), "--out", str(out), "--item", one]
    res = runner.invoke(app, [*args, "--pixel-size", "0.65"])
    assert res.exit_code == 0, res.output
    node = nodes(group)[f"{one}.ome.zarr"]
    axes = {a["name"]: a.get("unit") for a in node.metadata["axes"]}
    assert axes == {"c": None, "y": "micrometer", "x": "micrometer"}
    scale = node.metadata["coordinateTransformations"][0][0]["scale"]
    assert scale == [1.0, 0.65, 0.65]
    validate(group)  # ome-zarr-models accepts it
    labels_meta = zarr.open_group(group / "labels" / GROUND_TRUTH, mode="r").attrs["ome"]
    assert labels_meta["multiscales"][0]["datasets"][0]["coordinateTransformations"] == [
        {"type": "scale", "scale": [1.0, 0.65, 0.65]}
    ]
    again = runner.invoke(app, [*args, "--pixel-size", "0.65"])
    assert "0 written, 1 unchanged" in again.output, again.output
    res = runner.invoke(app, [*args, "--pixel-size", "325", "--unit", "nanometer"])
    assert "1 written" in res.output, res.output
    node = nodes(group)[f"{one}.ome.zarr"]
    assert node.metadata["axes"][1]["unit"] == "nanometer"
    # as people and TIFF writers spell units (they were refused as not NGFF's names)
    for spelt in ("nm", "um", "\u00b5m", "microns"):
        res = runner.invoke(app, [*args, "--pixel-size", "325", "--unit", spelt])
        assert res.exit_code == 0, res.output
        want = "nanometer" if spelt == "nm" else "micrometer"
        assert nodes(group)[f"{one}.ome.zarr"].metadata["axes"][1]["unit"] == want
    assert node.metadata["coordinateTransformations"][0][0]["scale"] == [1.0, 325.0, 325.0]
    # without --pixel-size again: the source's (none declared here), not the last one given
    res = runner.invoke(app, args)
    assert "1 written" in res.output, res.output
    assert "unit" not in nodes(group)[f"{one}.ome.zarr"].metadata["axes"][1]
    for bad, name in ((["--pixel-size", "0"], "--pixel-size"), (["--unit", "furlong"], "--unit")):
        res = runner.invoke(app, [*args, "--pixel-size", "1", *bad])
        assert res.exit_code == 2 and name in res.output and "Traceback" not in res.output
    assert "unit" not in nodes(group)[f"{one}.ome.zarr"].metadata["axes"][1]  # unchanged
    # --unit alone was ignored (exit 0, the source's size and unit written): refused
    res = runner.invoke(app, [*args, "--unit", "nanometer"])
    assert res.exit_code == 2 and "--unit is the unit of --pixel-size" in res.output, res.output


def test_export_takes_the_pixel_size_the_source_ome_tiff_declares(ray_session, tmp_path):
    """By default an item's scale is what its source file declares (read again from the
    path the store records); a plain file gets none; --pixel-size wins over both."""
    from conftest import store_of_a_declared_and_a_plain_pixel_size

    store_of_a_declared_and_a_plain_pixel_size(tmp_path)
    out = tmp_path / "ome"

    def scale(name: str) -> tuple[list[float], str | None]:
        ms = zarr.open_group(out / f"{name}.ome.zarr", mode="r").attrs["ome"]["multiscales"][0]
        return ms["datasets"][0]["coordinateTransformations"][0]["scale"], ms["axes"][1].get("unit")

    export_store(tmp_path / "store", out, progress=False)
    assert scale("a") == ([1.0, 0.5, 0.5], "micrometer")
    assert scale("b") == ([1.0, 1.0, 1.0], None)
    validate(out / "a.ome.zarr")
    # its source moved away since: the size was dropped (scale 1, no unit, no word) and
    # the calibrated group rewritten; it is kept, and the export says why
    from cellst.data.store import CellStore

    src = Path(CellStore(tmp_path / "store", lease=False).row("a").source_path)
    src.rename(src.with_name("moved" + src.suffix))
    lines: list[str] = []
    export_store(tmp_path / "store", out, progress=False, log=lines.append)
    assert scale("a") == ([1.0, 0.5, 0.5], "micrometer")
    assert any(f"a: its source {src} is gone; kept the pixel size" in ln for ln in lines), lines
    export_store(tmp_path / "store", out, pixel_size=2.0, progress=False)
    assert scale("a") == ([1.0, 2.0, 2.0], "micrometer") == scale("b")


def test_int64_images_and_a_file_at_the_group_name(tmp_path):
    """tifffile's int64 (numpy ``longlong``) is stored as int64; a plain file at the group
    name is replaced whole, with nothing left beside it."""
    image = np.arange(32 * 32, dtype=np.longlong).reshape(32, 32)
    path = tmp_path / "x.ome.zarr"
    path.write_text("in the way")
    write_ome_zarr(path, image, {"cells": blobs((32, 32), 1, 0)})
    back = read_ome_zarr(path)[0]
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back[..., 0] if back.ndim == 3 else back, image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ome.zarr"]


def test_cli_export_bad_requests_are_one_line(store_with_pseudo, tmp_path):
    """An --out that is a file, a corrupt chunk in the store: one line, exit 1; an item
    given twice is exported (and counted) once."""
    from typer.testing import CliRunner

    from cellst.cli import app

    runner = CliRunner()
    store = CellStore(store_with_pseudo, lease=False)
    one, two = store.ids("labeled")[:2]
    afile = tmp_path / "afile"
    afile.write_text("mine")
    res = runner.invoke(app, ["export", str(store_with_pseudo), "--out", str(afile)])
    assert res.exit_code == 1, res.output
    assert res.output.strip() == f"error: {afile} is a file, not a folder"
    assert afile.read_text() == "mine"

    out = tmp_path / "ome"
    res = runner.invoke(
        app, ["export", str(store_with_pseudo), "--out", str(out), "--item", one, "--item", one]
    )
    assert res.exit_code == 0 and "1 OME-Zarr groups" in res.output, res.output

    chunk = next(
        p for p in (store_with_pseudo / store.row(two).image_array).rglob("c/**/*") if p.is_file()
    )
    chunk.write_bytes(b"garbage")
    res = runner.invoke(app, ["export", str(store_with_pseudo), "--out", str(out), "--item", two])
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert f"item {two!r}: its image" in lines[0] and "has a corrupt chunk" in lines[0]


def test_a_rewritten_export_keeps_the_users_label_images_and_files(store_with_pseudo, tmp_path):
    """A user annotates an exported item in another tool (a label image written by
    ome-zarr-py) and leaves a note in the group; the store then gains a pseudo-label for
    the item, so re-exporting rewrites the group: the annotation and the note stay, listed
    beside cellst's label images, and clients still read the group."""
    from ome_zarr.writer import write_labels

    out = tmp_path / "export"
    with CellStore(store_with_pseudo) as store:
        item = store.ids()[2]  # no pseudo-label yet
        shape = (int(store.row(item).height), int(store.row(item).width))
    [path] = export_store(store_with_pseudo, out, items=[item], progress=False)
    mine = np.zeros((1, *shape), np.uint16)
    mine[0, 5:20, 5:20] = 7
    write_labels(mine, zarr.open_group(path, mode="a"), name="my_annotations", axes="cyx")
    (path / "NOTES.txt").write_text("checked by hand")
    write_array(CellStore(store_with_pseudo).pseudo_path("round1", item), blobs(shape, 3, 4))

    lines: list[str] = []
    export_store(store_with_pseudo, out, items=[item], progress=False, log=lines.append)
    assert (path / "NOTES.txt").read_text() == "checked by hand"
    _, labels = read_ome_zarr(path)
    assert "round1" in labels and "my_annotations" in labels
    np.testing.assert_array_equal(labels["my_annotations"], mine[0])
    assert "NOTES.txt" in lines[0] and "labels/my_annotations" in lines[0]
    assert lines[-1] == "1 written, 0 unchanged"
    # ome-zarr's reader finds both (ome-zarr-models' validator refuses ome-zarr-py's own
    # label metadata, without colours, whoever holds it)
    assert {"round1", "my_annotations"} <= set(nodes(path))


def test_unusual_pixel_sizes_are_kept_and_groups_of_pruned_items_named(ray_session, tmp_path):
    """An ImageJ TIFF in cm was exported without a scale, and an OME-TIFF of non-square
    pixels too, both without a word; both now get their scale, the second its own size
    along y and x (at every pyramid level), also in napari. Groups of items a pruning
    ingest dropped were left and not mentioned; they are named."""
    import tifffile

    from cellst.data.ingest import ingest

    src = tmp_path / "src"
    src.mkdir()
    arr = (np.arange(48 * 48).reshape(48, 48) % 200).astype(np.uint16)
    tifffile.imwrite(src / "aniso.ome.tif", arr, ome=True,
                     metadata={"PhysicalSizeX": 0.325, "PhysicalSizeY": 0.65})  # fmt: skip
    tifffile.imwrite(src / "cm.tif", arr, imagej=True, resolution=(1000, 1000),
                     metadata={"unit": "cm"})  # fmt: skip
    tifffile.imwrite(src / "plain.tif", arr)
    ingest(src, tmp_path / "store", progress=False)
    out, lines = tmp_path / "ome", []
    export_store(tmp_path / "store", out, pyramid_threshold=32, progress=False, log=lines.append)
    ms = zarr.open_group(out / "cm.ome.zarr", mode="r").attrs["ome"]["multiscales"][0]
    assert ms["axes"][1].get("unit") == "centimeter"
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"][1:] == [0.001, 0.001]
    ms = zarr.open_group(out / "aniso.ome.zarr", mode="r").attrs["ome"]["multiscales"][0]
    assert ms["axes"][1].get("unit") == "micrometer"
    level0, level1 = (d["coordinateTransformations"] for d in ms["datasets"][:2])
    assert level0[0]["scale"][1:] == pytest.approx([0.65, 0.325])
    assert level1[0]["scale"][1:] == pytest.approx([1.3, 0.65])  # 2x blocks: their centres
    assert level1[1]["translation"][1:] == pytest.approx([0.325, 0.1625])
    # ome-zarr's own reader gives the same scale
    node = next(iter(Reader(parse_url(str(out / "aniso.ome.zarr")))()))
    scale = node.metadata["coordinateTransformations"][0][0]["scale"]
    assert scale[1:] == pytest.approx([0.65, 0.325])
    said = " ".join(lines)
    assert "aniso:" not in said and "plain:" not in said and "cm:" not in said, lines
    # in napari (the store reader): the layers have the file's own pixel sides
    from cellst.napari.reader import read_store

    by_name = {layer[1]["name"]: layer[1] for layer in read_store(tmp_path / "store")}
    assert by_name["aniso"]["scale"][:2] == pytest.approx((0.65, 0.325))
    lines.clear()  # the same export again: nothing to rewrite
    export_store(tmp_path / "store", out, pyramid_threshold=32, progress=False, log=lines.append)
    assert lines[-1] == "0 written, 3 unchanged", lines
    (src / "plain.tif").unlink()
    ingest(src, tmp_path / "store", prune=True, progress=False)
    lines.clear()
    export_store(tmp_path / "store", out, progress=False, log=lines.append)
    assert any("1 group(s) of items no longer in the store" in ln and "plain.ome.zarr" in ln
               for ln in lines), lines  # fmt: skip
