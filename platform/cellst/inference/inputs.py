"""The input images of ``cellst segment`` (and of ``cellst predict`` on a folder).

Which files of the folders and files named on the command line are images to segment
(not this command's outputs, Cellpose's outputs or hidden files), where each one's
outputs go, and the one-line :class:`SegmentError` of a request that cannot run. Below
:mod:`cellst.inference.segment` and :mod:`cellst.inference.batch`, which both list inputs
this way; imports neither torch nor Ray.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from cellst.data.images import IMAGE_SUFFIXES, LABEL_SUFFIX, label_file_name
from cellst.data.layout import image_name, name_key

__all__ = [
    "OTHER_TOOLS_SUFFIXES",
    "OVERLAY_SUFFIX",
    "SegmentError",
    "collect_images",
    "output_dir",
]

#: suffix of the overlay image (``NAME_overlay.png``); such files are never taken as inputs
OVERLAY_SUFFIX = "_overlay"


class SegmentError(ValueError):
    """The request cannot run (a missing input, no images, a bad checkpoint); one line that
    names the path. Raised before anything is written."""


def _is_input_image(path: Path) -> bool:
    stem = image_name(path)
    return (
        path.suffix.lower() in IMAGE_SUFFIXES
        and not path.name.startswith(".")
        and not stem.endswith(LABEL_SUFFIX)
        and not stem.endswith(OVERLAY_SUFFIX)
    )


#: what Cellpose writes beside an image NAME: NAME_masks / NAME_cp_masks (label maps),
#: NAME_cp_outlines, NAME_flows; never inputs when NAME itself is in the folder
OTHER_TOOLS_SUFFIXES = ("_cp_masks", "_masks", "_cp_outlines", "_flows")


def _images_in(folder: Path) -> list[Path]:
    """The folder's input images; a dangling link of an image name is listed too, so that
    the run names it as unreadable instead of leaving it out unseen. Cellpose's outputs
    of an image in the folder (:data:`OTHER_TOOLS_SUFFIXES`) are label maps or drawings,
    not images to segment: they are left out."""
    found = sorted(
        p
        for p in folder.iterdir()
        if (p.is_file() or (p.is_symlink() and not p.exists())) and _is_input_image(p)
    )
    names = {name_key(image_name(p)) for p in found}

    def of_an_image_here(p: Path) -> bool:
        stem = name_key(image_name(p))
        return any(
            stem.endswith(suffix) and stem[: -len(suffix)] in names
            for suffix in OTHER_TOOLS_SUFFIXES
        )

    return [p for p in found if not of_an_image_here(p)]


def _subfolder_hint(folder: Path) -> str:
    """``"; did you mean SUB/ (N images)?"`` for the first subfolder holding images (a
    challenge-layout split keeps them in ``images/``), else ``""``."""
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        n = len(_images_in(sub))
        if n:
            return f"; did you mean {sub}/ ({n} image{'s' if n > 1 else ''})?"
    return ""


def collect_images(
    inputs: Iterable[str | os.PathLike[str]], out_dir: str | os.PathLike[str] | None = None
) -> list[Path]:
    """The image files named by ``inputs``: files as given, folders listed (not recursively).

    Files whose name ends in ``_label`` or ``_overlay`` (this command's outputs), Cellpose's
    outputs of an image beside them (``NAME_cp_masks.png``...) and hidden files are skipped
    when listing a folder. ``out_dir`` is where the outputs go (None:
    beside each image); two images of one name clash only when their outputs share a folder.

    Raises
    ------
    SegmentError
        An input does not exist, a given file is not an image, a folder holds no image,
        or two images of one name write to the same folder (their outputs would overwrite
        each other).
    """
    found: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            images = _images_in(path)
            if not images:
                raise SegmentError(
                    f"{path}: no image files in this folder (expected "
                    f"{', '.join(IMAGE_SUFFIXES)}){_subfolder_hint(path)}"
                )
            found.extend(images)
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise SegmentError(
                    f"{path}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})"
                )
            found.append(path)
        else:
            raise SegmentError(f"{path}: no such file or folder")
    if not found:
        raise SegmentError("no input images given")
    out = Path(out_dir) if out_dir is not None else None
    by_name: dict[tuple[Path, str], Path] = {}
    for p in found:
        key = (output_dir(p, out).resolve(), name_key(image_name(p)))  # NFD and NFC alike
        if key in by_name and by_name[key].resolve() != p.resolve():
            raise SegmentError(
                f"{by_name[key]} and {p} have the same name {image_name(p)!r}; their outputs "
                f"({label_file_name(image_name(p))}) would overwrite each other or could not "
                f"be told apart"
            )
        by_name.setdefault(key, p)
    return list(by_name.values())


def output_dir(path: Path, out: Path | None) -> Path:
    """Where the outputs of image ``path`` go: ``out``, or beside the image when None."""
    return out if out is not None else path.parent
