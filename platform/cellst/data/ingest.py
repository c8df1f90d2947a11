"""``cellst ingest``: challenge-layout image folders into a cellst store, in parallel on Ray.

Accepted layouts
----------------
* The challenge layout: sub-folders ``labeled/``, ``unlabeled/``, ``test/`` (or the official
  names ``Training-labeled/``, ``train-unlabeled-*/``, ``Tuning/``), each holding ``images/``
  and, where labelled, ``labels/NAME_label.tiff``; unlabelled folders may hold the images
  directly. An image name used in several of them (the Tuning images reuse Training-labeled's
  ``cell_00001`` ...) is prefixed with its folder's name outside the first (``tuning-cell_00001``).
* One such split folder by itself (``Training-labeled/`` with ``images/`` and ``labels/``),
  its split told by its name, else by whether it has labels.
* A plain folder of images (split ``unlabeled``, or ``labeled`` where ``NAME_label.tiff``
  files beside them or in ``labels/`` label them, unless ``split=`` says otherwise). A
  ``labeled`` split whose image has no label is a problem naming the image.

An optional ``modalities.csv`` (columns ``name,modality``) at the source root names each
image's modality.

Guarantees
----------
* Every problem is found before anything is committed, and reported with the file's path.
* Arrays are written to a staging folder beside the store and the new manifest replaces the
  old one by an atomic rename, so a failed or interrupted ingest leaves the previous store
  readable and unchanged.
* Re-running on the same source only decodes new or changed files (by sha256).
* A re-ingest never replaces a stored item with another folder's image of its name, nor
  unlabels a labelled item, unless asked (``replace``); no test image is byte for byte a
  training image (:func:`shared_across_test_split`).
* Arrays a reader of an older manifest version may hold are kept until no live reader
  holds that version (see :mod:`cellst.data.store`); a later ingest collects them.
* Ctrl-C stops the Ray tasks, removes the staging folder and leaves the store unchanged
  (:class:`IngestInterrupted`).
* A task writes only into a staging folder that exists (:class:`StagingGone`): one that
  outlives its ingest leaves nothing beside the store, and a staging removed under a
  running ingest refuses the ingest whole.
* Header checks come before decoding: a file that is empty, not an image, declares more
  than ``ingest.max_pixels`` pixels or is smaller than ``ingest.min_side`` is refused
  by name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import ray
from tqdm.auto import tqdm

from cellst import fs
from cellst.config import IngestConfig
from cellst.data.arrays import create_array, remove_tree, write_array
from cellst.data.images import (
    IMAGE_SUFFIXES,
    LABEL_SUFFIX,
    ImageFormatError,
    binary_regions,
    check_header,
    check_min_side,
    declared_pixels,
    declared_shape,
    label_tiff_record,
    normalize_image,
    normalize_tiff_tiled,
    read_array,
    validate_label,
)
from cellst.data.layout import (
    ARRAY_GROUPS,
    ZARR_META,
    image_name,
    is_store_root,
    name_key,
    without_ome,
)
from cellst.data.modalities import MODALITIES_FILE, match_modalities, read_modalities
from cellst.data.store import (
    MANIFEST,
    MANIFEST_COLUMNS,
    SPLITS,
    archive_manifest,
    atomic_write_bytes,
    collect_garbage,
    init_store,
    parse_manifest,
    store_lock,
    write_manifest,
)
from cellst.fingerprint import file_sha256
from cellst.fs import lock_beside
from cellst.raycluster import as_completed, check_shared_paths, ensure_ray

REPORT = "ingest_report.json"
#: a ground-truth label with one value over this many separate regions is a binary mask
#: (one cell split in two by a thin gap is not refused)
BINARY_LABEL_REGIONS = 3


class IngestError(ValueError):
    """Ingest refused the source; ``problems`` lists ``(path, reason)`` pairs.

    ``skippable`` is false when ``--skip-bad`` cannot help (no source, nothing to ingest),
    so the message does not suggest it.
    """

    def __init__(self, problems: list[tuple[str, str]], skippable: bool = True):
        self.problems = problems
        self.skippable = skippable
        lines = [f"ingest found {len(problems)} problem(s); nothing was written:"]
        lines += [f"  {path}: {why}" for path, why in problems]
        if skippable:
            lines.append("Fix them, or pass --skip-bad to ingest the rest and report these.")
        super().__init__("\n".join(lines))


class IngestInterrupted(KeyboardInterrupt):
    """Ctrl-C during an ingest, after its Ray tasks were stopped and its staging removed."""

    def __init__(self, committed: bool = False):
        self.committed = committed
        super().__init__(
            "interrupted after the new manifest was committed: the store holds the new version"
            if committed
            else "interrupted, the store is unchanged"
        )

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class SourceItem:
    """One image (and maybe its label) found in the source tree."""

    id: str
    split: str
    image: str
    label: str = ""
    modality: str = "unknown"
    #: the image's stem where its id had to differ from it (see :func:`scan_source`)
    renamed_from: str = ""


@dataclass
class IngestResult:
    """What an ingest did."""

    store: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: items whose image or label was skipped as bad this time, kept in the store as an
    #: earlier ingest stored them (they no longer match the files in the source)
    kept: list[str] = field(default_factory=list)
    #: ``(source image, item id)`` of images whose name another folder also uses
    renamed: list[tuple[str, str]] = field(default_factory=list)
    #: things the ingest went on despite (a ``modalities.csv`` row that names no image)
    warnings: list[str] = field(default_factory=list)
    #: the manifest version committed (``CellStore.version`` of the new store)
    version: str = ""
    #: what :func:`cellst.data.store.collect_garbage` removed or kept for live readers
    collected: dict = field(default_factory=dict)

    def summary(self) -> str:
        kept = f" ({len(self.kept)} kept as stored before)" if self.kept else ""
        return (
            f"{len(self.added)} added, {len(self.updated)} updated, "
            f"{len(self.unchanged)} unchanged, {len(self.removed)} removed, "
            f"{len(self.skipped)} skipped{kept}"
        )


# ----------------------------------------------------------------------------- scanning
def split_of_folder(folder: str) -> str:
    """The split a source sub-folder's name means, by its words (``-``, ``_``, ``.`` and
    spaces separate them): the challenge's ``Training-labeled``, ``train-unlabeled-*`` and
    ``Tuning`` / ``Testing``, or ``labeled``, ``unlabeled``, ``test*``, ``val*``, ``eval*``.
    Any other name is kept as its own split (``plates_untested`` is not a test split)."""
    low = folder.lower()
    words = [w for w in re.split(r"[^a-z0-9]+", low) if w]
    if "unlabel" in low:  # also inside a word: TrainUnlabeled
        return "unlabeled"
    if any(w.startswith(("test", "tuning", "val", "eval")) for w in words):
        return "test"
    if any(w.startswith(("label", "train")) for w in words):
        return "labeled"
    return re.sub(r"[^a-z0-9_-]+", "_", low)


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES


def _utf8_names(item: SourceItem, problems: list[tuple[str, str]]) -> bool:
    """Whether ``item``'s file names can be stored (the manifest, MLflow and the readers of
    the store take UTF-8 text); a problem naming the file, shown with U+FFFD where its
    bytes are not UTF-8, for each that cannot."""
    ok = True
    for path in (item.image, item.label):
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(path).decode("utf-8", "replace")
            problems.append((shown, "its name is not valid UTF-8 text; rename the file"))
            ok = False
    return ok


def _dangling_images(folder: Path, problems: list[tuple[str, str]]) -> None:
    """Name each link of an image name whose target is gone (``is_file()`` is False for
    it, so it would be left out unseen)."""
    for p in sorted(folder.iterdir()):
        if p.is_symlink() and not p.exists() and not p.name.startswith("."):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                problems.append((str(p), f"a link to a missing file ({os.readlink(p)})"))


def _label_stem(p: Path) -> str | None:
    """The image name a label file ``NAME_label.<ext>`` belongs to, or None for an image.
    An OME-TIFF's label may be ``X_label.tiff`` or, as cellst wrote it before it took the
    ``.ome`` off image names, ``X.ome_label.tiff``: both belong to ``X.ome.tif``."""
    stem = image_name(p)
    if not stem.endswith(LABEL_SUFFIX):
        return None
    return without_ome(stem[: -len(LABEL_SUFFIX)])


#: why a label file that cellst itself predicted is refused as ground truth
PREDICTED_LABEL = (
    "a prediction cellst wrote (cellst segment or predict), not ground truth: training and "
    "scoring on it would learn the model's own output; move the *_label.tiff files cellst "
    "wrote out of the folder (the images are then unlabelled), or save corrected labels "
    "under that name"
)


def _scan_folder(
    images_dir: Path, labels_dir: Path | None, split: str, problems: list[tuple[str, str]]
) -> list[SourceItem]:
    files = sorted(p for p in images_dir.iterdir() if _is_image(p))
    _dangling_images(images_dir, problems)
    label_files = [p for p in files if _label_stem(p) is not None]
    image_files = [p for p in files if _label_stem(p) is None]
    if labels_dir is not None and labels_dir.is_dir():
        _dangling_images(labels_dir, problems)
        for p in sorted(q for q in labels_dir.iterdir() if _is_image(q)):
            if _label_stem(p) is None:
                problems.append((str(p), "label file name must be NAME_label.tiff"))
            else:
                label_files.append(p)
    predicted = {p for p in label_files if label_tiff_record(p) is not None}
    for p in sorted(predicted):  # `cellst segment` or `predict` wrote it
        problems.append((str(p), PREDICTED_LABEL))
    label_files = [p for p in label_files if p not in predicted]
    refused = {name_key(_label_stem(p)) for p in predicted}  # type: ignore[arg-type]
    labels: dict[str, list[Path]] = defaultdict(list)  # by name_key: NFD and NFC names pair
    for p in label_files:
        labels[name_key(_label_stem(p))].append(p)  # type: ignore[arg-type]
    items = [SourceItem(image_name(p), split, str(p.absolute())) for p in image_files]
    names = {name_key(it.id) for it in items}
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
        if name_key(it.id) in labels:
            it.label = str(labels[name_key(it.id)][0].absolute())
        elif name_key(it.id) in refused:
            continue  # its only label is a prediction, named above
        elif (labelled_split or split == "labeled") and split != "test":
            where = labels_dir if labels_dir is not None else images_dir
            expected = Path(where) / f"{it.id}_label.tiff"
            folder = ", which is a folder, not a file" if expected.is_dir() else ""
            problems.append(
                (it.image, f"labelled image without a label (expected {expected}{folder})")
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
    if split is not None and split not in SPLITS:
        return [], [("--split", f"unknown split {split!r} (one of {', '.join(SPLITS)})")]
    if not root.is_dir():
        return [], [(str(root), source_problem(root))]
    folders: list[tuple[str, list[SourceItem]]] = []  # (split folder's name, its items)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [
        d for d in subdirs if (d / "images").is_dir() or any(_is_image(p) for p in d.iterdir())
    ]
    direct = [p for p in root.iterdir() if _is_image(p)]
    labels_dir = root / "labels" if (root / "labels").is_dir() else None
    if not direct and (root / "images").is_dir():
        # one split folder by itself (the challenge's Training-labeled/: images/, labels/)
        named = split_of_folder(root.name)
        implied = named if named in SPLITS else "labeled" if labels_dir else "unlabeled"
        found = _scan_folder(root / "images", labels_dir, split or implied, problems)
        folders.append((root.name, found))
        split_dirs = [d for d in split_dirs if d.name not in ("images", "labels")]
    elif direct or not split_dirs:
        # a plain folder: labels beside the images or in labels/ make them labelled
        has_labels = labels_dir is not None or any(
            _label_stem(p) and label_tiff_record(p) is None for p in direct
        )
        implied = "labeled" if has_labels else "unlabeled"
        found = _scan_folder(root, labels_dir, split or implied, problems)
        folders.append((root.name, found))
        split_dirs = [d for d in split_dirs if d.name != "labels"]
    for d in split_dirs:
        images_dir = d / "images" if (d / "images").is_dir() else d
        labels_dir = d / "labels" if (d / "labels").is_dir() else None
        found = _scan_folder(images_dir, labels_dir, split or split_of_folder(d.name), problems)
        folders.append((d.name, found))
    items = [it for it in _unique_ids(folders, problems) if _utf8_names(it, problems)]
    if not items and not problems:
        problems.append((str(root), f"no images found (looked for {', '.join(IMAGE_SUFFIXES)})"))
    table = root / MODALITIES_FILE
    names = read_modalities(table, problems) if table.is_file() else {}
    by_stem, _ = match_modalities(names, [image_name(it.image) for it in items])
    for it in items:
        it.modality = modality or by_stem.get(image_name(it.image), "unknown")
    return items, problems


def moves_across_test_split(
    items: list[SourceItem], stored: dict[str, dict]
) -> list[tuple[str, str]]:
    """Problems for images that would move an item of the store into or out of the test
    split: an image of another folder with a stored item's name (the test split must
    share no item with training, and a silent move would replace the stored one)."""
    problems = []
    for it in items:
        row = stored.get(it.id)
        if row is None or row["split"] == it.split or "test" not in (row["split"], it.split):
            continue
        problems.append(
            (
                it.image,
                f"item {it.id!r} is in split {row['split']!r} of the store (from "
                f"{row['source_path']}); this image would move it to split {it.split!r}. "
                "Rename the image, or ingest into another store",
            )
        )
    return problems


def silent_replacements(rows: list[dict], stored: dict[str, dict]) -> list[tuple[str, str]]:
    """Problems for ingested rows that would replace a stored item with other data unasked.

    Two cases lose work without a word: a labelled item that this ingest found no label
    for (its ``labels/`` folder left out) would become unlabelled, and another image of the
    same name from another folder (a second plate over the first) would replace the stored
    one. A changed image in its own folder is an ordinary update, and so is one in a moved
    folder: a folder that, in the same ``rows``, holds some other stored image unchanged
    (a copied or moved dataset in which an image was edited).
    """
    moves = {
        (str(Path(old["source_path"]).parent), str(Path(row["source_path"]).parent))
        for row in rows
        if (old := stored.get(row["id"])) is not None
        and old["source_sha256"] == row["source_sha256"]
    }
    problems = []
    for row in rows:
        old = stored.get(row["id"])
        if old is None:
            continue
        folders = (str(Path(old["source_path"]).parent), str(Path(row["source_path"]).parent))
        if old["label_path"] and not row["label_path"]:
            problems.append(
                (
                    row["source_path"],
                    f"item {row['id']!r} is labelled in the store (by {old['label_path']}); "
                    "this ingest found no label for it and would unlabel it. Put its label "
                    "back (labels/NAME_label.tiff), or pass --replace",
                )
            )
        elif (
            folders[0] != folders[1]
            and folders not in moves
            and old["source_sha256"] != row["source_sha256"]
        ):
            problems.append(
                (
                    row["source_path"],
                    f"item {row['id']!r} of the store is another image ({old['source_path']}); "
                    "this image of another folder would replace it. Rename the image, ingest "
                    "into another store, or pass --replace",
                )
            )
    return problems


def shared_across_test_split(rows: list[dict]) -> list[tuple[str, str, str]]:
    """``(test id, training id, why)`` for test items whose image is byte for byte a
    training item's (labeled or unlabeled): scores on such a test split mean nothing.

    The usual cause is an image moved or renamed from a training folder to the test one
    while its old item stays in the store (an ingest keeps items whose files are gone,
    unless ``--prune``).
    """
    training: dict[str, dict] = {}
    for row in rows:
        if row["split"] != "test":
            training.setdefault(row["source_sha256"], row)
    found = []
    for row in rows:
        other = training.get(row["source_sha256"]) if row["split"] == "test" else None
        if other is None:
            continue
        gone = not Path(other["source_path"]).exists()
        why = (
            f"test item {row['id']!r} is the same image as {other['split']} item "
            f"{other['id']!r} ({other['source_path']}"
            + (
                ", whose file is gone: moved? --prune drops items whose files are gone)"
                if gone
                else "): the test split must share no image with training"
            )
        )
        found.append((row["id"], other["id"], why))
    return found


def _source_folders(root: Path, depth: int) -> Iterator[tuple[Path, list[Path]]]:
    """Each folder under ``root`` (``depth`` levels at most, hidden ones left out) with its
    sorted entries."""
    level = [root]
    for _ in range(depth + 1):
        below = []
        for folder in level:
            try:
                entries = sorted(folder.iterdir())
            except OSError:
                continue
            yield folder, entries
            below += [p for p in entries if p.is_dir() and not p.name.startswith(".")]
        level = below


#: how deep below a source ingest looks for folders it did not read (said, not ingested)
WALK_DEPTH = 3
#: ``(folder, sorted entries)`` of each folder under a source (:func:`_source_folders`)
SourceWalk = list[tuple[Path, list[Path]]]


def unread_image_folders(
    src: str | Path,
    items: list[SourceItem],
    depth: int = WALK_DEPTH,
    walk: SourceWalk | None = None,
) -> list[str]:
    """Folders under ``src`` (``depth`` levels at most) holding images that none of
    ``items`` came from, e.g. a split's images one folder too deep: said, not ingested.
    ``walk`` is the source's folders already listed, to list them once for both checks."""
    read = {str(Path(it.image).parent) for it in items} | {
        str(Path(it.label).parent) for it in items if it.label
    }
    found = []
    for folder, entries in walk if walk is not None else _source_folders(Path(src), depth):
        if _named_like_a_file(folder) and folder != Path(src):
            continue  # said by folders_named_like_files
        images = [p for p in entries if _is_image(p) and _label_stem(p) is None]
        if images and str(folder.absolute()) not in read and str(folder) not in read:
            found.append(f"{folder}: {len(images)} image(s) not ingested")
    return found


