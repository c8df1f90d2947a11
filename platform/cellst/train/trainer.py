"""``cellst train``: the driver that checks inputs, opens the MLflow run and fits a TorchTrainer.

Everything that can be wrong with the request (config values, a store without labelled
items, a missing pseudo-label set, GPUs the cluster lacks) is reported before any worker
starts. Re-running with the same run name resumes: Ray Train V2 restores the latest
checkpoint of the same ``(storage_path, name)``, and the MLflow run is re-attached.

``train.num_workers=0`` runs the same ``train_loop_per_worker`` in this process (Ray Train's
local mode): no controller, worker or helper actors start, which on a small machine saves
about 25 s per training (measured on 2 CPUs: 12-14 s against 37-40 s for a 2-epoch run).
The crop stream still runs as Ray Data tasks. Ray Train keeps no checkpoints there, so the
loop keeps its resumable state in ``<run>/resume/`` itself; failures are not retried.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import threading
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellst import fs
from cellst.config import ConfigError
from cellst.data.store import CellStore, StoreError
from cellst.experiment import ExperimentConfig
from cellst.fingerprint import NOT_READ_BY_TRAINING, config_differences, training_fingerprint
from cellst.fingerprint import VERSION as FINGERPRINT_VERSION
from cellst.fs import atomic_write_json
from cellst.model.checkpoint_files import is_checkpoint
from cellst.procenv import environ
from cellst.raycluster import (
    ClusterError,
    actors_per_node,
    alive_node_resources,
    cpus_per_actor,
    elastic_cpus_per_actor,
    found_no_room,
    own_node_cpus,
    train_log_level,
)
from cellst.tracking.config import LOCK_TAG
from cellst.train.checkpoints import RunPaths
from cellst.train.config import OVERLAYS_DIR, RAY_STORAGE_DIR, TrainConfig, TrainingDiverged
from cellst.train.plan import steps_per_epoch, training_ranks


@dataclass
class TrainResult:
    """Where a training run's outputs are."""

    run_path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    resumed: bool = False

    @property
    def best(self) -> Path:
        return RunPaths(self.run_path).best

    @property
    def last(self) -> Path:
        return RunPaths(self.run_path).last

    @property
    def snapshots(self) -> list[Path]:
        return RunPaths(self.run_path).snapshots()


def config_hash(cfg: ExperimentConfig) -> str:
    """Fingerprint of what this training computes (:func:`cellst.fingerprint.training_fingerprint`)."""
    return training_fingerprint(cfg)


def same_configuration(state: dict, cfg: ExperimentConfig) -> bool | None:
    """Whether a run folder's state (``run.json``) records a training of ``cfg``.

    A fingerprint of an earlier recipe is compared by that recipe. None where that cannot
    be done: a run of a cellst before fingerprints (its hash counted every default), or of
    a recipe this cellst does not know.
    """
    version = state.get("fingerprint")
    if version is None:
        return True if state.get("config_hash") == config_hash(cfg) else None
    if version == FINGERPRINT_VERSION:
        return state.get("config_hash") == config_hash(cfg)
    try:
        return state.get("config_hash") == training_fingerprint(cfg, version=int(version))
    except ValueError:  # a recipe this cellst does not know
        return None


def _store_as_recorded(cfg: ExperimentConfig, state: dict) -> ExperimentConfig:
    """``cfg`` with ``store`` spelled as the run folder recorded it, where both name the
    same folder (``store``, ``./store/``, its absolute path): the fingerprint counts the
    store's path as given, so another spelling of it refused a resume."""
    then = (state.get("config") or {}).get("store")
    if not then or not cfg.store or then == cfg.store:
        return cfg
    try:
        same = Path(then).resolve() == Path(cfg.store).resolve()
    except OSError:
        same = False
    return cfg.model_copy(update={"store": then}) if same else cfg


