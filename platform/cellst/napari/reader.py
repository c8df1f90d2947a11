"""npe2 reader: ``napari IMAGE.ome.zarr`` or ``napari STORE/`` opens images with their labels.

* An OME-Zarr image group (NGFF 0.5, as :func:`cellst.export.write_ome_zarr` writes it)
  becomes one image layer (all pyramid levels, lazily through dask; a 3-channel uint8
  image is shown as RGB, other multichannel images split along ``channel_axis``) and one
  labels layer per label image, with the ``image-label`` properties as layer features.
* A cellst store (a folder with ``manifest.parquet``) becomes, for its first
  :data:`MAX_STORE_ITEMS` items in manifest order, an image layer and its ground-truth
  and pseudo-label layers per item. The items are laid side by side (each translated
  to the right of the previous one, :data:`STORE_GAP` pixels apart), so they do not hide
  each other; opening every item of a large store would flood the viewer with layers, so
  export the items you want with ``cellst export`` and open those instead.

Layer data tuples only: napari itself is not imported here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: items of a cellst store opened at once (in manifest order)
MAX_STORE_ITEMS = 4
#: pixels between two store items laid side by side
STORE_GAP = 32

LayerData = tuple[Any, dict[str, Any], str]
PathLike = str | os.PathLike[str]


def _is_ome_zarr(path: Path) -> bool:
    """An OME-Zarr image group: a zarr v3 group with ``ome.multiscales`` attributes."""
    import json

    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return "multiscales" in attrs.get("ome", {})


def _is_store(path: Path) -> bool:
    return (path / "manifest.parquet").is_file()


def get_reader(path: PathLike | Sequence[PathLike]) -> Callable[..., list[LayerData]] | None:
    """The reader for ``path`` when it is an OME-Zarr image group or a cellst store (or a
    list of those), else None so that napari tries other readers."""
    paths = [Path(p) for p in ([path] if isinstance(path, str | os.PathLike) else path)]
    if not paths or not all(_is_ome_zarr(p) or _is_store(p) for p in paths):
        return None
    return read


def read(path: PathLike | Sequence[PathLike]) -> list[LayerData]:
    """Layer data tuples of every path (see the module docstring)."""
    paths = [Path(p) for p in ([path] if isinstance(path, str | os.PathLike) else path)]
    layers: list[LayerData] = []
    for p in paths:
        layers += read_store(p) if _is_store(p) else read_ome_zarr_layers(p)
    return layers


# ----------------------------------------------------------------------------- layers
def _image_layer(
    levels: list[Any], name: str, scale: tuple[float, float], translate: tuple[float, float]
) -> LayerData:
    """An image layer from ``(C, H, W)`` levels: RGB for 3-channel uint8, one channel
    squeezed, otherwise split along ``channel_axis``."""
    import numpy as np

    meta: dict[str, Any] = {"name": name}
    channels = levels[0].shape[0]
    if channels == 3 and levels[0].dtype == np.uint8:
        levels = [lv.transpose(1, 2, 0) for lv in levels]
        meta["rgb"] = True
    elif channels == 1:
        levels = [lv[0] for lv in levels]
    else:
        meta["channel_axis"] = 0
    meta.update(scale=scale, translate=translate)
    if len(levels) > 1:
        meta["multiscale"] = True
        return levels, meta, "image"
    return levels[0], meta, "image"


def _labels_layer(
    levels: list[Any],
    name: str,
    properties: list[dict[str, Any]] | None,
    scale: tuple[float, float],
    translate: tuple[float, float],
) -> LayerData:
    """A labels layer from ``(1, H, W)`` (or ``(H, W)``) levels; the ``image-label``
    properties become features (the ``index`` column holds the label value)."""
    levels = [lv.reshape(lv.shape[-2:]) for lv in levels]
    meta: dict[str, Any] = {"name": name, "scale": scale, "translate": translate}
    if properties:
        columns = sorted({k for row in properties for k in row} - {"label-value"})
        features = {"index": [row["label-value"] for row in properties]}
        for col in columns:
            features[col] = [row.get(col) for row in properties]
        meta["features"] = features
    if len(levels) > 1:
        meta["multiscale"] = True
        return levels, meta, "labels"
    return levels[0], meta, "labels"


def _group_levels(group: Any) -> tuple[list[Any], tuple[float, float]]:
    """Lazy dask arrays of a multiscale group's levels and the level-0 y, x scale."""
    import dask.array as da

    ms = group.attrs["ome"]["multiscales"][0]
    levels = [da.from_zarr(group[d["path"]]) for d in ms["datasets"]]
    scale = (1.0, 1.0)
    for t in ms["datasets"][0].get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = (float(t["scale"][-2]), float(t["scale"][-1]))
    return levels, scale


def read_ome_zarr_layers(path: PathLike) -> list[LayerData]:
    """An image layer and one labels layer per label image of an OME-Zarr group."""
    import zarr

    path = Path(path)
    root = zarr.open_group(path, mode="r", zarr_format=3)
    name = root.attrs["ome"]["multiscales"][0].get("name") or path.name.removesuffix(".ome.zarr")
    levels, scale = _group_levels(root)
    layers = [_image_layer(levels, name, scale, (0.0, 0.0))]
    if "labels" in root:
        group = root["labels"]
        for key in group.attrs["ome"]["labels"]:
            sub = group[key]
            label_levels, label_scale = _group_levels(sub)
            props = sub.attrs["ome"].get("image-label", {}).get("properties")
            layers.append(
                _labels_layer(label_levels, f"{name} {key}", props, label_scale, (0.0, 0.0))
            )
    return layers


def read_store(path: PathLike, max_items: int = MAX_STORE_ITEMS) -> list[LayerData]:
    """The first ``max_items`` items of a cellst store, side by side: image, ground truth
    (``ground_truth``) and each pseudo-label set holding the item (named after the set)."""
    from cellst.data.store import CellStore
    from cellst.export.omezarr import GROUND_TRUTH

    layers: list[LayerData] = []
    with CellStore(path) as store:
        sets = store.pseudo_sets()
        x0 = 0.0
        for item_id in store.ids()[:max_items]:
            row = store.row(item_id)
            at = (0.0, x0)
            layers.append(
                _image_layer([store.image(item_id).transpose(2, 0, 1)], item_id, (1.0, 1.0), at)
            )
            if row.label_array:
                layers.append(
                    _labels_layer(
                        [store.label(item_id)], f"{item_id} {GROUND_TRUTH}", None, (1.0, 1.0), at
                    )
                )
            for s in sets:
                if (store.pseudo_path(s, item_id) / "zarr.json").is_file():
                    label = store.pseudo_label(s, item_id)
                    layers.append(_labels_layer([label], f"{item_id} {s}", None, (1.0, 1.0), at))
            x0 += int(row.width) + STORE_GAP
    return layers
