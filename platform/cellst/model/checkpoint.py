"""Model checkpoints: a directory with ``model.pt`` and ``model.json`` (layout and records:
:mod:`cellst.model.checkpoint_files`, torch-free).

* ``model.pt``: the ``state_dict`` only (CPU tensors, no pickled code; loaded with
  ``weights_only=True``), without DDP ``module.`` / ``torch.compile`` ``_orig_mod.`` prefixes;
* ``model.json``: ``{"format": "cellst-model/1", "cellst_version": ..., "model": <ModelConfig>,
  "metadata": {...}}`` where metadata is free JSON (epoch, metrics, data version, ...);
* ``postprocess.json`` (optional): post-processing settings calibrated for these weights on
  validation items (:func:`save_postprocess`, :func:`load_postprocess`; written after training
  by :mod:`cellst.postprocess.calibrate`). It names the sha256 of ``model.pt``, so settings
  calibrated for other weights are never applied.

:func:`save_checkpoint` writes into a temporary sibling directory and renames it into place,
so a reader never sees a half-written checkpoint (an existing checkpoint at the same path is
moved aside first and deleted after the rename). :func:`load_model` rebuilds the network
from ``model.json``; :func:`load_into` loads into an existing network and reports a model or
parameter mismatch as a :class:`CheckpointError` naming the checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cellst import __version__
from cellst.fs import staged_dir
from cellst.model.checkpoint_files import (
    FORMAT,
    INFO_FILE,
    POSTPROCESS_FILE,
    POSTPROCESS_FORMAT,
    WEIGHTS_FILE,
    CheckpointError,
    is_checkpoint,
    jsonable,
    load_postprocess,
    read_checkpoint_info,
    save_postprocess,
    weights_digest,
)
from cellst.model.networks import ModelConfig, build_model

# the folder layout and its records live in the torch-free checkpoint_files; re-exported here
__all__ = [
    "FORMAT",
    "INFO_FILE",
    "POSTPROCESS_FILE",
    "POSTPROCESS_FORMAT",
    "WEIGHTS_FILE",
    "CheckpointError",
    "is_checkpoint",
    "load_into",
    "load_model",
    "load_postprocess",
    "read_checkpoint_info",
    "save_checkpoint",
    "save_postprocess",
    "unwrap_model",
    "weights_digest",
]

_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 8


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare network inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    changed = True
        out[key] = value.detach().cpu()
    return out


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: torch.nn.Module,
    cfg: ModelConfig,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (possibly DDP-wrapped) and ``cfg`` to the checkpoint ``directory``.

    Atomic: written into a temporary sibling directory, then renamed. Returns the path.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "format": FORMAT,
        "cellst_version": __version__,
        "model": cfg.model_dump(mode="json"),
        "metadata": jsonable(dict(metadata or {})),
    }
    state = _clean_state_dict(unwrap_model(model).state_dict())
    with staged_dir(target) as tmp:  # the old folder is replaced only once this is whole
        torch.save(state, tmp / WEIGHTS_FILE)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        for f in (tmp / WEIGHTS_FILE, tmp / INFO_FILE):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    return target


def _read_state(path: Path, map_location: Any) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {path} has no {WEIGHTS_FILE} ({weights} is missing)")
    try:
        state = torch.load(weights, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        # torch's first sentence says what is wrong; the rest is advice over several lines
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        raise CheckpointError(
            f"checkpoint weights {weights} cannot be read (truncated or corrupt?): {reason}"
        ) from exc
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint weights {weights} do not hold a state_dict")
    return _clean_state_dict(state)


def _describe(cfg: ModelConfig) -> str:
    arch = cfg.architecture()
    extra = ", ".join(f"{k}={v}" for k, v in arch.items() if k != "name")
    return f"{arch['name']} ({extra})"


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")


def load_into(
    model: torch.nn.Module,
    cfg: ModelConfig,
    directory: str | os.PathLike[str],
    map_location: Any = "cpu",
) -> dict[str, Any]:
    """Load the checkpoint at ``directory`` into ``model`` (built from ``cfg``); returns metadata.

    Raises :class:`CheckpointError` if the checkpoint is missing or was saved from a different
    architecture (name, width, channels) or its parameters do not match ``model``.
    """
    path = Path(directory)
    ck_cfg, metadata = read_checkpoint_info(path)
    if ck_cfg.architecture() != cfg.architecture():
        raise CheckpointError(
            f"checkpoint {path} holds a {_describe(ck_cfg)} model and cannot be loaded into a "
            f"{_describe(cfg)} model"
        )
    what = f"checkpoint {path} ({_describe(ck_cfg)}) does not fit the {_describe(cfg)} model"
    _load_state(unwrap_model(model), _read_state(path, map_location), what)
    return metadata


def _load_state(net: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` strictly, or raise a :class:`CheckpointError` ``what: <differences>``."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listed(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches (checkpoint vs model): {_listed(mismatched)}")
        raise CheckpointError(f"{what}: " + "; ".join(parts))
    net.load_state_dict(state, strict=True)


def load_model(
    directory: str | os.PathLike[str], map_location: Any = "cpu"
) -> tuple[torch.nn.Module, ModelConfig, dict[str, Any]]:
    """Rebuild the network saved at ``directory``: ``(model, cfg, metadata)``.

    The network is built without downloading ``pretrained_url`` (the checkpoint replaces
    those weights); the returned ``cfg`` is the saved one. The model is on ``map_location``
    (if it names a device) and in eval mode.
    """
    path = Path(directory)
    cfg, metadata = read_checkpoint_info(path)
    build_cfg = cfg.model_copy(update={"pretrained_url": None})
    model = build_model(build_cfg)
    # built from the checkpoint's own model.json: a mismatch means the two files disagree
    what = (
        f"checkpoint {path}: the weights in {WEIGHTS_FILE} do not fit the {_describe(cfg)} "
        f"model that its {INFO_FILE} describes"
    )
    _load_state(model, _read_state(path, map_location), what)
    if isinstance(map_location, str | torch.device):
        model = model.to(map_location)
    model.eval()
    return model, cfg, metadata
