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

from cellst.data.layout import is_store

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


def get_reader(path: PathLike | Sequence[PathLike]) -> Callable[..., list[LayerData]] | None:
    """The reader for ``path`` when it is an OME-Zarr image group or a cellst store (or a
    list of those), else None so that napari tries other readers."""
    paths = [Path(p) for p in ([path] if isinstance(path, str | os.PathLike) else path)]
    if not paths or not all(_is_ome_zarr(p) or is_store(p) for p in paths):
        return None
    return read


def read(path: PathLike | Sequence[PathLike]) -> list[LayerData]:
    """Layer data tuples of every path (see the module docstring)."""
    paths = [Path(p) for p in ([path] if isinstance(path, str | os.PathLike) else path)]
    layers: list[LayerData] = []
    for p in paths:
        layers += read_store(p) if is_store(p) else read_ome_zarr_layers(p)
    return layers


# ----------------------------------------------------------------------------- layers
def _squeeze(
    levels: list[Any], axes: Sequence[str], scale: Sequence[float], offset: Sequence[float]
) -> tuple[list[Any], list[str], list[float], list[float]]:
    """Drop the axes of size 1 other than ``y`` and ``x`` (a ``t``, ``c`` or ``z`` of one),
    from every level, the axis names, the scale and the offset."""
    shape = levels[0].shape
    keep = [i for i, n in enumerate(shape) if n > 1 or axes[i] in ("y", "x")]
    index = tuple(slice(None) if i in keep else 0 for i in range(len(shape)))
    return (
        [lv[index] for lv in levels],
        [axes[i] for i in keep],
        [float(scale[i]) for i in keep],
        [float(offset[i]) for i in keep],
    )


def _placement(
    axes: Sequence[str],
    scale: Sequence[float],
    offset: Sequence[float],
    translate: tuple[float, float],
) -> dict[str, Any]:
    """napari's ``scale`` and ``translate`` of a layer with these axes: its own ``offset``
    per axis (NGFF translations), moved by ``translate`` in y and x."""
    shift = [
        o + (translate[0] if a == "y" else translate[1] if a == "x" else 0.0)
        for a, o in zip(axes, offset, strict=True)
    ]
    return {"scale": tuple(scale), "translate": tuple(shift)}


def _image_layer(
    levels: list[Any],
    name: str,
    axes: Sequence[str],
    scale: Sequence[float],
    translate: tuple[float, float] = (0.0, 0.0),
    offset: Sequence[float] | None = None,
) -> LayerData:
    """An image layer from levels with these axis names (NGFF's ``t``, ``c``, ``z``, ``y``,
    ``x``; ``c`` the channel axis): axes of size 1 dropped, a 3-channel uint8 image shown as
    RGB, other multichannel images split along ``channel_axis``."""
    import numpy as np

    offset = [0.0] * len(axes) if offset is None else offset
    levels, axes, scale, offset = _squeeze(levels, axes, scale, offset)
    meta: dict[str, Any] = {"name": name}
    if "c" in axes:
        ch = axes.index("c")
        if levels[0].shape[ch] == 3 and levels[0].dtype == np.uint8:
            levels = [np.moveaxis(lv, ch, -1) for lv in levels]
            meta["rgb"] = True
        else:
            meta["channel_axis"] = ch
        scale = [v for a, v in zip(axes, scale, strict=True) if a != "c"]
        offset = [v for a, v in zip(axes, offset, strict=True) if a != "c"]
        axes = [a for a in axes if a != "c"]
    meta.update(_placement(axes, scale, offset, translate))
    if len(levels) > 1:
        meta["multiscale"] = True
        return levels, meta, "image"
    return levels[0], meta, "image"


def _labels_layer(
    levels: list[Any],
    name: str,
    properties: list[dict[str, Any]] | None,
    axes: Sequence[str],
    scale: Sequence[float],
    translate: tuple[float, float] = (0.0, 0.0),
    offset: Sequence[float] | None = None,
) -> LayerData:
    """A labels layer (axes of size 1 dropped, so cellst's ``(1, H, W)`` labels are 2-D);
    the ``image-label`` properties become features (``index`` holds the label value)."""
    offset = [0.0] * len(axes) if offset is None else offset
    levels, axes, scale, offset = _squeeze(levels, axes, scale, offset)
    meta: dict[str, Any] = {"name": name, **_placement(axes, scale, offset, translate)}
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