def check_request(cfg: ExperimentConfig) -> tuple[CellStore, list[str], list[str]]:
    """Validate the store side of a training request; returns the store and the split."""
    from cellst.train.validate import split_train_val

    if not cfg.store:
        raise ConfigError(
            "no store configured: set `store: PATH` in the config or --set store=PATH"
        )
    store = CellStore(cfg.store)
    labelled = store.items(split="labeled", labeled=True)
    if labelled.empty:
        raise StoreError(
            f"store {store.root} has no labelled items in split 'labeled' to train on "
            f"(splits: {store.manifest['split'].value_counts().to_dict()})"
        )
    t = cfg.train
    if t.pseudo_set is not None and t.pseudo_set not in store.pseudo_sets():
        raise StoreError(
            f"train.pseudo_set={t.pseudo_set!r} is not in store {store.root} "
            f"(sets: {store.pseudo_sets() or 'none'}); create it with `cellst predict`"
        )
    if t.num_workers == 0 and t.use_gpu:
        raise ConfigError(
            "train.num_workers=0 trains in this process on its CPUs; set train.num_workers=1 "
            "for a GPU worker"
        )
    if t.init_checkpoint is not None and not is_checkpoint(t.init_checkpoint):
        raise ConfigError(f"train.init_checkpoint={t.init_checkpoint} is not a cellst checkpoint")
    train_ids, val_ids = split_train_val(labelled, cfg.data.val_fraction, cfg.data.seed)
    return store, train_ids, val_ids


def single_node_defaults() -> None:
    """On a one-node cluster, skip Ray Train's preemption watcher (an extra actor process
    per training, watching for spot-node loss that cannot happen there); an explicit
    ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`` wins."""
    import ray

    if sum(1 for n in ray.nodes() if n.get("Alive")) == 1:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


#: Ray Train waits this many seconds per try for its worker group's placement group
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


#: seconds per try of an elastic group (train.min_workers): Ray Train sizes it by the
#: resources it sees, and just after a loss it still counted the lost node's, so the first
#: restart asked for a group that could not be placed and waited a whole try for it
ELASTIC_TRY_S = 15.0


def node_wait_policy(node_wait_s: float | None, try_s: float = 60.0) -> tuple[dict[str, str], int]:
    """How long Ray Train may wait for room for the workers: ``(environment, tries - 1)``.

    Ray Train waits for the worker group's placement group up to
    ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s) per try, at the start and after a
    lost node, and by default tries forever (for an autoscaler to add a node). A fixed
    cluster that lost a node would wait forever, so cellst allows ``train.node_wait_s`` in
    all: at least two tries of at most ``try_s`` that add up to it (a worker that fails to start
    also costs a try), passed as ``FailureConfig(controller_failure_limit=...)``. Ray counts
    the tries over the whole run, so the wait is a total for one ``cellst train`` call, not
    per lost node. A try length set in that variable by the user is kept. None keeps Ray's
    wait-forever.
    """
    if node_wait_s is None:
        return {}, -1
    given = os.environ.get(START_TIMEOUT_ENV)
    if given:
        try:
            per_try = float(given)
        except ValueError:
            raise ConfigError(f"{START_TIMEOUT_ENV}={given!r} is not a number of seconds") from None
        if per_try > 0:
            return {}, max(1, math.ceil(node_wait_s / per_try)) - 1
    tries = max(2, math.ceil(node_wait_s / try_s))
    return {START_TIMEOUT_ENV: f"{node_wait_s / tries:g}"}, tries - 1


def controller_callbacks(t: TrainConfig) -> list:
    """Callbacks that run inside Ray Train's controller: for an elastic group
    (``train.min_workers``), the limit on its wait for room (``train.node_wait_s``; None
    waits for ever, for an autoscaler) that Ray Train lacks, which also paces the
    controller's loop while it waits (:mod:`cellst.train.elastic_wait`)."""
    if not t.min_workers or not t.num_workers:
        return []
    from cellst.train.elastic_wait import ElasticWaitLimit

    return [ElasticWaitLimit(t.node_wait_s)]


def no_room_error(cfg: ExperimentConfig, paths: RunPaths) -> ClusterError:
    """The one-line error of a training whose workers found no room for train.node_wait_s.
    (The run resumes from the last checkpoint Ray Train registered, which can be one epoch
    before ``last`` if the node went between the two.)"""
    t = cfg.train
    kept = "its checkpoints are kept" if is_checkpoint(paths.last) else "no checkpoint yet"
    gpus = " + 1 GPU" if t.use_gpu else ""
    least = f" (at least {t.min_workers}: train.min_workers)" if t.min_workers else ""
    return ClusterError(
        f"train: {t.num_workers} worker(s){least} of {t.cpus_per_worker:g} CPU(s){gpus} "
        f"({t.placement_strategy}) found no room on the Ray cluster within "
        f"train.node_wait_s={t.node_wait_s:g} s (the run's total wait), e.g. a lost node that "
        f"nothing replaced; {kept}, and the same command resumes the run once the cluster "
        "has room"
    )


