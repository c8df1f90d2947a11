"""OME-Zarr (NGFF 0.5 on zarr v3) images with label images, and the store exporter.

One ``NAME.ome.zarr`` group holds an image as a ``c, y, x`` multiscale (a 2x pyramid for
images over ``pyramid_threshold`` pixels) and a ``labels/`` group whose label images
(``c, y, x`` with ``c = 1``, the same pyramid levels, as the spec and ``ome-zarr-models``
ask) carry ``image-label`` metadata: a deterministic colour and a ``properties`` row (the
per-cell measurements) per label value. Any NGFF 0.5 client (``ome-zarr``, napari,
``ome-zarr-models``) opens it; the layout is::

    NAME.ome.zarr/
      zarr.json                 {"ome": {"version": "0.5", "multiscales": [...]}, "cellst": {...}}
      0/, 1/, ...               image levels (C, H, W), (C, H/2, W/2), ...
      labels/zarr.json          {"ome": {"version": "0.5", "labels": [names]}}
      labels/<name>/zarr.json   {"ome": {"version": "0.5", "image-label": {...}, "multiscales": [...]}}
      labels/<name>/0/, 1/, ... label levels (1, H, W), ...

The cellst store keeps its own format (manifest, leases, Ray Data reads);
:func:`export_store` writes one such group per store item, with the ground truth and each
pseudo-label set holding the item as label images. Every group is built in a staging
folder and swapped into place (:func:`cellst.fs.staged_dir`), so a reader never sees half
of one and an interrupted export resumes where it stopped.
"""

from __future__ import annotations

import colorsys
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from cellst.data.images import (  # noqa: F401 - source_*: public here as before
    PixelSize,
    pixel_size_yx,
    source_missing,
    source_pixel_size,
)
from cellst.fs import check_writable, staged_dir

NGFF_VERSION = "0.5"
SUFFIX = ".ome.zarr"
GROUND_TRUTH = "ground_truth"
#: the label image ``cellst segment`` writes in its NAME.ome.zarr
SEGMENTATION = "segmentation"
IMAGE_AXES = ("c", "y", "x")
_AXIS_TYPES = {"c": "channel", "y": "space", "x": "space"}
#: the units NGFF 0.5 allows on a space axis (UDUNITS-2 names)
SPACE_UNITS = (
    "angstrom", "attometer", "centimeter", "decimeter", "exameter", "femtometer", "foot",
    "gigameter", "hectometer", "inch", "kilometer", "megameter", "meter", "micrometer",
    "mile", "millimeter", "nanometer", "parsec", "petameter", "picometer", "terameter",
    "yard", "yoctometer", "yottameter", "zeptometer", "zettameter",
)  # fmt: skip
_LABEL_KEYS = ("label-value", "label_value", "label")

Properties = Any  # a pandas DataFrame or a list of dicts, one row per label value
Measure = Callable[[np.ndarray, np.ndarray], Properties]


# ----------------------------------------------------------------------------- pyramid
def _levels(data: np.ndarray, threshold: int, reduce: Callable[[np.ndarray], np.ndarray]):
    """``data`` (C, H, W) and its 2x reductions until the largest side is <= threshold."""
    levels = [data]
    while max(levels[-1].shape[1:]) > threshold:
        levels.append(reduce(levels[-1]))
    return levels


def _mean_2x(level: np.ndarray) -> np.ndarray:
    """2x2 mean per channel (edge-padded to even sides), cast back to the input dtype."""
    from skimage.transform import downscale_local_mean

    _, h, w = level.shape
    out = []
    for channel in level:
        padded = np.pad(channel, ((0, h % 2), (0, w % 2)), mode="edge")
        mean = downscale_local_mean(padded, (2, 2))
        if np.issubdtype(level.dtype, np.integer):
            info = np.iinfo(level.dtype)
            mean = np.clip(np.rint(mean), info.min, info.max)
        out.append(mean.astype(level.dtype))
    return np.stack(out)


def _nearest_2x(level: np.ndarray) -> np.ndarray:
    """Every second pixel: label values stay label values (no blending of two cells)."""
    return np.ascontiguousarray(level[:, ::2, ::2])


