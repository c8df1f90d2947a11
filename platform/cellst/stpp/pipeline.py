"""``cellst stpp``: the six ST++ stages (plus a final evaluation) as a durable DAG on Ray.

Stages (each one a child MLflow run under one parent run of the pipeline)::

    1 supervised         Ray Train on the labelled items; ST++ snapshots at ~1/3, 2/3, end
    2 reliability        every snapshot predicts every unlabelled item (Ray Data actor pool,
                         no TTA, as ST++); score = mean agreement of each earlier snapshot
                         with the final one; the top ``reliable_fraction`` are reliable
    3 pseudo_reliable    stage-1 best checkpoint pseudo-labels the reliable items (flip TTA)
    4 retrain_reliable   Ray Train on labelled + reliable pseudo-labels (fresh init; by
                         default as many labelled crops per epoch as stage 1, plus the
                         pseudo-labelled ones: see ``stpp.scale_retrain_crops``)
    5 pseudo_unreliable  stage-4 best checkpoint pseudo-labels the unreliable items (TTA);
                         the reliable and unreliable pseudo-labels are then combined
    6 retrain_all        Ray Train on labelled + all pseudo-labels (fresh init)
    7 evaluate           the test split predicted by the best checkpoints of stages 1, 4, 6:
                         challenge F1 supervised-only vs round 1 vs round 2, per modality

Each stage depends only on the outputs of earlier ones (their digests are hashed into its
input hash), so a re-run skips every finished stage whose inputs did not change, resumes the
first unfinished one (see :mod:`cellst.stpp.stages`) and runs the rest.

Files, in ``<stpp.run_dir>/<stpp.name>/``::

    pipeline.json            MLflow parent run id and tracking URI, the pseudo-label sets
                             this pipeline owns (with the key of what produced them)
    config.yaml              the resolved configuration of the last run
    stages/<n>_<stage>.json  durable stage records
    train/<name>-1_supervised/, -4_retrain_reliable/, -6_retrain_all/   training runs
    reliability/scores.csv, reliable.txt, unreliable.txt, scores.png
    eval/<model>/metrics.json, report.csv, report.json      test-split results
    mlflow.db, mlartifacts/  the embedded MLflow store (unless tracking says otherwise)

Pseudo-label sets (in the store), with ``P`` the set prefix: ``P-snapshot_eNNN`` (stage 2,
one per snapshot), ``P-reliable`` (3), ``P-unreliable`` (5), ``P-all`` (5: the union of the
reliable and unreliable sets, hard-linked copies, trained on in stage 6) and
``P-test-{supervised,round1,round2}`` (7). A set of one of these names that this pipeline
did not write is refused unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cellst.config import ConfigError, dump_config
from cellst.data.store import CellStore, StoreError, atomic_write_bytes, store_lock
from cellst.fingerprint import checkpoint_fingerprint, config_fingerprint, stable_hash
from cellst.stpp.experiment import StppExperimentConfig
from cellst.stpp.stages import StageBook, StageRecord, atomic_write_json

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
META = "pipeline.json"


class StppStopped(StoreError):
    """The pipeline stopped early for a reason of the data (e.g. no unlabelled items)."""


@dataclass
class StppResult:
    """What a pipeline run produced."""

    pipeline_dir: Path
    records: list[StageRecord]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    report: pd.DataFrame | None = None
    parent_run_id: str | None = None
    tracking_uri: str | None = None

    def record(self, name: str) -> StageRecord:
        return next(r for r in self.records if r.name == name)


# ----------------------------------------------------------------------------- helpers
def items_digest(store: CellStore, split: str) -> str:
    """Hash of a split's items and their content (ids, source and label hashes)."""
    df = store.items(split=split).sort_values("id")
    cols = ["id", "source_sha256", "label_sha256", "image_array", "label_array"]
    return stable_hash(df[cols].values.tolist())


def training_hash(cfg) -> str:
    """Fingerprint of what a training stage computes (not where it logs, runs or predicts)."""
    return config_fingerprint(
        cfg, {"": ("store", "name"), "predict": ("*",), "evaluate": ("*",), "ingest": ("*",)}
    )


def retrain_crops(crops: int, pseudo_weight: float, max_factor: float = 4.0) -> int:
    """Crops per epoch of a re-training stage that keeps stage 1's labelled crops per epoch."""
    factor = min(1.0 / (1.0 - pseudo_weight), max_factor) if pseudo_weight < 1 else 1.0
    return int(math.ceil(crops * factor))