def fit_cluster(cfg: ExperimentConfig):
    """Refuse requests the Ray cluster can never satisfy; settle the CPUs of each worker.

    The cluster must leave room for one read-and-augment task beside the workers.
    ``train.cpus_per_worker`` left at None becomes 1 with GPUs (the GPU computes; the other
    CPUs augment) and otherwise about half the CPUs, in whole threads (on CPUs, reading and
    augmenting a crop costs about as much as the network's step on it). An explicit value
    that does not fit is lowered, with a note. A training in this process
    (``train.num_workers=0``) is settled as one worker; it holds no Ray resources, so
    :func:`build_dataset` keeps the read tasks off its CPUs. Returns a copy of ``cfg``.
    """
    import ray

    t = cfg.train
    n = training_ranks(cfg)
    res = ray.cluster_resources()
    if t.num_workers == 0:  # in this process: sized by the CPUs of its own node
        res = {"CPU": driver_node_cpus()}
    if t.use_gpu and res.get("GPU", 0) < n:
        raise ClusterError(
            f"train.use_gpu=true with train.num_workers={t.num_workers} needs {n} "
            f"GPU(s), but the Ray cluster has {res.get('GPU', 0):g}; set train.use_gpu=false"
        )
    room = res.get("CPU", 0) - t.augment_cpus
    if room < 0.25 * n:
        raise ClusterError(
            f"train.num_workers={t.num_workers} does not fit on {res.get('CPU', 0):g} CPUs "
            f"beside one read-and-augment task (train.augment_cpus={t.augment_cpus:g})"
        )
    cfg = cfg.model_copy(deep=True)
    if t.cpus_per_worker is None:
        # CPU training: a crop costs the read-and-augment task about as much CPU time as the
        # small network's step, so the workers get about half the CPUs (whole threads)
        per = 1.0 if t.use_gpu else max(1.0, float(int(room / 2 / n)))
        cfg.train.cpus_per_worker = min(per, room / n)
    elif n * t.cpus_per_worker > room:
        per = room / n
        print(
            f"note: {n} workers x {t.cpus_per_worker:g} CPUs leave no room for "
            f"data reads and augmentation on {res.get('CPU', 0):g} CPUs; using {per:.2f} CPUs "
            "per worker"
        )
        cfg.train.cpus_per_worker = per
    if t.num_workers == 0:  # in this process: on this node, whatever the others hold
        return cfg
    # per node: whatever node a worker lands on, a read-and-augment task must still fit
    held = alive_node_resources() or [{"CPU": res.get("CPU", 0)}]  # read once, used twice
    nodes = [float(r.get("CPU", 0)) for r in held]
    share = cpus_per_actor(nodes, t.num_workers, cfg.train.cpus_per_worker, t.augment_cpus)
    if share <= 0:
        raise ClusterError(
            f"train.num_workers={t.num_workers} does not fit on nodes of "
            f"{', '.join(f'{c:g}' for c in nodes)} CPUs beside a read-and-augment task "
            f"(train.augment_cpus={t.augment_cpus:g}) on each"
        )
    if share < cfg.train.cpus_per_worker:
        print(
            f"note: {t.num_workers} workers x {cfg.train.cpus_per_worker:g} CPUs leave no room "
            f"for a read-and-augment task on nodes of {', '.join(f'{c:g}' for c in nodes)} "
            f"CPUs; using {share:.2f} CPUs per worker"
        )
        cfg.train.cpus_per_worker = share
    if t.min_workers:  # elastic: Ray sizes a restarted group by the nodes' resources alone
        caps = actors_per_node([r.get("GPU", 0) for r in held], 1.0) if t.use_gpu else None
        per = elastic_cpus_per_actor(
            nodes, t.num_workers, cfg.train.cpus_per_worker, t.augment_cpus, caps
        )
        if per <= 0:
            raise ClusterError(
                f"train.min_workers={t.min_workers}: no CPU share per worker places "
                f"{t.num_workers} workers on nodes of {', '.join(f'{c:g}' for c in nodes)} "
                "CPUs so that any node Ray fills with workers keeps a read-and-augment task "
                f"(train.augment_cpus={t.augment_cpus:g}); leave train.min_workers unset"
            )
        if abs(per - cfg.train.cpus_per_worker) > 1e-9:
            print(
                f"note: train.min_workers={t.min_workers}: {per:.2f} CPUs per worker (not "
                f"{cfg.train.cpus_per_worker:g}), so that a node Ray fills with workers after "
                "a loss still has room for a read-and-augment task"
            )
            cfg.train.cpus_per_worker = per
    return cfg


