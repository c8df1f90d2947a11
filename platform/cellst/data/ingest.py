"""``cellst ingest``: challenge-layout image folders into a cellst store, in parallel on Ray.

Accepted layouts
----------------
* The challenge layout: sub-folders ``labeled/``, ``unlabeled/``, ``test/`` (or the official
  names ``Training-labeled/``, ``train-unlabeled-*/``, ``Tuning/``), each holding ``images/``
  and, where labelled, ``labels/NAME_label.tiff``; unlabelled folders may hold the images
  directly.
* A plain folder of images (split ``unlabeled`` unless ``split=`` says otherwise), with
  ``NAME_label.tiff`` files beside them or in ``labels/`` making them labelled.

An optional ``modalities.csv`` (columns ``name,modality``) at the source root names each
image's modality.

Guarantees
----------
* Every problem is found before anything is committed, and reported with the file's path.
* Arrays are written to a staging folder beside the store and the new manifest replaces the
  old one by an atomic rename, so a failed or interrupted ingest leaves the previous store
  readable and unchanged.
* Re-running on the same source only decodes new or changed files (by sha256).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import ray
from tqdm.auto import tqdm

from cellst.config import IngestConfig
from cellst.data.images import (
    IMAGE_SUFFIXES,
    LABEL_SUFFIX,
    ImageFormatError,
    file_sha256,
    normalize_image,
    read_array,
    validate_label,
)
from cellst.data.store import (
    MANIFEST,
    MANIFEST_COLUMNS,
    atomic_write_bytes,
    atomic_write_parquet,
    init_store,
    remove_tree,
    store_lock,
    write_array,
)
from cellst.raycluster import as_completed, ensure_ray

REPORT = "ingest_report.json"


class IngestError(ValueError):
    """Ingest refused the source; ``problems`` lists ``(path, reason)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = [f"ingest found {len(problems)} problem(s); nothing was written:"]
        lines += [f"  {path}: {why}" for path, why in problems]
        lines.append("Fix them, or pass --skip-bad to ingest the rest and report these.")
        super().__init__("\n".join(lines))


@dataclass
class SourceItem:
    """One image (and maybe its label) found in the source tree."""

    id: str
    split: str
    image: str
    label: str = ""
    modality: str = "unknown"


@dataclass
class IngestResult:
    """What an ingest did."""

    store: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.added)} added, {len(self.updated)} updated, "
            f"{len(self.unchanged)} unchanged, {len(self.removed)} removed, "
            f"{len(self.skipped)} skipped"
        )


# ----------------------------------------------------------------------------- scanning
def _split_name(folder: str) -> str:
    low = folder.lower()
    if "unlabel" in low:
        return "unlabeled"
    if "test" in low or "tuning" in low or "val" in low:
        return "test"
    if "label" in low or "train" in low:
        return "labeled"
    return re.sub(r"[^a-z0-9_-]+", "_", low)


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES


def _label_stem(p: Path) -> str | None:
    stem = p.stem
    return stem[: -len(LABEL_SUFFIX)] if stem.endswith(LABEL_SUFFIX) else None


def _scan_folder(
    images_dir: Path, labels_dir: Path | None, split: str, problems: list[tuple[str, str]]
) -> list[SourceItem]:
    files = sorted(p for p in images_dir.iterdir() if _is_image(p))
    label_files = [p for p in files if _label_stem(p) is not None]
    image_files = [p for p in files if _label_stem(p) is None]
    if labels_dir is not None and labels_dir.is_dir():
        for p in sorted(q for q in labels_dir.iterdir() if _is_image(q)):
            if _label_stem(p) is None:
                problems.append((str(p), "label file name must be NAME_label.tiff"))
            else:
                label_files.append(p)
    labels: dict[str, list[Path]] = defaultdict(list)
    for p in label_files:
        labels[_label_stem(p)].append(p)  # type: ignore[index]
    items = [SourceItem(p.stem, split, str(p.absolute())) for p in image_files]
    names = {it.id for it in items}
    labelled_split = bool(label_files) or (labels_dir is not None and labels_dir.is_dir())
    for stem, ps in sorted(labels.items()):
        if len(ps) > 1:
            problems.append(
                (str(ps[0]), f"label {stem!r} appears {len(ps)} times: {[str(p) for p in ps]}")
            )
        if stem not in names:
            problems.append(
                (str(ps[0]), f"label without an image (no {stem}.<ext> in {images_dir})")
            )
    for it in items:
        if it.id in labels:
            it.label = str(labels[it.id][0].absolute())
        elif labelled_split and split != "test":
            where = labels_dir if labels_dir is not None else images_dir
            problems.append(
                (it.image, f"labelled image without a label (expected {where}/{it.id}_label.tiff)")
            )
    return items


