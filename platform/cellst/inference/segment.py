"""``cellst segment``: image files in, instance maps (and optional exports) out.

The one command a biologist types: files or folders of images in any format
:mod:`cellst.data.images` reads, a checkpoint, and per image ``NAME_label.tiff`` (the
challenge format), plus on request an overlay PNG, per-cell measurements, QuPath GeoJSON and
an OME-Zarr. Each image goes through exactly what the trained model saw and what
``cellst predict`` does:

1. :func:`~cellst.data.images.read_array` + :func:`~cellst.data.images.normalize_image`
   with the ``ingest`` section's percentiles (the normalisation of the store);
2. :func:`~cellst.inference.predictor.predict_maps` (sliding window, optional flip TTA,
   block-wise for large images);
3. :func:`~cellst.postprocess.tiled.postprocess_hover` with the effective post-processing:
   explicit settings (command-line options, ``--set``, the YAML file) win over the
   checkpoint's calibrated values (:func:`~cellst.postprocess.calibrate.effective_postprocess`),
   which win over the defaults;
4. :func:`filter_instances`: cells touching the border (``exclude_on_edges``) and cells
   smaller than ``min_size`` pixels are dropped, and the rest relabelled ``1..N``.

Small jobs run in this process (:func:`segment_in_process`), so one image costs the imports
and the model, not a Ray cluster start; larger ones (see
:class:`~cellst.inference.config.SegmentConfig`) run on Ray with the batch path of ``cellst
predict`` (:func:`segment_on_ray`). Heavy modules (torch, MONAI, Ray, the exporters) are
imported only by the functions that need them.

An image that cannot be read or segmented is reported by name while the others are
written; every file is written atomically.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellst.data.images import (
    LABEL_SUFFIX,
    declared_pixels,
    declared_shape,
    label_file_name,
)
from cellst.data.layout import image_name
from cellst.errors import first_line
from cellst.fs import process_temp_dir, remove_orphan_temp_dirs
from cellst.inference.config import InferenceConfig, PredictConfig, SegmentConfig
from cellst.inference.inputs import OVERLAY_SUFFIX, SegmentError, collect_images, output_dir
from cellst.model.checkpoint_files import INFO_FILE, is_checkpoint
from cellst.provenance import PNG_SOFTWARE_KEY, SOFTWARE_TAG, is_cellst_png

if TYPE_CHECKING:
    import pandas as pd

    from cellst.config import IngestConfig
    from cellst.postprocess.config import PostprocessConfig

__all__ = [
    "SegmentResult",
    "check_outputs",
    "foreign_outputs",
    "filter_instances",
    "load_segmenter",
    "overlay_rgb",
    "segment",
    "segment_in_process",
    "segment_on_ray",
    "use_ray",
    "write_outputs",
]

#: outline colour of the overlay (RGB)
_OUTLINE = (255, 255, 0)


@dataclass
class SegmentResult:
    """What a segmentation run did."""

    written: list[str] = field(default_factory=list)  # image names
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    outputs: list[Path] = field(default_factory=list)  # every file or folder written
    mode: str = "in-process"  # or "ray"
    seconds: float = 0.0
    postprocess: dict[str, Any] = field(default_factory=dict)  # the settings used
    postprocess_note: str = ""  # one line: calibrated or configured
    #: cellst's own outputs of an earlier run removed because the image's label changed
    removed: list[Path] = field(default_factory=list)
    #: ... and those kept because a user added to them (an OME-Zarr with their labels)
    stale_kept: list[Path] = field(default_factory=list)
    #: images written with no instance at all: (image name, why, when known)
    empty: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        failed = f", {len(self.failed)} failed" if self.failed else ""
        return (
            f"{len(self.written)} image(s) segmented{failed} in {self.seconds:.1f} s ({self.mode})"
        )

    def empty_note(self) -> str:
        """One line naming the images in which nothing was found (empty when there are none)."""
        if not self.empty:
            return ""
        named = [f"{name} ({why})" if why else name for name, why in self.empty[:5]]
        more = f" and {len(self.empty) - 5} more" if len(self.empty) > 5 else ""
        return (
            f"no cells found in {len(self.empty)} image(s): {', '.join(named)}{more}; "
            "their label files are empty"
        )

    def failure_message(self) -> str:
        """One line: how many images failed (each is named in ``failed``) and were written."""
        n = len(self.failed)
        return (
            f"{n} of {n + len(self.written)} image(s) could not be segmented (named above); "
            f"the other {len(self.written)} were written"
        )


def use_ray(paths: Sequence[Path], cfg: SegmentConfig) -> bool:
    """Whether a job is large enough for Ray: more images or megapixels (read from the
    file headers, no pixel decoded) than ``cfg`` allows in-process."""
    if len(paths) > cfg.in_process_max_images:
        return True
    total = 0
    for p in paths:
        try:
            total += declared_pixels(declared_shape(p))
        except Exception:  # noqa: BLE001 - a bad file is reported when it is segmented
            continue
    return total > cfg.in_process_max_mpx * 1e6


def check_checkpoint_dir(checkpoint: str | os.PathLike[str]) -> Path:
    """Cheap check (no torch import) that ``checkpoint`` is a checkpoint folder."""
    path = Path(checkpoint)
    if path.is_file():
        hint = f"; pass its folder {path.parent}" if is_checkpoint(path.parent) else ""
        raise SegmentError(
            f"checkpoint {path} is a file; a checkpoint is the folder holding {INFO_FILE} "
            f"and the weights{hint}"
        )
    if not path.is_dir():
        raise SegmentError(f"checkpoint {path}: no such folder")
    if not is_checkpoint(path):
        raise SegmentError(f"checkpoint {path} is not a cellst checkpoint (no {INFO_FILE})")
    return path


# ----------------------------------------------------------------------------- model
def load_segmenter(
    checkpoint: str | os.PathLike[str],
    post: PostprocessConfig | None = None,
    device: str | None = None,
) -> tuple[Any, PostprocessConfig, str]:
    """Load the model of ``checkpoint`` and the effective post-processing.

    Returns ``(model, post, note)``: the model in eval mode on ``device`` (default: CUDA when
    available, else CPU), the post-processing settings (explicit fields of ``post`` win over
    the checkpoint's calibrated values, which win over the defaults) and a one-line note
    saying which were used.

    Raises
    ------
    SegmentError
        The checkpoint is missing, unreadable or does not fit its own model description.
    """
    import torch

    from cellst.model.checkpoint import load_model
    from cellst.postprocess.calibrate import effective_postprocess

    path = check_checkpoint_dir(checkpoint)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(dev).type
    except (RuntimeError, ValueError):
        raise SegmentError(f"--device {dev}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise SegmentError(f"--device {dev}: CUDA is not available on this machine")
    try:
        model, _, _ = load_model(path, map_location=dev)
        post, note = effective_postprocess(post, path)
    except Exception as exc:  # noqa: BLE001 - CheckpointError, StoreError, torch errors
        text = first_line(exc)
        raise SegmentError(text if str(path) in text else f"checkpoint {path}: {text}") from None
    return model, post, note


# ----------------------------------------------------------------------------- labels
def filter_instances(
    label: np.ndarray, exclude_on_edges: bool = False, min_size: int = 0
) -> np.ndarray:
    """Drop cells touching the image border and cells of fewer than ``min_size`` pixels.

    Parameters
    ----------
    label : (H, W) ndarray of int
        Instance map, 0 = background.
    exclude_on_edges : bool
        Remove every instance with a pixel in the first or last row or column
        (:func:`skimage.segmentation.clear_border`).
    min_size : int
        Remove instances with fewer pixels (0 keeps all).

    Returns
    -------
    ndarray
        ``(H, W)`` int32, the remaining instances relabelled ``1..N`` in their order.
    """
    from cellst.postprocess.hover import relabel_sequential

    lab = np.asarray(label)
    if lab.ndim != 2:
        raise ValueError(f"expected a 2-D instance map, got shape {lab.shape}")
    if exclude_on_edges and lab.size:
        from skimage.segmentation import clear_border

        lab = clear_border(lab)
    if min_size > 0 and lab.size:
        sizes = np.bincount(lab.ravel())
        small = sizes < min_size
        small[0] = False
        if small.any():
            lab = np.where(small[lab], 0, lab)
    return relabel_sequential(lab)


def overlay_rgb(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """The image (``(H, W, 3) uint8``) with the outline of every instance drawn in."""
    from skimage.segmentation import find_boundaries

    out = np.array(image, dtype=np.uint8, copy=True)
    out[find_boundaries(label, mode="inner")] = _OUTLINE
    return out


def write_overlay(path: Path, image: np.ndarray, label: np.ndarray) -> Path:
    """Write ``NAME_overlay.png``: outlines, and the id of each cell at its centroid where
    the id fits inside the cell's bounding box (in a dense image of small cells, ids drawn
    over every cell would hide the cells themselves; ``NAME_cells.csv`` has them all)."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo
    from skimage.measure import regionprops_table

    from cellst.fs import atomic_write

    canvas = Image.fromarray(overlay_rgb(image, label))
    draw = ImageDraw.Draw(canvas)
    cells = regionprops_table(label, properties=("label", "centroid", "bbox"))
    columns = ("label", "centroid-0", "centroid-1", "bbox-0", "bbox-1", "bbox-2", "bbox-3")
    for i, y, x, y0, x0, y1, x1 in zip(*(cells[c] for c in columns), strict=True):
        text = str(int(i))
        left, top, right, bottom = draw.textbbox((0, 0), text, stroke_width=1)
        if right - left > x1 - x0 or bottom - top > y1 - y0:
            continue
        pos = (x - (right - left) / 2, y - (bottom - top) / 2)
        draw.text(pos, text, fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
    info = PngInfo()
    info.add_text(PNG_SOFTWARE_KEY, SOFTWARE_TAG)  # so that a re-run may replace it
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG", pnginfo=info))


def is_cellst_overlay(path: Path) -> bool:
    """Whether ``path`` is an overlay PNG that cellst wrote (its ``Software`` text says so)."""
    return is_cellst_png(path)


def stale_outputs(
    name: str, out_dir: Path, label: np.ndarray, written: Sequence[str]
) -> list[Path]:
    """cellst's own outputs of image ``name`` in ``out_dir`` that a run writing ``label``
    and the files named ``written`` leaves describing another segmentation: the overlay,
    cell tables, GeoJSON and OME-Zarr of an earlier run whose ``NAME_label.tiff`` (cellst's)
    differs from ``label``. Files a user or another tool wrote are never listed."""
    from cellst.data.images import is_cellst_label_tiff, read_array
    from cellst.export.geojson import is_cellst_geojson
    from cellst.export.measure import TABLE_SUFFIX, is_cellst_table
    from cellst.export.omezarr import cellst_provenance

    ours: list[tuple[str, Callable[[Path], bool]]] = [
        (f"{name}{OVERLAY_SUFFIX}.png", is_cellst_overlay),
        (f"{name}{TABLE_SUFFIX}.csv", is_cellst_table),
        (f"{name}{TABLE_SUFFIX}.parquet", is_cellst_table),
        (f"{name}.geojson", is_cellst_geojson),
        (f"{name}.ome.zarr", lambda q: cellst_provenance(q) is not None),
    ]
    candidates = [
        out_dir / f
        for f, is_ours in ours
        if f not in written and (out_dir / f).exists() and is_ours(out_dir / f)
    ]
    previous = out_dir / label_file_name(name)
    if not candidates or not previous.is_file() or not is_cellst_label_tiff(previous):
        return []  # nothing that could be stale: the earlier label is not even read
    try:
        if np.array_equal(read_array(previous, labels=True), label):
            return []  # the same segmentation: its other outputs still describe it
    except Exception:  # noqa: BLE001 - an unreadable earlier label: its outputs are stale
        pass
    return candidates


def _remove_stale(stale: Sequence[Path], removed: list[Path], kept: list[Path]) -> None:
    """Remove :func:`stale_outputs`; an OME-Zarr group holding a user's additions is kept."""
    from cellst.export.omezarr import foreign_attributes, foreign_content

    for path in stale:
        if path.is_dir():
            if any(foreign_content(path)) or foreign_attributes(path):
                kept.append(path)
                continue
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)