# ----------------------------------------------------------------------------- metadata
def check_pixel_size(pixel_size: PixelSize, unit: str | None) -> None:
    """Raise ValueError unless ``pixel_size`` is a positive number (or a ``(y, x)`` pair of
    them) and ``unit`` (if any) a space unit NGFF allows (:data:`SPACE_UNITS`)."""
    sides = tuple(pixel_size) if isinstance(pixel_size, tuple | list) else (pixel_size,)
    if len(sides) not in (1, 2) or not all(
        isinstance(v, int | float) and 0 < v < float("inf") for v in sides
    ):
        raise ValueError(f"pixel size must be a positive number, got {pixel_size!r}")
    if unit is not None and unit not in SPACE_UNITS:
        raise ValueError(
            f"unit {unit!r} is not an OME-NGFF space unit (e.g. micrometer, nanometer, millimeter)"
        )


def _axes(unit: str | None) -> list[dict[str, str]]:
    axes = []
    for name in IMAGE_AXES:
        axis = {"name": name, "type": _AXIS_TYPES[name]}
        if unit and axis["type"] == "space":
            axis["unit"] = unit
        axes.append(axis)
    return axes


def _level_transforms(k: int, pixel_size: PixelSize, block_mean: bool) -> list[dict[str, Any]]:
    """Level ``k``'s transformations: scale ``pixel_size * 2**k`` in y and x (each its own
    side of the pixel) and, for a level of block means, the translation that puts each
    pixel at the centre of the ``2**k`` level-0 pixels it averages (``pixel_size *
    (2**k - 1) / 2``). A level that keeps every ``2**k``-th pixel (labels) needs none: its
    pixel is that level-0 pixel."""
    y, x = pixel_size_yx(pixel_size)
    transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [1.0, y * 2**k, x * 2**k]}]
    if block_mean and k:
        shift = (2**k - 1) / 2
        transforms.append({"type": "translation", "translation": [0.0, y * shift, x * shift]})
    return transforms


def _multiscale(
    name: str, n_levels: int, pixel_size: PixelSize, unit: str | None, kind: str, method: str
) -> dict[str, Any]:
    """One ``multiscales`` entry (see :func:`_level_transforms`; ``kind`` ``local_mean``
    levels are block means)."""
    datasets = [
        {
            "path": str(k),
            "coordinateTransformations": _level_transforms(
                k, pixel_size, block_mean=kind == "local_mean"
            ),
        }
        for k in range(n_levels)
    ]
    return {
        "name": name,
        "axes": _axes(unit),
        "datasets": datasets,
        "type": kind,
        "metadata": {"method": method},
    }


def label_color(value: int) -> list[int]:
    """A deterministic, well-spread RGBA colour for a label value (golden-ratio hues)."""
    hue = (int(value) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.95)
    return [round(r * 255), round(g * 255), round(b * 255), 255]


def _json_value(x: Any) -> Any:
    """A JSON-safe scalar: numpy scalars unwrapped, NaN/inf as null, others as str."""
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return str(x)


def _property_rows(properties: Properties | None, where: str) -> dict[int, dict[str, Any]]:
    """Rows of a measurement table keyed by label value (its ``label``/``label-value``)."""
    if properties is None:
        return {}
    records = properties.to_dict("records") if hasattr(properties, "to_dict") else list(properties)
    rows: dict[int, dict[str, Any]] = {}
    for rec in records:
        key = next((k for k in _LABEL_KEYS if k in rec), None)
        if key is None:
            raise ValueError(f"properties of {where} need a 'label' column (the label value)")
        value = int(rec[key])
        row = {str(k): _json_value(v) for k, v in rec.items() if k not in _LABEL_KEYS}
        rows[value] = {"label-value": value, **row}
    return rows


def _image_label(label: np.ndarray, properties: Properties | None, name: str) -> dict[str, Any]:
    """``image-label`` metadata: one colour and one properties row per label value present
    (values without measurements get a row with ``label-value`` only, since the spec ties
    the two lists to the same set of values)."""
    values = [int(v) for v in np.unique(label) if v != 0]
    rows = _property_rows(properties, f"label {name!r}")
    return {
        "version": NGFF_VERSION,
        "colors": [{"label-value": v, "rgba": label_color(v)} for v in values],
        "properties": [rows.get(v, {"label-value": v}) for v in values],
        "source": {"image": "../../"},
    }