def folders_named_like_files(
    src: str | Path, depth: int = WALK_DEPTH, walk: SourceWalk | None = None
) -> list[str]:
    """Folders under ``src`` named like an image, a label or ``modalities.csv``
    (``a.png/``, ``X_label.tiff/``): ingest reads files only, so each is said, not
    silently passed over. ``walk``: as for :func:`unread_image_folders`."""
    return [
        f"{p}: a folder named like a file; ingest reads files only, so it was not read"
        for _, entries in (walk if walk is not None else _source_folders(Path(src), depth))
        for p in entries
        if p.is_dir() and not p.name.startswith(".") and _named_like_a_file(p)
    ]


def _named_like_a_file(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES or p.name == MODALITIES_FILE


def unmatched_modalities(src: str | Path, items: list[SourceItem]) -> list[str]:
    """The rows of ``src``'s ``modalities.csv`` that name none of ``items``' images."""
    table = Path(src) / MODALITIES_FILE
    if not table.is_file():
        return []
    _, unused = match_modalities(read_modalities(table, []), [image_name(it.image) for it in items])
    return unused


#: which split folder keeps an image name that several use (the challenge's Tuning images
#: reuse the names of Training-labeled ones: cell_00001 ...)
_SPLIT_RANK = {"labeled": 0, "unlabeled": 1, "test": 2}


def _folder_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "_", name.lower()).strip("_") or "root"