def refresh_run_table(folder: Path, removed: Sequence[Path]) -> None:
    """Drop the images whose cell tables were removed from the folder's run table
    (``cells.csv`` / ``.parquet``, cellst's), rebuilt from the tables that remain."""
    import pandas as pd

    from cellst.export.measure import RUN_TABLE, TABLE_SUFFIX, combine_tables, is_cellst_table

    gone = {p.name.removesuffix(f"{TABLE_SUFFIX}.parquet") for p in removed if p.parent == folder}
    run = folder / f"{RUN_TABLE}.parquet"
    if not gone or not run.is_file() or not is_cellst_table(run):
        return
    names = [str(n) for n in pd.read_parquet(run, columns=["image_id"])["image_id"].unique()]
    if gone & set(names):
        keep = [
            n for n in names if n not in gone and (folder / f"{n}{TABLE_SUFFIX}.parquet").is_file()
        ]
        combine_tables(folder, keep)


def why_empty(raw: np.ndarray | None) -> str:
    """Why an image may hold no instance: ``"a blank image: every pixel is V"`` when every
    pixel of ``raw`` has one value (nothing to segment), else ``""`` (the model found none)."""
    if raw is None or raw.size == 0:
        return ""
    flat = raw.reshape(-1)
    if np.all(flat == flat[0]):
        return f"a blank image: every pixel is {flat[0].item():g}"
    return ""


