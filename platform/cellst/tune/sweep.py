"""``cellst tune``: Ray Tune sweeps of post-processing or training settings, tracked in MLflow.

Two modes (``tune.mode``):

``postprocess``
    One checkpoint predicts the validation items once (a Ray task; maps cached under the
    sweep folder). Each trial then runs the HoVer post-processing with its settings on the
    cached maps and reports the mean challenge F1 (``val_f1``). Seconds per trial, so
    hundreds of settings are cheap.
``train``
    Each trial trains a model with its settings (augmentation probabilities, learning
    rate, loss weights...) through Ray Train, exactly like ``cellst train``, and reports
    ``best_val_f1`` after each epoch; ASHA stops the poor ones early.

Both score on the *validation* items held out of the labelled split (``data.val_fraction``,
the split training uses), never on the test split. Files, in ``<tune.run_dir>/<name>/``::

    results.csv      one row per trial: settings, val F1, epochs, MLflow run id
    best.yaml        the best settings as overrides (``--set`` syntax) and the full config
    sweep.png        val F1 against each swept setting
    maps/            postprocess mode: cached validation predictions
    trials/          train mode: one training run per trial
    mlflow.db        the embedded MLflow store: a parent run, one child run per trial

Re-running an interrupted sweep with the same settings, store version and (post-processing)
checkpoint weights resumes it (``Tuner.restore``); else it starts over, saying why.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ray.tune import Callback

from cellst.data.store import CellStore, StoreError
from cellst.experiment import ExperimentConfig
from cellst.fs import atomic_write, atomic_write_bytes, held_by_one, lock_beside, read_json
from cellst.tracking.config import LOCK_TAG
from cellst.train.config import RAY_STORAGE_DIR
from cellst.tune.space import plain


@dataclass
class SweepResult:
    """What a sweep produced."""

    sweep_dir: Path
    table: pd.DataFrame
    metric: str
    best_params: dict[str, Any]
    best_score: float
    parent_run_id: str | None
    tracking_uri: str | None
    resumed: bool
    baseline_score: float | None = None  # postprocess mode: the config's own settings

    @property
    def keeps_current(self) -> bool:
        """No trial beat the current settings (postprocess mode): the advice is to keep
        them, and ``best.yaml`` sets nothing."""
        return keep_current(self.best_score, self.baseline_score)


def keep_current(best_score: float, baseline: float | None) -> bool:
    """Whether the best trial's ``best_score`` fails to beat the current settings' score."""
    return baseline is not None and not best_score > baseline


def sweep_scores(best_score: float, baseline: float | None, trials: int) -> dict[str, float]:
    """The sweep's parent-run metrics, the same names in both modes (the best trial's
    ``metric`` is val_f1 or best_val_f1).

    ``best_val_f1`` is the score of what ``best.yaml`` recommends: the best trial's, or the
    current settings' where no trial beat them (postprocess mode); the best trial's own is
    ``best_trial_val_f1``, the current settings' ``baseline_val_f1``.
    """
    keep = keep_current(best_score, baseline)
    out = {
        "best_val_f1": baseline if keep else best_score,
        "best_trial_val_f1": best_score,
        "trials": float(trials),
    }
    if baseline is not None:
        out |= {"baseline_val_f1": baseline, "keep_current_settings": float(keep)}
    return out


def sweep_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.tune.run_dir).absolute() / (cfg.tune.name or cfg.name)


def sweep_hash(cfg: ExperimentConfig, *, legacy: bool = False) -> str:
    """Identity of a sweep (:func:`cellst.fingerprint.sweep_fingerprint`): a changed
    sweep is a new sweep, and its finished trials go."""
    from cellst.fingerprint import sweep_fingerprint

    return sweep_fingerprint(cfg, legacy=legacy)


def sweep_inputs(cfg: ExperimentConfig, store_version: str) -> dict[str, Any]:
    """What a sweep reads besides its settings: the store's version and, for a
    post-processing sweep, the checkpoint's weights (retrained at the same path, its
    trials scored the old weights)."""
    from cellst.model.checkpoint_files import checkpoint_fingerprint

    inputs: dict[str, Any] = {"store_version": store_version}
    if cfg.tune.mode == "postprocess":
        inputs["checkpoint"] = checkpoint_fingerprint(cfg.tune.checkpoint)
    return inputs


def sweep_changes(
    state: dict[str, Any], h: str, inputs: dict[str, Any], legacy_hash: str | None = None
) -> list[str]:
    """What changed since the sweep recorded in ``state`` (``sweep.json``) ran: its
    settings, the store or the checkpoint; empty where it may resume. A ``sweep.json`` of
    an earlier cellst, which recorded no checkpoint, or its settings' identity as
    ``legacy_hash`` (:func:`sweep_hash`), is taken as it is."""
    if not state:
        return []
    changed = ["the settings"] if state.get("hash") not in (h, legacy_hash) else []
    names = {"store_version": "the store", "checkpoint": "the checkpoint's weights"}
    for key, value in inputs.items():
        if key in state and state[key] != value:
            changed.append(names[key])
    return changed


# ----------------------------------------------------------------------------- postprocess
def _cache_maps(checkpoint: str, store_root: str, ids: list[str], infer: dict, out: str) -> int:
    """Predict ``ids`` with ``checkpoint`` into ``out/<id>.npz`` (prob, hv, label)."""
    import torch

    from cellst.inference.predictor import InferenceConfig
    from cellst.model import load_model
    from cellst.postprocess.calibrate import predict_val_maps

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    model, _, _ = load_model(checkpoint)
    model.eval()
    store = CellStore(store_root)
    cfg = InferenceConfig.model_validate(infer)
    folder = Path(out)
    for item, maps in zip(ids, predict_val_maps(model, store, ids, cfg, "cpu"), strict=True):
        arrays = {"prob": maps.prob, "hv": maps.hv, "label": maps.label}
        atomic_write(folder / f"{item}.npz", lambda tmp, a=arrays: np.savez(tmp, **a))
    return len(ids)


#: what a finished sweep writes in its folder (:func:`write_results`)
RESULTS_CSV, BEST_YAML, SWEEP_PNG = "results.csv", "best.yaml", "sweep.png"
RESULT_FILES = (RESULTS_CSV, BEST_YAML, SWEEP_PNG)


def prepare_maps(
    cfg: ExperimentConfig,
    ids: list[str],
    root: Path,
    log: Callable[[str], None],
    store: CellStore | None = None,
) -> Path:
    """Validation predictions of ``tune.checkpoint``, computed once per checkpoint, settings
    and validation data: the items' stored image and label arrays (whose names hold their
    content's digest) are part of the key, so a re-ingest that changed an image or a label
    predicts anew. (Keyed by the store's path alone, a restarted sweep scored the old
    predictions against the old labels.)"""
    import ray

    from cellst.fingerprint import stable_hash
    from cellst.fs import atomic_write_json
    from cellst.model.checkpoint_files import checkpoint_fingerprint

    store = store or CellStore(cfg.store, lease=False)
    rows = store.manifest.set_index("id").loc[sorted(ids)]
    key = stable_hash(
        {
            "checkpoint": checkpoint_fingerprint(cfg.tune.checkpoint),
            "infer": cfg.inference.model_dump(mode="json"),
            "ids": sorted(ids),
            "store": str(Path(cfg.store).absolute()),
            "arrays": [
                [str(a), str(b)]
                for a, b in zip(rows["image_array"], rows["label_array"], strict=True)
            ],
        }
    )
    folder = root / "maps" / key
    if (folder / "done.json").is_file():
        log(f"[tune] validation predictions cached in {folder}")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    task = ray.remote(num_cpus=1)(_cache_maps)
    n = ray.get(
        task.remote(
            str(Path(cfg.tune.checkpoint).absolute()),
            str(Path(cfg.store).absolute()),
            ids,
            cfg.inference.model_dump(mode="json"),
            str(folder),
        )
    )
    atomic_write_json(folder / "done.json", {"items": ids, "checkpoint": cfg.tune.checkpoint})
    log(f"[tune] predicted {n} validation items in {time.perf_counter() - t0:.1f} s")
    return folder


def score_postprocess(
    maps: Path, ids: list[str], post: dict[str, Any], evaluate: dict[str, Any]
) -> dict[str, float]:
    """Mean challenge scores of the cached maps post-processed with ``post``."""
    from cellst.postprocess.calibrate import ValMaps, score_maps

    def cached():
        for item in ids:
            with np.load(maps / f"{item}.npz") as z:
                yield ValMaps(z["prob"], z["hv"], z["label"])

    return score_maps(cached(), post, evaluate)


def _postprocess_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One postprocess trial: settings -> val F1 (a child MLflow run)."""
    from ray import tune

    from cellst.tracking import log_metrics, log_params, start_run, supersede_earlier_children
    from cellst.tracking.config import TrackingConfig

    post = dict(ctx["post"])
    for key, value in config.items():
        post[key.split(".", 1)[1]] = plain(value)
    scores = score_postprocess(Path(ctx["maps"]), ctx["ids"], post, ctx["evaluate"])
    trial = tune.get_context().get_trial_id()
    # seconds-long runs: no system-metrics thread (Tune may stop the actor right after)
    tracking = TrackingConfig.model_validate({**ctx["tracking"], "system_metrics": False})
    with start_run(
        tracking,
        ctx["root"],
        ctx["experiment"],
        f"{ctx['name']}-{trial}",
        parent_run_id=ctx["parent_id"],
        tags={"cellst.stage": "tune.trial", "cellst.tune.trial_id": trial},
    ) as run:
        log_params(config)
        log_metrics(scores)
        scores["mlflow_run_id"] = run.info.run_id
    # a trial a resumed sweep runs again (it ended after Tune last saved its state)
    supersede_earlier_children(
        tracking,
        ctx["root"],
        ctx["experiment"],
        ctx["parent_id"],
        "cellst.tune.trial_id",
        trial,
        scores["mlflow_run_id"],
    )
    tune.report(scores)