def _unique_ids(
    folders: list[tuple[str, list[SourceItem]]], problems: list[tuple[str, str]]
) -> list[SourceItem]:
    """The items of every split folder, each id unique in the store.

    An image name used in several split folders keeps its name as the id in the folder
    whose split comes first (labelled, unlabelled, test, then others; folders by name), and
    becomes ``<folder>-<name>`` in the others (``tuning-cell_00001``), recorded in
    ``renamed_from``. Two images of one name in the same folder (``a.png`` and ``a.tif``)
    are a problem naming the second: which one is meant cannot be told.
    """
    ranked = sorted(
        folders, key=lambda f: (_SPLIT_RANK.get(f[1][0].split, 3), f[0]) if f[1] else (4, f[0])
    )
    owner: dict[str, str] = {}  # name_key(id) -> the folder that holds it
    by_id: dict[str, list[SourceItem]] = defaultdict(list)  # ids equal but for Unicode form too
    for folder, found in ranked:
        for it in found:
            if name_key(it.id) in owner and owner[name_key(it.id)] != folder:
                it.renamed_from, it.id = it.id, f"{_folder_slug(folder)}-{it.id}"
            owner.setdefault(name_key(it.id), folder)
            by_id[name_key(it.id)].append(it)
    for _, its in sorted(by_id.items()):
        if len(its) > 1:
            problems.append((its[1].image, f"duplicate id {its[1].id!r}: also {its[0].image}"))
    return [it for _, found in folders for it in found]


