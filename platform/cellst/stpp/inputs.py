"""What an ST++ stage's input hash is made of: a split's items by content, a training's
fingerprint, the inference settings that change results.

A stage runs again exactly when one of these changes (:class:`cellst.stpp.runner.StageRunner`),
so each is a stable digest of what the stage reads, never of where it runs or logs.
"""

from __future__ import annotations

from typing import Any

from cellst.data.store import CellStore
from cellst.experiment import ExperimentConfig
from cellst.fingerprint import VERSION as FINGERPRINT_VERSION
from cellst.fingerprint import stable_hash, training_fingerprint
from cellst.inference.config import SPEED_ONLY_INFERENCE, InferenceConfig
from cellst.stpp.config import StppConfig


def items_digest(store: CellStore, split: str) -> str:
    """Hash of a split's items and their content (ids, source and label hashes)."""
    df = store.items(split=split).sort_values("id")
    cols = ["id", "source_sha256", "label_sha256", "image_array", "label_array"]
    return stable_hash(df[cols].values.tolist())


def training_hash(cfg: ExperimentConfig, version: int = FINGERPRINT_VERSION) -> str:
    """Fingerprint of what a training stage computes (not where it logs or runs; the store
    by its items' content, :func:`items_digest`, not its path). The ``stpp`` section, which
    a training never reads, counts at its defaults, as every recipe recorded it."""
    return training_fingerprint(without_stpp(cfg), store=False, version=version)


def without_stpp(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with its ``stpp`` section at the defaults (a stage training's config as the
    fingerprints of earlier cellst versions hashed it)."""
    return cfg.model_copy(update={"stpp": StppConfig()})


def infer_inputs(infer: InferenceConfig) -> dict[str, Any]:
    """A stage's inference settings as its inputs: every one but those that change only
    speed (``SPEED_ONLY_INFERENCE``: a new ``sw_batch_size`` re-runs no stage)."""
    dump = infer.model_dump(mode="json")
    return {k: v for k, v in dump.items() if k not in SPEED_ONLY_INFERENCE}


def infer_inputs_before(inputs: dict[str, Any], infer: InferenceConfig) -> dict[str, Any]:
    """``inputs`` as cellsts before :func:`infer_inputs` hashed them (every inference
    setting, speed-only ones included): a record of these is a record of ``inputs``."""
    return {**inputs, "infer": infer.model_dump(mode="json")}