def last_epoch_metrics(paths: RunPaths) -> dict[str, Any]:
    """The metrics saved with the run's last checkpoint: what a run that resumed with no
    epoch left to train reports (in local mode Ray Train restores no checkpoint whose
    metrics it could return)."""
    from cellst.model.checkpoint_files import read_checkpoint_info

    last = paths.last
    return read_checkpoint_info(last)[1] if is_checkpoint(last) else {}


def driver_node_cpus() -> float:
    """CPUs of the node this process runs on (a training in this process steps there);
    the machine's cores where that node gives Ray none (a head started with 0 CPUs)."""
    return own_node_cpus() or float(os.cpu_count() or 1)


def augment_transform(cfg: ExperimentConfig):
    """The read tasks' augmentation (:func:`cellst.train.step.augment_batch`), named rather
    than pickled, so that only the read tasks import torch and MONAI for it (Ray Train's
    controller and split coordinator carry the dataset but never augment)."""
    from cellst.data.datasource import LazyTransform

    return LazyTransform.of(
        "cellst.train.step",
        "augment_batch",
        augment=cfg.augment.model_dump(mode="json"),
        crop=cfg.data.crop_size,
    )


def data_digest(store: CellStore, train_ids: list[str], val_ids: list[str]) -> str:
    """Fingerprint of the labelled items a run trains and validates on: their ids, which
    split each is in, and their stored image and label arrays (whose names hold their
    content's digest). A re-ingest that changes, adds or removes one changes it."""
    from cellst.fingerprint import stable_hash

    rows = store.manifest.set_index("id")
    return stable_hash(
        [
            [split, i, str(rows.at[i, "image_array"]), str(rows.at[i, "label_array"])]
            for split, ids in (("train", train_ids), ("val", val_ids))
            for i in sorted(ids)
        ]
    )


def _inside(path: str | Path, folder: Path) -> bool:
    """Whether ``path`` (links resolved) lies in ``folder``."""
    return Path(path).resolve().is_relative_to(folder.resolve())


def build_dataset(
    cfg: ExperimentConfig,
    store: CellStore,
    train_ids: list[str],
    val_ids: Collection[str] = (),
):
    """The training stream: crops of the labelled items (plus the pseudo-label set if
    configured), augmented into model-ready arrays by CPU tasks anywhere on the cluster.

    A pseudo-label set's items that are validation items (``val_ids``) or in the test
    split are left out, said in a note: ``cellst predict`` labels the test split too when
    a store has no unlabelled items, and a model trained on its own validation or test
    images would choose its checkpoint, and be scored, on what it learnt.

    Each read task augments its own crops (one operator to schedule, and no raw crops
    handed over through the object store). One stream serves every epoch (the workers
    count :func:`steps_per_epoch` batches per epoch): restarting it each epoch cost about
    5 s of an epoch of 25 s on 2 CPUs (``first_batch_seconds``), while one stream keeps
    augmenting through validation and checkpoint writes.
    """
    from cellst.data.datasource import crop_items, train_crop_dataset

    t, d = cfg.train, cfg.data
    pseudo_w = t.pseudo_weight if t.pseudo_set else 0.0
    items = crop_items(store, train_ids, d.balance_by, total_weight=1.0 - pseudo_w)
    if t.pseudo_set:
        items += crop_items(
            store,
            _pseudo_training_ids(store, t.pseudo_set, val_ids),
            d.balance_by,
            pseudo_set=t.pseudo_set,
            source=1,
            total_weight=pseudo_w,
        )
    total = steps_per_epoch(cfg) * t.batch_size * training_ranks(cfg) * t.epochs
    dataset = train_crop_dataset(
        items,
        total,
        d.crop_size,
        d.crops_per_visit,
        seed=None,
        chunk=cfg.ingest.chunk,
        read_cpus=t.augment_cpus,
        transform=augment_transform(cfg),
        block_rows=max(t.batch_size, 32),
    )
    if t.num_workers == 0:
        # local mode: this process steps on train.cpus_per_worker threads that Ray does not
        # count, so the read tasks are kept to the rest (Ray Train's workers hold theirs)
        from cellst.raycluster import leave_cpus_to_driver

        leave_cpus_to_driver(dataset, t.cpus_per_worker, minimum=t.augment_cpus)
    return dataset