def write_outputs(
    name: str,
    out_dir: Path,
    label: np.ndarray,
    raw: np.ndarray | None,
    image: np.ndarray | None,
    cfg: SegmentConfig,
    result: SegmentResult | None = None,
    source: Path | None = None,
) -> list[Path]:
    """Write ``NAME_label.tiff`` and the exports ``cfg`` asks for; returns their paths.

    ``raw`` is the image as read (measurements and OME-Zarr keep its values), ``image`` the
    normalised ``(H, W, 3) uint8`` one (the overlay); either may be None when not needed.

    All or nothing per image: everything is written into a hidden folder beside the outputs
    first and moved into place only once all of it is written, so an export that fails
    (a full disk, say) leaves the image's earlier outputs as they were, not a new label
    beside old exports. ``source`` is the image file (its declared pixel size goes into
    the OME-Zarr); ``result`` collects the earlier outputs removed (:func:`stale_outputs`).
    """
    from cellst.fs import replace_dir, stale_siblings, temp_sibling

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in stale_siblings(out_dir / name, ".partial"):  # of a run killed mid-image
        shutil.rmtree(stale, ignore_errors=True)
    stage = temp_sibling(out_dir / name, suffix=".partial")
    stage.mkdir()
    try:
        try:
            staged = _write_outputs_into(stage, name, label, raw, image, cfg, source)
        except Exception as exc:  # named where the file would have gone, not the stage
            raise SegmentError(str(exc).replace(str(stage), str(out_dir))) from exc
        stale = stale_outputs(name, out_dir, label, [p.name for p in staged])
        final = []
        for path in [*staged[1:], staged[0]]:  # the label last: it says the image is done
            dest = out_dir / path.name
            if path.is_dir():
                _keep_users_additions(dest, path)
                replace_dir(path, dest)
            else:
                os.replace(path, dest)
            final.append(dest)
        _remove_stale(stale, *((result.removed, result.stale_kept) if result else ([], [])))
        if result is not None and not label.any():
            result.empty.append((name, why_empty(raw)))
        return final
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _keep_users_additions(old: Path, new: Path) -> None:
    """Carry what a user added to an earlier run's OME-Zarr group (label images, files)
    into the one that replaces it (:func:`cellst.export.omezarr.carry_foreign`)."""
    if not old.is_dir() or old.suffixes[-2:] != [".ome", ".zarr"]:
        return
    from cellst.export.omezarr import SEGMENTATION, carry_foreign, cellst_provenance

    if cellst_provenance(old) is not None:
        carry_foreign(old, new, [SEGMENTATION])