def training_crops(cfg) -> dict[str, int]:
    """Training crops (epochs x crops per epoch) of the three training stages of ``cfg``:
    the compute a supervised-only baseline needs for an equal-compute comparison."""
    crops, epochs = cfg.data.crops_per_epoch, cfg.train.epochs
    re_crops = (
        retrain_crops(crops, cfg.train.pseudo_weight) if cfg.stpp.scale_retrain_crops else crops
    )
    re_epochs = cfg.stpp.retrain_epochs or epochs
    return {
        "supervised": epochs * crops,
        "retrain_reliable": re_epochs * re_crops,
        "retrain_all": re_epochs * re_crops,
    }


def read_meta(pipeline_dir: str | Path) -> dict[str, Any]:
    p = Path(pipeline_dir) / META
    return json.loads(p.read_text()) if p.is_file() else {}


def pipeline_status(pipeline_dir: str | Path) -> tuple[dict[str, Any], list[StageRecord]]:
    """``(pipeline.json, stage records)`` of a pipeline folder, for ``cellst stpp status``."""
    root = Path(pipeline_dir)
    if not (root / "stages").is_dir() and not (root / META).is_file():
        raise FileNotFoundError(f"{root} is not an ST++ pipeline folder (no {META}, no stages/)")
    return read_meta(root), StageBook(root, STAGES).records()


def combine_sets(store: CellStore, sources: list[str], dest: str, meta: dict) -> pd.DataFrame:
    """Write the pseudo-label set ``dest`` as the union of ``sources``; its statistics
    (:meth:`cellst.data.pseudo.PseudoLabelSet.combine`)."""
    from cellst.data.pseudo import PseudoLabelSet

    return PseudoLabelSet.combine(store.root, sources, dest, meta).stats()


def _checkpoints_present(outputs: dict) -> bool:
    paths = [outputs.get("best"), *outputs.get("snapshots", [])]
    return all(p and (Path(p) / "model.json").is_file() for p in paths)


def _sets_present(store: CellStore, names: list[str | None]) -> bool:
    """Whether the pseudo-label sets exist (None: a stage that wrote no set)."""
    have = set(store.pseudo_sets())
    return all(n is None or n in have for n in names)


def f1_table(reports: dict[str, dict]) -> pd.DataFrame:
    """One row per model: test F1 overall and per modality (NaN where a model lacks one)."""
    mods = sorted({m for r in reports.values() for m in r.get("per_modality", {})})
    rows = []
    for label, r in reports.items():
        row = {
            "model": label,
            "stage": MODELS[label],
            "stage_index": STAGES.index(MODELS[label]) + 1,
            "images": r.get("count"),
            "f1": r["f1"],
        }
        for m in mods:
            block = r.get("per_modality", {}).get(m)
            row[f"f1_{m}"] = block["f1"] if block else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the pipeline
