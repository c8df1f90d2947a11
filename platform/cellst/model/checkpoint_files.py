"""A checkpoint folder's layout and its JSON records, readable without torch or MONAI.

The one owner of the file names (``model.pt``, ``model.json``, ``postprocess.json``), their
formats, the weights' sha256 and their cheap identity (:func:`checkpoint_fingerprint`).
:mod:`cellst.model.checkpoint` (torch) writes and loads the weights and re-exports these
names; commands that only need to know whether a folder is a
checkpoint, what model it holds or what post-processing was calibrated for it use this
module and fail on a bad ``model.json`` before importing torch (seconds per process).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from cellst import __version__
from cellst.fingerprint import file_sha256
from cellst.model.config import ModelConfig

__all__ = [
    "FORMAT",
    "INFO_FILE",
    "POSTPROCESS_FILE",
    "POSTPROCESS_FORMAT",
    "WEIGHTS_FILE",
    "CheckpointError",
    "checkpoint_fingerprint",
    "is_checkpoint",
    "jsonable",
    "load_postprocess",
    "read_checkpoint_info",
    "read_record",
    "save_postprocess",
    "weights_digest",
]

FORMAT = "cellst-model/1"
POSTPROCESS_FORMAT = "cellst-postprocess/1"
WEIGHTS_FILE = "model.pt"
INFO_FILE = "model.json"
POSTPROCESS_FILE = "postprocess.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, malformed or does not fit the model it is loaded into."""


def is_checkpoint(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` looks like a checkpoint folder (it has a ``model.json``); a cheap
    test, :func:`read_checkpoint_info` checks the record itself."""
    return (Path(directory) / INFO_FILE).is_file()


def jsonable(value: Any) -> Any:
    """Metadata as plain JSON (numpy / torch scalars, paths, tuples; non-finite -> None)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    if torch is not None and isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"checkpoint metadata value {value!r} ({type(value).__name__}) is not JSON")


def read_record(path: Path, fmt: str, what: str, hint: str) -> dict[str, Any]:
    """A JSON record of a checkpoint folder, checked to be a mapping of format ``fmt``;
    :class:`CheckpointError` naming ``path`` (with ``what`` before and ``hint`` after)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError alike
        raise CheckpointError(f"{what}{path} is not readable JSON: {exc}{hint}") from exc
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        got = doc.get("format") if isinstance(doc, dict) else None
        raise CheckpointError(f"{what}{path} has format {got!r}, expected {fmt!r}{hint}")
    return doc


def read_checkpoint_info(directory: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, Any]]:
    """``(ModelConfig, metadata)`` from a checkpoint's ``model.json`` (weights not read)."""
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    info_path = path / INFO_FILE
    if not info_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {INFO_FILE} ({info_path} is missing)")
    info = read_record(info_path, FORMAT, "checkpoint ", "")
    try:
        cfg = ModelConfig.model_validate(info.get("model"))
    except ValidationError as exc:
        from cellst.config import field_errors

        why = "; ".join(field_errors(exc, "model."))
        raise CheckpointError(f"checkpoint {info_path} has an invalid model config: {why}") from exc
    metadata = info.get("metadata") or {}
    return cfg, dict(metadata)


def weights_digest(directory: str | os.PathLike[str]) -> str:
    """sha256 of a checkpoint's ``model.pt`` (what calibrated settings belong to)."""
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(
            f"checkpoint {directory} has no {WEIGHTS_FILE} ({weights} is missing)"
        )
    return file_sha256(weights)


def checkpoint_fingerprint(path: str | os.PathLike[str]) -> list:
    """Cheap identity of a checkpoint's weights (path, size and mtime of ``model.pt``)."""
    st = (Path(path) / WEIGHTS_FILE).stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def save_postprocess(
    directory: str | os.PathLike[str],
    settings: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Store post-processing ``settings`` calibrated for the checkpoint at ``directory``.

    ``settings`` are :class:`cellst.postprocess.PostprocessConfig` fields; ``meta`` is free JSON
    (validation F1 before/after, items, ...). Written atomically (temporary file, rename) as
    ``postprocess.json`` beside the weights, with their sha256. Returns the file's path.
    """
    from cellst.fs import atomic_write_bytes

    path = Path(directory)
    read_checkpoint_info(path)  # a real checkpoint, or a CheckpointError naming it
    doc = {
        "format": POSTPROCESS_FORMAT,
        "cellst_version": __version__,
        "weights_sha256": weights_digest(path),
        "settings": jsonable(dict(settings)),
        "meta": jsonable(dict(meta or {})),
    }
    target = path / POSTPROCESS_FILE
    atomic_write_bytes(target, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    return target


def load_postprocess(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The calibrated post-processing of a checkpoint: ``{"settings": ..., "meta": ...}``.

    Returns None when the checkpoint has no ``postprocess.json``, or when the file was
    calibrated for other weights (then a ``UserWarning`` says so and nothing is applied).

    Raises
    ------
    CheckpointError
        The file exists but is not a readable calibration record.
    """
    import warnings

    path = Path(directory) / POSTPROCESS_FILE
    if not path.is_file():
        return None
    doc = read_record(path, POSTPROCESS_FORMAT, "", "; delete it")
    if not isinstance(doc.get("settings"), dict) or not isinstance(doc.get("meta", {}), dict):
        raise CheckpointError(f"{path} has no settings mapping; delete it")
    if doc.get("weights_sha256") != weights_digest(directory):
        warnings.warn(
            f"{path} was calibrated for other weights than {Path(directory) / WEIGHTS_FILE}; "
            f"ignored",
            UserWarning,
            stacklevel=2,
        )
        return None
    return {"settings": dict(doc["settings"]), "meta": dict(doc.get("meta") or {})}