def _write_outputs_into(
    out_dir: Path,
    name: str,
    label: np.ndarray,
    raw: np.ndarray | None,
    image: np.ndarray | None,
    cfg: SegmentConfig,
    source_path: Path | None = None,
) -> list[Path]:
    """:func:`write_outputs`' files, written into ``out_dir`` (its staging folder); the
    label TIFF and the OME-Zarr carry the pixel size ``source_path`` declares
    (:func:`pixel_size`)."""
    from cellst.data.images import pixel_size, write_label_tiff

    declared = pixel_size(source_path) if source_path else None
    written: list[Path] = []
    tiff = out_dir / label_file_name(name)
    write_label_tiff(tiff, label, pixel_size=declared)
    written.append(tiff)
    if cfg.save_png:
        written.append(write_overlay(out_dir / f"{name}{OVERLAY_SUFFIX}.png", image, label))
    table: pd.DataFrame | None = None
    source = None if raw is None else raw[:, :, None] if raw.ndim == 2 else raw  # (H, W, C)
    if cfg.save_csv or cfg.save_ome_zarr or cfg.save_geojson:
        from cellst.export.measure import cell_table

        table = cell_table(label, source, image_id=name)
    if cfg.save_csv:
        from cellst.export.measure import write_image_table

        written.extend(write_image_table(table, out_dir, name).values())
    if cfg.save_geojson:
        from cellst.export.geojson import write_geojson

        written.append(
            write_geojson(label, out_dir / f"{name}.geojson", measurements=table, image_id=name)
        )
    if cfg.save_ome_zarr:
        from cellst.export.omezarr import SEGMENTATION, write_ome_zarr

        size, unit = declared or (1.0, None)
        written.append(
            write_ome_zarr(
                out_dir / f"{name}.ome.zarr",
                source,
                pixel_size=size,
                unit=unit,
                labels={SEGMENTATION: label},
                properties={SEGMENTATION: table},
                label_attributes={SEGMENTATION: {"cellst": {"command": "segment"}}},
                attributes={"cellst": {"command": "segment", "image": name}},
            )
        )
    return written


