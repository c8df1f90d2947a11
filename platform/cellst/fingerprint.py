"""Fingerprints: the one owner of "is this the same computation as before?".

Training runs, ST++ stages and sweeps resume or skip work when their fingerprint is
unchanged. A config fingerprint hashes only the fields a user set to something other than
the default (``model_dump(exclude_defaults=True)``), minus the fields that say where or how
a computation runs or logs rather than what it computes. So a new cellst version that adds
a setting with a default does not invalidate every earlier run, and moving a run to more
CPUs does not restart it. Only the standard library is imported here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for annotations only: this module imports the standard library alone
    from cellst.experiment import ExperimentConfig

#: version of the fingerprint recipe, stored beside fingerprints (run.json ``fingerprint``);
#: 3: a training's fingerprint leaves out the sections a training never reads;
#: 4: and ``inference.sw_batch_size`` (speed only), which 2 and 3 counted;
#: 5: and :data:`PSEUDO_ONLY` of a training without a pseudo-label set, which 2-4 counted
VERSION = 5

#: ``train`` fields a training reads only with a pseudo-label set (``train.pseudo_set``):
#: the share of pseudo-labelled crops. Changing it re-runs ST++'s re-training stages, not
#: its supervised stage 1 (recipe 5 on).
PSEUDO_ONLY: tuple[str, ...] = ("pseudo_weight",)

#: fields that change where or how a computation runs or logs, never its result
RUN_ONLY: dict[str, tuple[str, ...]] = {
    "tracking": ("*",),
    "train": (
        "run_dir",
        "run_name",
        "max_failures",
        "min_workers",
        "elastic_resize_s",
        "node_wait_s",
        "log_every_steps",
        "keep_last",
        "cpus_per_worker",
        "placement_strategy",
        "augment_cpus",
        "prefetch_batches",
    ),
    # (``cellst.inference.config.SPEED_ONLY_INFERENCE``: windows per forward pass)
    "inference": ("sw_batch_size",),
}

#: sections whose entry goes when leaving out their run-only fields empties it: a
#: fingerprint is then the one of a config that never set them (``train`` keeps its empty
#: entry, as fingerprints recorded before were hashed with it)
DROP_EMPTIED: frozenset[str] = frozenset({"inference"})

#: what recipes 2 and 3 left out (they counted ``inference.sw_batch_size``)
_RUN_ONLY_BEFORE_4: dict[str, tuple[str, ...]] = {
    k: v for k, v in RUN_ONLY.items() if k != "inference"
}


def stable_hash(obj: Any, n: int = 16, *, spaced: bool = False) -> str:
    """Short sha256 of a JSON-serialisable object (keys sorted, so order does not matter).

    ``spaced`` hashes :func:`json.dumps`'s default spacing (``", "``, ``": "``) instead of
    the compact form: the pseudo-label sets' ``model_id`` (``inference.batch.model_identity``)
    was first written that way, and keeps it so that stored sets still resume.
    """
    separators = (", ", ": ") if spaced else (",", ":")
    text = json.dumps(obj, sort_keys=True, default=str, separators=separators)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def config_fingerprint(
    cfg: Any,
    ignore: Mapping[str, Iterable[str]] | None = None,
    n: int = 16,
    *,
    run_only: Mapping[str, Iterable[str]] = RUN_ONLY,
    pseudo_only: Iterable[str] = (),
) -> str:
    """Fingerprint of what a configuration computes.

    Parameters
    ----------
    cfg : pydantic model
        An experiment configuration (any :class:`cellst.config.Section` tree).
    ignore : mapping, optional
        Section -> field names to leave out besides :data:`RUN_ONLY`; ``"*"`` leaves out the
        whole section, and the key ``""`` names top-level fields (``store``, ``name``).
    run_only : mapping
        The run-only fields (:data:`RUN_ONLY`; an earlier recipe's to recognise it).
    pseudo_only : iterable of str
        ``train`` fields left out when ``train.pseudo_set`` is empty (:data:`PSEUDO_ONLY`
        for a training; none for an earlier recipe).

    Notes
    -----
    A training without pseudo-labels (``train.pseudo_set`` empty) also leaves out the
    settings of the strong augmentation (``augment.STRONG_FIELDS``), which act on
    pseudo-labelled crops alone: changing them re-runs ST++'s re-training stages, not its
    supervised stage 1.
    """
    data = cfg.model_dump(mode="json", exclude_defaults=True)
    strong = set(getattr(getattr(cfg, "augment", None), "STRONG_FIELDS", ()))
    if (
        strong
        and isinstance(data.get("augment"), dict)
        and not data.get("train", {}).get("pseudo_set")
    ):
        # (a section left empty goes too: the same dump as with the strong defaults)
        data["augment"] = {k: v for k, v in data["augment"].items() if k not in strong}
        if not data["augment"]:
            del data["augment"]
    train = data.get("train")
    if pseudo_only and isinstance(train, dict) and train and not train.get("pseudo_set"):
        # (emptied, the entry goes: the dump of a config that never set them)
        kept = {k: v for k, v in train.items() if k not in set(pseudo_only)}
        if kept:
            data["train"] = kept
        else:
            del data["train"]
    rules: dict[str, set[str]] = {k: set(v) for k, v in run_only.items()}
    for section, fields in (ignore or {}).items():
        rules.setdefault(section, set()).update(fields)
    for field in rules.pop("", set()):
        data.pop(field, None)
    for section, fields in rules.items():
        if "*" in fields:
            data.pop(section, None)
        elif isinstance(data.get(section), dict):
            kept = {k: v for k, v in data[section].items() if k not in fields}
            if kept or not data[section] or section not in DROP_EMPTIED:
                data[section] = kept
            else:
                del data[section]
    return stable_hash(data, n)


#: what a training never reads: other commands' sections, and the experiment name (where it
#: logs); of ``ingest`` only ``chunk`` counts (the regions crops are cut from)
NOT_READ_BY_TRAINING: dict[str, tuple[str, ...]] = {
    "": ("name",),
    "predict": ("*",),
    "segment": ("*",),
    "tune": ("*",),
    "stpp": ("*",),
}


def training_fingerprint(
    cfg: ExperimentConfig, *, store: bool = True, version: int = VERSION
) -> str:
    """Fingerprint of what a training computes: what ``cellst train`` resumes by and ST++
    skips or re-runs its training stages by.

    Parameters
    ----------
    cfg : ExperimentConfig
        The training's configuration (an ST++ stage's: :meth:`stage_train_config`).
    store : bool
        Count the store's path (``cellst train``). ST++ leaves it out and hashes the
        labelled items' content instead, so a moved store is the same computation.
    version : int
        The recipe of an earlier cellst (2, 3 or 4), to recognise what it recorded.

    Notes
    -----
    Recipe 2 counted the sections a training never reads (``predict``, ``segment``,
    ``tune``, ``stpp``...) for ``cellst train``, so editing them refused a resume, and left
    ``evaluate`` out for ST++, whose validation F1 it defines (which checkpoint is ``best``,
    the calibrated post-processing), so changing it skipped stale training stages.
    """
    if version == 2:
        if store:
            return config_fingerprint(cfg, run_only=_RUN_ONLY_BEFORE_4)
        legacy = {"": ("store", "name"), "predict": ("*",), "evaluate": ("*",), "ingest": ("*",)}
        return config_fingerprint(cfg, legacy, run_only=_RUN_ONLY_BEFORE_4)
    if version not in (3, 4, VERSION):
        raise ValueError(f"no fingerprint recipe {version}")
    ignore = {k: set(v) for k, v in NOT_READ_BY_TRAINING.items()}
    ingest = getattr(cfg, "ingest", None)
    ignore["ingest"] = {f for f in type(ingest).model_fields if f != "chunk"} if ingest else set()
    if not store:
        ignore[""].add("store")
    run_only = RUN_ONLY if version >= 4 else _RUN_ONLY_BEFORE_4
    pseudo_only = PSEUDO_ONLY if version >= 5 else ()
    return config_fingerprint(cfg, ignore, run_only=run_only, pseudo_only=pseudo_only)


#: what no sweep reads: other commands' sections
NOT_READ_BY_SWEEPS: dict[str, tuple[str, ...]] = {
    "predict": ("*",),
    "segment": ("*",),
    "stpp": ("*",),
}
#: and what a post-processing sweep does not read besides: how a model would be trained
#: (its trials score one checkpoint's predictions)
NOT_READ_BY_POSTPROCESS_SWEEPS: dict[str, tuple[str, ...]] = {
    **NOT_READ_BY_SWEEPS,
    "train": ("*",),
    "augment": ("*",),
    "loss": ("*",),
}


def sweep_fingerprint(cfg: ExperimentConfig, *, legacy: bool = False) -> str:
    """Fingerprint of what a ``cellst tune`` sweep's trials compute. Where it logs, and
    the sections it never reads, are left out: editing ``predict.*`` or ``stpp.*`` in a
    shared YAML, or ``train.epochs`` beside a post-processing sweep, threw its finished
    trials away. ``legacy``: the fingerprint cellst recorded before (every section), to
    recognise a ``sweep.json`` it wrote."""
    if legacy:
        return config_fingerprint(cfg)
    post = cfg.tune.mode == "postprocess"
    return config_fingerprint(cfg, NOT_READ_BY_POSTPROCESS_SWEEPS if post else NOT_READ_BY_SWEEPS)


def config_differences(
    then: Mapping[str, Any], now: Mapping[str, Any], ignore: Mapping[str, Iterable[str]] = ()
) -> list[str]:
    """``"section.field: THEN -> NOW"`` for each field two config dumps
    (``model_dump(mode="json")``) differ in, leaving out :data:`RUN_ONLY` and ``ignore``
    (section -> field names, ``"*"`` for all; ``""`` for top-level fields): what a refusal
    to resume names, so the user need not diff the configs."""
    left = {k: set(v) for k, v in RUN_ONLY.items()}
    for section, names in dict(ignore).items():
        left.setdefault(section, set()).update(names)

    def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping) and v:
                out.update(flat(v, f"{key}."))
            else:
                out[key] = v
        return out

    def counted(key: str) -> bool:
        section, _, field = key.partition(".")
        if not field:
            section, field = "", key
        names = left.get(section, set())
        return "*" not in names and field.split(".")[0] not in names

    a, b = flat(then), flat(now)
    return [
        f"{k}: {json.dumps(a.get(k))} -> {json.dumps(b.get(k))}"
        for k in sorted(a.keys() | b.keys())
        if counted(k) and a.get(k) != b.get(k)
    ]


def file_sha256(path: str | os.PathLike[str], block: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in blocks (a source image's, a checkpoint's
    weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