def _pseudo_training_ids(store: CellStore, name: str, val_ids: Collection[str]) -> list[str]:
    """The items of pseudo-label set ``name`` a training may learn from: not a validation
    item, not in the test split (a note says how many were left out, and why)."""
    m = store.manifest
    in_set = m["id"].isin(set(store.pseudo_set(name).done_items()))
    is_val = m["id"].isin(set(val_ids))
    is_test = (m["split"] == "test") & ~is_val
    n_val, n_test = int((in_set & is_val).sum()), int((in_set & is_test).sum())
    if n_val or n_test:
        print(
            f"note: train.pseudo_set={name!r}: its {n_val} validation and {n_test} test-split "
            "items are left out of training (a model is never chosen or scored on images it "
            "learnt)"
        )
    held = is_val | is_test
    return m.loc[~held, "id"].tolist()


def _keeps_torch_rng(fn):
    """Run ``fn`` on a fork of torch's CPU generator: a training seeds it (the loop in local
    mode, model building, calibration), and the caller's random stream must not change."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)

    return wrapper


def check_run_dir(cfg: ExperimentConfig) -> None:
    """A ``train.run_dir`` where no run folder can be made is a :class:`ConfigError`
    naming the field (it was a late MLflow error about its database file)."""
    unwritable = fs.unwritable_reason(Path(cfg.train.run_dir).absolute())
    if unwritable:
        raise ConfigError(f"train.run_dir: {unwritable}")


@contextlib.contextmanager
def run_folder_lock(run_path: Path):
    """Held by the training of run folder ``run_path``: a second ``cellst train`` of the
    same run at the same time is refused at once (both trained into one folder and one
    MLflow run, their checkpoints mixed). The lock file sits beside the folder
    (``.<run>.lock``), so that ``--force``, which removes the folder, keeps it."""
    refusal = StoreError(
        f"run {run_path} is being trained by another process; wait for it to end, or "
        "choose another train.run_name"
    )
    with fs.held_by_one(run_lock_file(run_path), refusal):
        yield


def run_lock_file(run_path: Path) -> Path:
    """The lock file :func:`run_folder_lock` holds for run folder ``run_path``."""
    return fs.lock_beside(run_path)


def run_folder(cfg: ExperimentConfig, run_name: str | None = None) -> Path:
    """The training's run folder: ``train.run_dir/<run_name, train.run_name or NAME-train>``."""
    name = run_name or cfg.train.run_name or f"{cfg.name}-train"
    return Path(cfg.train.run_dir).absolute() / name


def _holding_run_lock(fn):
    """Run the decorated training with its run folder's lock held (:func:`run_folder_lock`),
    after :func:`check_run_dir` (before the lock file is made there)."""

    @functools.wraps(fn)
    def wrapper(cfg: ExperimentConfig, *, run_name: str | None = None, **kwargs):
        check_run_dir(cfg)
        with run_folder_lock(run_folder(cfg, run_name)), _reading_pseudo_set(cfg):
            return fn(cfg, run_name=run_name, **kwargs)

    return wrapper


@contextlib.contextmanager
def _reading_pseudo_set(cfg: ExperimentConfig) -> Iterator[None]:
    """Hold ``train.pseudo_set``'s read lock for the training (none without one), so that
    no other run re-writes or removes the set while this one streams it."""
    if not (cfg.train.pseudo_set and cfg.store):
        yield
        return
    from cellst.data.pseudo import PseudoLabelSet

    with PseudoLabelSet(cfg.store, cfg.train.pseudo_set).reading():
        yield


def record_stop(paths: RunPaths, exc: BaseException, error: str | None = None) -> None:
    """Record in ``run.json`` why a training stopped: ``interrupted`` (Ctrl-C) or ``failed``,
    with ``error`` or the exception's first line. The same command resumes either."""
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    paths.write_state(
        status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
        error=error or f"{type(exc).__name__}: {first_line}",
    )