def _finish_tables(
    written: Iterable[tuple[Path, str]], cfg: SegmentConfig, removed: Sequence[Path] = ()
) -> list[Path]:
    """The per-run ``cells.csv`` / ``cells.parquet`` of every output folder, from the
    tables of the images this run wrote there (``(folder, name)`` pairs); without
    ``--save-csv``, an earlier run's table loses the images whose tables were ``removed``
    (:func:`refresh_run_table`)."""
    if not cfg.save_csv:
        for folder in sorted({p.parent for p in removed}):
            refresh_run_table(folder, removed)
        return []
    from cellst.export.measure import combine_tables

    names: dict[Path, list[str]] = {}
    for folder, name in written:
        names.setdefault(folder, []).append(name)
    return [p for d in sorted(names) for p in combine_tables(d, names[d]).values()]


def foreign_outputs(
    paths: Sequence[Path], out_dir: str | os.PathLike[str] | None, cfg: SegmentConfig
) -> list[Path]:
    """Files at this run's output names that cellst did not write, which a run would
    replace: a ``NAME_label.tiff`` (a ground truth kept beside its image), and with the
    outputs asked for, a ``NAME_overlay.png``, ``NAME_cells.csv`` / ``.parquet``, the
    folder's ``cells.csv`` / ``.parquet``, a ``NAME.geojson`` or a ``NAME.ome.zarr`` of
    another tool or of the user. A file cellst wrote (its TIFF tag, PNG text, table columns,
    GeoJSON member or OME-Zarr attributes say so) is not listed: re-running a segmentation
    replaces its own outputs."""
    from cellst.data.images import is_cellst_label_tiff
    from cellst.export.measure import RUN_TABLE, TABLE_SUFFIX, is_cellst_table

    checks: list[tuple[str, Callable[[Path], bool]]] = [
        (f"{LABEL_SUFFIX}.tiff", is_cellst_label_tiff)
    ]
    if cfg.save_png:
        checks.append((f"{OVERLAY_SUFFIX}.png", is_cellst_overlay))
    if cfg.save_csv:
        checks += [(f"{TABLE_SUFFIX}{ext}", is_cellst_table) for ext in (".csv", ".parquet")]
    if cfg.save_geojson:
        from cellst.export.geojson import is_cellst_geojson

        checks.append((".geojson", is_cellst_geojson))
    if cfg.save_ome_zarr:
        from cellst.export.omezarr import cellst_provenance

        checks.append((".ome.zarr", lambda p: cellst_provenance(p) is not None))
    out = Path(out_dir) if out_dir is not None else None
    targets = [
        (output_dir(p, out) / f"{image_name(p)}{suffix}", ours)
        for p in paths
        for suffix, ours in checks
    ]
    if cfg.save_csv:  # each output folder's run table
        folders = sorted({output_dir(p, out) for p in paths})
        targets += [
            (d / f"{RUN_TABLE}{ext}", is_cellst_table)
            for d in folders
            for ext in (".csv", ".parquet")
        ]
    return [target for target, ours in targets if target.exists() and not ours(target)]