# ----------------------------------------------------------------------------- train
def _train_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One training trial: ``cellst train`` with the trial's settings, reporting each epoch."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cellst.experiment import ExperimentConfig
    from cellst.train.trainer import train
    from cellst.tune.space import apply

    cfg = apply(ExperimentConfig.model_validate(ctx["experiment_cfg"]), config)
    cfg.train.node_wait_s = None  # a trial waits for room, as Tune's queued trials do
    trial = tune.get_context().get_trial_id()
    run_dir = trial_run_dir(Path(ctx["root"]), ctx["name"], trial)
    train(
        cfg,
        run_name=run_dir.name,
        parent_run_id=ctx["parent_id"],
        tags={"cellst.stage": "tune.trial", "cellst.tune.trial_id": trial},
        callbacks=[TuneReportCallback()],
        force=not trial_resumes(run_dir, cfg),
    )


def trial_resumes(run_dir: Path, cfg: ExperimentConfig) -> bool:
    """Whether a training trial goes on from its own last checkpoint.

    A trial Tune restores (a resumed sweep, ``resume_errored``) calls its training again.
    Where its run folder records an unfinished training of the same configuration (the
    sweep was interrupted, or the trial's process died), the training resumes from its
    last epoch's checkpoint rather than from epoch 1, so no finished epoch is trained
    twice. Anything else starts over: no run yet, a finished run (Tune needs its reports
    again) or a run of other settings.
    """
    from cellst.train.trainer import same_configuration

    state = _run_state(run_dir)
    return (
        bool(state) and state.get("status") != "finished" and same_configuration(state, cfg) is True
    )