@_keeps_torch_rng
@_holding_run_lock
def train(
    cfg: ExperimentConfig,
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    force: bool = False,
    callbacks: list | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.store`` with Ray Train; see the module docstring.

    Parameters
    ----------
    cfg : ExperimentConfig
    run_name : str, optional
        Overrides ``train.run_name`` (default ``<experiment name>-train``).
    parent_run_id : str, optional
        MLflow parent run (ST++ stages nest their training runs).
    force : bool
        Train again even if a finished run with the same name and config exists.
    callbacks : list, optional
        Ray Train callbacks (a Tune sweep passes ``TuneReportCallback``).

    Raises
    ------
    StoreError
        For every problem found before training starts, among them another training
        running in the same run folder now (:func:`run_folder_lock`).
    TrainingDiverged
        If the loss became non-finite; the checkpoints of earlier epochs are kept.
    TrackingUnavailable
        If the tracking server does not answer before training starts. Once training runs,
        tracking is best-effort (see :mod:`cellst.tracking.buffered`).
    """
    from cellst.raycluster import check_shared_paths, ensure_ray, quiet_ray_data
    from cellst.tracking import (
        check_tracking,
        log_config,
        mark_superseded,
        pending_note,
        resend_pending,
        start_run,
        store_tags,
    )

    if callbacks and cfg.train.num_workers == 0:
        raise ConfigError(
            "train.num_workers=0 (training in this process) cannot report to Ray Train "
            "callbacks such as a Tune sweep's; set train.num_workers to 1 or more"
        )
    paths = RunPaths(run_folder(cfg, run_name))
    store, train_ids, val_ids = check_request(cfg)
    run = _resumable(cfg, paths, store, train_ids, val_ids, force)
    cfg, state = run.cfg, run.state
    if state.get("status") == "finished":
        note = resend_pending(cfg.tracking, paths.root, cfg.name)  # kept during an outage
        if note != state.get("tracking"):
            paths.write_state(tracking=note)
        return TrainResult(paths.root, state.get("metrics", {}), state.get("mlflow_run_id"), True)

    check_tracking(cfg.tracking, paths.root, cfg.name)  # a dead server: one line, no work
    ensure_ray()
    quiet_ray_data()
    # every node may host a worker (checkpoints, run folder) or a read task (the store)
    check_shared_paths(read=[store.root], write=[paths.root])
    cfg = fit_cluster(cfg)
    t = cfg.train
    # (a bad variable: before any work)
    wait_env, wait_tries = node_wait_policy(t.node_wait_s, ELASTIC_TRY_S if t.min_workers else 60.0)
    # the stream checks its pseudo-label set (complete, current, not empty): before --force
    # deletes anything, as each check above
    dataset = build_dataset(cfg, store, train_ids, val_ids)
    # this attempt is the run's one writer from now on, before anything is removed: the
    # workers of a killed earlier attempt, which Ray stops seconds later, publish nothing more
    paths = paths.claim(uuid.uuid4().hex[:12])
    if run.restart:  # every check passed: only now is the earlier run (and its checkpoints) gone
        _clear_for_restart(cfg, paths)
    run_tags = {
        **store_tags(store),
        "cellst.stage": "train",
        "cellst.run_name": paths.root.name,
        LOCK_TAG: str(run_lock_file(paths.root)),  # held while this process trains
        **(tags or {}),
    }
    with start_run(
        cfg.tracking,
        paths.root,
        cfg.name,
        paths.root.name,
        parent_run_id=parent_run_id,
        run_id=state.get("mlflow_run_id"),
        tags=run_tags,
    ) as mlflow_run:
        run_id = mlflow_run.info.run_id
        mark_superseded(cfg.tracking, paths.root, cfg.name, run.replaced_run, run_id)
        log_config(cfg)
        paths.write_state(
            mlflow_run_id=run_id,
            config_hash=run.config_hash,
            fingerprint=FINGERPRINT_VERSION,
            config=cfg.model_dump(mode="json"),  # a changed one is refused naming the fields
            store_version=store.version,  # the manifest version every worker reads
            status="running",
            error=None,
            diverged=None,
            train_ids=train_ids,
            val_ids=val_ids,
            data_digest=run.data_digest,  # a resume on re-ingested items is refused
            writer=paths.writer,
        )
        single_node_defaults()
        trainer = _torch_trainer(cfg, paths, store, val_ids, dataset, run_id, callbacks, wait_tries)
        metrics = _fit(trainer, cfg, paths, wait_env)
        _raise_if_diverged(paths)
        _calibrate_and_log(cfg, store, val_ids, paths, metrics)
    paths.write_state(status="finished", metrics=metrics, tracking=pending_note(paths.root))
    return TrainResult(paths.root, metrics, run_id)


@dataclass
class _Resumable:
    """What the run folder says of a request: what to go on from."""

    cfg: ExperimentConfig  # with the store as the run recorded it
    state: dict[str, Any]  # run.json; empty when the run starts (over)
    config_hash: str
    data_digest: str
    restart: bool  # --force on an existing run: removed once every check has passed
    replaced_run: str | None  # the MLflow run that --force supersedes


def _resumable(
    cfg: ExperimentConfig,
    paths: RunPaths,
    store: CellStore,
    train_ids: list[str],
    val_ids: list[str],
    force: bool,
) -> _Resumable:
    """Check that the run in ``paths`` may go on with ``cfg`` (same configuration, same
    data) or, with ``force``, be started over; a :class:`ConfigError` names why not."""
    t = cfg.train
    state = paths.read_state()
    cfg = _store_as_recorded(cfg, state)
    chash = config_hash(cfg)
    same = same_configuration(state, cfg) if state else True
    if not force and state and same is None:
        # a run folder of an older cellst, whose config hash counted every default: its
        # configuration cannot be compared any more; resume it, with a note
        print(
            f"note: {paths.root} was written by an older cellst; its configuration is taken "
            "as unchanged (pass --force to start it over)"
        )
    if not force and state and same is not False and state.get("config_hash") != chash:
        # the same training, fingerprinted by an earlier recipe: recorded by this one
        state = paths.write_state(config_hash=chash, fingerprint=FINGERPRINT_VERSION)
    if state and state.get("config_hash") != chash and not force:
        changed = config_differences(
            state.get("config") or {}, cfg.model_dump(mode="json"), NOT_READ_BY_TRAINING
        )
        what = (
            f" ({'; '.join(changed[:3])}{', ...' if len(changed) > 3 else ''})"
            if state.get("config") and changed
            else ""
        )
        raise ConfigError(
            f"run {paths.root} exists with a different configuration{what}; choose another "
            f"train.run_name or pass --force to start it over"
        )
    data = data_digest(store, train_ids, val_ids)
    recorded = state.get("data_digest")
    if not force and recorded and recorded != data and state.get("status") != "finished":
        raise ConfigError(
            f"run {paths.root} was started on other data: the store's labelled items changed "
            f"since (re-ingested: store version {state.get('store_version', '?')}, now "
            f"{store.version}), and resuming would train its last epochs and pick its best "
            "checkpoint on the new items; pass --force to start it over, or choose another "
            "train.run_name"
        )
    restart = force and paths.root.exists()  # the old run is removed once the new can run
    if restart and t.init_checkpoint and _inside(t.init_checkpoint, paths.root):
        raise ConfigError(
            f"train.init_checkpoint={t.init_checkpoint} lies in the run that --force replaces "
            f"({paths.root}), so it would be deleted before the training loads it; copy it "
            "out of the run folder, or choose another train.run_name"
        )
    replaced_run = state.get("mlflow_run_id") if restart else None
    return _Resumable(cfg, {} if restart else state, chash, data, restart, replaced_run)


def _clear_for_restart(cfg: ExperimentConfig, paths: RunPaths) -> None:
    """Remove the run that ``--force`` starts over, and Ray Train's state of it. An MLflow
    store inside the run folder (the default) is kept: it holds the earlier run, tagged
    superseded (``--force`` erased the record of the experiment it replaced)."""
    import shutil

    from cellst.tracking import store_inside

    keep = (
        {"mlflow.db", "mlartifacts"} if store_inside(cfg.tracking, paths.root, cfg.name) else set()
    )
    claim = fs.writer_record(paths.root)  # beside the run, but inside where it must be
    for child in paths.root.iterdir():
        if child.name in keep or paths.root.resolve() / child.name == claim:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    ray_state = Path(cfg.train.run_dir).absolute() / RAY_STORAGE_DIR / paths.root.name
    shutil.rmtree(ray_state, ignore_errors=True)


def _torch_trainer(
    cfg: ExperimentConfig,
    paths: RunPaths,
    store: CellStore,
    val_ids: list[str],
    dataset,
    run_id: str,
    callbacks: list | None,
    wait_tries: int,
):
    """The ``TorchTrainer`` of the run: its workers (or local mode), its failure and
    checkpoint policy, and the MLflow logging of each epoch."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from cellst.tracking.config import resolve_tracking
    from cellst.train.epoch_log import EpochMetricsToMLflow
    from cellst.train.loop import train_loop_per_worker

    t = cfg.train
    uri = resolve_tracking(cfg.tracking, paths.root, cfg.name)[0] if cfg.tracking.enabled else None
    # epochs are logged by the controller once it holds their checkpoints (in local mode,
    # which takes no callbacks, by the loop itself after saving its resume state)
    epoch_logger = (
        [
            EpochMetricsToMLflow(
                uri,
                run_id,
                paths.root,
                timeout_s=cfg.tracking.timeout_s,
                retry_every_s=cfg.tracking.retry_every_s,
            )
        ]
        if t.num_workers
        else []
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "experiment": cfg.model_dump(mode="json"),
            "run_path": str(paths.root),
            "writer": paths.writer,  # checkpoints land only while this attempt is the writer
            "store": str(store.root),
            "store_version": store.version,
            "val_ids": val_ids,
            "tracking_uri": uri,
            "mlflow_run_id": run_id,
            "inject_nan_at_step": int(os.environ.get("CELLST_INJECT_NAN_AT_STEP", "0")),
            "hold_epochs_while": os.environ.get("CELLST_HOLD_EPOCHS_WHILE") or None,
            "local": t.num_workers == 0,  # the loop keeps its own resumable state
        },
        scaling_config=ray.train.ScalingConfig(
            # an elastic group (train.min_workers) shrinks on a lost node, grows back
            num_workers=(t.min_workers, t.num_workers) if t.min_workers else t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
            placement_strategy=t.placement_strategy,
            elastic_resize_monitor_interval_s=t.elastic_resize_s,
        )
        if t.num_workers
        else ray.train.ScalingConfig(num_workers=0),  # local mode: in this process
        run_config=ray.train.RunConfig(
            name=paths.root.name,
            storage_path=str(Path(t.run_dir).absolute() / RAY_STORAGE_DIR),
            failure_config=ray.train.FailureConfig(
                max_failures=t.max_failures, controller_failure_limit=wait_tries
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_last),
            logging_config=ray.train.LoggingConfig(log_level=train_log_level()),
            callbacks=list(callbacks or []) + epoch_logger + controller_callbacks(t),
        ),
        datasets={"train": dataset},
    )
    return trainer