def check_outputs(
    paths: Sequence[Path],
    out_dir: str | os.PathLike[str] | None,
    cfg: SegmentConfig,
    overwrite: bool = False,
) -> None:
    """Refuse, before anything runs, a run whose outputs cannot be written (a folder that
    is not writable, a file given as ``--out``) or would replace files cellst did not
    write (:func:`foreign_outputs`; ``overwrite`` allows it).

    Raises
    ------
    SegmentError
        One line naming the folder or the first such file.
    """
    from cellst.fs import unwritable_reason

    out = Path(out_dir) if out_dir is not None else None
    for folder in sorted({output_dir(p, out) for p in paths}):
        reason = unwritable_reason(folder)
        if reason:
            raise SegmentError(f"cannot write the outputs: {reason}")
    if overwrite:
        return
    foreign = foreign_outputs(paths, out_dir, cfg)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise SegmentError(
            f"{foreign[0]}{more} exists and was not written by cellst (a ground truth, or "
            f"another tool's file?); choose another --out, or pass --overwrite to replace it"
        )


# ----------------------------------------------------------------------------- running
def _read(path: Path, ingest: IngestConfig) -> tuple[np.ndarray, np.ndarray]:
    """The image as read and normalised exactly as ``cellst ingest`` stores it."""
    from cellst.data.images import check_min_side, normalize_image, read_array

    raw = read_array(path, ingest.max_pixels)
    check_min_side(path, raw.shape[0], raw.shape[1], ingest.min_side)  # as ingest refuses
    image = normalize_image(
        raw, ingest.low_percentile, ingest.high_percentile, name=path, channel_axis=-1
    )
    return raw, image


def _progress(items: Sequence[Path], enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="img", disable=None if enabled else True)


def segment_in_process(
    paths: Sequence[Path],
    checkpoint: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    infer: InferenceConfig | None = None,
    post: PostprocessConfig | None = None,
    segment_cfg: SegmentConfig | None = None,
    ingest: IngestConfig | None = None,
    device: str | None = None,
    progress: bool = True,
) -> SegmentResult:
    """Segment ``paths`` one by one in this process (no Ray).

    Parameters are those of :func:`segment`. An image that fails is recorded in the
    result's ``failed`` (path and reason) and the others are still written.
    """
    from cellst.config import IngestConfig
    from cellst.inference.predictor import predict_maps
    from cellst.postprocess.tiled import postprocess_hover

    t0 = time.perf_counter()
    infer = infer or InferenceConfig()
    cfg = segment_cfg or SegmentConfig()
    ingest = ingest or IngestConfig()
    out = Path(out_dir) if out_dir is not None else None
    model, post, note = load_segmenter(checkpoint, post, device)
    result = SegmentResult(mode="in-process", postprocess=post.model_dump(), postprocess_note=note)
    dev = next(model.parameters()).device
    tables: list[tuple[Path, str]] = []  # (folder, name) of each image written
    for path in _progress(paths, progress, "segment"):
        try:
            raw, image = _read(path, ingest)
            prob, hv = predict_maps(model, image, infer, dev)
            label = postprocess_hover(prob, hv, post, shape=image.shape[:2])
            label = filter_instances(label, cfg.exclude_on_edges, cfg.min_size)
            dest = output_dir(path, out)
            result.outputs += write_outputs(
                image_name(path), dest, label, raw, image, cfg, result, path
            )
            result.written.append(image_name(path))
            tables.append((dest, image_name(path)))
        except Exception as exc:  # noqa: BLE001 - this image fails, not the run
            why = first_line(exc)
            result.failed.append((str(path), why if str(path) in why else f"{path}: {why}"))
    result.outputs += _finish_tables(tables, cfg, result.removed)
    result.seconds = time.perf_counter() - t0
    return result