def keep_stored_ids(items: list[SourceItem], stored: dict[str, dict]) -> None:
    """Give each image the folder-prefixed id the store already holds it under
    (``test-cell_1``), where :func:`_unique_ids` would now give it another only because
    another folder's image of its name is gone (``labeled/cell_1`` deleted): an item's id
    does not change with other folders. Where the stored id is now another image's, the
    new one stands. In place."""
    by_path = {row["source_path"]: item_id for item_id, row in stored.items()}
    taken = {name_key(it.id) for it in items}
    for it in items:
        then = by_path.get(it.image)
        name = it.renamed_from or it.id
        if then is None or then == it.id or name_key(then) in taken:
            continue
        if then.endswith(f"-{name}"):  # the folder prefix it had when first ingested
            taken.discard(name_key(it.id))
            it.renamed_from, it.id = "", then  # as stored: not a rename of this ingest
            taken.add(name_key(then))


def source_problem(src: str | Path) -> str:
    """Why ``src`` cannot be a source folder ('' when it can)."""
    root = Path(src)
    if not root.exists():
        return "source folder does not exist"
    if not root.is_dir():
        return "source is a file, not a folder of images"
    if not os.access(root, os.R_OK | os.X_OK):
        return "source folder is not readable"
    return ""


def check_source(src: str | Path) -> None:
    """Refuse a missing or unreadable source folder at once (before Ray starts).

    Raises
    ------
    IngestError
        Naming the path; it does not suggest ``--skip-bad``, which cannot help.
    """
    why = source_problem(src)
    if why:
        raise IngestError([(str(src), why)], skippable=False)