# ----------------------------------------------------------------------------- foreign content
def _is_level(name: str) -> bool:
    return name.isdigit()


def foreign_content(path: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """What an existing group holds that cellst's writer does not produce: ``(entries,
    label_images)``, the names of top-level files or folders other than ``zarr.json``, the
    image levels and ``labels/``, and of label images under ``labels/`` without cellst's
    attributes (a user's annotations, another tool's). Rewriting the group keeps them."""
    root = Path(path)
    if not root.is_dir():
        return [], []
    entries = sorted(
        p.name
        for p in root.iterdir()
        if p.name not in ("zarr.json", "labels") and not _is_level(p.name)
    )
    labels: list[str] = []
    folder = root / "labels"
    # `cellst segment` groups written before their label image carried cellst's attributes
    segment_label = SEGMENTATION if (cellst_provenance(root) or {}).get("command") else None
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.name == "zarr.json":
                continue
            if not p.is_dir():
                entries.append(f"labels/{p.name}")
                continue
            try:
                attrs = zarr.open_group(p, mode="r", zarr_format=3).attrs.asdict()
            except Exception:  # noqa: BLE001 - not a group cellst could have written
                attrs = {}
            if "cellst" not in attrs and p.name != segment_label:
                labels.append(p.name)
    return entries, labels


#: the group attributes cellst writes: every other one is a user's or another tool's
_OWN_ATTRIBUTES = frozenset({"ome", "cellst"})
_OWN_OME_KEYS = frozenset({"version", "multiscales"})


def foreign_attributes(path: str | os.PathLike[str]) -> list[str]:
    """Names of the root attributes of an existing group that cellst's writer does not
    produce (``ome.omero`` channel settings made in napari, a user's own keys): rewriting
    the group keeps them (:func:`carry_foreign`)."""
    try:
        attrs = zarr.open_group(Path(path), mode="r", zarr_format=3).attrs.asdict()
    except Exception:  # noqa: BLE001 - no group there, or not one cellst could rewrite
        return []
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else {}
    return [
        *(f"ome.{k}" for k in sorted(ome) if k not in _OWN_OME_KEYS),
        *(k for k in sorted(attrs) if k not in _OWN_ATTRIBUTES),
    ]


def _carry_attributes(old: Path, stage: Path) -> None:
    """The :func:`foreign_attributes` of ``old`` set on ``stage``'s root, beside cellst's."""
    names = foreign_attributes(old)
    if not names:
        return
    before = zarr.open_group(old, mode="r", zarr_format=3).attrs.asdict()
    root = zarr.open_group(stage, mode="a", zarr_format=3)
    attrs = root.attrs.asdict()
    ome = dict(attrs.get("ome") or {})
    for name in names:
        if name.startswith("ome."):
            ome.setdefault(name[4:], before["ome"][name[4:]])
        else:
            attrs.setdefault(name, before[name])
    root.attrs.update({**attrs, "ome": ome})


def carry_foreign(old: Path, stage: Path, written_labels: Sequence[str]) -> None:
    """Copy :func:`foreign_content` and :func:`foreign_attributes` of ``old`` into the
    staged group ``stage``: its files and folders as they are, its root attributes beside
    cellst's, its label images under ``labels/``, listed after cellst's."""
    import shutil

    entries, labels = foreign_content(old)
    clash = sorted(set(labels) & set(written_labels))
    if clash:
        raise FileExistsError(
            f"{old}/labels/{clash[0]} was not written by cellst, and cellst writes a label "
            "image of that name: rename or move it first"
        )
    for name in entries:
        src, dst = old / name, stage / name
        if src.is_dir():
            shutil.copytree(src, dst, symlinks=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst, follow_symlinks=False)
    _carry_attributes(old, stage)
    if not labels:
        return
    for name in labels:
        shutil.copytree(old / "labels" / name, stage / "labels" / name, symlinks=True)
    group = zarr.open_group(stage / "labels", mode="a", zarr_format=3)
    ome = dict(group.attrs.get("ome") or {"version": NGFF_VERSION})
    ome["labels"] = [*list(ome.get("labels") or []), *labels]
    group.attrs["ome"] = ome


# ----------------------------------------------------------------------------- writing
def _as_cyx(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8)
    # the plain dtype of the same kind and size: tifffile returns numpy's `longlong` for
    # int64 TIFFs, a dtype zarr does not map although it equals int64
    image = image.view(np.dtype(image.dtype.str))
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"image dtype {image.dtype} is neither integer nor float")
    if image.ndim == 2:
        return image[None]
    if image.ndim == 3:
        return np.moveaxis(image, -1, 0)
    raise ValueError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")