#: the hidden folder ``cellst segment`` on Ray predicts into, in each output folder
STAGING_PREFIX = ".cellst-segment-"


def segment_on_ray(
    paths: Sequence[Path],
    checkpoint: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    infer: InferenceConfig | None = None,
    post: PostprocessConfig | None = None,
    segment_cfg: SegmentConfig | None = None,
    ingest: IngestConfig | None = None,
    resources: PredictConfig | None = None,
    ray_address: str | None = None,
    progress: bool = True,
) -> SegmentResult:
    """Segment ``paths`` with the distributed batch path of ``cellst predict``.

    Per output folder, :func:`cellst.inference.batch.predict` writes the post-processed
    instance maps of the images of each input folder into a hidden staging folder; each
    map is then filtered (:func:`filter_instances`), written as ``NAME_label.tiff`` with the
    requested exports, and the staging folder is removed. The post-processing is resolved
    once here (:func:`~cellst.postprocess.calibrate.effective_postprocess`) and passed as is.
    """
    import tifffile

    from cellst.config import IngestConfig
    from cellst.fs import lock_beside, writer_record
    from cellst.inference.batch import predict
    from cellst.postprocess.calibrate import effective_postprocess

    t0 = time.perf_counter()
    cfg = segment_cfg or SegmentConfig()
    ingest = ingest or IngestConfig()
    out = Path(out_dir) if out_dir is not None else None
    ckpt = check_checkpoint_dir(checkpoint)
    try:
        post, note = effective_postprocess(post, ckpt)
    except Exception as exc:  # noqa: BLE001 - an unreadable postprocess.json
        raise SegmentError(first_line(exc)) from None
    result = SegmentResult(mode="ray", postprocess=post.model_dump(), postprocess_note=note)
    groups: dict[tuple[Path, Path], list[Path]] = {}
    tables: list[tuple[Path, str]] = []  # (folder, name) of each image written
    for p in paths:
        groups.setdefault((p.parent, output_dir(p, out)), []).append(p)
    for (folder, dest), members in groups.items():
        dest.mkdir(parents=True, exist_ok=True)
        for gone in remove_orphan_temp_dirs(STAGING_PREFIX, dest):  # of a run killed earlier
            for own in (lock_beside(gone), writer_record(gone)):
                own.unlink(missing_ok=True)
        staging = process_temp_dir(STAGING_PREFIX, dest)
        try:
            run = predict(
                ckpt,
                folder,
                out_dir=staging,
                ids=[image_name(p) for p in members],
                infer=infer,
                post=post,
                resources=resources,
                calibrated=False,
                skip_bad=True,
                progress=progress,
                ray_address=ray_address,
                ingest=ingest,
            )
            by_stem = {image_name(p): p for p in members}
            result.failed += [(str(by_stem.get(i, i)), why) for i, why in run.failed]
            for name in run.written:
                path = by_stem[name]
                try:
                    label = filter_instances(
                        tifffile.imread(staging / label_file_name(name)),
                        cfg.exclude_on_edges,
                        cfg.min_size,
                    )
                    raw = image = None
                    exports = cfg.save_png or cfg.save_csv or cfg.save_geojson
                    if exports or cfg.save_ome_zarr or not label.any():
                        raw, image = _read(path, ingest)  # an empty label: is it blank?
                    result.outputs += write_outputs(
                        name, dest, label, raw, image, cfg, result, path
                    )
                    result.written.append(name)
                    tables.append((dest, name))
                except Exception as exc:  # noqa: BLE001 - this image fails, not the run
                    why = first_line(exc)
                    result.failed.append((str(path), why if str(path) in why else f"{path}: {why}"))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            for own in (lock_beside(staging), writer_record(staging)):  # predict's, ours alone
                own.unlink(missing_ok=True)
    result.outputs += _finish_tables(tables, cfg, result.removed)
    result.seconds = time.perf_counter() - t0
    return result