def check_target(store: str | Path) -> None:
    """Refuse a ``--out`` folder that holds anything and is not a cellst store.

    A store manages its ``images/`` and ``labels/`` folders (arrays no manifest names are
    garbage-collected), so a folder of the user's own files, often the source folder
    itself, must not become one.

    Raises
    ------
    IngestError
        Naming the folder; it does not suggest ``--skip-bad``, which cannot help.
    """
    root = Path(store)
    if not root.is_dir() or is_store_root(root):
        return  # new (check_writable names a file in its way), or a store
    # hidden files (.DS_Store, .gitkeep) and a fresh volume's lost+found are no one's data
    held = sorted(
        p.name for p in root.iterdir() if not p.name.startswith(".") and p.name != "lost+found"
    )
    if held:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise IngestError(
            [
                (
                    str(store),
                    f"is not a cellst store and is not empty (holds {shown}); ingest writes a "
                    "store into a new or empty folder: choose another --out",
                )
            ],
            skippable=False,
        )


# ----------------------------------------------------------------------------- workers
def _norm_string(cfg: IngestConfig) -> str:
    return f"percentile-nonzero:{cfg.low_percentile:g}-{cfg.high_percentile:g}->uint8"


def _content_key(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


class StagingGone(OSError):
    """The staging folder an ingest task was given no longer exists: the ingest that made
    it has stopped (Ctrl-C, killed, failed) and removed it, or another process did."""


def _check_staging(target: Path) -> None:
    """Refuse to write the array ``target`` when the folder it goes into is gone (the
    ingest driver makes a staging's :data:`ARRAY_GROUPS` before starting any task).
    Writing would create it again, since zarr makes the parents of an array: a task that
    outlives its ingest, or a retry of one, would leave a stray staging folder beside the
    store."""
    if not target.parent.is_dir():
        raise StagingGone(
            f"the staging folder {target.parent} is gone (its ingest stopped, or another "
            "process removed it): nothing staged"
        )


def _stage_image(path: str, target: Path, cfg: IngestConfig) -> tuple[int, int]:
    """Normalise one image into the stored array at ``target``; returns its height, width.

    TIFFs declaring more than ``ingest.tiled_pixels`` pixels are read and written band by
    band through tifffile's zarr view (:func:`normalize_tiff_tiled`), so memory stays
    bounded; everything else is decoded whole.
    """
    kind = check_header(path, cfg.max_pixels)
    shape = declared_shape(path, kind)
    if kind == "TIFF" and len(shape) in (2, 3) and declared_pixels(shape) > cfg.tiled_pixels:
        h, w = shape[:2]
        check_min_side(path, h, w, cfg.min_side)
        _check_staging(target)
        array = create_array(target, (h, w, 3), np.uint8, cfg.chunk, cfg.compression_level)
        signal = [False]

        def write_band(y0: int, band: np.ndarray) -> None:
            _check_staging(target)  # (zarr makes a chunk's folders: checked before each band)
            array[y0 : y0 + band.shape[0]] = band
            signal[0] = signal[0] or bool(band.any())

        hw = normalize_tiff_tiled(
            path, write_band, cfg.low_percentile, cfg.high_percentile, band=cfg.chunk
        )
        _check_signal(path, signal[0])
        return hw
    image = normalize_image(
        read_array(path, cfg.max_pixels),
        cfg.low_percentile,
        cfg.high_percentile,
        name=path,
        channel_axis=-1,
    )
    h, w = image.shape[:2]
    check_min_side(path, h, w, cfg.min_side)
    _check_signal(path, bool(image.any()))
    _check_staging(target)  # (decoding takes a while: checked just before writing)
    write_array(target, image, cfg.chunk, cfg.compression_level)
    return h, w


def _check_signal(path: str, any_signal: bool) -> None:
    """An image that normalises to all zeros (every pixel 0 or NaN: a blank frame, a float
    export of a masked-out field; one negative value everywhere; signal only in a fourth
    channel) teaches nothing and would be stored silently as black. (One positive value
    everywhere is stored white, as its own maximum: placeholder images of one grey level
    are ingested.)"""
    if not any_signal:
        raise ImageFormatError(
            f"{path}: the image holds no signal: it normalises to all black (every pixel 0 or "
            "NaN, one negative value everywhere, or signal only beyond the first three "
            "channels)"
        )


def arrays_present(store: Path, row: dict) -> bool:
    """Whether the arrays a manifest row names are in ``store`` (deleted by hand, say: an
    ingest that took the item as unchanged kept naming arrays no reader can open)."""
    names = [row["image_array"], row["label_array"]]
    return all((store / name / ZARR_META).is_file() for name in names if name)


@ray.remote(num_cpus=1, max_retries=2)
def _ingest_one(item: SourceItem, staging: str, previous: dict | None, cfg: IngestConfig) -> dict:
    """Decode, check, normalise and stage one item. Returns a manifest row or a problem."""
    try:
        check_header(item.image, cfg.max_pixels)  # before hashing or decoding anything
        if item.label:
            check_header(item.label, cfg.max_pixels)
        img_sha = file_sha256(item.image)
        lab_sha = file_sha256(item.label) if item.label else ""
        norm = _norm_string(cfg)
        image_array = f"images/{item.id}.{_content_key(img_sha, norm, str(cfg.chunk))}"
        if previous is not None and (
            previous["source_sha256"],
            previous["label_sha256"],
            previous["normalization"],
            previous["image_array"],  # its key holds the chunking: a new one restages it
        ) == (img_sha, lab_sha, norm, image_array):
            return {"status": "unchanged", "row": previous}
        h, w = _stage_image(item.image, Path(staging) / image_array, cfg)
        label_array, n_inst = "", -1
        if item.label:
            label = read_array(item.label, cfg.max_pixels, labels=True)
            label = validate_label(label, (h, w), item.label)
            if (regions := binary_regions(label)) >= BINARY_LABEL_REGIONS:
                raise ImageFormatError(
                    f"{item.label}: label is a binary mask ({regions} separate "
                    "regions, one label value), not an instance map: give each cell its own "
                    "value (e.g. skimage.measure.label) before ingesting"
                )
            n_inst = int(label.max()) if label.size else 0
            label_array = f"labels/{item.id}.{_content_key(lab_sha, str(cfg.chunk))}"
            _check_staging(Path(staging) / label_array)
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
    except StagingGone as exc:  # not the file's fault: the driver refuses the whole ingest
        return {"status": "gone", "id": item.id, "problem": (staging, str(exc))}
    except ImageFormatError as exc:  # "PATH: why", where PATH may hold ": " itself
        message = str(exc)
        named = [p for p in (item.image, item.label) if p and message.startswith(f"{p}: ")]
        if named:
            path, why = named[0], message[len(named[0]) + 2 :]
        else:
            path, _, why = message.partition(": ")
        return {"status": "bad", "id": item.id, "problem": (path, why)}
    except Exception as exc:  # OSError, MemoryError, a decoder's own: named by file
        problem = (item.image, f"{type(exc).__name__}: {exc}")
        return {"status": "bad", "id": item.id, "problem": problem}


def _crashed(item: SourceItem, exc: Exception) -> dict:
    """The outcome of an item whose decoding process died past its retries: a bad item
    named by file, as a decoding error is, so that ``--skip-bad`` can go on without it."""
    why = (
        "Ray's memory monitor killed the process decoding it (out of memory)"
        if isinstance(exc, ray.exceptions.OutOfMemoryError)
        else "the process decoding it died (a crash in the image decoder, or killed)"
    )
    return {"status": "bad", "id": item.id, "problem": (item.image, why)}


# ----------------------------------------------------------------------------- driver
def _hold_back_leaks(
    rows: dict[str, dict], stored: dict[str, dict], result: IngestResult, skip_bad: bool
) -> list[tuple[str, str]]:
    """Problems for test items that share their image with training (see
    :func:`shared_across_test_split`). With ``skip_bad`` the item of each pair that this
    ingest brought goes back to how the store held it (or out, if new), in ``rows`` and
    ``result``; a pair both of whose items were already stored is only reported."""
    problems = []
    ingested = {*result.added, *result.updated, *result.unchanged}
    done: set[str] = set()
    for test_id, train_id, why in shared_across_test_split(list(rows.values())):
        held = test_id if test_id in ingested else train_id
        if held in done:
            continue
        problems.append((rows[held]["source_path"], why))
        if not skip_bad or held not in ingested:
            continue
        done.add(held)
        for ids in (result.added, result.updated, result.unchanged):
            if held in ids:
                ids.remove(held)
        if held in stored:
            rows[held] = stored[held]
            result.kept.append(held)
        else:
            del rows[held]
    return problems


def _stale_stagings(store: Path) -> list[Path]:
    """Staging folders of ``store`` that earlier ingests left (killed): this store's own
    alone, however its name reads as a pattern (``s[1]`` is not ``s1``), also under the
    name cellst gave them before :func:`cellst.fs.temp_sibling` (``.NAME.staging-1a2b3c4d``)."""
    legacy = re.compile(rf"\.{re.escape(store.name)}\.staging-[0-9a-f]{{8}}")
    siblings = store.parent.iterdir() if store.parent.is_dir() else ()
    old = [p for p in siblings if legacy.fullmatch(p.name)]
    return [*fs.stale_siblings(store, ".staging"), *old]


def _commit(store: Path, staging: Path, manifest: pd.DataFrame) -> str:
    """Move staged arrays into the store beside the old ones, then atomically switch the
    manifest (archived under ``manifests/`` first). Returns the new version."""
    init_store(store)
    for group in ARRAY_GROUPS:
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
    missing = [r["id"] for r in manifest.to_dict("records") if not arrays_present(store, r)]
    if missing:  # the staging lost arrays (removed by another process): keep the old manifest
        raise IngestError(
            [
                (
                    str(staging),
                    f"{len(missing)} staged item(s) vanished before the commit, e.g. "
                    f"{missing[0]!r}; the store keeps its earlier version: ingest again",
                )
            ],
            skippable=False,
        )
    return write_manifest(store, manifest[list(MANIFEST_COLUMNS)])


def _stop_tasks(refs: list, grace: float = 5.0) -> None:
    """Cancel the ingest's Ray tasks and wait until none runs, so none writes into the
    staging folder after it is removed.

    Only tasks still running are cancelled, first politely (a ``KeyboardInterrupt`` in the
    task), and only those still running after ``grace`` seconds are killed: force-cancelling
    a task while its result arrives can crash the driver inside Ray's core worker ("Tried to
    complete task that was not pending", ray-project/ray#54798).
    """
    pending = [r for r in refs if r is not None]
    if not pending:
        return
    with contextlib.suppress(Exception):
        _, running = ray.wait(pending, num_returns=len(pending), timeout=0)
        for force, wait in ((False, grace), (True, 60.0)):
            if not running:
                return
            for ref in running:
                ray.cancel(ref, force=force)
            _, running = ray.wait(running, num_returns=len(running), timeout=wait)


def _source_warnings(src: str | Path, items: list) -> list[str]:
    """What in ``src`` is not ingested although it looks meant to be: a ``modalities.csv``
    row naming no image, image folders cellst does not read, folders named like files."""
    walk = list(_source_folders(Path(src), WALK_DEPTH))
    return (
        [
            f"{Path(src) / MODALITIES_FILE}: row {name!r} names no image of the source"
            for name in unmatched_modalities(src, items)
        ]
        + [
            f"{line}: cellst reads SRC/SPLIT/, SPLIT/images/ and SPLIT/labels/ (or a plain "
            "folder); ingest that folder on its own, or move its images up"
            for line in unread_image_folders(src, items, walk=walk)
        ]
        + folders_named_like_files(src, walk=walk)
    )


def _mark_silent_replacements(outcomes: list[dict], by_item: dict, prev_rows: dict) -> None:
    """Mark ``bad`` each staged outcome that would replace a stored item unasked (another
    folder's image of its name, a labelled item made unlabelled: :func:`silent_replacements`)."""
    good = [o for o in outcomes if o["status"] != "bad"]
    rows_now = []
    for o in good:
        it = by_item[o["row"]["id"]]
        rows_now.append({**o["row"], "source_path": it.image, "label_path": it.label})
    found = dict(silent_replacements(rows_now, prev_rows))
    for o, row in zip(good, rows_now, strict=True):
        if row["source_path"] in found:
            why = found[row["source_path"]]
            o.update(status="bad", id=row["id"], problem=(row["source_path"], why))


def _ingested_rows(
    outcomes: list[dict], by_item: dict, prev_rows: dict, result: IngestResult
) -> dict[str, dict]:
    """The manifest rows of the items staged without a problem, each counted in ``result``
    as added, updated or unchanged."""
    rows: dict[str, dict] = {}
    for o in outcomes:
        if o["status"] == "bad":
            continue
        row = dict(o["row"])
        it = by_item[row["id"]]
        where = {
            "split": it.split,
            "modality": it.modality,
            "source_path": it.image,
            "label_path": it.label,
        }
        status = o["status"]
        if status == "new" and row["id"] in prev_rows:
            status = "updated"  # its arrays were gone from the store
        if status == "unchanged" and any(row.get(k) != v for k, v in where.items()):
            status = "updated"  # same pixels, but another split, modality or path
        row.update(where)
        rows[row["id"]] = row
        {"new": result.added, "updated": result.updated, "unchanged": result.unchanged}[
            status
        ].append(row["id"])
    return rows


def _carry_over(
    prev_rows: dict,
    rows: dict[str, dict],
    result: IngestResult,
    prune: bool,
    skipped: tuple[set, set],
) -> list[str]:
    """Add to ``rows`` the stored items this ingest did not stage and keeps: a skipped
    item's (its file is still in SRC), and without ``prune`` every other. Return the kept
    items whose image file is gone."""
    skipped_ids, skipped_sources = skipped
    ingested_as = {row["source_path"]: item_id for item_id, row in rows.items()}
    gone: list[str] = []
    for item_id, row in prev_rows.items():
        if item_id in rows:
            continue
        if row["source_path"] in ingested_as:
            # the same file under a new id (an earlier cellst kept an OME-TIFF's ".ome", or
            # a folder prefix came or went): one item, not two
            result.removed.append(item_id)
            result.warnings.append(
                f"item {item_id!r} is now item {ingested_as[row['source_path']]!r} "
                f"(the same file, {row['source_path']})"
            )
            continue
        is_skipped = item_id in skipped_ids or row["source_path"] in skipped_sources
        if prune and not is_skipped:
            result.removed.append(item_id)
            continue
        rows[item_id] = row
        if is_skipped:
            result.kept.append(item_id)
        elif not Path(row["source_path"]).exists():
            gone.append(item_id)
    return gone


def ingest(
    src: str | Path,
    store: str | Path,
    cfg: IngestConfig | None = None,
    *,
    split: str | None = None,
    modality: str | None = None,
    skip_bad: bool = False,
    prune: bool = False,
    replace: bool = False,
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
        Drop items whose source files are no longer under ``src`` (an item skipped as bad
        is still there: its previous version is kept).
    replace : bool
        Let an image of another folder replace a stored item of its name, and a labelled
        item become unlabelled (both refused otherwise, see :func:`silent_replacements`).

    Raises
    ------
    IngestError
        Listing every problem with its file, when ``skip_bad`` is false.
    IngestInterrupted
        On Ctrl-C (a ``KeyboardInterrupt``), once the tasks are stopped and the staging
        folder removed.
    """
    cfg = cfg or IngestConfig()
    # through links: one store reached by two paths has one lock, and its staging folder
    # sits on the store's own file system (its arrays are renamed into it)
    store = Path(store).resolve()
    check_source(src)
    check_target(store)
    items, problems = scan_source(src, split, modality)
    if problems and not skip_bad:
        raise IngestError(problems, skippable=bool(items))  # an empty source: nothing to skip
    bad_paths = {p for p, _ in problems}
    bad = [it for it in items if it.image in bad_paths or it.label in bad_paths]
    named = {id(it) for it in bad}  # their stored items are kept (not pruned): still in SRC
    items = [it for it in items if id(it) not in named]  # only the files named, by file
    if not items:
        raise IngestError(problems or [(str(src), "no images to ingest")], skippable=False)

    lock_root = lock_beside(store)
    staging = fs.temp_sibling(store, ".staging")
    result = IngestResult(store=str(store))
    refs: list = []
    committed = finished = False
    with store_lock(lock_root):
        for stale in _stale_stagings(store):
            remove_tree(stale)  # left by a killed ingest; we hold the lock, so it is dead
        old = None
        if (store / MANIFEST).is_file():
            old_bytes = (store / MANIFEST).read_bytes()
            old = parse_manifest(old_bytes, store / MANIFEST)  # a broken one: nothing archived
            archive_manifest(store, old_bytes)  # readers of it can still be resolved
        prev_rows = {r["id"]: r for r in old.to_dict("records")} if old is not None else {}
        keep_stored_ids([*items, *bad], prev_rows)
        skipped_ids = {it.id for it in bad}
        skipped_sources = {it.image for it in bad}  # their stored items are kept, whatever id
        moves = moves_across_test_split(items, prev_rows)
        if moves and not skip_bad:
            raise IngestError(moves)
        problems += moves
        moved = {path for path, _ in moves}
        skipped_ids |= {it.id for it in items if it.image in moved}  # stored rows kept
        skipped_sources |= moved
        items = [it for it in items if it.image not in moved]
        if not items:
            raise IngestError(problems, skippable=False)
        result.renamed = [(it.image, it.id) for it in items if it.renamed_from]
        result.warnings = _source_warnings(src, items)
        try:
            ensure_ray()
            # every node reads the sources and writes arrays into the staging folder
            for group in ARRAY_GROUPS:  # (tasks write only into folders that exist)
                (staging / group).mkdir(parents=True, exist_ok=True)
            check_shared_paths(read=[src], write=[staging])
            cfg_ref = ray.put(cfg)
            lost = {i for i, row in prev_rows.items() if not arrays_present(store, row)}
            for it in items:  # an item whose arrays are gone is staged again, as if new
                previous = None if it.id in lost else prev_rows.get(it.id)
                refs.append(_ingest_one.remote(it, str(staging), previous, cfg_ref))
            outcomes = []
            bar = tqdm(total=len(refs), desc="ingest", unit="img", disable=not progress)
            for out in as_completed(refs, on_crash=lambda i, exc: _crashed(items[i], exc)):
                outcomes.append(out)
                bar.update(1)
            bar.close()
            finished = True
            if gone := [o["problem"] for o in outcomes if o["status"] == "gone"]:
                raise IngestError(
                    [
                        (
                            gone[0][0],
                            f"the staging folder was removed while {len(gone)} item(s) were "
                            "being staged (by another process?); the store keeps its earlier "
                            "version: ingest again",
                        )
                    ],
                    skippable=False,
                )
            by_item = {it.id: it for it in items}
            if not replace:  # what would replace a stored item unasked is a bad file
                _mark_silent_replacements(outcomes, by_item, prev_rows)
            bad = [o["problem"] for o in outcomes if o["status"] == "bad"]
            if bad and not skip_bad:
                raise IngestError(sorted(problems + bad))
            skipped_ids |= {o["id"] for o in outcomes if o["status"] == "bad"}
            rows = _ingested_rows(outcomes, by_item, prev_rows, result)
            gone = _carry_over(
                prev_rows, rows, result, prune, skipped=(skipped_ids, skipped_sources)
            )
            leaks = _hold_back_leaks(rows, prev_rows, result, skip_bad)
            if leaks and not skip_bad:
                raise IngestError(sorted(problems + bad + leaks))
            problems += leaks
            if gone := [i for i in gone if i in rows]:
                result.warnings.append(
                    f"{len(gone)} item(s) of the store whose image file is gone are kept "
                    f"({gone[0]}: {rows[gone[0]]['source_path']}"
                    + (f", and {len(gone) - 1} more" if len(gone) > 1 else "")
                    + "); --prune drops them"
                )
            if restaged := sorted(lost & set(result.updated)):
                result.warnings.append(
                    f"{len(restaged)} item(s) whose arrays were missing from the store were "
                    f"staged again from their files ({', '.join(restaged[:3])}"
                    + (", ..." if len(restaged) > 3 else "")
                    + ")"
                )
            manifest = pd.DataFrame(list(rows.values()), columns=list(MANIFEST_COLUMNS))
            manifest = manifest.sort_values(["split", "id"]).reset_index(drop=True)
            result.version = _commit(store, staging, manifest)
            committed = True
            result.collected = collect_garbage(store)
            result.skipped = sorted(problems + bad)
            report = {
                **asdict(result),
                "config": cfg.model_dump(),
                "source": str(Path(src).absolute()),
            }
            atomic_write_bytes(store / REPORT, json.dumps(report, indent=2).encode())
        except KeyboardInterrupt:
            raise IngestInterrupted(committed) from None
        finally:
            if not finished:
                _stop_tasks(refs)  # none may write into the staging after its removal
            remove_tree(staging)
    return result