def _write_levels(group: zarr.Group, levels: Sequence[np.ndarray], chunk: int) -> None:
    for k, level in enumerate(levels):
        chunks = tuple(min(c, s) for c, s in zip((1, chunk, chunk), level.shape, strict=True))
        group.create_array(
            str(k),
            data=level,
            chunks=chunks,
            compressors=ZstdCodec(level=3),
            dimension_names=IMAGE_AXES,
        )


def write_ome_zarr(
    path: str | os.PathLike[str],
    image: np.ndarray,
    labels: Mapping[str, np.ndarray] | None = None,
    properties: Mapping[str, Properties] | None = None,
    name: str = "",
    pyramid_threshold: int = 2048,
    chunk: int = 256,
    *,
    pixel_size: PixelSize = 1.0,
    unit: str | None = None,
    attributes: Mapping[str, Any] | None = None,
    label_attributes: Mapping[str, Mapping[str, Any]] | None = None,
    overwrite: bool = True,
    keep_foreign: bool = False,
) -> Path:
    """Write an image and its label images as one OME-Zarr (NGFF 0.5, zarr v3) group.

    Parameters
    ----------
    path : path-like
        The group folder (by convention ``NAME.ome.zarr``); built in a staging folder and
        swapped into place.
    image : ndarray
        ``(H, W)`` or ``(H, W, C)``, any integer or float dtype; stored as ``c, y, x``.
    labels : mapping, optional
        Label image name -> ``(H, W)`` integer instance map (0 is background).
    properties : mapping, optional
        Label image name -> per-cell measurements (a DataFrame or a list of dicts with a
        ``label`` or ``label-value`` column), stored as ``image-label`` ``properties``.
    name : str
        Name of the multiscale (default: the folder name without ``.ome.zarr``).
    pyramid_threshold : int
        Images whose largest side exceeds this get 2x levels until it is at most this.
    chunk : int
        Spatial chunk side.
    pixel_size, unit : float or (float, float), str, optional
        Physical size of a level-0 pixel in ``unit`` (e.g. ``"micrometer"``): one side of a
        square pixel, or its ``(y, x)`` sides; 1 pixel and no unit by default.
    attributes : mapping, optional
        Extra root attributes (kept beside ``ome``, e.g. provenance under ``cellst``).
    label_attributes : mapping, optional
        Label name -> extra attributes of that label image group.
    overwrite : bool
        Replace an existing group (default); else :class:`FileExistsError`.
    keep_foreign : bool
        When replacing a group, keep what cellst's writer does not produce
        (:func:`foreign_content`: a user's label images and files) in the new one.

    Returns
    -------
    Path
        ``path``.
    """
    check_pixel_size(pixel_size, unit)
    path = Path(path)
    data = _as_cyx(image)
    height, width = data.shape[1:]
    labels = dict(labels or {})
    properties = dict(properties or {})
    unknown = sorted(set(properties) - set(labels))
    if unknown:
        raise ValueError(f"properties given for labels that are not written: {unknown}")
    label_cyx = {}
    for key, label in labels.items():
        label = np.asarray(label)
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"invalid label image name {key!r}")
        if not np.issubdtype(label.dtype, np.integer):
            raise ValueError(f"label {key!r} must be an integer array, got {label.dtype}")
        if label.shape != (height, width):
            raise ValueError(
                f"label {key!r} has shape {label.shape}, the image is {(height, width)}"
            )
        label_cyx[key] = label[None]
    name = name or path.name.removesuffix(SUFFIX).removesuffix(".zarr")

    levels = _levels(data, pyramid_threshold, _mean_2x)
    with staged_dir(path, overwrite=overwrite) as stage:
        ome = {
            "version": NGFF_VERSION,
            "multiscales": [
                _multiscale(
                    name,
                    len(levels),
                    pixel_size,
                    unit,
                    "local_mean",
                    "skimage.transform.downscale_local_mean",
                )
            ],
        }
        root = zarr.open_group(
            stage, mode="w", zarr_format=3, attributes={"ome": ome, **dict(attributes or {})}
        )
        _write_levels(root, levels, chunk)
        if label_cyx:
            group = root.create_group(
                "labels", attributes={"ome": {"version": NGFF_VERSION, "labels": list(label_cyx)}}
            )
            for key, label in label_cyx.items():
                label_ome = {
                    "version": NGFF_VERSION,
                    "image-label": _image_label(label, properties.get(key), key),
                    "multiscales": [
                        _multiscale(key, len(levels), pixel_size, unit, "nearest", "stride 2")
                    ],
                }
                extra = dict((label_attributes or {}).get(key, {}))
                sub = group.create_group(key, attributes={"ome": label_ome, **extra})
                _write_levels(sub, _levels(label, pyramid_threshold, _nearest_2x), chunk)
        if keep_foreign and path.is_dir():
            carry_foreign(path, stage, list(label_cyx))
    return path