class Pipeline:
    """One ST++ pipeline (a folder); :func:`run_stpp` is the entry point."""

    def __init__(
        self,
        cfg: StppExperimentConfig,
        *,
        overwrite: bool = False,
        log: Callable[[str], None] = print,
    ):
        self.cfg = cfg
        self.overwrite = overwrite
        self.log = log
        self.dir = cfg.pipeline_dir
        self.book = StageBook(self.dir, STAGES)
        self.prefix = cfg.set_prefix
        self.parent_id: str | None = None
        self.tracking = cfg.tracking
        self.uri: str | None = None
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.report: pd.DataFrame | None = None

    # -- names ---------------------------------------------------------------------------------
    def snapshot_sets(self) -> list[str]:
        return [f"{self.prefix}-snapshot_e{e:03d}" for e in self.cfg.train.snapshot_epochs()]

    def set_names(self) -> list[str]:
        names = self.snapshot_sets()
        names += [f"{self.prefix}-{s}" for s in ("reliable", "unreliable", "all")]
        names += [f"{self.prefix}-test-{m}" for m in MODELS]
        return names

    def train_run_name(self, stage: str) -> str:
        return f"{self.cfg.pipeline_name}-{self.book.index(stage)}_{stage}"

    # -- metadata ------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return read_meta(self.dir)

    def save_meta(self, **update: Any) -> dict[str, Any]:
        meta = {**self.meta(), **update}
        atomic_write_json(self.dir / META, meta)
        return meta

    # -- checks before anything runs -----------------------------------------------------------
    def preflight(self) -> CellStore:
        from cellst.train.trainer import check_request

        store, _, val_ids = check_request(self.cfg.base())
        if not val_ids:
            raise StoreError(
                f"store {store.root} leaves no validation items (data.val_fraction="
                f"{self.cfg.data.val_fraction}, {len(store.ids('labeled'))} labelled items): ST++ "
                f"keeps the best checkpoint by validation F1 and calibrates on those items"
            )
        owned = self.meta().get("sets", {})
        foreign = [s for s in self.set_names() if s in store.pseudo_sets() and s not in owned]
        if foreign and not self.overwrite:
            raise StoreError(
                f"pseudo-label set(s) {foreign} in store {store.root} were not written by this "
                f"pipeline ({self.dir}); pass --overwrite to replace them, or choose another "
                f"--set stpp.set_prefix=..."
            )
        return store

    # -- MLflow --------------------------------------------------------------------------------
    def _resolve_tracking(self) -> None:
        if not self.cfg.tracking.enabled:
            return
        from cellst.tracking import resolve_tracking

        uri, artifacts, experiment = resolve_tracking(self.cfg.tracking, self.dir, self.cfg.name)
        self.uri = uri
        self.tracking = self.cfg.tracking.model_copy(
            update={"tracking_uri": uri, "artifact_root": artifacts, "experiment": experiment}
        )

    def _open_parent(self, store: CellStore) -> None:
        """Create the pipeline's parent run, or re-attach the one of an earlier attempt.

        Creating it needs the tracking server (:class:`~cellst.tracking.TrackingUnavailable`
        before any stage runs); everything after is best-effort, as all tracking is.
        """
        if not self.tracking.enabled:
            return
        from mlflow.tracking import MlflowClient

        from cellst.tracking import log_config, set_tags, start_run, store_tags
        from cellst.tracking.buffered import http_limits
        from cellst.tracking.mlflow_utils import _guarded

        meta = self.meta()
        run_id = meta.get("parent_run_id") if meta.get("tracking_uri") == self.uri else None
        if run_id:
            try:
                with http_limits(self.tracking.timeout_s):
                    run = MlflowClient(self.uri).get_run(run_id)
                if run.info.lifecycle_stage == "deleted":
                    run_id = None
            except Exception:  # noqa: BLE001 - a run that cannot be read is replaced
                run_id = None
        tags = {
            **store_tags(store),
            "cellst.stage": "stpp",
            "cellst.stpp.pipeline": str(self.dir),
        }
        with start_run(
            self.tracking,
            self.dir,
            self.cfg.name,
            f"{self.cfg.pipeline_name}-stpp",
            run_id=run_id,
            tags=tags,
        ) as run:
            self.parent_id = run.info.run_id
            self.save_meta(parent_run_id=self.parent_id, tracking_uri=self.uri)
            with _quiet_param_warnings():
                log_config(self.cfg)
            set_tags({"cellst.stpp.attempt_started": time.strftime("%Y-%m-%d %H:%M:%S")})
        # the parent stays RUNNING while the stages run as its children (best-effort: a
        # failure is one line, the stages run all the same)
        _guarded(
            "the parent run's RUNNING status",
            MlflowClient(self.uri).update_run,
            self.parent_id,
            status="RUNNING",
        )

    def _close_parent(self, status: str, tags: dict | None = None) -> None:
        """End the parent run with ``status``; best-effort: what the server cannot take now
        is kept in the pipeline folder's pending file and sent by a later run."""
        if not self.parent_id:
            return
        from cellst.tracking import BufferedMetricLogger

        journal = BufferedMetricLogger(
            self.uri,
            self.parent_id,
            self.dir,
            timeout_s=self.tracking.timeout_s,
            retry_every_s=self.tracking.retry_every_s,
        )
        journal.set_tags(tags or {})
        journal.set_terminated(status)
        journal.close()

    @contextlib.contextmanager
    def _child(self, rec: StageRecord) -> Iterator[str | None]:
        from cellst.tracking import start_run

        with start_run(
            self.tracking,
            self.dir,
            self.cfg.name,
            f"{self.cfg.pipeline_name}-{rec.key}",
            parent_run_id=self.parent_id,
            run_id=rec.mlflow_run_id,
            tags={
                "cellst.stage": f"stpp.{rec.name}",
                "cellst.stpp.stage": rec.key,
                "cellst.stpp.pipeline": str(self.dir),
            },
        ) as run:
            yield run.info.run_id

    # -- the stage runner ----------------------------------------------------------------------
    def stage(
        self,
        name: str,
        inputs: dict[str, Any],
        body: Callable[[str], dict],
        training: bool = False,
        present: Callable[[dict], bool] | None = None,
    ) -> StageRecord:
        """Run ``body(decision)`` as stage ``name`` unless it is done with these inputs.

        ``present(outputs)`` says whether a finished stage's outputs still exist; a stage
        whose outputs were deleted runs again.
        """
        n = self.book.index(name)
        h = stable_hash(inputs)
        decision = self.book.decide(name, h)
        head = f"[stpp] stage {n}/{len(STAGES)} {name} ({TITLES[name]})"
        if decision == "skip" and present is not None and not present(self.book.get(name).outputs):
            self.log(f"{head}: done before, but its outputs are gone -> running again")
            decision = "fresh"
        if decision == "skip":
            self.log(f"{head}: done, inputs unchanged -> skipped")
            self.skipped.append(name)
            return self.book.get(name)
        self.log(f"{head}: {'resuming' if decision == 'resume' else 'running'}")
        rec = self.book.start(name, h, fresh=decision == "fresh")
        t0 = time.perf_counter()
        try:
            if training:
                outputs = body(decision)
                run_id = outputs.get("mlflow_run_id")
            else:
                with self._child(rec) as run_id:
                    self.book.update(name, mlflow_run_id=run_id)
                    outputs = body(decision)
        except BaseException as exc:
            self.book.fail(name, f"{type(exc).__name__}: {exc}")
            raise
        rec = self.book.finish(name, outputs, run_id)
        self.ran.append(name)
        self.log(f"{head}: done in {time.perf_counter() - t0:.0f} s")
        return rec

    # -- building blocks -----------------------------------------------------------------------
    def _train(self, stage: str, decision: str, pseudo_set=None, init=None) -> dict[str, Any]:
        from cellst.train.checkpoints import RunPaths
        from cellst.train.trainer import config_hash, train

        cfg = self.stage_train_config(stage, pseudo_set, init)
        name = self.train_run_name(stage)
        state = RunPaths(Path(cfg.train.run_dir) / name).read_state()
        force = decision == "fresh" or (
            bool(state) and state.get("config_hash") != config_hash(cfg)
        )
        result = train(
            cfg,
            run_name=name,
            parent_run_id=self.parent_id,
            tags={
                "cellst.stpp.stage": f"{self.book.index(stage)}_{stage}",
                "cellst.stpp.pipeline": str(self.dir),
            },
            force=force,
        )
        snaps = [str(p) for p in result.snapshots]
        m = result.metrics
        return {
            "run_path": str(result.run_path),
            "best": str(result.best),
            "snapshots": snaps,
            "mlflow_run_id": result.mlflow_run_id,
            "best_val_f1": m.get("best_val_f1"),
            "epochs": m.get("epoch"),
            "weights": [checkpoint_fingerprint(p) for p in [result.best, *snaps]],
        }

    def stage_train_config(self, stage: str, pseudo_set=None, init=None):
        cfg = self.cfg.base()
        cfg.tracking = self.tracking
        cfg.train.run_dir = str(self.dir / "train")
        cfg.train.run_name = None
        cfg.train.pseudo_set = pseudo_set
        cfg.train.init_checkpoint = None if init is None else str(init)
        if pseudo_set is not None and self.cfg.stpp.scale_retrain_crops:
            cfg.data.crops_per_epoch = retrain_crops(
                cfg.data.crops_per_epoch, cfg.train.pseudo_weight
            )
        if pseudo_set is not None and self.cfg.stpp.retrain_epochs is not None:
            cfg.train.epochs = self.cfg.stpp.retrain_epochs
        return cfg

    def _predict_set(self, set_name: str, checkpoint: str, ids: list[str], infer, producer):
        """Predict ``ids`` into ``set_name`` (resuming only a set made by the same producer).

        Post-processing: the checkpoint's calibrated settings, except for the fields the
        experiment sets explicitly (:func:`cellst.postprocess.calibrate.effective_postprocess`).
        """
        from cellst.inference.batch import predict
        from cellst.postprocess.calibrate import effective_postprocess

        post, note = effective_postprocess(self.cfg.postprocess, checkpoint)
        key = stable_hash(
            {
                "producer": producer,
                "checkpoint": str(checkpoint),
                "infer": infer.model_dump(mode="json"),
                "post": post.model_dump(mode="json"),
                "ids": sorted(ids),
            }
        )
        sets = self.meta().get("sets", {})
        if sets.get(set_name) != key:
            from cellst.data.pseudo import PseudoLabelSet

            PseudoLabelSet(Path(self.cfg.store).absolute(), set_name).remove()
            self.save_meta(sets={**sets, set_name: key})
        result = predict(
            checkpoint,
            self.cfg.store,
            set_name=set_name,
            ids=ids,
            infer=infer,
            post=post,
            resources=self.cfg.predict,
            progress=False,
            calibrated=False,  # ``post`` is already the effective setting
        )
        self.log(f"[stpp]   {set_name}: {result.summary()}; {note}")
        return result, key

    def _log_pseudo_stats(self, result, artifact: str) -> dict[str, float]:
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
        log_metrics(summary)
        return summary

    # -- stages --------------------------------------------------------------------------------
    def run(self, store: CellStore) -> None:
        cfg = self.cfg
        unlabelled = store.ids("unlabeled")
        s1 = self.stage(
            "supervised",
            {
                "train": training_hash(self.stage_train_config("supervised")),
                "labelled": items_digest(store, "labeled"),
            },
            lambda d: self._train("supervised", d),
            training=True,
            present=_checkpoints_present,
        )
        if not unlabelled:
            for later in STAGES[1:]:
                self.book.reset(later)
            raise StppStopped(
                f"store {store.root} has no unlabelled items (split 'unlabeled'): ST++ stopped "
                f"after stage 1 (supervised training; best checkpoint {s1.outputs['best']}). "
                f"Ingest unlabelled images (`cellst ingest FOLDER --out {cfg.store} --split "
                f"unlabeled`) and re-run: stage 1 will not be recomputed."
            )
        no_tta = cfg.inference.model_copy(update={"tta": False})
        tta = cfg.inference.model_copy(update={"tta": cfg.stpp.tta})
        s2 = self.stage(
            "reliability",
            {
                "s1": s1.output_digest,
                "unlabelled": items_digest(store, "unlabeled"),
                "infer": no_tta.model_dump(mode="json"),
                "post": cfg.postprocess.model_dump(mode="json"),
                "measure": cfg.stpp.reliability,
                "fraction": cfg.stpp.reliable_fraction,
            },
            lambda d: self._reliability(store, s1, unlabelled, no_tta),
            present=lambda o: _sets_present(store, list(o.get("sets", {}))),
        )
        s3 = self.stage(
            "pseudo_reliable",
            {
                "s1": s1.output_digest,
                "s2": s2.output_digest,
                "infer": tta.model_dump(mode="json"),
                "post": cfg.postprocess.model_dump(mode="json"),
            },
            lambda d: self._pseudo(
                "reliable", s1.outputs["best"], s2.outputs["reliable"], tta, s1.output_digest
            ),
            present=lambda o: _sets_present(store, [o.get("set")]),
        )
        s4 = self._retrain(store, "retrain_reliable", pseudo=s3, previous=s1)
        s5 = self.stage(
            "pseudo_unreliable",
            {
                "s4": s4.output_digest,
                "s2": s2.output_digest,
                "s3": s3.output_digest,
                "infer": tta.model_dump(mode="json"),
                "post": cfg.postprocess.model_dump(mode="json"),
            },
            lambda d: self._pseudo_unreliable(s4, s2, s3, tta),
            present=lambda o: _sets_present(store, [o.get("set")]),
        )
        s6 = self._retrain(store, "retrain_all", pseudo=s5, previous=s4)
        trained = {"supervised": s1, "round1": s4, "round2": s6}
        s7 = self.stage(
            "evaluate",
            {
                "models": {k: r.output_digest for k, r in trained.items()},
                "test": items_digest(store, "test"),
                "enabled": cfg.stpp.evaluate,
                "infer": cfg.inference.model_dump(mode="json"),
                "post": cfg.postprocess.model_dump(mode="json"),
                "evaluate": cfg.evaluate.model_dump(mode="json"),
            },
            lambda d: self._evaluate(store, trained),
        )
        if s7.outputs.get("table"):
            self.report = pd.DataFrame(s7.outputs["table"])

    def _retrain(
        self, store: CellStore, stage: str, pseudo: StageRecord, previous: StageRecord
    ) -> StageRecord:
        """Stage 4 or 6: labelled + the pseudo-labels of ``pseudo``; warm-started from
        ``previous``'s best checkpoint only when ``stpp.fresh_init`` is false."""
        init = None if self.cfg.stpp.fresh_init else previous.outputs["best"]
        pseudo_set = pseudo.outputs["set"]
        return self.stage(
            stage,
            {
                "train": training_hash(self.stage_train_config(stage, pseudo_set, init)),
                "labelled": items_digest(store, "labeled"),
                "pseudo": pseudo.output_digest,
                "init": None if init is None else previous.output_digest,
            },
            lambda d: self._train(stage, d, pseudo_set, init),
            training=True,
            present=_checkpoints_present,
        )

    def _reliability(self, store, s1: StageRecord, ids: list[str], infer) -> dict[str, Any]:
        from cellst.stpp.reliability import score_items, split_reliable
        from cellst.tracking import histogram_figure, log_figure, log_metrics, log_table, set_tags
        from cellst.tracking.figures import save_figure

        snaps = s1.outputs["snapshots"]
        names = self.snapshot_sets()
        if len(snaps) != len(names):
            raise StoreError(
                f"stage 1 kept snapshots {[Path(s).name for s in snaps]}, expected "
                f"{len(names)} ({names}); re-run with --force-from 1"
            )
        keys = {}
        for snap, set_name in zip(snaps, names, strict=True):
            _, keys[set_name] = self._predict_set(set_name, snap, ids, infer, s1.output_digest)
        m = self.cfg.stpp
        scores = score_items(store, names, ids, m.reliability, use_ray=True)
        reliable, unreliable, cutoff = split_reliable(scores, m.reliable_fraction)
        scores["reliable"] = scores["id"].isin(set(reliable))
        out = self.dir / "reliability"
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
        title = f"ST++ reliability ({m.reliability}) of {len(ids)} unlabelled items"
        fig = histogram_figure(scores["score"], title, m.reliability, threshold=cutoff)
        save_figure(fig, out / "scores.png")
        log_figure(fig, "reliability/scores.png")
        log_metrics(
            {
                "n_unlabelled": len(ids),
                "n_reliable": len(reliable),
                "n_unreliable": len(unreliable),
                "score_mean": float(scores["score"].mean()),
                "score_min": float(scores["score"].min()),
                "score_max": float(scores["score"].max()),
                "cutoff": cutoff,
            }
        )
        set_tags({"cellst.stpp.measure": m.reliability})
        return {
            "sets": keys,
            "scores": str(out / "scores.csv"),
            "reliable": reliable,
            "unreliable": unreliable,
            "cutoff": cutoff,
            "score_mean": float(scores["score"].mean()),
        }

    def _pseudo(self, group: str, checkpoint: str, ids: list[str], infer, producer):
        set_name = f"{self.prefix}-{group}"
        if not ids:
            return {"set": None, "key": None, "items": 0}
        result, key = self._predict_set(set_name, checkpoint, ids, infer, producer)
        summary = self._log_pseudo_stats(result, f"pseudo_labels/{group}.csv")
        return {"set": set_name, "key": key, "items": len(ids), "checkpoint": checkpoint, **summary}

    def _pseudo_unreliable(self, s4, s2, s3, infer) -> dict[str, Any]:
        from cellst.tracking import log_metrics, log_table

        part = self._pseudo(
            "unreliable", s4.outputs["best"], s2.outputs["unreliable"], infer, s4.output_digest
        )
        sources = [s for s in (s3.outputs["set"], part["set"]) if s]
        dest = f"{self.prefix}-all"
        key = stable_hash({"sources": sources, "keys": [s3.outputs["key"], part["key"]]})
        self.save_meta(sets={**self.meta().get("sets", {}), dest: key})
        store = CellStore(self.cfg.store)
        stats = combine_sets(store, sources, dest, {"pipeline": str(self.dir), "key": key})
        log_table(stats, "pseudo_labels/all.csv")
        log_metrics({"combined_items": float(len(stats))})
        self.log(f"[stpp]   {dest}: {len(stats)} items ({' + '.join(sources)})")
        return {"set": dest, "key": key, "unreliable": part, "sources": sources}

    def _evaluate(self, store: CellStore, trained: dict[str, StageRecord]) -> dict[str, Any]:
        from cellst.metrics.sources import evaluate_sources
        from cellst.tracking import log_artifact, log_metrics, log_table

        cfg = self.cfg
        test = store.items(split="test", labeled=True)["id"].tolist()
        if not cfg.stpp.evaluate:
            return {"skipped": "stpp.evaluate is false"}
        if not test:
            self.log("[stpp]   the store has no labelled test items: final evaluation skipped")
            return {"skipped": f"store {store.root} has no labelled items in split 'test'"}
        reports = {}
        for label, rec in trained.items():
            set_name = f"{self.prefix}-test-{label}"
            self._predict_set(set_name, rec.outputs["best"], test, cfg.inference, rec.output_digest)
            reports[label] = evaluate_sources(
                store.root,
                store.root,
                self.dir / "eval" / label,
                pred_set=set_name,
                gt_split="test",
                count_boundary=cfg.evaluate.count_boundary,
                iou_threshold=cfg.evaluate.iou_threshold,
                progress=False,
            )
        table = f1_table(reports)
        atomic_write_bytes(self.dir / "report.csv", table.to_csv(index=False).encode())
        atomic_write_json(
            self.dir / "report.json",
            {"f1": table.to_dict(orient="records"), "test_items": len(test)},
        )
        log_table(table, "final/f1_table.csv")
        log_metrics(table_metrics(table))
        log_artifact(self.dir / "report.json", "final")
        return {"table": table.to_dict(orient="records"), "test_items": len(test)}

    def _finish_parent(self) -> None:
        """Log the final F1 table and the stage summary on the parent run, and end it.

        Best-effort: with the server down, one line says so and the end of the run is kept
        in the pending file (the table is in ``report.csv`` all the same).
        """
        if not self.parent_id:
            return
        from cellst.tracking import TrackingUnavailable
        from cellst.tracking.buffered import say

        try:
            self._log_final()
        except TrackingUnavailable as exc:
            say(f"tracking: {exc}; the final table was not logged (see {self.dir})")
            self._close_parent("FINISHED", {"cellst.stpp.completed": "true"})

    def _log_final(self) -> None:
        from cellst.tracking import log_metrics, log_table, set_tags, start_run

        with start_run(self.tracking, self.dir, self.cfg.name, None, run_id=self.parent_id):
            stages = pd.DataFrame(
                [
                    {
                        "stage": r.key,
                        "status": r.status,
                        "seconds": r.seconds,
                        "attempts": r.attempts,
                        "mlflow_run_id": r.mlflow_run_id,
                    }
                    for r in self.book.records()
                ]
            )
            log_table(stages, "stages.csv")
            rel = self.book.get("reliability").outputs
            if rel:
                log_metrics(
                    {"n_reliable": len(rel["reliable"]), "n_unreliable": len(rel["unreliable"])}
                )
            if self.report is not None:
                log_table(self.report, "final/f1_table.csv")
                log_metrics(table_metrics(self.report))
            set_tags({"cellst.stpp.completed": "true"})