STOPPED_BY_SCHEDULER = "stopped by the sweep's scheduler"


def trial_run_dir(root: Path, name: str, trial_id: str) -> Path:
    """The training run folder of a training sweep's trial (as :func:`_train_trial` names it)."""
    return root / "trials" / f"{name}-{trial_id}"


def release_stopped_trial(
    run_dir: Path, status: str = "stopped", error: str = STOPPED_BY_SCHEDULER
) -> list[str]:
    """Release what a training trial that Tune stopped left holding; the placement groups
    removed.

    When Tune stops a trial (ASHA's early stopping, ``max_t``), it ends the trial's actor,
    and with it the Ray Train controller it owns, but the worker group's placement group
    lives on with the sweep's driver (Ray Train V2, ray-project/ray#54305): its CPUs stay
    taken and the next trial waits for them for ever. The workers recorded theirs
    (``workers/rank*.json``); a group still there is removed. A ``run.json`` left
    ``running`` gets ``status`` and ``error`` (a trial Tune stopped: ``stopped`` by the
    sweep's scheduler; one whose actor died: ``failed``), never "running".
    """
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    from cellst.train.checkpoints import RunPaths

    paths = RunPaths(run_dir)
    ids = {r["placement_group"] for r in paths.worker_records() if r.get("placement_group")}
    # the record first: removing the group ends the workers, and the trial's own training
    # (if its actor still runs) then sees "stopped" and keeps it, not "failed"
    if paths.read_state().get("status") == "running":
        paths.write_state(status=status, error=error)
    removed = []
    table = ray.util.placement_group_table()
    for pg in sorted(ids):
        if table.get(pg, {}).get("state") in ("CREATED", "PENDING", "RESCHEDULING"):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg))))
            removed.append(pg)
    return removed


