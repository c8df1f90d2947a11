"""Scoring folders of label images and writing the challenge report (JSON, CSV, table).

A ground-truth folder and a prediction folder hold one label TIFF per image, named
``NAME_label.tiff`` (``NAME_label.tif``, ``NAME_label.png``, ``NAME.tif`` and ``NAME.tiff`` are
accepted too).
Images are matched by ``NAME``. Every ground-truth image is scored; a missing prediction counts
as an empty one (F1 0) and is listed under ``"missing"``. The challenge score is the mean F1
over images (key ``"f1"``).

Note: the official script iterates over the *prediction* folder, so a missing prediction is
silently skipped there; here it scores 0, as the challenge leaderboard does for a case that
was not submitted.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellst.data.layout import name_key
from cellst.metrics.instance import (
    SCORE_KEYS,
    _as_labels,
    cell_matches,
    image_scores,
    summarize,
)

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "CSV_COLUMNS",
    "evaluate_folders",
    "evaluate_pairs",
    "format_table",
    "load_label_folder",
    "write_report",
]

#: Columns of ``metrics.csv``, one row per image.
CSV_COLUMNS = (
    "id",
    "modality",
    "missing",
    "n_gt",
    "n_pred",
    "tp",
    "fp",
    "fn",
    "precision",
    "recall",
    "f1",
    "dq",
    "sq",
    "pq",
)

#: NAME_label.tif(f) or .png (as ingest takes labels), or a plain NAME.tif(f); an OME-TIFF's
#: ``.ome`` is not part of NAME (``X.ome.tif``, ``X_label.ome.tif`` and ``X.ome_label.tiff``,
#: what cellst wrote before, are all image ``X``, as :func:`cellst.data.layout.image_name`)
_NAME_RE = re.compile(
    r"^(?P<name>.+?)(?:\.ome)?(?:(?P<label>_label)(?:\.ome)?\.(?:tiff?|png)|\.tiff?)$",
    re.IGNORECASE,
)


def evaluate_pairs(
    pairs: Iterable[tuple[str, np.ndarray, np.ndarray | None, str | None]],
    count_boundary: bool = False,
    iou_threshold: float = 0.5,
    per_cell: bool = False,
) -> dict[str, Any]:
    """Score image pairs and summarise them.

    Parameters
    ----------
    pairs : iterable of (id, gt, pred, modality)
        ``gt`` and ``pred`` are 2-D label images of the same shape; ``pred=None`` means the
        prediction is missing (scored as an empty prediction and listed under ``"missing"``).
        ``modality`` may be None.
    count_boundary : bool, optional
        Keep the cells touching the image border (official ``--count_bd_cells``).
    iou_threshold : float, optional
        IoU needed for a true positive.

    Returns
    -------
    dict
        The :func:`~cellst.metrics.instance.summarize` block (``f1`` is the mean F1), plus
        ``per_modality``, ``images`` (one row per image, in input order), ``missing`` (ids),
        ``count_boundary`` and ``iou_threshold``; with ``per_cell`` also ``cells``, the
        :func:`~cellst.metrics.instance.cell_matches` rows of every image with its ``id``.
    """
    rows: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    missing: list[str] = []
    for image_id, gt, pred, modality in pairs:
        image_id = str(image_id)
        gt = np.asarray(gt)
        is_missing = pred is None
        if is_missing:
            pred = np.zeros(gt.shape, dtype=np.uint8)
            missing.append(image_id)
        pred = np.asarray(pred)
        if pred.shape != gt.shape:
            raise ValueError(
                f"image {image_id!r}: prediction shape {pred.shape} differs from "
                f"ground-truth shape {gt.shape}"
            )
        scores = image_scores(gt, pred, count_boundary=count_boundary, iou_threshold=iou_threshold)
        rows.append({"id": image_id, "modality": modality, "missing": is_missing, **scores})
        if per_cell:
            cells.extend(
                {"id": image_id, **row}
                for row in cell_matches(gt, pred, count_boundary, iou_threshold)
            )
    report = summarize(rows, by="modality")
    if per_cell:
        report["cells"] = cells
    report["images"] = rows
    report["missing"] = missing
    report["count_boundary"] = bool(count_boundary)
    report["iou_threshold"] = float(iou_threshold)
    return report


def load_label_folder(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Map image names to the label TIFFs of a folder.

    ``NAME_label.tiff``, ``NAME_label.tif``, ``NAME_label.png`` (a labelling tool's PNG,
    palette or 16-bit, as ingest reads it), ``NAME.tiff`` and ``NAME.tif`` map to ``NAME``.
    Other files and hidden files are ignored. A folder where some ``NAME.tif(f)`` has a
    ``NAME_label`` file beside it holds images beside their labels (``cellst segment``'s
    default output): there only the ``_label`` files are labels, and an image whose label
    is absent is never read as one.

    Parameters
    ----------
    folder : path
        Directory to list (not recursive).

    Returns
    -------
    dict
        ``{NAME: path}`` sorted by name, each NAME in Unicode NFC
        (:func:`cellst.data.layout.name_key`).

    Raises
    ------
    NotADirectoryError
        If ``folder`` is not a directory.
    ValueError
        If two files map to the same name.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    found: dict[str, Path] = {}
    matches = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        match = _NAME_RE.match(path.name)
        if match is not None:
            matches.append((path, match))
    labelled = {name_key(m.group("name")) for _, m in matches if m.group("label")}
    if any(not m.group("label") and name_key(m.group("name")) in labelled for _, m in matches):
        matches = [(p, m) for p, m in matches if m.group("label")]  # the rest are images
    for path, match in matches:
        name = name_key(match.group("name"))  # one Unicode form: NFD and NFC names pair
        if name in found:
            raise ValueError(
                f"{found[name].name} and {path.name} in {root} both name image {name!r}"
            )
        found[name] = path
    return dict(sorted(found.items()))


def read_labels(path: Path) -> np.ndarray:
    """Read a 2-D label image (TIFF); a clear error naming the file if it is not one
    (:func:`cellst.data.images.read_array`: a truncated or corrupt file says so)."""
    from cellst.data.images import read_array

    arr = read_array(path, labels=True)
    if arr.ndim > 2:
        arr = arr.reshape([n for n in arr.shape if n != 1] or [1, 1])
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D label image, got shape {arr.shape}")
    try:  # checked here, where the file is known (scoring names only "gt" or "pred")
        _as_labels(arr, str(path))
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    return arr


def evaluate_folders(
    gt_dir: str | os.PathLike[str],
    pred_dir: str | os.PathLike[str],
    modalities: Mapping[str, str] | None = None,
    count_boundary: bool = False,
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """Score every ground-truth image of ``gt_dir`` against its prediction in ``pred_dir``.

    Parameters
    ----------
    gt_dir, pred_dir : path
        Folders of label TIFFs (see :func:`load_label_folder`).
    modalities : mapping, optional
        ``{NAME: modality}`` for the per-modality means; unknown names have modality None.
    count_boundary : bool, optional
        Keep the cells touching the image border.
    iou_threshold : float, optional
        IoU needed for a true positive.

    Returns
    -------
    dict
        As :func:`evaluate_pairs`, plus ``extra`` (predictions without ground truth),
        ``gt_dir`` and ``pred_dir``.

    Raises
    ------
    ValueError
        If ``gt_dir`` has no label image, or a prediction's shape differs from its ground
        truth's (the message names both files and shapes).
    """
    gt_files = load_label_folder(gt_dir)
    if not gt_files:
        raise ValueError(f"no label images (*.tif, *.tiff) in {gt_dir}")
    pred_files = load_label_folder(pred_dir)
    modalities = dict(modalities or {})

    def pairs() -> Iterator[tuple[str, np.ndarray, np.ndarray | None, str | None]]:
        for name, gt_path in gt_files.items():
            gt = read_labels(gt_path)
            pred = None
            if name in pred_files:
                pred = read_labels(pred_files[name])
                if pred.shape != gt.shape:
                    raise ValueError(
                        f"prediction {pred_files[name]} has shape {pred.shape} but its ground "
                        f"truth {gt_path} has shape {gt.shape}"
                    )
            yield name, gt, pred, modalities.get(name)

    report = evaluate_pairs(pairs(), count_boundary=count_boundary, iou_threshold=iou_threshold)
    report["extra"] = sorted(set(pred_files) - set(gt_files))
    report["gt_dir"] = str(gt_dir)
    report["pred_dir"] = str(pred_dir)
    return report


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


#: columns of the per-cell match table (``cells.csv``)
CELL_COLUMNS = ("id", "gt_label", "pred_label", "iou", "matched")


def _is_cellst_metrics_json(path: Path) -> bool:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(doc, dict) and {"f1", "count", "images"} <= set(doc)


def foreign_report_files(out_dir: str | os.PathLike[str], per_cell: bool = False) -> list[Path]:
    """The files at :func:`write_report`'s names in ``out_dir`` that it did not write (a
    user's own ``metrics.csv``, say), which writing the report would replace.

    ``cells.csv`` counts only with ``per_cell`` (the report writes it only then): without
    it, ``cellst segment --save-csv``'s table of the same name in that folder stays as it is.
    """
    from cellst.provenance import csv_begins_with

    out = Path(out_dir)
    ours = {
        "metrics.json": _is_cellst_metrics_json,
        "metrics.csv": lambda p: csv_begins_with(p, CSV_COLUMNS),
    }
    if per_cell:
        ours["cells.csv"] = lambda p: csv_begins_with(p, CELL_COLUMNS)
    return [
        out / name
        for name, check in ours.items()
        if (out / name).exists() and not check(out / name)
    ]


def write_report(report: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``metrics.json`` (the whole report) and ``metrics.csv`` (one row per image),
    and ``cells.csv`` when the report has its cells (else an earlier report's is removed;
    ``cellst segment``'s table of that name, of other columns, stays).

    Each file is written to a temporary file in ``out_dir`` and moved into place with
    :func:`os.replace`, so a reader never sees a partial file.

    Parameters
    ----------
    report : mapping
        As returned by :func:`evaluate_pairs` or :func:`evaluate_folders`.
    out_dir : path
        Created if needed.

    Returns
    -------
    dict
        ``{"json": path, "csv": path}``.
    """
    from cellst.fs import atomic_write_texts
    from cellst.provenance import csv_begins_with

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "metrics.json"
    csv_path = out / "metrics.csv"
    summary = {k: v for k, v in report.items() if k != "cells"}  # cells go to cells.csv
    texts = {json_path: json.dumps(summary, indent=2, default=_json_default) + "\n"}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in report.get("images", []):
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    texts[csv_path] = buf.getvalue()
    paths = {"json": json_path, "csv": csv_path}
    if "cells" in report:  # per-cell match results: which predicted cell each cell got
        buf = io.StringIO()
        writer = csv.DictWriter(
            buf, fieldnames=CELL_COLUMNS, extrasaction="ignore", lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(report["cells"])
        paths["cells"] = out / "cells.csv"
        texts[paths["cells"]] = buf.getvalue()
    # every file whole before any replaces an earlier report's: a full disk while writing
    # the large cells.csv left this report's metrics.json beside the last one's CSVs
    atomic_write_texts(texts)
    stale_cells = out / "cells.csv"
    if "cells" not in report and csv_begins_with(stale_cells, CELL_COLUMNS):
        stale_cells.unlink()  # an earlier report's: it would pass for this one's
    return paths


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_table(report: Mapping[str, Any]) -> Table:
    """A :class:`rich.table.Table` of the mean scores, one row per modality and one overall."""
    from rich.table import Table

    missing = report.get("missing") or []
    title = f"Cell segmentation F1 at IoU >= {report.get('iou_threshold', 0.5):g}"
    if missing:
        title += f" ({len(missing)} missing prediction{'s' if len(missing) > 1 else ''})"
    table = Table(title=title)
    table.add_column("modality")
    table.add_column("images", justify="right")
    table.add_column("F1", justify="right")
    table.add_column("F1 median", justify="right")
    for key in SCORE_KEYS[1:]:
        table.add_column(key if key in ("precision", "recall") else key.upper(), justify="right")

    def add(name: str, block: Mapping[str, Any], **style: Any) -> None:
        cells = [name, str(block.get("count", 0)), _fmt(block.get("f1"))]
        cells.append(_fmt(block.get("f1_median")))
        cells += [_fmt(block.get(key)) for key in SCORE_KEYS[1:]]
        table.add_row(*cells, **style)

    for name, block in (report.get("per_modality") or {}).items():
        add(name, block)
    add("all", report, style="bold")
    return table
