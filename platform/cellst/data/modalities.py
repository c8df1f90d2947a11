"""``modalities.csv``: the image modality of each file of a source folder (its one owner).

Columns ``name,modality`` (UTF-8, a BOM accepted); ``name`` is a file name or stem (matched
whole: ``phase.gray`` names ``phase.gray.tif``, not ``phase.tif``). Read by
``cellst ingest`` at the source root and by ``cellst evaluate`` beside a folder of label
files. Only the standard library is imported, so scoring folders stays cheap.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from cellst.data.layout import image_name

#: the file's name, at the root of a source folder (or up to two levels above labels)
MODALITIES_FILE = "modalities.csv"


def read_modalities(table: Path, problems: list[tuple[str, str]]) -> dict[str, str]:
    """``name -> modality`` from ``modalities.csv``; every bad row is a problem naming the
    file and its line number."""
    raw = table.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        problems.append(
            (f"{table}:{line}", f"not UTF-8 text (byte {raw[exc.start]:#04x}); save it as UTF-8")
        )
        return {}
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or not {"name", "modality"} <= set(reader.fieldnames):
        problems.append((f"{table}:1", "must have the columns name,modality"))
        return {}
    out: dict[str, str] = {}
    seen: dict[str, str] = {}  # image name -> the modality its first row gave
    try:
        for row in reader:
            where = f"{table}:{reader.line_num}"
            name, modality = row.get("name"), row.get("modality")
            if name is None or modality is None:
                problems.append((where, "row has a missing field (expected name,modality)"))
            elif not name.strip():
                problems.append((where, "row has an empty name"))
            else:
                name, modality = name.strip(), modality.strip() or "unknown"
                earlier = seen.setdefault(image_name(name), modality)
                if earlier != modality:  # the same image (by name or file name), another one
                    problems.append(
                        (where, f"{name!r} is given twice, as {earlier!r} and {modality!r}")
                    )
                out[name] = modality
    except csv.Error as exc:
        problems.append((f"{table}:{reader.line_num}", f"not a valid CSV row ({exc})"))
    return out


def match_modalities(names: dict[str, str], stems: list[str]) -> tuple[dict[str, str], list[str]]:
    """Each image stem's modality from :func:`read_modalities`' rows, and the rows that name
    no image (a typo, or an image not in the folder).

    A row names an image by its stem or its file name, compared whole: only a known image
    suffix (``.tif``, ``.png``...) is taken off a row's name, so ``phase.gray`` is the image
    ``phase.gray.tif`` and never ``phase.tif``.
    """
    by_stem = {image_name(name): modality for name, modality in names.items()}
    wanted = set(stems)
    found = {stem: by_stem[stem] for stem in stems if stem in by_stem}
    unused = [name for name in names if image_name(name) not in wanted]
    return found, unused


class ModalitiesError(ValueError):
    """A ``modalities.csv`` that cannot be read; one line naming the file and line."""


def modalities_or_error(table: Path) -> dict[str, str]:
    """:func:`read_modalities`, raising :class:`ModalitiesError` with the first problem
    (``FILE:LINE: reason``) instead of collecting them."""
    problems: list[tuple[str, str]] = []
    out = read_modalities(table, problems)
    if problems:
        where, why = problems[0]
        raise ModalitiesError(f"{where}: {why}")
    return out