# ----------------------------------------------------------------------------- reading
def _level0(group: zarr.Group) -> zarr.Array:
    datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
    return group[datasets[0]["path"]]


def read_ome_zarr(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Level 0 of an OME-Zarr image group as ``(H, W, C)`` and its label images as
    ``{name: (H, W)}`` (the round trip of :func:`write_ome_zarr`)."""
    root = zarr.open_group(Path(path), mode="r", zarr_format=3)
    image = np.moveaxis(_level0(root)[...], 0, -1)
    labels = {}
    if "labels" in root:
        group = root["labels"]
        for key in group.attrs["ome"]["labels"]:
            label = _level0(group[key])[...]
            labels[key] = label.reshape(label.shape[-2:])
    return image, labels


def read_label_metadata(path: str | os.PathLike[str], name: str) -> dict[str, Any]:
    """The ``image-label`` metadata (colours, properties, source) of one label image."""
    group = zarr.open_group(Path(path) / "labels" / name, mode="r", zarr_format=3)
    return dict(group.attrs["ome"].get("image-label", {}))


# ----------------------------------------------------------------------------- store export
def cellst_provenance(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``cellst`` attributes of an OME-Zarr group cellst wrote (export provenance, or the
    image ``cellst segment`` wrote it for); None when it is not one of ours."""
    try:
        attrs = zarr.open_group(path, mode="r", zarr_format=3).attrs.asdict()
    except Exception:  # noqa: BLE001 - unreadable means "not ours"
        return None
    cellst = attrs.get("cellst")
    return cellst if isinstance(cellst, dict) else None


def _cell_measurements(label: np.ndarray, image: np.ndarray) -> Any:
    """The cell table of :mod:`cellst.export.measure` (its owner), without the id column."""
    from cellst.export.measure import cell_table

    return cell_table(label, image).drop(columns="image_id")


def export_store(
    store_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    items: Iterable[str] | None = None,
    include_pseudo: bool = True,
    overwrite: bool = False,
    *,
    measure: Measure | bool = True,
    pixel_size: float | None = None,
    unit: str = "micrometer",
    progress: bool = True,
    pyramid_threshold: int = 2048,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Export store items as ``OUT/<item_id>.ome.zarr`` groups readable by OME-Zarr clients.

    Each group holds the item's image, its ground truth as label image ``ground_truth``
    (labelled items) and, with ``include_pseudo``, every pseudo-label set holding the item
    as a label image named after the set. The store is only read.

    Resume: an existing export of an item whose sources are unchanged (same image and
    label arrays, same pseudo-labels) is skipped; one whose sources changed is rewritten;
    ``overwrite`` rewrites all. A folder at an output path that is not a cellst export is
    never replaced unless ``overwrite``. A cellst export that is rewritten keeps what cellst
    did not write in it (a user's label images and files: :func:`foreign_content`).

    Parameters
    ----------
    items : iterable of str, optional
        Item ids to export (all by default); an unknown id is a :class:`StoreError`.
    measure : callable or bool
        ``measure(label, image) -> table`` of per-cell measurements (one row per label
        value, with a ``label`` column), stored as the label images' ``properties``;
        True (default) uses :func:`cellst.export.measure.cell_table` (shape, position and
        per-channel intensities), False stores colours and label values only.
    pixel_size, unit : float, str
        Physical size of a pixel in ``unit`` (an NGFF space unit, default micrometer),
        written as the groups' scale, so viewers show scale bars and physical distances.
        By default each item's is what its source file declares (an OME-TIFF or ImageJ
        TIFF, read again from the path the store records), else none (1 pixel, no unit).
        Measurements stay in pixels.
    progress : bool
        Show a progress bar.
    log : callable, optional
        Called with a line per rewritten group that kept foreign content, and a summary.

    Returns
    -------
    list of Path
        The group of every requested item, written now or before.
    """
    from tqdm.auto import tqdm

    from cellst.data.store import CellStore, StoreError

    if measure is True:
        measure = _cell_measurements
    measure = measure or None
    if pixel_size is not None:
        check_pixel_size(pixel_size, unit)
    out_dir = Path(out_dir)
    check_writable(out_dir)  # one line before any work, not a traceback at the first item
    outputs: list[Path] = []
    written = 0
    with CellStore(store_path) as store:
        ids = list(dict.fromkeys(store.ids() if items is None else items))  # once each
        store.require(ids)
        sets = store.pseudo_sets() if include_pseudo else []
        if GROUND_TRUTH in sets:
            raise StoreError(
                f"pseudo-label set name {GROUND_TRUTH!r} clashes with the ground truth"
            )
        # labels predicted from images a later ingest changed no longer fit: left out
        stale = {s: set(store.pseudo_set(s).stale_items(store.manifest, ids)) for s in sets}
        for s, items_ in stale.items():
            if items_ and log is not None:
                log(
                    f"pseudo-label set {s!r}: {len(items_)} item(s) (e.g. {sorted(items_)[0]}) "
                    "left out, predicted from images a later ingest changed; run "
                    "`cellst predict` again to predict them anew"
                )
        for item_id in tqdm(ids, desc="export", unit="item", disable=not progress):
            row = store.row(item_id)
            held = [
                s for s in sets if store.pseudo_set(s).has_item(item_id) and item_id not in stale[s]
            ]
            stamp = {
                "store": str(store.root),
                "item": item_id,
                "split": row.split,
                "modality": row.modality,
                "image_array": row.image_array,
                "label_array": row.label_array,
                "pseudo": {s: store.pseudo_set(s).item_stamp(item_id) for s in held},
                "measure": getattr(measure, "__qualname__", type(measure).__name__)
                if measure
                else "",
            }
            out = out_dir / f"{item_id}{SUFFIX}"
            scale = _item_scale(row, out, pixel_size, unit, log)
            if scale is not None:  # (absent otherwise: exports of earlier cellst match)
                # as JSON reads it back: a (y, x) pair as a list
                stamp["pixel_size"] = [list(v) if isinstance(v, tuple) else v for v in scale]
            outputs.append(out)
            if out.exists() and not overwrite and _export_is_current(out, stamp):
                continue
            _write_item(store, row, held, out, stamp, scale, measure, pyramid_threshold, log)
            written += 1
    if log is not None:
        log(f"{written} written, {len(outputs) - written} unchanged")
        if items is None and (gone := orphan_exports(out_dir, store_path, outputs)):
            log(
                f"{len(gone)} group(s) of items no longer in the store are left in {out_dir} "
                f"(e.g. {gone[0].name}); remove them if they are no longer wanted"
            )
    return outputs


def _item_scale(
    row: Any,
    out: Path,
    pixel_size: float | None,
    unit: str,
    log: Callable[[str], None] | None,
) -> tuple | None:
    """An item's ``(pixel size, unit)``: the one given, else what its source file declares;
    a source that is gone or changed keeps the earlier export's (None: in pixels)."""
    from cellst.data.images import ignored_pixel_size

    item_id = row.id
    scale = (pixel_size, unit) if pixel_size is not None else source_pixel_size(row)
    earlier = (cellst_provenance(out) or {}).get("pixel_size") if out.exists() else None
    # the source's digest is read only where its size would change the export
    same = scale is not None and earlier == [list(v) if isinstance(v, tuple) else v for v in scale]
    missing = None if pixel_size is not None or same else source_missing(row)
    if missing:  # not the image stored: the earlier export's size, if it had one
        scale = (earlier[0], earlier[1]) if earlier else None
        if log is not None:
            log(
                f"{item_id}: its source {row.source_path} is {missing}; "
                + (
                    "kept the pixel size of the earlier export"
                    if earlier
                    else "exported in pixels (--pixel-size sets one)"
                )
            )
    elif scale is None and log is not None and row.source_path:
        if why := ignored_pixel_size(row.source_path):
            log(f"{item_id}: {why}; exported in pixels (--pixel-size sets one)")
    return scale


def _export_is_current(out: Path, stamp: dict[str, Any]) -> bool:
    """Whether the cellst export at ``out`` was written from the sources ``stamp`` names
    (then it is kept). A folder there that is no cellst export is a
    :class:`FileExistsError`."""
    old = cellst_provenance(out)
    if old is None or old.get("command") == "segment":
        what = "`cellst segment`'s output" if old else "not a cellst export"
        raise FileExistsError(
            f"{out} exists and is {what}; export into another folder, or pass "
            "--overwrite (overwrite=True) to replace it"
        )
    keys = (set(stamp) | set(old)) - {"store"}  # a key only one of them has counts
    return {k: old.get(k) for k in keys} == {k: stamp.get(k) for k in keys}


def _write_item(
    store: Any,
    row: Any,
    held: list[str],
    out: Path,
    stamp: dict[str, Any],
    scale: tuple | None,
    measure: Measure | None,
    pyramid_threshold: int,
    log: Callable[[str], None] | None,
) -> None:
    """Write one item's group: its image, ground truth and the pseudo-label sets ``held``,
    keeping what a user added to an earlier cellst export of it."""
    item_id = row.id
    image = store.image(item_id)
    labels: dict[str, np.ndarray] = {}
    label_attrs: dict[str, dict[str, Any]] = {}
    if row.label_array:
        labels[GROUND_TRUTH] = store.label(item_id)
        label_attrs[GROUND_TRUTH] = {"cellst": {"source": row.label_path}}
    for s in held:
        labels[s] = store.pseudo_label(s, item_id)
        label_attrs[s] = {"cellst": {"pseudo_set": s, **store.pseudo_set_info(s)}}
    props = {k: measure(v, image) for k, v in labels.items()} if measure else None
    # a cellst export keeps a user's additions; --overwrite of another folder does not
    ours = out.exists() and "item" in (cellst_provenance(out) or {})
    entries, user_labels = foreign_content(out) if ours else ([], [])
    kept = [*entries, *(f"labels/{n}" for n in user_labels)]
    kept += [f"attribute {n}" for n in (foreign_attributes(out) if ours else [])]
    write_ome_zarr(
        out,
        image,
        labels,
        props,
        name=item_id,
        pyramid_threshold=pyramid_threshold,
        pixel_size=scale[0] if scale else 1.0,
        unit=scale[1] if scale else None,
        attributes={"cellst": stamp},
        label_attributes=label_attrs,
        keep_foreign=ours,
    )
    if kept and log is not None:
        log(f"rewrote {out}, keeping what cellst did not write there: {', '.join(kept)}")


def orphan_exports(
    out_dir: str | os.PathLike[str], store_path: str | os.PathLike[str], current: Iterable[Path]
) -> list[Path]:
    """Groups in ``out_dir`` that cellst exported from the store at ``store_path`` for items
    it no longer holds (``cellst ingest --prune`` dropped them), besides ``current``."""
    root = str(Path(store_path).resolve())
    keep = {Path(p).name for p in current}
    found = []
    for group in sorted(Path(out_dir).glob(f"*{SUFFIX}")):
        if group.name in keep:
            continue
        stamp = cellst_provenance(group) or {}
        stored = stamp.get("store")
        if stamp.get("item") and stored and str(Path(stored).resolve()) == root:
            found.append(group)
    return found
