"""The ST++ stage bodies: what each stage does, one function each, with a typed output.

:meth:`cellst.stpp.pipeline.Pipeline.run` chains them in the paper's order, each under its
durable record (:class:`cellst.stpp.runner.StageRunner`), which decides whether a body runs
at all. A body gets the pipeline it belongs to (a :class:`StageContext`: its
configuration, folder, names, pseudo-label sets, MLflow parent run and log) and the outputs
of the earlier stages it needs, and returns its own output (:mod:`cellst.stpp.outputs`):

=====================  ===========================  =====================================
stage                  body                         output
=====================  ===========================  =====================================
1, 4, 6 (training)     :func:`train`                :class:`TrainingOutput`
2 reliability          :func:`reliability`          :class:`ReliabilityOutput`
3 pseudo_reliable      :func:`pseudo_label`         :class:`PseudoOutput`
5 pseudo_unreliable    :func:`pseudo_label_rest`    :class:`CombinedOutput`
7 evaluate             :func:`evaluate`             :class:`EvaluationOutput`
=====================  ===========================  =====================================

Stages 2, 3, 5 and 7 predict through :func:`predict_sets` (one pass over the images for
every model a stage needs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pandas as pd

from cellst.data.store import CellStore, StoreError
from cellst.fingerprint import VERSION as FINGERPRINT_VERSION
from cellst.fingerprint import stable_hash
from cellst.fs import atomic_write_bytes, atomic_write_json
from cellst.model.checkpoint_files import checkpoint_fingerprint
from cellst.stpp.inputs import infer_inputs, infer_inputs_before, without_stpp
from cellst.stpp.outputs import (
    CombinedOutput,
    EvaluationOutput,
    PseudoOutput,
    ReliabilityOutput,
    TrainingOutput,
)
from cellst.stpp.report import f1_table, table_metrics
from cellst.stpp.stages import StageRecord

if TYPE_CHECKING:
    from cellst.experiment import ExperimentConfig
    from cellst.inference.config import InferenceConfig
    from cellst.stpp.experiment import StppExperimentConfig
    from cellst.stpp.owned_sets import OwnedSets
    from cellst.stpp.parent_run import ParentRun
    from cellst.stpp.runner import StageRunner
    from cellst.stpp.stages import StageBook

__all__ = [
    "StageContext",
    "evaluate",
    "predict_set",
    "predict_sets",
    "pseudo_label",
    "pseudo_label_rest",
    "reliability",
    "train",
]


class StageContext(Protocol):
    """What a stage body uses of its pipeline (:class:`cellst.stpp.pipeline.Pipeline`)."""

    cfg: StppExperimentConfig
    dir: Path
    #: the pipeline's pseudo-label set prefix (``P`` of ``P-reliable``)
    prefix: str
    book: StageBook
    sets: OwnedSets
    parent: ParentRun
    #: the stage runner (``fresh``: the stage running now was forced)
    stage: StageRunner
    log: Callable[[str], None]

    def snapshot_sets(self) -> list[str]: ...

    def train_run_name(self, stage: str) -> str: ...

    def stage_train_config(
        self, stage: str, pseudo_set: str | None = None, init: str | None = None
    ) -> ExperimentConfig: ...


def train(
    pipe: StageContext,
    stage: str,
    decision: str,
    pseudo_set: str | None = None,
    init: str | None = None,
) -> TrainingOutput:
    """Stages 1, 4, 6: ``cellst train`` of the stage's configuration
    (:meth:`StageContext.stage_train_config`), resumed unless ``decision`` is fresh or the
    configuration changed."""
    from cellst.train.checkpoints import RunPaths
    from cellst.train.trainer import config_hash, same_configuration
    from cellst.train.trainer import train as run_training

    cfg = pipe.stage_train_config(stage, pseudo_set, init)
    name = pipe.train_run_name(stage)
    paths = RunPaths(Path(cfg.train.run_dir) / name)
    state = paths.read_state()
    same = same_configuration(state, without_stpp(cfg)) if state else None
    force = decision == "fresh" or (bool(state) and same is False)
    if not force and same and state.get("config_hash") != config_hash(cfg):
        # recorded by an earlier recipe, which hashed the stage's config with ``stpp`` at
        # its defaults: recorded by this one, so that the training resumes
        paths.write_state(config_hash=config_hash(cfg), fingerprint=FINGERPRINT_VERSION)
    result = run_training(
        cfg,
        run_name=name,
        parent_run_id=pipe.parent.run_id,
        tags={
            "cellst.stpp.stage": f"{pipe.book.index(stage)}_{stage}",
            "cellst.stpp.pipeline": str(pipe.dir),
        },
        force=force,
    )
    snaps = [str(p) for p in result.snapshots]
    m = result.metrics
    return TrainingOutput(
        run_path=str(result.run_path),
        best=str(result.best),
        snapshots=snaps,
        mlflow_run_id=result.mlflow_run_id,
        best_val_f1=m.get("best_val_f1"),
        epochs=m.get("epoch"),
        weights=[checkpoint_fingerprint(p) for p in [result.best, *snaps]],
    )


def reliability(
    pipe: StageContext, store: CellStore, s1: StageRecord, ids: list[str], infer: InferenceConfig
) -> ReliabilityOutput:
    """Stage 2: every snapshot of stage 1 predicts every unlabelled item in ``ids``; each
    item's score is the agreement of the earlier snapshots with the last; the top
    ``stpp.reliable_fraction`` is reliable."""
    from cellst.stpp.reliability import score_items, split_reliable

    snaps = s1.outputs["snapshots"]
    names = pipe.snapshot_sets()
    if len(snaps) != len(names):
        raise StoreError(
            f"stage 1 kept snapshots {[Path(s).name for s in snaps]}, expected "
            f"{len(names)} ({names}); re-run with --force-from 1"
        )
    jobs = [(name, snap, s1.output_digest) for snap, name in zip(snaps, names, strict=True)]
    done = predict_sets(pipe, jobs, ids, infer)
    keys = {name: key for name, (_, key) in zip(names, done, strict=True)}
    m = pipe.cfg.stpp
    scores = score_items(store, names, ids, m.reliability, use_ray=True)
    by = "modality" if m.reliable_per_modality else None
    reliable, unreliable, cutoff = split_reliable(scores, m.reliable_fraction, by=by)
    scores["reliable"] = scores["id"].isin(set(reliable))
    path = _record_reliability(pipe, scores, reliable, unreliable, cutoff)
    return ReliabilityOutput(
        sets=keys,
        scores=str(path),
        reliable=reliable,
        unreliable=unreliable,
        cutoff=cutoff,
        score_mean=float(scores["score"].mean()),
    )


def _record_reliability(
    pipe: StageContext,
    scores: pd.DataFrame,
    reliable: list[str],
    unreliable: list[str],
    cutoff: float,
) -> Path:
    """Stage 2's files (scores.csv, the two id lists, the histogram) and MLflow records;
    the path of scores.csv."""
    from cellst.tracking import histogram_figure, log_figure, log_metrics, log_table, set_tags
    from cellst.tracking.figures import save_figure

    m = pipe.cfg.stpp
    out = pipe.dir / "reliability"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "scores.csv", scores.to_csv(index=False).encode())
    atomic_write_bytes(out / "reliable.txt", "".join(f"{i}\n" for i in reliable).encode())
    atomic_write_bytes(out / "unreliable.txt", "".join(f"{i}\n" for i in unreliable).encode())
    log_table(scores, "reliability/scores.csv")
    split = pd.DataFrame(
        {
            "id": reliable + unreliable,
            "group": ["reliable"] * len(reliable) + ["unreliable"] * len(unreliable),
        }
    )
    log_table(split, "reliability/split.csv")
    title = f"ST++ reliability ({m.reliability}) of {len(scores)} unlabelled items"
    fig = histogram_figure(scores["score"], title, m.reliability, threshold=cutoff)
    save_figure(fig, out / "scores.png")
    log_figure(fig, "reliability/scores.png")
    log_metrics(
        {
            "n_unlabelled": len(scores),
            "n_reliable": len(reliable),
            "n_unreliable": len(unreliable),
            "score_mean": float(scores["score"].mean()),
            "score_min": float(scores["score"].min()),
            "score_max": float(scores["score"].max()),
            "cutoff": cutoff,
        }
    )
    set_tags({"cellst.stpp.measure": m.reliability})
    return out / "scores.csv"


def pseudo_label(
    pipe: StageContext,
    group: str,
    checkpoint: str,
    ids: list[str],
    infer: InferenceConfig,
    producer: str | None,
) -> PseudoOutput:
    """Stages 3 and 5: ``checkpoint`` pseudo-labels ``ids`` into the set ``P-<group>``
    (``producer``: the digest of the stage output it comes from)."""
    set_name = f"{pipe.prefix}-{group}"
    if not ids:
        return PseudoOutput(set=None, key=None, items=0)
    result, key = predict_set(pipe, set_name, checkpoint, ids, infer, producer, ignore=True)
    summary = _log_pseudo_stats(result, f"pseudo_labels/{group}.csv")
    return PseudoOutput(set=set_name, key=key, items=len(ids), checkpoint=checkpoint, **summary)


def pseudo_label_rest(
    pipe: StageContext, s4: StageRecord, s2: StageRecord, s3: StageRecord, infer: InferenceConfig
) -> CombinedOutput:
    """Stage 5: stage 4's model pseudo-labels the unreliable items; their set and the
    reliable one are combined into ``P-all`` (trained on in stage 6)."""
    from cellst.tracking import log_metrics, log_table

    part = pseudo_label(
        pipe, "unreliable", s4.outputs["best"], s2.outputs["unreliable"], infer, s4.output_digest
    )
    sources = [s for s in (s3.outputs["set"], part["set"]) if s]
    dest = f"{pipe.prefix}-all"
    key = stable_hash({"sources": sources, "keys": [s3.outputs["key"], part["key"]]})
    stats = pipe.sets.combine(sources, dest, key)
    log_table(stats, "pseudo_labels/all.csv")
    log_metrics({"combined_items": float(len(stats))})
    pipe.log(f"[stpp]   {dest}: {len(stats)} items ({' + '.join(sources)})")
    return CombinedOutput(set=dest, key=key, unreliable=part, sources=sources)


def evaluate(
    pipe: StageContext, store: CellStore, trained: dict[str, StageRecord]
) -> EvaluationOutput:
    """Stage 7: each trained model's best checkpoint predicts the test split; challenge
    F1 overall and per modality, one row per model (``report.csv``, ``report.json``)."""
    from cellst.metrics.sources import evaluate_sources
    from cellst.tracking import log_artifact, log_metrics, log_table

    cfg = pipe.cfg
    test = store.items(split="test", labeled=True)["id"].tolist()
    if not cfg.stpp.evaluate:
        return EvaluationOutput(skipped="stpp.evaluate is false")
    if not test:
        pipe.log("[stpp]   the store has no labelled test items: final evaluation skipped")
        return EvaluationOutput(skipped=f"store {store.root} has no labelled items in split 'test'")
    sets = {label: f"{pipe.prefix}-test-{label}" for label in trained}
    jobs = [(sets[k], rec.outputs["best"], rec.output_digest) for k, rec in trained.items()]
    predict_sets(pipe, jobs, test, cfg.inference)
    reports = {}
    for label, set_name in sets.items():
        reports[label] = evaluate_sources(
            store.root,
            store.root,
            pipe.dir / "eval" / label,
            pred_set=set_name,
            gt_split="test",
            count_boundary=cfg.evaluate.count_boundary,
            iou_threshold=cfg.evaluate.iou_threshold,
            progress=False,
        )
    table = f1_table(reports)
    atomic_write_bytes(pipe.dir / "report.csv", table.to_csv(index=False).encode())
    atomic_write_json(
        pipe.dir / "report.json",
        {"f1": table.to_dict(orient="records"), "test_items": len(test)},
        default=str,
    )
    log_table(table, "final/f1_table.csv")
    log_metrics(table_metrics(table))
    log_artifact(pipe.dir / "report.json", "final")
    return EvaluationOutput(table=table.to_dict(orient="records"), test_items=len(test))


# -- shared by the bodies ----------------------------------------------------------------------
def predict_set(
    pipe: StageContext,
    set_name: str,
    checkpoint: str,
    ids: list[str],
    infer: InferenceConfig,
    producer: str | None,
    ignore: bool = False,
) -> tuple[Any, str]:
    """Predict ``ids`` into ``set_name`` (resuming only a set made by the same producer);
    ``(PredictResult, key)``. ``ignore``: a pseudo-label set for training, which gets
    ignore masks when ``stpp.ignore_band`` is set."""
    return predict_sets(pipe, [(set_name, checkpoint, producer)], ids, infer, ignore)[0]


def predict_sets(
    pipe: StageContext,
    jobs: list[tuple[str, str, str | None]],
    ids: list[str],
    infer: InferenceConfig,
    ignore: bool = False,
) -> list[tuple[Any, str]]:
    """Each ``(set_name, checkpoint, producer)`` predicts ``ids`` into its set, all in one
    pass over the images (:func:`cellst.inference.batch.predict_sets`); a set is resumed
    only when made by the same producer (:meth:`cellst.stpp.owned_sets.OwnedSets.renew`).
    ``[(PredictResult, key)]`` in the order given.

    Post-processing: each checkpoint's calibrated settings, except for the fields the
    experiment sets explicitly (:func:`cellst.postprocess.calibrate.effective_postprocess`).
    """
    from cellst.inference.batch import SetRequest
    from cellst.inference.batch import predict_sets as predict_in_one_pass
    from cellst.postprocess.calibrate import effective_postprocess

    band = pipe.cfg.stpp.ignore_band if ignore else 0.0
    requests, keys, notes = [], [], []
    for set_name, checkpoint, producer in jobs:
        post, note = effective_postprocess(pipe.cfg.postprocess, checkpoint)
        what = {
            "producer": producer,
            "checkpoint": str(checkpoint),
            "infer": infer_inputs(infer),  # a new sw_batch_size resumes the set
            "post": post.model_dump(mode="json"),
            "ids": sorted(ids),
        }
        if band:  # (absent when 0: pipelines from before the option keep their keys)
            what["ignore_band"] = band
        # (the key as cellst hashed it before, with every inference setting: still this set)
        earlier = [stable_hash(infer_inputs_before(what, infer))]
        key = pipe.sets.renew(set_name, what, earlier=earlier, fresh=pipe.stage.fresh)
        requests.append(SetRequest(str(checkpoint), set_name, post, band))
        keys.append(key)
        notes.append(note)
    results = predict_in_one_pass(
        pipe.cfg.store, requests, ids, infer=infer, resources=pipe.cfg.predict, progress=False
    )
    shared = f" (one pass for {len(jobs)} models)" if len(jobs) > 1 else ""
    for (set_name, _, _), result, note in zip(jobs, results, notes, strict=True):
        pipe.log(f"[stpp]   {set_name}: {result.summary()}{shared}; {note}")
    return list(zip(results, keys, strict=True))


def _log_pseudo_stats(result: Any, artifact: str) -> dict[str, float]:
    """A pseudo-label set's per-item statistics, logged as a table and as their means."""
    from cellst.tracking import log_metrics, log_table

    stats = result.stats if result.stats is not None else pd.DataFrame()
    if stats.empty:
        return {}
    log_table(stats, artifact)
    summary = {
        "pseudo_items": float(len(stats)),
        "pseudo_instances_mean": float(stats["n_instances"].mean()),
        "pseudo_foreground_mean": float(stats["foreground_fraction"].mean()),
        "pseudo_prob_foreground_mean": float(stats["mean_prob_foreground"].mean()),
        "predict_seconds": float(result.seconds),
    }
    if "ignored_fraction" in stats:
        summary["pseudo_ignored_mean"] = float(stats["ignored_fraction"].mean())
    log_metrics(summary)
    return summary
