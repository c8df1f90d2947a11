"""Ground truth and predictions from either folders of ``NAME_label.tiff`` or cellst stores.

``cellst evaluate`` accepts both on either side: a store's labelled items of one split as
ground truth, a store's pseudo-label set as prediction, or challenge-format folders.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from cellst.data.layout import is_store, name_key
from cellst.metrics.report import evaluate_pairs, load_label_folder, read_labels, write_report


@dataclass
class LabelSource:
    """Label maps by item id, with modalities where known."""

    description: str
    loaders: dict[str, Callable[[], np.ndarray]]
    modalities: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # ids in one Unicode form (cellst.data.layout.name_key), so an NFD-named ground
        # truth pairs with an NFC-named prediction
        self.loaders = {name_key(k): v for k, v in self.loaders.items()}
        self.modalities = {name_key(k): v for k, v in self.modalities.items()}


def _folder_modalities(folder: Path) -> dict[str, str]:
    """``modalities.csv`` from the folder or up to two levels above (challenge layout),
    read as ``cellst ingest`` reads it (a bad row is a one-line error naming file and line)."""
    from cellst.data.modalities import MODALITIES_FILE, modalities_or_error

    for d in (folder, folder.parent, folder.parent.parent):
        table = d / MODALITIES_FILE
        if table.is_file():
            return modalities_or_error(table)
    return {}


def open_labels(
    path: str | Path, *, pseudo_set: str | None = None, split: str | None = None
) -> LabelSource:
    """Open a label source.

    Parameters
    ----------
    path : path
        A folder of label TIFFs, or a cellst store.
    pseudo_set : str, optional
        With a store: read this pseudo-label set instead of the ground-truth labels.
    split : str, optional
        With a store and ground-truth labels: only items of this split.
    """
    path = Path(path)
    if is_store(path):
        from cellst.data.store import CellStore, StoreError

        store = CellStore(path)
        mods = dict(zip(store.manifest["id"], store.manifest["modality"], strict=True))
        if pseudo_set is not None:
            store.pseudo_set(pseudo_set).check_current(store.manifest)
            ids = store.pseudo_items(pseudo_set)["id"].tolist()
            loaders = {i: (lambda i=i: store.pseudo_label(pseudo_set, i)) for i in ids}
            return LabelSource(f"{path} (pseudo-label set {pseudo_set})", loaders, mods)
        df = store.items(split=split, labeled=True)
        if df.empty:
            raise StoreError(f"store {path} has no labelled items in split {split!r}")
        loaders = {i: (lambda i=i: store.label(i)) for i in df["id"]}
        return LabelSource(f"{path} (split {split})", loaders, mods)
    if pseudo_set is not None:
        from cellst.data.store import StoreError

        raise StoreError(f"--pred-set needs a store, but {path} is a folder")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a folder of label TIFFs nor a cellst store")
    files = load_label_folder(path)
    loaders = {name: (lambda p=p: read_labels(p)) for name, p in files.items()}
    from cellst.data.modalities import match_modalities

    mods, _ = match_modalities(_folder_modalities(path), list(files))
    return LabelSource(str(path), loaders, mods)


def _nothing_to_score(g: LabelSource, p: LabelSource, pred: Path) -> str:
    """Why no prediction pairs with a ground-truth item: one line naming the prediction
    side (scoring it would print F1 0 for every image, as if the model had found nothing)."""
    first = sorted(g.loaders)[0]
    if p.loaders:
        return (
            f"none of the {len(p.loaders)} predictions in {p.description} names a ground-truth "
            f"image of {g.description} (e.g. {sorted(p.loaders)[0]!r} there, {first!r} here)"
        )
    hint = ""
    if pred.is_dir():
        others = sorted(f.name for f in pred.iterdir() if f.is_file() and "_label" in f.stem)
        if others:
            hint = f"; it holds {len(others)} other label file(s), e.g. {others[0]}: predictions are TIFF or PNG label files"
    return (
        f"no prediction label images in {p.description} (expected NAME_label.tiff for the "
        f"{len(g.loaders)} ground-truth images, e.g. {first}_label.tiff){hint}"
    )


def _label_folder_hint(folder: Path) -> str:
    """Where the labels of an ingest-layout folder are (``images/`` beside ``labels/``,
    or split folders holding them), for the message of a folder that holds none itself."""
    if not folder.is_dir():
        return ""

    def holds_labels(d: Path) -> bool:
        try:
            return bool(load_label_folder(d))  # the rule evaluate reads a folder by
        except ValueError:  # two files of one name: labels all the same
            return True

    found = sorted(
        d for d in [folder / "labels", *folder.glob("*/labels")] if d.is_dir() and holds_labels(d)
    )
    if not found:
        return ""
    more = f" (or {', '.join(str(d) for d in found[1:3])})" if len(found) > 1 else ""
    return f"; its labels are in {found[0]}{more}: pass that folder as --gt"


def evaluate_sources(
    gt: str | Path,
    pred: str | Path,
    out: str | Path | None = None,
    *,
    pred_set: str | None = None,
    gt_split: str | None = "test",
    count_boundary: bool = False,
    iou_threshold: float = 0.5,
    progress: bool = True,
    per_cell: bool = False,
) -> dict[str, Any]:
    """Score every ground-truth item against its prediction; write the report if ``out``.

    A ground-truth item without prediction scores F1 0 and is listed under ``missing``; a
    prediction that is a binary mask (:func:`cellst.data.images.binary_regions`) is scored
    as it is (one cell) and listed under ``binary`` with its number of regions; a ground
    truth that is one under ``binary_gt``. Maps that look like intensity images
    (:func:`cellst.data.images.scattered_values`) are listed under ``scattered["pred"]``
    and ``scattered["gt"]``.
    ``per_cell`` adds the per-cell match results (``cells.csv`` in ``out``).
    """
    if pred_set is None and is_store(pred):
        from cellst.data.store import CellStore, StoreError

        sets = CellStore(pred, lease=False).pseudo_sets()
        raise StoreError(
            f"--pred {pred} is a store: name the pseudo-label set to score with --pred-set "
            f"({', '.join(sets) if sets else 'it holds none'}); its ground truth is --gt's side"
        )
    g = open_labels(gt, split=gt_split)
    p = open_labels(pred, pseudo_set=pred_set)
    if not g.loaders:
        raise FileNotFoundError(
            f"no ground-truth label images in {g.description}{_label_folder_hint(Path(gt))}"
        )
    if not set(p.loaders) & set(g.loaders):
        raise FileNotFoundError(_nothing_to_score(g, p, Path(pred)))
    modalities = {**p.modalities, **g.modalities}
    binary: dict[str, int] = {}

    from cellst.data.images import binary_regions, scattered_values

    binary_gt: dict[str, int] = {}
    scattered: dict[str, dict[str, tuple[int, int]]] = {"pred": {}, "gt": {}}

    def pairs() -> Iterator[tuple[str, np.ndarray, np.ndarray | None, str | None]]:
        for name in tqdm(sorted(g.loaders), desc="evaluate", unit="img", disable=not progress):
            gt_map = g.loaders[name]()
            pred_map = p.loaders[name]() if name in p.loaders else None
            if pred_map is not None and pred_map.shape != gt_map.shape:
                raise ValueError(
                    f"prediction {name!r} in {p.description} has shape {pred_map.shape} but "
                    f"its ground truth in {g.description} has shape {gt_map.shape}"
                )
            if pred_map is not None and (regions := binary_regions(pred_map)):
                binary[name] = regions
            if regions := binary_regions(gt_map):
                binary_gt[name] = regions
            for side, a_map in (("pred", pred_map), ("gt", gt_map)):
                if a_map is not None and (found := scattered_values(a_map)):
                    scattered[side][name] = found
            yield name, gt_map, pred_map, modalities.get(name)

    report = evaluate_pairs(
        pairs(), count_boundary=count_boundary, iou_threshold=iou_threshold, per_cell=per_cell
    )
    report["extra"] = sorted(set(p.loaders) - set(g.loaders))
    report["binary"] = binary  # name -> regions of predictions that are binary masks
    report["binary_gt"] = binary_gt  # ... and of ground-truth maps
    # name -> (values, pieces) of maps that look like intensity images, per side
    report["scattered"] = scattered
    report["gt"] = g.description
    report["pred"] = p.description
    if out is not None:
        write_report(report, out)
    return report