def _fit(trainer, cfg: ExperimentConfig, paths: RunPaths, wait_env: dict[str, str]) -> dict:
    """``trainer.fit()``; the metrics of its last epoch. Why a fit stopped is recorded in
    ``run.json``; no room for the workers is a :class:`ClusterError` of one line."""
    import torch

    # fit() hands its controller to Ray Train's own SIGINT handler, which asks it to abort:
    # on a terminal's Ctrl-C (SIGINT to the whole process group) the training went on for
    # epochs, then the command exited 1 without a word, recording "SystemExit: 1". Ctrl-C
    # stays Python's KeyboardInterrupt, as SIGTERM is (raycluster.interrupt_on_sigterm): the
    # run is recorded interrupted, the command exits 130, and the same command resumes it.
    trainer._register_sigint_handler = lambda controller: None
    # the previous SIGINT handler is put back after the run (Ray Train's outlived it
    # before: a later Ctrl-C called a dead controller)
    sigint = signal.getsignal(signal.SIGINT)
    threads = torch.get_num_threads()  # local mode: the loop sets this process's
    try:
        with environ(wait_env):
            result = trainer.fit()
    except BaseException as exc:  # the run's own record tells why it stopped
        no_room = no_room_error(cfg, paths) if found_no_room(exc) else None
        if paths.read_state().get("status") == "stopped" and not no_room:
            raise  # a sweep's scheduler stopped it (and ended its workers): it says so
        record_stop(paths, exc, str(no_room) if no_room else None)
        if no_room:
            raise no_room from None
        raise
    finally:
        torch.set_num_threads(threads)
        if sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
    return dict(result.metrics or {}) or last_epoch_metrics(paths)