def format_f1_table(df: pd.DataFrame):
    """The F1 table as a ``rich`` table: one row per model, overall and per modality."""
    from rich.table import Table

    table = Table(title="test-split F1 (NeurIPS 2022 CellSeg, IoU 0.5)")
    table.add_column("model")
    table.add_column("overall", justify="right")
    mods = [c for c in df.columns if c.startswith("f1_")]
    for c in mods:
        table.add_column(c[3:], justify="right")
    for row in df.to_dict(orient="records"):
        table.add_row(
            f"{row['model']} (stage {row['stage_index']})",
            f"{row['f1']:.4f}",
            *[f"{row[c]:.4f}" if row[c] == row[c] else "-" for c in mods],
        )
    return table


def table_metrics(table: pd.DataFrame) -> dict[str, float]:
    """Metrics of an F1 table: ``test_f1_<model>`` and ``test_f1_<model>_<modality>`` for
    every model, and for the pipeline's final model (its last stage) the names every cellst
    run uses, ``test_f1`` and ``test_f1/<modality>``, so that MLflow's compare view and
    ``cellst compare`` line pipelines up with trainings and sweeps."""
    out = {}
    rows = table.to_dict(orient="records")
    for row in rows:
        for k, v in row.items():
            if k == "f1" or k.startswith("f1_"):
                out[f"test_{k.replace('f1', 'f1_' + row['model'], 1)}"] = v
    if rows:
        final = max(rows, key=lambda r: r.get("stage_index", 0))
        out["test_f1"] = final["f1"]
        for k, v in final.items():
            if k.startswith("f1_"):
                out[f"test_f1/{k[3:]}"] = v
    return {k: float(v) for k, v in out.items() if v == v}