class ReleaseStoppedTrials(Callback):
    """A Tune callback that runs :func:`release_stopped_trial` on each trial that ends (a
    module-level class: a resumed sweep unpickles it with the rest of its run config)."""

    def __init__(self, root: Path, name: str):
        self.root, self.name = Path(root), name

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        release_stopped_trial(trial_run_dir(self.root, self.name, trial.trial_id))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        # a training that failed by itself has said so in its run.json; one left "running"
        # lost its process (killed, out of memory, its node gone)
        release_stopped_trial(
            trial_run_dir(self.root, self.name, trial.trial_id),
            status="failed",
            error="the trial failed without its training recording why (its process killed, "
            "out of memory, or its node lost): see the sweep's log",
        )


class TrialProgress(Callback):
    """How far the sweep has got: a progress bar of its ended trials with the best score so
    far on a terminal, else a line at each tenth of them (the sweep printed nothing until it
    ended). Module-level and pickled without its bar: a resumed sweep unpickles it with the
    rest of its run config."""

    def __init__(self, total: int, metric: str, bar: bool):
        self.total, self.metric, self.bar = total, metric, bar
        self._ended: set[str] = set()
        self._shown = 0
        self._tqdm: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tqdm": None}

    def _update(self, trials: list, trial: Any) -> None:
        self._ended |= {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        self._ended.add(trial.trial_id)
        done = len(self._ended)
        scores = [
            float(t.last_result[self.metric])
            for t in trials
            if isinstance((t.last_result or {}).get(self.metric), int | float)
        ]
        best = f"best {self.metric} {max(scores):.3f}" if scores else ""
        if self.bar:
            if self._tqdm is None:
                from tqdm.auto import tqdm

                self._tqdm = tqdm(total=self.total, desc="tune", unit="trial")
            self._tqdm.n = min(done, self.total)
            self._tqdm.set_postfix_str(best, refresh=True)
        elif done * 10 // max(1, self.total) > self._shown * 10 // max(1, self.total):
            self._shown = done
            print(f"[tune] {done}/{self.total} trial(s) ended; {best}".rstrip("; "), flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._update(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._update(trials, trial)

    def on_experiment_end(self, trials, **info) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None


# ----------------------------------------------------------------------------- the sweep
def _concurrency(cfg: ExperimentConfig, per_trial_cpus: float) -> int:
    import ray

    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    total = ray.cluster_resources()
    if cfg.tune.mode == "train" and cfg.train.use_gpu:
        return max(1, int(total.get("GPU", 0) // max(1, cfg.train.num_workers)))
    return max(1, int(total.get("CPU", 1) // per_trial_cpus))


def run_sweep(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> SweepResult:
    """Run (or resume) the sweep described by ``cfg.tune``; see the module docstring.

    One process at a time runs a sweep: it holds the lock beside the sweep's folder
    (:func:`cellst.fs.lock_beside`), so a second ``cellst tune`` of the same sweep is
    refused at once instead of writing its trials and ``sweep.json`` into the same folder
    (or starting it over under the first).

    Raises
    ------
    StoreError
        Store problems found before anything runs (no labelled or validation items), or
        the sweep being run by another process.
    """
    cfg, store, val_ids, inference_note = _checked_request(cfg)
    root = sweep_dir(cfg)
    root.parent.mkdir(parents=True, exist_ok=True)
    refusal = StoreError(
        f"sweep {root} is being run by another process; wait for it to end, or choose "
        "another tune.name"
    )
    with held_by_one(lock_beside(root), refusal):
        return _run_sweep(cfg, store, val_ids, inference_note, log)


def _checked_request(cfg: ExperimentConfig) -> tuple[ExperimentConfig, CellStore, list, str]:
    """What a sweep checks before anything is written: the store and its validation items,
    the checkpoint of a post-processing sweep (whose calibration's inference settings
    fill those ``cfg`` leaves unset, said in the returned note), the tracking server."""
    from cellst.tracking import check_tracking
    from cellst.train.trainer import check_request

    t = cfg.tune
    store, _, val_ids = check_request(cfg)
    if not val_ids:
        raise StoreError(
            f"store {store.root} leaves no validation items (data.val_fraction="
            f"{cfg.data.val_fraction}); a sweep scores settings on them, never on the test split"
        )
    if t.max_items:
        val_ids = val_ids[: t.max_items]
    inference_note = ""
    if t.mode == "postprocess":
        from cellst.config import ConfigError
        from cellst.inference.batch import check_checkpoint
        from cellst.postprocess.calibrate import effective_inference

        check_checkpoint(t.checkpoint)  # a bad one in one line, not a Ray task's traceback
        seen = trained_on(t.checkpoint) & set(val_ids)
        if seen:
            raise ConfigError(
                f"tune.checkpoint {t.checkpoint} was trained on {len(seen)} of the sweep's "
                f"{len(val_ids)} validation items (e.g. {sorted(seen)[0]}): its scores would "
                "flatter the settings; split the store as the training did (data.val_fraction "
                "and data.seed of its run)"
            )
        # the maps `cellst predict` makes with this checkpoint: its calibration's inference
        # settings where the sweep's configuration leaves them unset
        infer, inference_note = effective_inference(cfg.inference, t.checkpoint)
        cfg = cfg.model_copy(update={"inference": infer})
    # a dead server: one line before Ray starts, and before an earlier sweep is discarded
    check_tracking(cfg.tracking, sweep_dir(cfg), cfg.name)
    return cfg, store, val_ids, inference_note


def _run_sweep(
    cfg: ExperimentConfig,
    store: CellStore,
    val_ids: list,
    inference_note: str,
    log: Callable[[str], None],
) -> SweepResult:
    """:func:`run_sweep` once its request is checked, with the sweep's lock held."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from cellst.config import dump_config
    from cellst.fs import atomic_write_json
    from cellst.raycluster import ensure_ray, verbose
    from cellst.tracking import (
        log_config,
        mark_superseded,
        resolve_tracking,
        start_run,
        store_tags,
    )
    from cellst.tune.space import to_tune

    if not verbose():  # Tune's own console tables; cellst prints the results itself
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    t = cfg.tune
    root = sweep_dir(cfg)
    name = t.name or cfg.name
    ensure_ray()
    root.mkdir(parents=True, exist_ok=True)
    state_file = root / "sweep.json"
    state = read_json(state_file, missing={})
    inputs = sweep_inputs(cfg, store.version)
    h = sweep_hash(cfg)
    ray_path = root / RAY_STORAGE_DIR / name
    changed = sweep_changes(state, h, inputs, sweep_hash(cfg, legacy=True))
    resumed = bool(state) and not changed and tune.Tuner.can_restore(str(ray_path))
    if state and changed and ray_path.exists():
        import shutil

        log(
            f"[tune] {' and '.join(changed)} changed since the last run in {root}: "
            "starting the sweep over"
        )
        shutil.rmtree(ray_path)
        # the earlier sweep's results go with it: an interrupted new sweep left them beside
        # its own sweep.json, another sweep's best.yaml presented as this one's
        for result in RESULT_FILES:
            (root / result).unlink(missing_ok=True)
        state = {"replaced_run_id": state.get("parent_run_id")}

    tracking = cfg.tracking
    uri = None
    if tracking.enabled:
        uri, artifacts, experiment = resolve_tracking(tracking, root, cfg.name)
        tracking = tracking.model_copy(
            update={"tracking_uri": uri, "artifact_root": artifacts, "experiment": experiment}
        )
    with start_run(
        tracking,
        root,
        cfg.name,
        f"{name}-tune",
        run_id=state.get("parent_run_id") if resumed else None,
        tags={
            **store_tags(store),
            "cellst.stage": "tune",
            "cellst.tune.mode": t.mode,
            LOCK_TAG: str(lock_beside(root)),  # held while this process sweeps
        },
    ) as parent:
        parent_id = parent.info.run_id if tracking.enabled else None
        mark_superseded(tracking, root, cfg.name, state.get("replaced_run_id"), parent_id)
        if not resumed:
            log_config(cfg)
        atomic_write_json(
            state_file,
            {"hash": h, **inputs, "parent_run_id": parent_id, "uri": uri},
        )
        atomic_write_bytes(root / "config.yaml", dump_config(cfg).encode())
        ctx: dict[str, Any] = {
            "name": name,
            "root": str(root),
            "experiment": cfg.name,
            "parent_id": parent_id,
            "tracking": tracking.model_dump(mode="json"),
        }
        if t.mode == "postprocess":
            plan = _postprocess_plan(cfg, store, val_ids, root, ctx, inference_note, log)
        else:
            plan = _training_plan(cfg, root, name, tracking, ctx)
        trainable, metric, per_trial = plan.trainable, plan.metric, plan.per_trial
        callbacks, baseline = plan.callbacks, plan.baseline
        concurrency = _concurrency(cfg, per_trial)
        expected = planned_trials(t.num_samples, to_tune(t.space))
        callbacks.append(TrialProgress(expected, metric, bar=sys.stderr.isatty()))
        log(
            f"[tune] {t.mode} sweep {name}: {t.num_samples} sample(s) of "
            f"{', '.join(t.space)}; {concurrency} trial(s) at a time; scored on "
            f"{len(val_ids)} validation items"
        )
        if resumed:
            log(f"[tune] resuming the sweep in {ray_path}")
            tuner = tune.Tuner.restore(str(ray_path), trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=to_tune(t.space),
                tune_config=tune.TuneConfig(
                    metric=metric,
                    mode="max",
                    num_samples=t.num_samples,
                    scheduler=plan.scheduler,
                    search_alg=BasicVariantGenerator(
                        max_concurrent=concurrency, random_state=t.seed
                    ),
                    trial_dirname_creator=lambda trial: trial.trial_id,
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=str(root / RAY_STORAGE_DIR),
                    verbose=0,
                    failure_config=tune.FailureConfig(max_failures=1),
                    callbacks=callbacks,
                ),
            )
        t0 = time.perf_counter()
        grid = tuner.fit()
        expected = planned_trials(t.num_samples, to_tune(t.space))
        finished = ended_trials(grid)
        if finished < max(expected, len(grid)):  # Tune stops on Ctrl-C and returns
            if t.mode == "train":
                mark_interrupted_trials(grid, root, name)
            raise SweepInterrupted(
                f"sweep {name} interrupted with {finished} of {max(expected, len(grid))} "
                f"trial(s) finished; results.csv and best.yaml are written when every trial "
                f"has: run the same command again to go on"
            )
        table = results_table(grid, metric, list(t.space))
        if t.mode == "train":  # a trial's training run: recorded in its run folder
            table["mlflow_run_id"] = [
                rid if isinstance(rid, str) and rid else trial_run_id(root, name, tid)
                for rid, tid in zip(table["mlflow_run_id"], table["trial_id"], strict=True)
            ]
        if table[metric].notna().sum() == 0:
            errors = [str(r.error) for r in grid if r.error][:3]
            raise RuntimeError(f"every trial of sweep {name} failed: {errors}")
        best = table.iloc[0]
        best_params = {k: plain(best[k]) for k in t.space}
        # best.yaml's config: the settings its score refers to (in post-processing mode the
        # checkpoint's calibrated ones, on which the trials' own are set), not the defaults
        current = cfg if plan.post is None else cfg.model_copy(update={"postprocess": plan.post})
        write_outputs(current, root, table, metric, best_params, baseline)
        from cellst.tracking import log_artifact, log_figure, log_metrics, log_table

        log_table(table, "tune/results.csv")
        log_artifact(root / BEST_YAML, "tune")
        log_figure(sweep_figure(table, metric, list(t.space), baseline), "tune/sweep.png")
        log_metrics(sweep_scores(float(best[metric]), baseline, len(table)))
        log(f"[tune] {len(table)} trials in {time.perf_counter() - t0:.0f} s")
    return SweepResult(
        root, table, metric, best_params, float(best[metric]), parent_id, uri, resumed, baseline
    )


@dataclass
class _TrialPlan:
    """What each trial of a sweep runs, and how the sweep scores it."""

    trainable: Any
    metric: str  # the score a trial reports (higher is better)
    per_trial: float  # CPUs one trial holds, its workers included
    callbacks: list = field(default_factory=list)
    scheduler: Any = None  # Tune's trial scheduler (ASHA) or None
    baseline: float | None = None  # the current settings' score (post-processing sweeps)
    post: Any = None  # the checkpoint's current post-processing (post-processing sweeps)


def _postprocess_plan(
    cfg: ExperimentConfig,
    store: CellStore,
    val_ids: list,
    root: Path,
    ctx: dict[str, Any],
    inference_note: str,
    log: Callable[[str], None],
) -> _TrialPlan:
    """A post-processing sweep: each trial scores a setting on the validation items' cached
    maps, beside the checkpoint's current settings (the baseline)."""
    from ray import tune

    from cellst.postprocess.calibrate import effective_postprocess

    t = cfg.tune
    # the current settings: what `cellst predict` uses with this checkpoint
    post, note = effective_postprocess(cfg.postprocess, t.checkpoint)
    log(f"[tune] {note}")
    if inference_note:
        log(f"[tune] {inference_note}")
    ctx.update(
        maps=str(prepare_maps(cfg, val_ids, root, log, store)),
        ids=val_ids,
        post=post.model_dump(mode="json"),
        evaluate=cfg.evaluate.model_dump(mode="json"),
    )
    trainable = tune.with_resources(
        tune.with_parameters(_postprocess_trial, ctx=ctx), {"cpu": t.trial_cpus}
    )
    baseline = score_postprocess(Path(ctx["maps"]), val_ids, ctx["post"], ctx["evaluate"])
    return _TrialPlan(trainable, "val_f1", t.trial_cpus, baseline=baseline["val_f1"], post=post)


def _training_plan(
    cfg: ExperimentConfig, root: Path, name: str, tracking, ctx: dict[str, Any]
) -> _TrialPlan:
    """A training sweep: each trial is a training (its workers sized to the cluster), ranked
    by its best checkpoint's score, and stopped early by ASHA where configured."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from cellst.train.trainer import fit_cluster

    t = cfg.tune
    run_cfg = fit_cluster(cfg).model_copy(deep=True)
    run_cfg.tracking = tracking
    run_cfg.train.run_dir = str(root / "trials")
    ctx["experiment_cfg"] = run_cfg.model_dump(mode="json")
    # the trial's driver only waits on its TorchTrainer; the workers hold the CPUs
    trainable = tune.with_resources(tune.with_parameters(_train_trial, ctx=ctx), {"cpu": 0.05})
    t_cfg = run_cfg.train
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration",
            # past the last epoch: a trial that gets there ends by itself, its checkpoints
            # calibrated, instead of being stopped at its last report
            max_t=t_cfg.epochs + 1,
            grace_period=min(t.grace_period, t_cfg.epochs),
        )
        if t.scheduler == "asha"
        else None
    )
    return _TrialPlan(
        trainable,
        "best_val_f1",
        t_cfg.num_workers * t_cfg.cpus_per_worker + t_cfg.augment_cpus + 0.05,
        callbacks=[ReleaseStoppedTrials(root, name)],
        scheduler=scheduler,
    )


def ended_trials(grid) -> int:
    """How many trials of a Tune result grid ended: failed, or finished (their function
    returned, or the scheduler stopped them: Tune marks their last result ``done``).

    Not Tune's ``num_terminated``: on Ctrl-C Tune stops the running trials on its way out
    and counts them as terminated, so a sweep whose last trial was cut short looked whole.
    """
    return sum(1 for r in grid if _ended(r))


def _ended(result) -> bool:
    """Whether one trial's Tune result is that of a trial that ended (see :func:`ended_trials`)."""
    return result.error is not None or (result.metrics or {}).get("done") is True


def mark_interrupted_trials(grid, root: Path, name: str) -> None:
    """Record, in each training trial's run folder, that the sweep's interruption cut it
    short: its training (killed with the trial's actor) may have recorded the actor's death
    as a failure. A trial that ended by itself keeps what it recorded."""
    from cellst.train.checkpoints import RunPaths

    for r in grid:
        if _ended(r):
            continue
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        paths = RunPaths(trial_run_dir(root, name, str(trial_id)))
        if paths.state.is_file() and _run_state(paths.root).get("status") != "finished":
            paths.write_state(
                status="interrupted",
                error="the sweep was interrupted; the same `cellst tune` command resumes it",
            )


def _run_state(run_dir: Path) -> dict[str, Any]:
    """A training run folder's ``run.json``; empty when it is missing or damaged (then
    there is nothing to tell from it)."""
    from cellst.train.checkpoints import RunPaths

    try:
        state = RunPaths(run_dir).read_state()
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def trained_on(checkpoint: str | os.PathLike[str]) -> set[str]:
    """The store items a checkpoint's training ran on (``train_ids`` of its run folder's
    ``run.json``: ``RUN/checkpoints/NAME``); empty when that record is not there."""
    ids = _run_state(Path(checkpoint).absolute().parent.parent).get("train_ids")
    return {str(i) for i in ids} if isinstance(ids, list) else set()


def trial_run_id(root: Path, name: str, trial_id: str) -> str | None:
    """The MLflow run of a training trial (``mlflow_run_id`` of its run folder's
    ``run.json``), or None."""
    rid = _run_state(trial_run_dir(root, name, str(trial_id))).get("mlflow_run_id")
    return rid if isinstance(rid, str) else None


class SweepInterrupted(KeyboardInterrupt):
    """A sweep Tune stopped (Ctrl-C) before every trial ended; says how far it got."""


def planned_trials(num_samples: int, space: Mapping[str, Any]) -> int:
    """How many trials Tune's basic variant generator makes of ``space``: ``num_samples``
    times the product of the grid searches' sizes."""
    grids = [
        len(v["grid_search"]) for v in space.values() if isinstance(v, dict) and "grid_search" in v
    ]
    return num_samples * math.prod(grids)


def results_table(grid, metric: str, keys: list[str]) -> pd.DataFrame:
    """One row per trial, best first: its settings, last ``metric``, epochs, status.

    The last report, not the highest: a training trial's ``best_val_f1`` is the score of
    its ``best/`` checkpoint, which the selection rule may move to a later epoch of a
    slightly lower score (:func:`cellst.train.selection.update_best`); its highest report
    may be an epoch no checkpoint holds any more. (A post-processing trial reports once.)
    """
    rows = []
    for r in grid:
        df = r.metrics_dataframe
        reported = df[metric].dropna() if df is not None and metric in df else pd.Series()
        score = float(reported.iloc[-1]) if len(reported) else float("nan")
        m = r.metrics or {}
        rows.append(
            {
                "trial_id": m.get("trial_id") or Path(r.path).name,
                **{k: plain(r.config.get(k)) for k in keys},
                metric: score,
                # train mode: epochs trained (Tune counts a resumed trial's reports anew)
                "iterations": int(m.get("epoch") or m.get("training_iteration") or 0),
                "status": "error" if r.error else "done",
                "mlflow_run_id": m.get("mlflow_run_id"),
            }
        )
    table = pd.DataFrame(rows)
    return table.sort_values(metric, ascending=False, na_position="last").reset_index(drop=True)


def write_outputs(
    cfg, root: Path, table: pd.DataFrame, metric: str, best: dict, baseline: float | None = None
) -> None:
    """``results.csv``, ``best.yaml`` and ``sweep.png``."""
    import yaml

    from cellst.tracking.figures import save_figure
    from cellst.tune.space import apply, overrides_of

    atomic_write_bytes(root / RESULTS_CSV, table.to_csv(index=False).encode())
    best_score = float(table.iloc[0][metric])
    keep = keep_current(best_score, baseline)
    doc = {
        "metric": metric,
        # what to use: the best trial's settings, or the current ones where no trial beat
        # them (then ``set`` is empty and ``score`` is theirs)
        "score": baseline if keep else best_score,
        "current_settings_score": baseline,
        "keep_current_settings": keep,
        "set": [] if keep else overrides_of(best),
        "best_trial": {"score": best_score, "set": overrides_of(best)},
        "config": (cfg if keep else apply(cfg, best)).model_dump(mode="json", exclude={"tune"}),
    }
    atomic_write_bytes(root / BEST_YAML, yaml.safe_dump(doc, sort_keys=False).encode())
    save_figure(sweep_figure(table, metric, list(best), baseline), root / SWEEP_PNG)


def sweep_figure(table: pd.DataFrame, metric: str, keys: list[str], baseline: float | None = None):
    """``metric`` against each swept setting (one panel per setting), best trial marked,
    the config's own settings as a dashed line."""
    from cellst.tracking.figures import new_figure

    n = max(1, len(keys))
    fig = new_figure((3.6 * n, 3.4))
    axes = np.atleast_1d(fig.subplots(1, n))
    ok = table[table[metric].notna()]
    for ax, key in zip(axes, keys, strict=False):
        x = ok[key]
        if x.map(lambda v: isinstance(v, int | float)).all():
            ax.scatter(x, ok[metric], s=18, color="#4c72b0")
            if len(ok):
                ax.scatter([x.iloc[0]], [ok[metric].iloc[0]], s=60, color="#c44e52", label="best")
        else:
            labels = x.astype(str)
            cats = sorted(labels.unique())
            ax.scatter([cats.index(v) for v in labels], ok[metric], s=18, color="#4c72b0")
            ax.set_xticks(range(len(cats)), cats, rotation=30, fontsize=8)
        if baseline is not None:
            ax.axhline(baseline, color="#777777", linestyle="--", linewidth=1, label="current")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
    fig.suptitle(f"{len(ok)} trials")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    return fig