def _group_levels(group: Any) -> tuple[list[Any], list[str], list[float], list[float]]:
    """Lazy dask arrays of a multiscale group's levels, its axis names (NGFF ``axes``; the
    channel axis, by name or type, called ``c``), and the level-0 scale and offset of each
    axis: level 0's ``scale`` / ``translation``, then the multiscale's own, as NGFF
    composes them (``world = s_ms * (s_0 * index + t_0) + t_ms``)."""
    import dask.array as da

    ms = group.attrs["ome"]["multiscales"][0]
    levels = [da.from_zarr(group[d["path"]]) for d in ms["datasets"]]
    ndim = levels[0].ndim
    axes = []
    for i, a in enumerate(ms.get("axes") or ["c", "y", "x"][-ndim:]):
        kind, name = (a.get("type"), a.get("name")) if isinstance(a, dict) else (None, a)
        axes.append("c" if kind == "channel" or name == "c" else str(name or f"dim{i}"))
    scale, offset = [1.0] * ndim, [0.0] * ndim
    for transforms in (
        ms["datasets"][0].get("coordinateTransformations") or [],
        ms.get("coordinateTransformations") or [],
    ):
        for t in transforms:
            if t.get("type") == "scale" and len(t.get("scale", [])) == ndim:
                s = [float(v) for v in t["scale"]]
                scale = [a * b for a, b in zip(scale, s, strict=True)]
                offset = [a * b for a, b in zip(offset, s, strict=True)]
            elif t.get("type") == "translation" and len(t.get("translation", [])) == ndim:
                offset = [a + float(b) for a, b in zip(offset, t["translation"], strict=True)]
    return levels, axes, scale, offset


def read_ome_zarr_layers(path: PathLike) -> list[LayerData]:
    """An image layer and one labels layer per label image of an OME-Zarr group."""
    import zarr

    path = Path(path)
    root = zarr.open_group(path, mode="r", zarr_format=3)
    name = root.attrs["ome"]["multiscales"][0].get("name") or path.name.removesuffix(".ome.zarr")
    levels, axes, scale, offset = _group_levels(root)
    layers = [_image_layer(levels, name, axes, scale, offset=offset)]
    if "labels" in root:
        group = root["labels"]
        for key in group.attrs["ome"]["labels"]:
            sub = group[key]
            props = sub.attrs["ome"].get("image-label", {}).get("properties")
            levels, axes, scale, offset = _group_levels(sub)
            layers.append(_labels_layer(levels, f"{name} {key}", props, axes, scale, offset=offset))
    return layers


def read_store(path: PathLike, max_items: int = MAX_STORE_ITEMS) -> list[LayerData]:
    """The first ``max_items`` items of a cellst store, side by side: image, ground truth
    (``ground_truth``) and each pseudo-label set holding the item (named after the set),
    at the pixel size the item's source file declares (as ``cellst export`` writes it).

    A pseudo-label predicted from an image a later ingest changed is left out, with a
    warning, as ``cellst export`` and ``cellst evaluate`` leave it out: it no longer fits
    the image shown.
    """
    import warnings

    from cellst.data.images import pixel_size_yx, source_pixel_size
    from cellst.data.store import CellStore
    from cellst.export.omezarr import GROUND_TRUTH

    layers: list[LayerData] = []
    with CellStore(path) as store:
        ids = store.ids()[:max_items]
        sets = store.pseudo_sets()
        stale = {s: set(store.pseudo_set(s).stale_items(store.manifest, ids)) for s in sets}
        for s, items in stale.items():
            if items:
                warnings.warn(
                    f"pseudo-label set {s!r}: {len(items)} item(s) (e.g. {sorted(items)[0]}) "
                    "not shown, predicted from images a later ingest changed; run "
                    "`cellst predict` again to predict them anew",
                    stacklevel=2,
                )
        x0 = 0.0
        for item_id in ids:
            row = store.row(item_id)
            # a source replaced since ingest does not describe the stored image
            declared = source_pixel_size(row, verified=True)
            sy, sx = pixel_size_yx(declared[0]) if declared else (1.0, 1.0)
            at = (0.0, x0)
            image = [store.image(item_id)]
            layers.append(_image_layer(image, item_id, ("y", "x", "c"), (sy, sx, 1.0), at))
            yx, px = ("y", "x"), (sy, sx)
            if row.label_array:
                label = [store.label(item_id)]
                layers.append(_labels_layer(label, f"{item_id} {GROUND_TRUTH}", None, yx, px, at))
            for s in sets:
                if store.pseudo_set(s).has_item(item_id) and item_id not in stale[s]:
                    label = [store.pseudo_label(s, item_id)]
                    layers.append(_labels_layer(label, f"{item_id} {s}", None, yx, px, at))
            x0 += (int(row.width) + STORE_GAP) * sx
    return layers
