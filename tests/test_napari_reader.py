"""The napari reader (extra ``cellst[napari]``), driven headless through npe2's reader API:
the manifest is registered as napari would find it, and ``npe2.read`` returns layer data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from npe2 import PluginManager, PluginManifest, read

import cellst.napari
from cellst.data.arrays import write_array
from cellst.data.store import CellStore
from cellst.export.omezarr import write_ome_zarr
from cellst.napari.reader import MAX_STORE_ITEMS, STORE_GAP, get_reader

MANIFEST = Path(cellst.napari.__file__).with_name("napari.yaml")


@pytest.fixture(scope="module", autouse=True)
def plugin():
    """Register cellst's npe2 manifest (the file the entry point names)."""
    pm = PluginManager.instance()
    manifest = PluginManifest.from_file(MANIFEST)
    if "cellst" not in pm:
        pm.register(manifest)
    yield manifest


def layers(path: Path) -> dict[str, tuple]:
    """``npe2.read`` through the cellst plugin, layers by name."""
    out = read([str(path)], stack=False, plugin_name="cellst")
    return {meta["name"]: (data, meta, kind) for data, meta, kind in out}


def test_manifest_declares_the_reader(plugin):
    assert plugin.name == "cellst"
    [reader] = plugin.contributions.readers
    assert reader.command == "cellst.get_reader"
    assert reader.accepts_directories
    assert "*.ome.zarr" in reader.filename_patterns


def test_rgb_image_with_labels_and_pyramid(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (2100, 64, 3), dtype=np.uint8)
    cells = np.zeros((2100, 64), np.int32)
    cells[5:20, 5:20], cells[100:140, 10:40] = 1, 2
    props = [{"label": 1, "area": 225.0}, {"label": 2, "area": 1200.0}]
    path = write_ome_zarr(tmp_path / "rgb.ome.zarr", image, {"cells": cells}, {"cells": props})

    found = layers(path)
    assert list(found) == ["rgb", "rgb cells"]
    data, meta, kind = found["rgb"]
    assert kind == "image" and meta["rgb"] and meta["multiscale"]
    assert [d.shape for d in data] == [(2100, 64, 3), (1050, 32, 3)]
    np.testing.assert_array_equal(np.asarray(data[0]), image)
    data, meta, kind = found["rgb cells"]
    assert kind == "labels" and meta["multiscale"]
    assert [d.shape for d in data] == [(2100, 64), (1050, 32)]
    np.testing.assert_array_equal(np.asarray(data[0]), cells)
    assert meta["features"] == {"index": [1, 2], "area": [225.0, 1200.0]}


def test_multichannel_and_grey_images(tmp_path):
    two = np.arange(30 * 20 * 2, dtype=np.uint16).reshape(30, 20, 2)
    path = write_ome_zarr(tmp_path / "two.ome.zarr", two)
    [(data, meta, kind)] = read([str(path)], stack=False, plugin_name="cellst")
    assert kind == "image" and meta["channel_axis"] == 0 and "rgb" not in meta
    np.testing.assert_array_equal(np.asarray(data), two.transpose(2, 0, 1))

    grey = np.linspace(0, 1, 30 * 20, dtype=np.float32).reshape(30, 20)
    path = write_ome_zarr(tmp_path / "grey.ome.zarr", grey)
    [(data, meta, kind)] = read([str(path)], stack=False, plugin_name="cellst")
    assert data.shape == (30, 20) and "channel_axis" not in meta
    np.testing.assert_array_equal(np.asarray(data), grey)


def test_ome_zarr_of_other_writers_follows_its_axes(tmp_path):
    """Groups written by ome-zarr-py: a 2-D ``yx`` image is one 2-D layer (not one layer
    per row), a ``tczyx`` one keeps its channels split and its z axis, with a scale per
    axis; labels follow their own axes."""
    import zarr
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_image, write_labels

    yx = np.arange(200 * 150, dtype=np.uint16).reshape(200, 150)
    group = zarr.open_group(str(tmp_path / "yx.ome.zarr"), mode="w", zarr_format=3)
    write_image(yx, group, axes="yx", fmt=FormatV05(), scaler=None)
    [(data, meta, kind)] = read([str(tmp_path / "yx.ome.zarr")], stack=False, plugin_name="cellst")
    data = data[0] if meta.get("multiscale") else data  # level 0
    assert kind == "image" and "channel_axis" not in meta and "rgb" not in meta
    assert data.shape == (200, 150) and len(meta["scale"]) == 2
    np.testing.assert_array_equal(np.asarray(data), yx)

    stack = np.arange(2 * 3 * 64 * 48, dtype=np.uint8).reshape(1, 2, 3, 64, 48)
    group = zarr.open_group(str(tmp_path / "5d.ome.zarr"), mode="w", zarr_format=3)
    write_image(stack, group, axes="tczyx", fmt=FormatV05(), scaler=None)
    cells = np.zeros((1, 1, 3, 64, 48), np.uint16)
    cells[0, 0, 1, 10:20, 10:20] = 1
    write_labels(cells, group, name="cells", axes="tczyx", fmt=FormatV05(), scaler=None)
    found = layers(tmp_path / "5d.ome.zarr")
    [(data, meta, kind)] = [v for v in found.values() if v[2] == "image"]
    data = data[0] if meta.get("multiscale") else data
    assert kind == "image" and meta["channel_axis"] == 0
    assert data.shape == (2, 3, 64, 48) and len(meta["scale"]) == len(meta["translate"]) == 3
    np.testing.assert_array_equal(np.asarray(data), stack[0])
    [(label, lmeta, lkind)] = [v for k, v in found.items() if k.endswith("cells")]
    label = label[0] if lmeta.get("multiscale") else label
    assert lkind == "labels" and label.shape == (3, 64, 48) and len(lmeta["scale"]) == 3
    np.testing.assert_array_equal(np.asarray(label), cells[0, 0])