def scan_source(
    src: str | Path, split: str | None = None, modality: str | None = None
) -> tuple[list[SourceItem], list[tuple[str, str]]]:
    """Find every image (and label) under ``src``.

    Returns
    -------
    items, problems
        The items found and a list of ``(path, reason)`` for layout problems: labels
        without images, labelled images without labels, duplicate ids, an empty source.
    """
    root = Path(src)
    problems: list[tuple[str, str]] = []
    if not root.is_dir():
        return [], [(str(root), "source folder does not exist")]
    items: list[SourceItem] = []
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [
        d for d in subdirs if (d / "images").is_dir() or any(_is_image(p) for p in d.iterdir())
    ]
    direct = [p for p in root.iterdir() if _is_image(p)]
    if direct or not split_dirs:
        labels_dir = root / "labels" if (root / "labels").is_dir() else None
        items += _scan_folder(root, labels_dir, split or "unlabeled", problems)
        split_dirs = [d for d in split_dirs if d.name != "labels"]
    for d in split_dirs:
        images_dir = d / "images" if (d / "images").is_dir() else d
        labels_dir = d / "labels" if (d / "labels").is_dir() else None
        items += _scan_folder(images_dir, labels_dir, split or _split_name(d.name), problems)
    by_id: dict[str, list[SourceItem]] = defaultdict(list)
    for it in items:
        by_id[it.id].append(it)
    for item_id, its in sorted(by_id.items()):
        if len(its) > 1:
            problems.append((its[1].image, f"duplicate id {item_id!r}: also {its[0].image}"))
    if not items and not problems:
        problems.append((str(root), f"no images found (looked for {', '.join(IMAGE_SUFFIXES)})"))
    table = root / "modalities.csv"
    names = _read_modalities(table, problems) if table.is_file() else {}
    for it in items:
        it.modality = modality or names.get(it.id, "unknown")
    return items, problems


def _read_modalities(table: Path, problems: list[tuple[str, str]]) -> dict[str, str]:
    with open(table, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"name", "modality"} <= set(reader.fieldnames):
            problems.append((str(table), "must have the columns name,modality"))
            return {}
        return {Path(r["name"]).stem: r["modality"].strip() or "unknown" for r in reader}


# ----------------------------------------------------------------------------- workers
def _norm_string(cfg: IngestConfig) -> str:
    return f"percentile-nonzero:{cfg.low_percentile:g}-{cfg.high_percentile:g}->uint8"