def segment(
    inputs: Iterable[str | os.PathLike[str]],
    checkpoint: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    infer: InferenceConfig | None = None,
    post: PostprocessConfig | None = None,
    segment_cfg: SegmentConfig | None = None,
    ingest: IngestConfig | None = None,
    resources: PredictConfig | None = None,
    ray: bool | None = None,
    ray_address: str | None = None,
    device: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    on_start: Callable[[list[Path], bool], None] | None = None,
) -> SegmentResult:
    """Segment image files or folders of images with a checkpoint.

    Parameters
    ----------
    inputs : paths
        Image files and folders of images (see :func:`collect_images`).
    checkpoint : path
        A cellst checkpoint folder (``model.json`` + ``model.pt``, optional calibrated
        ``postprocess.json``).
    out_dir : path, optional
        Folder for every output; default: beside each input image.
    infer, post, segment_cfg, ingest, resources : config sections, optional
        Inference (sliding window, TTA, rescaling) and post-processing: for each, the
        explicitly set fields win over what the checkpoint was calibrated with, which wins
        over the defaults; outputs and filters, normalisation, Ray resources.
    ray : bool, optional
        True: run on Ray; False: in this process; None: decide by the job's size
        (:func:`use_ray`).
    device : str, optional
        In-process torch device (default CUDA when available).
    overwrite : bool
        Replace files at the output names that cellst did not write (see
        :func:`check_outputs`); by default such a run is refused.
    on_start : callable, optional
        Called with the images and the Ray decision before the model is loaded.

    Raises
    ------
    SegmentError
        Before anything is written, for a request that cannot run. Images that fail
        later are in the result's ``failed``.
    """
    from cellst.postprocess.calibrate import effective_inference

    paths = collect_images(inputs, out_dir)
    ckpt = check_checkpoint_dir(checkpoint)
    try:  # the inference settings the checkpoint was calibrated with, where not given
        infer, infer_note = effective_inference(infer, ckpt)
    except Exception as exc:  # noqa: BLE001 - an unreadable postprocess.json
        raise SegmentError(first_line(exc)) from None
    cfg = segment_cfg or SegmentConfig()
    from cellst.fs import writing_folder

    check_outputs(paths, out_dir, cfg, overwrite)
    with contextlib.ExitStack() as held:  # each output folder: one writer at a time
        out = Path(out_dir) if out_dir is not None else None
        for folder in dict.fromkeys(output_dir(p, out) for p in paths):
            held.enter_context(writing_folder(folder, "cellst segment or predict"))
        distributed = use_ray(paths, cfg) if ray is None else ray
        if distributed and device is not None:  # Ray's actors take predict.* resources
            raise SegmentError(
                f"--device {device} applies to segmenting in this process, but "
                f"{'--ray was given' if ray else f'{len(paths)} image(s) go to Ray'}: pass "
                "--in-process to use it, or --set predict.num_gpus_per_actor=1 for GPU actors"
            )
        if on_start is not None:
            on_start(paths, distributed)
        common: dict[str, Any] = {
            "out_dir": out_dir,
            "infer": infer,
            "post": post,
            "segment_cfg": cfg,
            "ingest": ingest,
            "progress": progress,
        }
        if distributed:
            result = segment_on_ray(
                paths, checkpoint, resources=resources, ray_address=ray_address, **common
            )
        else:
            result = segment_in_process(paths, checkpoint, device=device, **common)
        if infer_note:
            result.postprocess_note += f"; {infer_note}"
        return result