def test_ngff_translations_and_the_multiscales_own_transforms_place_the_layer(tmp_path):
    """Level 0's ``scale`` and ``translation`` and then the multiscale's own transforms
    (NGFF's order) give the layer's scale and translate: other writers' groups open at
    their size and position, not at the origin in pixels."""
    import zarr
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_image, write_labels

    yx = np.arange(40 * 30, dtype=np.uint16).reshape(40, 30)
    path = tmp_path / "placed.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    write_image(yx, group, axes="yx", fmt=FormatV05(), scaler=None)
    cells = (yx > 600).astype(np.uint16)
    write_labels(cells, group, name="cells", axes="yx", fmt=FormatV05(), scaler=None)
    # the transforms set on the written metadata (this ome-zarr-py writes its own)
    own = [
        {"type": "scale", "scale": [0.5, 0.5]},
        {"type": "translation", "translation": [10.0, 20.0]},
    ]
    for g in (group, group["labels"]["cells"]):
        ome = dict(g.attrs["ome"])
        ms = dict(ome["multiscales"][0])
        level0 = {**ms["datasets"][0], "coordinateTransformations": own}
        ms["datasets"] = [level0, *ms["datasets"][1:]]
        ms["coordinateTransformations"] = [
            {"type": "scale", "scale": [2.0, 4.0]},
            {"type": "translation", "translation": [1.0, 1.0]},
        ]
        g.attrs["ome"] = {**ome, "multiscales": [ms]}
    found = layers(path)
    assert sorted(kind for _, _, kind in found.values()) == ["image", "labels"]
    for name, (_, meta, _) in found.items():
        assert meta["scale"] == (1.0, 2.0), name  # 0.5 x 2, 0.5 x 4
        assert meta["translate"] == (21.0, 81.0), name  # 10 x 2 + 1, 20 x 4 + 1


def test_store_items_at_their_pixel_size_without_stale_pseudo_labels(ray_session, tmp_path):
    """A store item is shown at the pixel size its source declares, as `cellst export`
    writes it; a pseudo-label predicted from an image a later ingest changed (here: of
    another shape) is left out with a warning, as export and evaluate leave it out."""
    from conftest import store_of_a_declared_and_a_plain_pixel_size

    root = store_of_a_declared_and_a_plain_pixel_size(tmp_path)
    base = root / "pseudo" / "round1"
    base.mkdir(parents=True)
    (base / "set.json").write_text(json.dumps({}))
    write_array(base / "a", np.ones((48, 48), np.int32))
    write_array(base / "b", np.ones((40, 48), np.int32))  # of an image b no longer is
    with pytest.warns(UserWarning, match=r"'round1': 1 item\(s\) \(e.g. b\) not shown"):
        found = layers(root)
    assert found["a"][1]["scale"] == (0.5, 0.5) and found["a"][1]["translate"] == (0.0, 0.0)
    assert found["a round1"][1]["scale"] == (0.5, 0.5)
    assert found["b"][1]["scale"] == (1.0, 1.0)
    assert found["b"][1]["translate"] == (0.0, (48 + STORE_GAP) * 0.5)  # beside a, in µm
    assert "b round1" not in found and "a round1" in found


def test_store_opens_first_items_side_by_side(store_dir, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(store_dir, root)
    with CellStore(root) as store:
        ids = store.ids()
        first = ids[0]
        shape = (int(store.row(first).height), int(store.row(first).width))
        base = root / "pseudo" / "round1"
        base.mkdir(parents=True)
        (base / "set.json").write_text(json.dumps({}))
        pseudo = np.zeros(shape, np.int32)
        pseudo[3:9, 3:9] = 1
        write_array(base / first, pseudo)

        found = layers(root)
        shown = ids[:MAX_STORE_ITEMS]
        assert [n for n, (_, _, k) in found.items() if k == "image"] == shown
        x = 0.0
        for item_id in shown:
            row = store.row(item_id)
            data, meta, _ = found[item_id]
            assert meta["rgb"] and meta["translate"] == (0.0, x)
            np.testing.assert_array_equal(data, store.image(item_id))
            if row.label_array:
                gt, gt_meta, kind = found[f"{item_id} ground_truth"]
                assert kind == "labels" and gt_meta["translate"] == (0.0, x)
                np.testing.assert_array_equal(gt, store.label(item_id))
            x += int(row.width) + STORE_GAP
        data, _, kind = found[f"{first} round1"]
        assert kind == "labels"
        np.testing.assert_array_equal(data, pseudo)


def test_reader_refuses_other_paths(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "x.tif").write_bytes(b"")
    assert get_reader(str(tmp_path / "plain")) is None
    assert get_reader(str(tmp_path / "x.tif")) is None
    with pytest.raises(ValueError, match="refused"):
        read([str(tmp_path / "plain")], stack=False, plugin_name="cellst")
