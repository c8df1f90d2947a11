"""``cellst stpp``: the six ST++ stages (plus a final evaluation) as a durable DAG on Ray.

Stages (each one a child MLflow run under one parent run of the pipeline)::

    1 supervised         Ray Train on the labelled items; ST++ snapshots at ~1/3, 2/3, end
    2 reliability        every snapshot predicts every unlabelled item (one pass of a Ray Data
                         actor pool holding every snapshot, no TTA, as ST++); score = mean
                         agreement of each earlier snapshot with the final one; the top
                         ``reliable_fraction`` are reliable
    3 pseudo_reliable    stage-1 best checkpoint pseudo-labels the reliable items (flip TTA)
    4 retrain_reliable   Ray Train on labelled + reliable pseudo-labels (fresh init; by
                         default as many labelled crops per epoch as stage 1, plus the
                         pseudo-labelled ones: see ``stpp.scale_retrain_crops``)
    5 pseudo_unreliable  stage-4 best checkpoint pseudo-labels the unreliable items (TTA);
                         the reliable and unreliable pseudo-labels are then combined
    6 retrain_all        Ray Train on labelled + all pseudo-labels (fresh init)
    7 evaluate           the test split predicted by the best checkpoints of stages 1, 4, 6
                         (one pass holding the three models):
                         challenge F1 supervised-only vs round 1 vs round 2, per modality

Modules: the stage names and each stage's typed output (:mod:`cellst.stpp.outputs`), the
durable records and ``pipeline.json`` (:mod:`cellst.stpp.stages`), the MLflow parent run
(:mod:`cellst.stpp.parent_run`), the generic stage runner (:mod:`cellst.stpp.runner`), what
each stage's input hash is made of (:mod:`cellst.stpp.inputs`), the re-training schedule
(:mod:`cellst.stpp.schedule`), the pseudo-label sets the pipeline owns and when one is
written anew (:mod:`cellst.stpp.owned_sets`), the F1 table (:mod:`cellst.stpp.report`), the
stage bodies, one function each (:mod:`cellst.stpp.bodies`); this module holds what the
bodies share (:class:`Pipeline`: the configuration, folder, names, sets and parent run),
the steps that chain the bodies (:meth:`Pipeline.run`) and :func:`run_stpp`.

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

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cellst.config import ConfigError, dump_config
from cellst.data.store import CellStore, StoreError, store_lock
from cellst.experiment import ExperimentConfig
from cellst.fs import atomic_write_bytes
from cellst.inference.config import InferenceConfig
from cellst.model.checkpoint_files import is_checkpoint
from cellst.stpp import bodies
from cellst.stpp.experiment import StppExperimentConfig
from cellst.stpp.inputs import infer_inputs, infer_inputs_before, items_digest, training_hash
from cellst.stpp.outputs import MODELS, STAGES, TITLES
from cellst.stpp.owned_sets import OwnedSets
from cellst.stpp.parent_run import ParentRun
from cellst.stpp.runner import StageRunner, UntilReached
from cellst.stpp.schedule import apply_retrain_schedule
from cellst.stpp.stages import (
    META,
    StageBook,
    StageRecord,
    pipeline_lock,
    read_meta,
    update_meta,
)


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
    #: the stage this run stopped after, as asked (``until``); None when it ran to the end
    stopped_after: str | None = None

    def record(self, name: str) -> StageRecord:
        return next(r for r in self.records if r.name == name)


# ----------------------------------------------------------------------------- helpers
def pipeline_status(pipeline_dir: str | Path) -> tuple[dict[str, Any], list[StageRecord]]:
    """``(pipeline.json, stage records)`` of a pipeline folder, for ``cellst stpp status``."""
    root = Path(pipeline_dir)
    if not (root / "stages").is_dir() and not (root / META).is_file():
        raise FileNotFoundError(f"{root} is not an ST++ pipeline folder (no {META}, no stages/)")
    return read_meta(root), StageBook(root, STAGES).records()


def _checkpoints_present(outputs: dict) -> bool:
    paths = [outputs.get("best"), *outputs.get("snapshots", [])]
    return all(p and is_checkpoint(p) for p in paths)


def _sets_present(store: CellStore, names: list[str | None]) -> bool:
    """Whether the pseudo-label sets exist (None: a stage that wrote no set)."""
    have = set(store.pseudo_sets())
    return all(n is None or n in have for n in names)


# ----------------------------------------------------------------------------- the pipeline
class Pipeline:
    """One ST++ pipeline (a folder): what its stage bodies (:mod:`cellst.stpp.bodies`)
    share, and :meth:`run`, which chains them as the paper's steps through :attr:`stage`
    (a :class:`cellst.stpp.runner.StageRunner`). :func:`run_stpp` is the entry point."""

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
        self.parent = ParentRun(cfg, self.dir)
        #: runs a stage body under its record (:class:`cellst.stpp.runner.StageRunner`)
        self.stage = StageRunner(self.book, self.parent, TITLES, log)
        #: the pseudo-label sets this pipeline owns (:class:`cellst.stpp.owned_sets.OwnedSets`)
        self.sets = OwnedSets(self.dir, cfg.store, self.book)
        self.report: pd.DataFrame | None = None

    @property
    def tracking(self):
        """The tracking section, resolved (URI, artifacts, experiment) once tracking starts."""
        return self.parent.tracking

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
        return update_meta(self.dir, **update)

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
        foreign = self.sets.foreign(self.set_names())
        if foreign and not self.overwrite:
            raise StoreError(
                f"pseudo-label set(s) {foreign} in store {store.root} were not written by this "
                f"pipeline ({self.dir}); pass --overwrite to replace them, or choose another "
                f"--set stpp.set_prefix=..."
            )
        self.sets.release(foreign)  # replaced (--overwrite): what this pipeline recorded is void
        return store

    # -- the steps -----------------------------------------------------------------------------
    def run(self, store: CellStore) -> None:
        """The seven stages in order; each skips itself when done with the same inputs."""
        cfg = self.cfg
        unlabelled = store.ids("unlabeled")
        # 1. train on the labelled items, keeping snapshots
        s1 = self._training_stage(store, "supervised")
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
        post = cfg.postprocess.model_dump(mode="json")
        # (hashed only when set: pipelines from before the option keep their hashes)
        band = {"ignore_band": cfg.stpp.ignore_band} if cfg.stpp.ignore_band else {}
        # 2. rank the unlabelled items by how well the snapshots agree with the final model
        s2 = self._inference_stage(
            "reliability",
            no_tta,
            {
                "s1": s1.output_digest,
                "unlabelled": items_digest(store, "unlabeled"),
                "infer": infer_inputs(no_tta),
                "post": post,
                "measure": cfg.stpp.reliability,
                "fraction": cfg.stpp.reliable_fraction,
                # (hashed only when set, as ignore_band)
                **({"per_modality": True} if cfg.stpp.reliable_per_modality else {}),
            },
            lambda d: bodies.reliability(self, store, s1, unlabelled, no_tta),
            present=lambda o: _sets_present(store, list(o.get("sets", {}))),
        )
        # 3. pseudo-label the reliable items with stage 1's model, 4. re-train on them
        s3 = self._inference_stage(
            "pseudo_reliable",
            tta,
            {
                "s1": s1.output_digest,
                "s2": s2.output_digest,
                "infer": infer_inputs(tta),
                "post": post,
                **band,
            },
            lambda d: bodies.pseudo_label(
                self, "reliable", s1.outputs["best"], s2.outputs["reliable"], tta, s1.output_digest
            ),
            present=lambda o: _sets_present(store, [o.get("set")]),
        )
        s4 = self._training_stage(store, "retrain_reliable", pseudo=s3, previous=s1)
        # 5. pseudo-label the rest with stage 4's model, 6. re-train on everything
        s5 = self._inference_stage(
            "pseudo_unreliable",
            tta,
            {
                "s4": s4.output_digest,
                "s2": s2.output_digest,
                "s3": s3.output_digest,
                "infer": infer_inputs(tta),
                "post": post,
                **band,
            },
            lambda d: bodies.pseudo_label_rest(self, s4, s2, s3, tta),
            present=lambda o: _sets_present(store, [o.get("set")]),
        )
        s6 = self._training_stage(store, "retrain_all", pseudo=s5, previous=s4)
        # 7. the test split: supervised vs round 1 vs round 2
        trained = {"supervised": s1, "round1": s4, "round2": s6}  # the labels of MODELS
        s7 = self._inference_stage(
            "evaluate",
            cfg.inference,
            {
                "models": {k: r.output_digest for k, r in trained.items()},
                "test": items_digest(store, "test"),
                "enabled": cfg.stpp.evaluate,
                "infer": infer_inputs(cfg.inference),
                "post": post,
                "evaluate": cfg.evaluate.model_dump(mode="json"),
            },
            lambda d: bodies.evaluate(self, store, trained),
        )
        if s7.outputs.get("table"):
            self.report = pd.DataFrame(s7.outputs["table"])

    def _inference_stage(
        self,
        name: str,
        infer: InferenceConfig,
        inputs: dict[str, Any],
        body: Callable[[str], dict],
        present: Callable[[dict], bool] | None = None,
    ) -> StageRecord:
        """A stage that predicts with ``infer`` (``inputs["infer"]``): a record of the
        inputs as earlier cellsts hashed them (every inference setting) counts as done."""
        earlier = infer_inputs_before(inputs, infer)
        return self.stage(name, inputs, body, present=present, recorded_as=[earlier])

    def _training_stage(
        self,
        store: CellStore,
        stage: str,
        pseudo: StageRecord | None = None,
        previous: StageRecord | None = None,
    ) -> StageRecord:
        """Stage 1 (labelled items), 4 or 6 (labelled + the pseudo-labels of ``pseudo``;
        warm-started from ``previous``'s best checkpoint only when ``stpp.fresh_init`` is
        false)."""
        init = None
        if previous is not None and not self.cfg.stpp.fresh_init:
            init = previous.outputs["best"]
        pseudo_set = None if pseudo is None else pseudo.outputs["set"]
        train_cfg = self.stage_train_config(stage, pseudo_set, init)
        inputs = {"train": training_hash(train_cfg), "labelled": items_digest(store, "labeled")}
        if pseudo is not None:
            inputs |= {
                "pseudo": pseudo.output_digest,
                "init": None if init is None else previous.output_digest,
            }
        return self.stage(
            stage,
            inputs,
            lambda d: bodies.train(self, stage, d, pseudo_set, init),
            training=True,
            present=_checkpoints_present,
            # the same inputs as recorded by cellst's earlier fingerprint recipes
            recorded_as=[
                {**inputs, "train": training_hash(train_cfg, version=v)} for v in (2, 3, 4)
            ],
        )

    def stage_train_config(
        self, stage: str, pseudo_set: str | None = None, init: str | None = None
    ) -> ExperimentConfig:
        """The training configuration of a training stage (what it runs and logs: ``stpp``
        as configured, the stage's run folder, pseudo-label set and initial checkpoint)."""
        cfg = self.cfg.training_base()
        cfg.tracking = self.tracking
        cfg.train.run_dir = str(self.dir / "train")
        cfg.train.run_name = None
        cfg.train.pseudo_set = pseudo_set
        cfg.train.init_checkpoint = None if init is None else str(init)
        if pseudo_set is not None:
            apply_retrain_schedule(cfg, self.cfg)
        return cfg


def _stage_option(book: StageBook, option: str, ref: str | int | None) -> str | None:
    """The stage name that ``option`` refers to (None if not given); ConfigError if unknown."""
    if ref is None:
        return None
    try:
        return book.resolve(ref)
    except ValueError as exc:
        raise ConfigError(f"{option}: {exc}") from None


def run_stpp(
    cfg: StppExperimentConfig,
    force_from: str | int | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    until: str | int | None = None,
) -> StppResult:
    """Run (or resume) the ST++ pipeline described by ``cfg``.

    Parameters
    ----------
    cfg : StppExperimentConfig
        From :func:`cellst.stpp.experiment.load_stpp_config`.
    force_from : stage number or name, optional
        Run this stage and every later one again even if done with the same inputs.
    overwrite : bool
        Replace pseudo-label sets of this pipeline's names that another run wrote.
    until : stage number or name, optional
        Stop once this stage is done (run or skipped): e.g. ``"reliability"`` to look at
        the ranking before any pseudo-labelling. Running again without it goes on from the
        next stage; nothing done is recomputed.

    Raises
    ------
    ConfigError
        An unknown ``force_from`` or ``until`` stage.
    StoreError
        Store problems (found before anything runs), a foreign pseudo-label set, another
        process running the same pipeline; :class:`StppStopped` when the store has no
        unlabelled items (after stage 1).
    """
    pipe = Pipeline(cfg, overwrite=overwrite, log=log)
    forced = _stage_option(pipe.book, "--force-from", force_from)
    pipe.stage.until = _stage_option(pipe.book, "--until", until)
    if forced and pipe.stage.until and pipe.book.index(pipe.stage.until) < pipe.book.index(forced):
        raise ConfigError(
            f"--until {pipe.stage.until} comes before --force-from {forced}: nothing would run, yet "
            f"stages from {forced} on would be marked to run again; give --until at or after "
            "--force-from"
        )
    store = pipe.preflight()
    pipe.dir.mkdir(parents=True, exist_ok=True)
    with store_lock(pipeline_lock(pipe.dir), what=f"the run folder {pipe.dir}"):
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
        parent = pipe.parent
        parent.resolve()
        parent.open(store)
        if parent.note:
            log(f"[stpp] note: {parent.note}")
        stopped_after = None

        def stopped_tag(stage: str) -> dict[str, str]:  # (an earlier attempt's "completed")
            return {
                "cellst.stpp.stopped_after": f"{pipe.book.index(stage)}_{stage}",
                "cellst.stpp.completed": "false",
            }

        try:
            pipe.run(store)
        except UntilReached as stop:
            stopped_after = str(stop)
            parent.close("FINISHED", stopped_tag(stopped_after))
            log(
                f"[stpp] stopped after stage {pipe.book.index(stopped_after)}/{len(STAGES)} "
                f"{stopped_after}, as asked (--until); the same command without --until goes "
                "on from the next stage"
            )
        except StppStopped:
            parent.close("FINISHED", stopped_tag("supervised"))
            raise
        except KeyboardInterrupt:
            parent.close("KILLED", {"cellst.stpp.completed": "false"})
            raise
        except BaseException:
            parent.close("FAILED", {"cellst.stpp.completed": "false"})
            raise
        if stopped_after is None:
            parent.finish(pipe.book.records(), pipe.report)
    return StppResult(
        pipe.dir,
        pipe.book.records(),
        pipe.stage.ran,
        pipe.stage.skipped,
        pipe.report,
        parent.run_id,
        parent.uri,
        stopped_after,
    )


def pipeline_active(pipeline_dir: str | Path) -> bool:
    """Whether a process holds the pipeline's lock (is running it now)."""
    from cellst.fs import is_locked

    return is_locked(pipeline_lock(pipeline_dir))