@contextlib.contextmanager
def _quiet_param_warnings() -> Iterator[None]:
    """A re-run with a changed config cannot re-log params (immutable); say so once."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        yield
    changed = [w for w in caught if "MLflow params are immutable" in str(w.message)]
    if changed:
        print(
            f"note: {len(changed)} config value(s) differ from the first attempt's params of "
            f"the MLflow parent run; the resolved config is in config.yaml"
        )


def run_stpp(
    cfg: StppExperimentConfig,
    force_from: str | int | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> StppResult:
    """Run (or resume) the ST++ pipeline described by ``cfg``.

    Parameters
    ----------
    cfg : StppExperimentConfig
        From :func:`cellst.stpp.config.load_stpp_config`.
    force_from : stage number or name, optional
        Run this stage and every later one again even if done with the same inputs.
    overwrite : bool
        Replace pseudo-label sets of this pipeline's names that another run wrote.

    Raises
    ------
    ConfigError
        An unknown ``force_from`` stage.
    StoreError
        Store problems (found before anything runs), a foreign pseudo-label set, another
        process running the same pipeline; :class:`StppStopped` when the store has no
        unlabelled items (after stage 1).
    """
    pipe = Pipeline(cfg, overwrite=overwrite, log=log)
    if force_from is not None:
        try:
            pipe.book.resolve(force_from)
        except ValueError as exc:
            raise ConfigError(f"--force-from: {exc}") from None
    store = pipe.preflight()
    pipe.dir.mkdir(parents=True, exist_ok=True)
    with store_lock(pipe.dir / ".lock", what=f"the run folder {pipe.dir}"):
        if force_from is not None:
            names = pipe.book.force_from(force_from)
            log(f"[stpp] --force-from {force_from}: stages {', '.join(names)} will run again")
        atomic_write_bytes(pipe.dir / "config.yaml", dump_config(cfg).encode())
        seen = pipe.meta().get("store_versions", [])
        pipe.save_meta(
            pipeline=cfg.pipeline_name,
            store=str(store.root),
            # the manifest version each attempt started from (an ingest between attempts
            # shows here as a second entry)
            store_versions=seen if store.version in seen else [*seen, store.version],
            set_prefix=pipe.prefix,
            created_at=pipe.meta().get("created_at", time.time()),
        )
        pipe._resolve_tracking()
        pipe._open_parent(store)
        try:
            pipe.run(store)
        except StppStopped:
            pipe._close_parent("FINISHED", {"cellst.stpp.stopped_after": "1_supervised"})
            raise
        except KeyboardInterrupt:
            pipe._close_parent("KILLED")
            raise
        except BaseException:
            pipe._close_parent("FAILED")
            raise
        pipe._finish_parent()
    return StppResult(
        pipe.dir,
        pipe.book.records(),
        pipe.ran,
        pipe.skipped,
        pipe.report,
        pipe.parent_id,
        pipe.uri,
    )


def pipeline_active(pipeline_dir: str | Path) -> bool:
    """Whether a process holds the pipeline's lock (is running it now)."""
    import fcntl

    lock = Path(pipeline_dir) / ".lock"
    if not lock.is_file():
        return False
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def outputs_summary(rec: StageRecord) -> str:
    """One line about a stage's outputs, for ``cellst stpp status``."""
    o = rec.outputs or {}
    if not o:
        return ""
    if "best" in o:
        f1 = o.get("best_val_f1")
        f1_text = f"{f1:.3f}" if isinstance(f1, int | float) else "?"
        return f"{Path(o['run_path']).name}: {o.get('epochs')} epochs, best val F1 {f1_text}"
    if "reliable" in o:
        return (
            f"{len(o['reliable'])} reliable / {len(o['unreliable'])} unreliable, "
            f"cut-off {o['cutoff']:.3f}"
        )
    if "table" in o:
        return ", ".join(f"{r['model']} {r['f1']:.3f}" for r in o["table"]) + " (test F1)"
    if "skipped" in o:
        return f"skipped: {o['skipped']}"
    if "sources" in o:
        return f"set {o['set']} = {' + '.join(o['sources'])}"
    if "set" in o:
        return f"set {o['set']}: {o.get('items', 0)} items"
    return ""
