"""The ST++ stages by name, and the typed outputs each stage records.

A stage's outputs are stored as JSON in its record (``stages/<n>_<stage>.json``) and hashed
into the inputs of later stages, so they are plain dicts; the ``TypedDict`` classes below
name their keys and types without changing what is stored (records written by earlier
cellst versions still read).
"""

from __future__ import annotations

from typing import Any, TypedDict

#: stage names, in order (stage n is STAGES[n - 1])
STAGES = (
    "supervised",
    "reliability",
    "pseudo_reliable",
    "retrain_reliable",
    "pseudo_unreliable",
    "retrain_all",
    "evaluate",
)
TITLES = {
    "supervised": "supervised training on the labelled items",
    "reliability": "reliability of the unlabelled items across snapshots",
    "pseudo_reliable": "pseudo-label the reliable items (stage-1 model)",
    "retrain_reliable": "re-train on labelled + reliable pseudo-labels",
    "pseudo_unreliable": "pseudo-label the unreliable items (stage-4 model)",
    "retrain_all": "re-train on labelled + all pseudo-labels",
    "evaluate": "test-split F1: supervised vs round 1 vs round 2",
}
#: the models compared by the final evaluation: label -> training stage
MODELS = {"supervised": "supervised", "round1": "retrain_reliable", "round2": "retrain_all"}


class TrainingOutput(TypedDict):
    """Stages 1, 4 and 6: one ``cellst train`` run."""

    run_path: str
    best: str  # best checkpoint by validation F1
    snapshots: list[str]  # the ST++ snapshots (stage 1 predicts with them)
    mlflow_run_id: str | None
    best_val_f1: float | None
    epochs: int | None
    weights: list[str]  # fingerprints of best and each snapshot


class ReliabilityOutput(TypedDict):
    """Stage 2: each unlabelled item's agreement across snapshots, and the split."""

    sets: dict[str, str]  # snapshot pseudo-label set -> key of what produced it
    scores: str  # path of scores.csv
    reliable: list[str]
    unreliable: list[str]
    cutoff: float
    score_mean: float


class PseudoOutput(TypedDict, total=False):
    """Stages 3 and 5: a pseudo-label set predicted by one checkpoint (``set`` is None
    when there were no items to label)."""

    set: str | None
    key: str | None
    items: int
    checkpoint: str
    pseudo_items: float
    pseudo_instances_mean: float
    pseudo_foreground_mean: float
    pseudo_prob_foreground_mean: float
    pseudo_ignored_mean: float  # share of pixels left out of the loss (stpp.ignore_band)
    predict_seconds: float


class CombinedOutput(TypedDict):
    """Stage 5: the unreliable items' set, and the union trained on in stage 6."""

    set: str
    key: str
    unreliable: PseudoOutput
    sources: list[str]


class EvaluationOutput(TypedDict, total=False):
    """Stage 7: the F1 table (one row per model), or why it was skipped."""

    table: list[dict[str, Any]]
    test_items: int
    skipped: str