def _raise_if_diverged(paths: RunPaths) -> None:
    """:class:`TrainingDiverged` where the loop recorded a NaN or infinite loss."""
    diverged = paths.read_state().get("diverged")
    if diverged:
        paths.write_state(status="diverged")
        raise TrainingDiverged(
            f"training diverged at epoch {diverged['epoch']}: {diverged['message']}; "
            f"checkpoints of earlier epochs are kept in {paths.checkpoints}"
        )


def _calibrate_and_log(
    cfg: ExperimentConfig,
    store: CellStore,
    val_ids: list[str],
    paths: RunPaths,
    metrics: dict[str, Any],
) -> None:
    """After the fit: each checkpoint's post-processing calibrated (``postprocess.json``),
    and the final metrics, overlays and checkpoint list in MLflow. Interrupted (Ctrl-C),
    the run is recorded so, not left "running"."""
    from cellst.postprocess.calibrate import calibrate_run
    from cellst.tracking import log_artifact, log_metrics

    try:
        calibrate_run(cfg, store, val_ids, paths)
        log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, int | float)})
        if paths.overlays.is_dir():
            for png in sorted(paths.overlays.glob("*.png")):
                log_artifact(png, OVERLAYS_DIR)
        ckpts = {
            p.name: str(p)
            for p in sorted(paths.checkpoints.iterdir())
            if p.is_dir() and not p.name.startswith(".")  # not a copy left half-made
        }
        log_artifact(atomic_write_json(paths.checkpoint_list, ckpts))
    except BaseException as exc:  # Ctrl-C while calibrating: not left "running"
        record_stop(paths, exc)
        raise