def _content_key(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


@ray.remote(num_cpus=1, max_retries=2)
def _ingest_one(item: SourceItem, staging: str, previous: dict | None, cfg: IngestConfig) -> dict:
    """Decode, check, normalise and stage one item. Returns a manifest row or a problem."""
    try:
        img_sha = file_sha256(item.image)
        lab_sha = file_sha256(item.label) if item.label else ""
        norm = _norm_string(cfg)
        if previous is not None and (
            previous["source_sha256"],
            previous["label_sha256"],
            previous["normalization"],
        ) == (img_sha, lab_sha, norm):
            return {"status": "unchanged", "row": previous}
        raw = read_array(item.image)
        image = normalize_image(raw, cfg.low_percentile, cfg.high_percentile)
        h, w = image.shape[:2]
        image_array = f"images/{item.id}.{_content_key(img_sha, norm, str(cfg.chunk))}"
        write_array(Path(staging) / image_array, image, cfg.chunk, cfg.compression_level)
        label_array, n_inst = "", -1
        if item.label:
            label = validate_label(read_array(item.label), (h, w), item.label)
            n_inst = int(label.max()) if label.size else 0
            label_array = f"labels/{item.id}.{_content_key(lab_sha, str(cfg.chunk))}"
            write_array(Path(staging) / label_array, label, cfg.chunk, cfg.compression_level)
        row = {
            "id": item.id,
            "split": item.split,
            "modality": item.modality,
            "height": h,
            "width": w,
            "source_path": item.image,
            "source_sha256": img_sha,
            "label_path": item.label,
            "label_sha256": lab_sha,
            "n_instances": n_inst,
            "normalization": norm,
            "image_array": image_array,
            "label_array": label_array,
        }
        return {"status": "new" if previous is None else "updated", "row": row}
    except ImageFormatError as exc:
        path, _, why = str(exc).partition(": ")
        return {"status": "bad", "problem": (path, why)}
    except (OSError, ValueError) as exc:
        return {"status": "bad", "problem": (item.image, f"{type(exc).__name__}: {exc}")}


# ----------------------------------------------------------------------------- driver
def _commit(store: Path, staging: Path, manifest: pd.DataFrame) -> None:
    """Move staged arrays into the store, then atomically switch the manifest."""
    init_store(store)
    for group in ("images", "labels"):
        src_dir = staging / group
        if not src_dir.is_dir():
            continue
        (store / group).mkdir(exist_ok=True)
        for arr in src_dir.iterdir():
            target = store / group / arr.name
            if target.exists():  # same content key: identical bytes already stored
                remove_tree(arr)
            else:
                os.rename(arr, target)
    atomic_write_parquet(manifest[list(MANIFEST_COLUMNS)], store / MANIFEST)


def _garbage_collect(store: Path, manifest: pd.DataFrame) -> None:
    """Remove arrays no longer referenced by the committed manifest."""
    live = set(manifest["image_array"]) | set(manifest["label_array"])
    for group in ("images", "labels"):
        d = store / group
        if d.is_dir():
            for arr in d.iterdir():
                if f"{group}/{arr.name}" not in live:
                    remove_tree(arr)


def ingest(
    src: str | Path,
    store: str | Path,
    cfg: IngestConfig | None = None,
    *,
    split: str | None = None,
    modality: str | None = None,
    skip_bad: bool = False,
    prune: bool = False,
    progress: bool = True,
) -> IngestResult:
    """Ingest ``src`` into ``store`` (created if needed). See the module docstring.

    Parameters
    ----------
    split : str, optional
        Split for a plain folder of images (default ``unlabeled``) or to force for all.
    modality : str, optional
        Modality for every image, overriding ``modalities.csv``.
    skip_bad : bool
        Ingest the good files and report the bad ones in ``STORE/ingest_report.json``
        instead of refusing the whole source.
    prune : bool
        Drop items whose source files are no longer under ``src``.

    Raises
    ------
    IngestError
        Listing every problem with its file, when ``skip_bad`` is false.
    """
    cfg = cfg or IngestConfig()
    store = Path(store).absolute()
    items, problems = scan_source(src, split, modality)
    if problems and not skip_bad:
        raise IngestError(problems)
    bad_paths = {p for p, _ in problems}
    items = [it for it in items if it.image not in bad_paths and it.label not in bad_paths]
    if not items:
        raise IngestError(problems or [(str(src), "no images to ingest")])

    lock_root = store.parent / f".{store.name}.lock"
    staging = store.parent / f".{store.name}.staging-{uuid.uuid4().hex[:8]}"
    result = IngestResult(store=str(store))
    with store_lock(lock_root):
        for stale in store.parent.glob(f".{store.name}.staging-*"):
            remove_tree(stale)  # left by a killed ingest; we hold the lock, so it is dead
        old = pd.read_parquet(store / MANIFEST) if (store / MANIFEST).is_file() else None
        prev_rows = {r["id"]: r for r in old.to_dict("records")} if old is not None else {}
        try:
            ensure_ray()
            cfg_ref = ray.put(cfg)
            refs = [
                _ingest_one.remote(it, str(staging), prev_rows.get(it.id), cfg_ref) for it in items
            ]
            outcomes = []
            bar = tqdm(total=len(refs), desc="ingest", unit="img", disable=not progress)
            for out in as_completed(refs):
                outcomes.append(out)
                bar.update(1)
            bar.close()
            bad = [o["problem"] for o in outcomes if o["status"] == "bad"]
            if bad and not skip_bad:
                raise IngestError(sorted(problems + bad))
            by_item = {it.id: it for it in items}
            rows: dict[str, dict] = {}
            for o in outcomes:
                if o["status"] == "bad":
                    continue
                row = dict(o["row"])
                it = by_item[row["id"]]
                row.update(
                    split=it.split, modality=it.modality, source_path=it.image, label_path=it.label
                )
                rows[row["id"]] = row
                {"new": result.added, "updated": result.updated, "unchanged": result.unchanged}[
                    o["status"]
                ].append(row["id"])
            for item_id, row in prev_rows.items():
                if item_id not in rows:
                    if prune:
                        result.removed.append(item_id)
                    else:
                        rows[item_id] = row
            manifest = pd.DataFrame(list(rows.values()), columns=list(MANIFEST_COLUMNS))
            manifest = manifest.sort_values(["split", "id"]).reset_index(drop=True)
            _commit(store, staging, manifest)
        finally:
            remove_tree(staging)
        _garbage_collect(store, manifest)
        result.skipped = sorted(problems + bad)
        report = {**asdict(result), "config": cfg.model_dump(), "source": str(Path(src).absolute())}
        atomic_write_bytes(store / REPORT, json.dumps(report, indent=2).encode())
    return result


def summarize_manifest(store: str | Path) -> pd.DataFrame:
    """Items per split and modality (for the CLI's closing table)."""
    df = pd.read_parquet(Path(store) / MANIFEST)
    return df.pivot_table(
        index="modality", columns="split", values="id", aggfunc="count", fill_value=0
    )
