"""``train_loop_per_worker``: what each Ray Train worker runs.

Each epoch: take this worker's ``steps_per_epoch`` batches from the run's one crop stream
(augmented by CPU tasks), step on each; then rank 0
validates (whole-image F1), saves a checkpoint and reports; every rank reports the same
number of times (``ray.train.report`` is a barrier). A restarted or resumed run continues
from ``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import ray.train

from cellst.fs import atomic_write_json, process_temp_dir, remove_orphan_temp_dirs
from cellst.train.plan import steps_per_epoch

if TYPE_CHECKING:
    import torch

    from cellst.experiment import ExperimentConfig

T = TypeVar("T")
#: each epoch's checkpoint is written under a temporary folder of this prefix first
CHECKPOINT_TEMP_PREFIX = "cellst-ckpt-"


def _all_finite(ok: bool, device: torch.device) -> bool:
    """Whether every rank's loss is finite (so all ranks stop together)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _placement_group_id() -> str | None:
    pg = ray.util.get_current_placement_group()
    return None if pg is None else pg.id.hex()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function. ``config`` comes from :func:`cellst.train.trainer.train`."""
    from cellst.experiment import ExperimentConfig  # configs only: no torch, no Ray Data
    from cellst.raycluster import quiet_logs

    quiet_logs()  # also when the cluster was started without cellst's runtime environment
    remove_orphan_temp_dirs(CHECKPOINT_TEMP_PREFIX)  # of workers killed on this node before
    cfg = ExperimentConfig.model_validate(config["experiment"])
    tcfg = cfg.train
    # the run's one crop stream (each epoch takes its steps from it; no restart per epoch),
    # started before anything heavy is imported here: its read-and-augment tasks start up
    # (new processes that import torch and MONAI) while this worker imports them too and
    # builds its model, instead of after
    batches = _first_item_fetched_now(
        ray.train.get_dataset_shard("train").iter_batches(
            batch_size=tcfg.batch_size,
            batch_format="numpy",
            drop_last=True,
            prefetch_batches=tcfg.prefetch_batches,
        )
    )
    try:
        _train(config, cfg, batches)
    finally:
        # now, while Ray is up: a stream finalised at exit (local mode runs in the driver)
        # called Ray after its shutdown, which started a new local cluster and hung
        batches.close()


def _train(config: dict[str, Any], cfg: ExperimentConfig, batches: Iterator) -> None:
    """The epochs of :func:`train_loop_per_worker` on its crop stream ``batches``."""
    tcfg = cfg.train
    import torch
    from ray.train.torch import get_device, prepare_model

    from cellst.data.store import CellStore
    from cellst.model import HoVerLoss, build_model, load_into, unwrap_model
    from cellst.tracking.buffered import BufferedMetricLogger
    from cellst.train.checkpoints import (
        RunPaths,
        keep_checkpoints,
        keep_resume_state,
        publish_best,
        restore_best,
        save_epoch,
    )
    from cellst.train.epoch_log import (
        STEP_METRICS,
        epoch_metrics,
        log_restored_epoch,
        write_step_metrics,
    )
    from cellst.train.selection import initial_best, update_best
    from cellst.train.step import (
        Batch,
        TrainingDiverged,
        encoder_parameters,
        make_ema,
        make_optimizer,
        make_scheduler,
        train_step,
    )
    from cellst.train.validate import validate

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(tcfg.seed + rank)
    # the CPUs this worker holds (Ray sets OMP threads to the integer part only)
    torch.set_num_threads(max(1, math.ceil((tcfg.cpus_per_worker or 1.0) - 1e-6)))
    # local mode (the driver's process) holds no GPU: Ray's get_device() would pick any
    # visible one there
    device = torch.device("cpu") if config.get("local") else get_device()
    paths = RunPaths(Path(config["run_path"]))
    paths.root.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (paths.root / "rank0.pid").write_text(str(os.getpid()))  # for operators (and tests)
    # where each rank runs (multi-node clusters): node, host, process, device
    atomic_write_json(
        paths.worker_file(rank),
        {
            "rank": rank,
            "world_size": world,
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(device),
            # the worker group's placement group (None in local mode): what a sweep
            # releases when Tune stops a trial (cellst.tune.sweep.ReleaseStoppedTrials)
            "placement_group": _placement_group_id(),
        },
    )
    if rank == 0:  # an elastic group that shrank (train.min_workers): its gone ranks' records
        for gone in [
            *paths.workers.glob("rank*.json"),
            *paths.root.glob("params_rank*.sha256"),
        ]:
            n = gone.stem.rpartition("rank")[2]
            if n.isdigit() and int(n) >= world:
                gone.unlink(missing_ok=True)

    model = build_model(cfg.model)
    if tcfg.init_checkpoint:
        load_into(model, cfg.model, tcfg.init_checkpoint)
    if tcfg.use_gpu:
        if tcfg.sync_bn and world > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if tcfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
    model = prepare_model(model)

    # two param groups so the two-phase schedule can hold the encoder still (lr 0) without
    # toggling requires_grad under DDP
    enc = {id(p) for p in encoder_parameters(model)}
    opt = make_optimizer(model, tcfg.optimizer, tcfg.lr, tcfg.weight_decay)
    params = opt.param_groups[0]["params"]
    opt.param_groups[0]["params"] = [p for p in params if id(p) in enc]
    opt.add_param_group({"params": [p for p in params if id(p) not in enc]})
    n_steps_epoch = steps_per_epoch(cfg)
    per_step = tcfg.schedule_unit == "step"
    sched = make_scheduler(
        opt,
        tcfg.schedule,
        tcfg.epochs,
        tcfg.step_epochs,
        tcfg.step_gamma,
        steps_per_epoch=n_steps_epoch if per_step else None,
    )
    # the weights validated, checkpointed and predicted with: the moving average, if kept
    ema = make_ema(unwrap_model(model), tcfg.ema_decay) if tcfg.ema_decay > 0 else None
    served = ema.module if ema is not None else unwrap_model(model)

    start_epoch, step, best = 0, 0, initial_best()
    local = bool(config.get("local"))  # in the driver's process: Ray Train keeps no state
    state = _resume_state(paths, local, device)
    if state is not None and rank == 0 and config.get("mlflow_run_id"):
        # the epoch resumed from was kept, but a kill between keeping and logging it (in
        # the controller, or here in local mode) left it out of MLflow: logged now, once
        repair = BufferedMetricLogger(
            config.get("tracking_uri"),
            config["mlflow_run_id"],
            paths.root,
            timeout_s=cfg.tracking.timeout_s,
            retry_every_s=cfg.tracking.retry_every_s,
        )
        log_restored_epoch(repair, state["epoch"], state.get("logged"))
        repair.close()
    if state is not None:
        unwrap_model(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, step, best = state["epoch"], state["step"], state["best"]
        if rank == 0:
            restore_best(paths, best.get("epoch"))
        if ema is not None and "ema" in state:  # else it restarts from the resumed weights
            ema.load_state_dict(state["ema"])

    # the version the driver checked: a re-ingest meanwhile does not change what this run reads
    store = CellStore(config["store"], version=config.get("store_version"))
    val_ids = config["val_ids"][: tcfg.val_max_items]
    loss_fn = HoVerLoss(cfg.loss)
    logger = (  # best-effort: a dead tracking server costs a file append per call
        BufferedMetricLogger(
            config.get("tracking_uri"),
            config.get("mlflow_run_id"),
            paths.root,
            timeout_s=cfg.tracking.timeout_s,
            retry_every_s=cfg.tracking.retry_every_s,
        )
        if rank == 0 and local  # else the controller logs (cellst.train.epoch_log)
        else None
    )
    snapshots = set(tcfg.snapshot_epochs())
    inject_nan_at = int(config.get("inject_nan_at_step") or 0)  # test hook: a real NaN loss
    model.train()

    for epoch in range(start_epoch + 1, tcfg.epochs + 1):
        frozen = epoch <= tcfg.frozen_encoder_epochs
        opt.param_groups[0]["lr"] = 0.0 if frozen else opt.param_groups[1]["lr"]
        lr = opt.param_groups[1]["lr"]  # the rate this epoch trains at (starts at)
        t0, n_seen, n_steps, sums, diverged = time.perf_counter(), 0, 0, {}, None
        step_log: list[tuple[int, int, dict[str, float]]] = []  # rank 0's step_* records
        busy = 0.0  # seconds spent stepping; the rest of the epoch waited for data
        first_batch_s = None  # stream start-up: until the first augmented batch arrived
        for _ in range(n_steps_epoch):
            batch = next(batches, None)  # augmented by the stream's CPU tasks
            if batch is None:  # the stream holds exactly the run's batches; never early
                break
            t_step = time.perf_counter()
            if first_batch_s is None:
                first_batch_s = t_step - t0
            b = Batch.from_numpy(batch).to(
                device, channels_last=tcfg.use_gpu and tcfg.channels_last
            )
            if inject_nan_at and step + 1 == inject_nan_at:
                b.image.fill_(float("nan"))
            try:
                terms = train_step(
                    model,
                    b,
                    loss_fn,
                    opt,
                    amp=tcfg.amp,
                    grad_clip=tcfg.grad_clip,
                    check=lambda ok: _all_finite(ok, device),
                )
            except TrainingDiverged as exc:
                diverged = str(exc)
                break
            if ema is not None:
                ema.update_parameters(unwrap_model(model))
            if per_step:
                sched.step()
                if frozen:  # the schedule sets every group's rate; the encoder stays still
                    opt.param_groups[0]["lr"] = 0.0
            busy += time.perf_counter() - t_step
            step += 1
            n_steps += 1
            n_seen += len(b.image)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            if rank == 0 and step % tcfg.log_every_steps == 0:  # logged with the epoch
                now_ms = int(time.time() * 1000)
                step_log.append((step, now_ms, {f"step_{k}": v for k, v in terms.items()}))
        if diverged is not None:
            store.close()
            if rank == 0:  # durable: Result.metrics follows the last *checkpointed* report
                paths.write_state(diverged={"epoch": epoch, "message": diverged})
            if logger is not None:  # the losses that led there (local mode)
                logger.log_steps(step_log)
                logger.close()
            # ... or by the controller, from the report (there is no checkpoint to hold them)
            ray.train.report({"epoch": epoch, "diverged": diverged, STEP_METRICS: step_log})
            return
        if not per_step:
            sched.step()
        seconds = time.perf_counter() - t0
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "lr": lr,
            "encoder_frozen": float(frozen),
            "images_per_s": n_seen * world / seconds if seconds > 0 else 0.0,
            # share of the epoch this worker waited for augmented batches (0: never starved)
            "data_wait_share": max(0.0, 1.0 - busy / seconds) if seconds > 0 else 0.0,
            "epoch_seconds": seconds,
            "first_batch_seconds": first_batch_s or 0.0,
            "resumed_from_epoch": start_epoch,
            **{f"train_{k}": v / max(1, n_steps) for k, v in sums.items()},
        }
        checkpoint = None
        if rank == 0:
            t_val = time.perf_counter()
            if val_ids and (epoch % tcfg.val_every == 0 or epoch == tcfg.epochs):
                val, kept, item_f1 = validate(
                    served,
                    store,
                    val_ids,
                    cfg.inference,
                    cfg.postprocess,
                    device,
                    keep=3 if epoch == tcfg.epochs else 0,
                    evaluate=cfg.evaluate,
                )
                metrics.update(val)
                best = update_best(best, epoch, val["val_f1"], item_f1, tcfg.best_within_se)
                if kept:
                    _save_overlays(store, kept, paths.overlays)
            metrics["best_val_f1"] = best["val_f1"]
            metrics["best_epoch"] = best["epoch"]
            metrics["val_seconds"] = time.perf_counter() - t_val
            t_ckpt = time.perf_counter()
            tmp = process_temp_dir(CHECKPOINT_TEMP_PREFIX) / "checkpoint"
            state = {
                "model": unwrap_model(model).state_dict(),
                **({"ema": ema.state_dict()} if ema is not None else {}),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "epoch": epoch,
                "step": step,
                "best": best,
                # what MLflow gets for the epoch: a resumed run logs it if it never got there
                "logged": {"metrics": epoch_metrics(metrics), "steps": step_log},
            }
            save_epoch(tmp, served, cfg.model, state, metrics)
            keep_checkpoints(
                paths,
                tmp,
                epoch,
                is_best=False,  # best/ once the epoch is kept for a resume (below)
                is_snapshot=epoch in snapshots,
                keep_last=tcfg.keep_last,
            )
            if local:  # after the epoch's folders: a re-run never skips an unpublished epoch
                keep_resume_state(paths, tmp)
            else:  # Ray's copy only: the controller logs them once it holds the checkpoint
                write_step_metrics(tmp, step_log)
            checkpoint = ray.train.Checkpoint.from_directory(str(tmp))
            metrics["checkpoint_seconds"] = time.perf_counter() - t_ckpt
            print(
                f"[cellst train] epoch {epoch}/{tcfg.epochs} "
                + " ".join(
                    f"{k}={v:.4g}"
                    for k, v in metrics.items()
                    if k in ("train_loss", "val_f1", "images_per_s", "data_wait_share", "lr")
                ),
                file=sys.__stdout__,  # once: Ray Train's print patch would also log it
                flush=True,
            )
        try:
            ray.train.report(metrics, checkpoint=checkpoint)  # uploads synchronously
            if checkpoint is not None and best["epoch"] == epoch:
                # only now: a kill before the report resumes from the epoch before, whose
                # best it restores, so best/ must not hold this (then discarded) epoch
                publish_best(paths, tmp)
        finally:
            if checkpoint is not None:  # Ray holds its own copy now: no temp folder left behind
                shutil.rmtree(tmp.parent, ignore_errors=True)
        if logger is not None:  # local mode: else the controller logs the epoch, once it
            # holds its checkpoint (cellst.train.epoch_log); here, the resume state is saved
            logger.log_steps(step_log)
            logger.log(epoch_metrics(metrics), epoch)
    # the store version's lease, now: Ray Train may end this process before a garbage
    # collection would (a lease left behind looks held until the next ingest drops it)
    store.close()
    if logger is not None:
        logger.close()  # a last attempt; what is left is said in one line
    _write_param_digest(unwrap_model(model), paths.root / f"params_rank{rank}.sha256")


def _resume_state(paths, local: bool, device: torch.device) -> dict[str, Any] | None:
    """The training state to continue from: Ray Train's restored checkpoint, or in local
    mode (``train.num_workers=0``) the run's own ``resume/train_state.pt``; None: start."""
    import torch

    from cellst.train.checkpoints import TRAIN_STATE_FILE

    if local:
        path = paths.resume_state
        if not path.is_file():
            return None
        return torch.load(path, map_location=device, weights_only=False)
    resumed = ray.train.get_checkpoint()
    if resumed is None:
        return None
    with resumed.as_directory() as d:
        return torch.load(Path(d) / TRAIN_STATE_FILE, map_location=device, weights_only=False)


class _FirstItemFetchedNow:
    """``items`` as an iterator whose first item is already being fetched, by a background
    thread, so that a lazy stream starts now rather than at the first ``next()``. An error
    of that fetch is raised by the first ``next()``, as without the thread. :meth:`close`
    closes the stream (Ray Data's iterator ends its executor then, not at exit)."""

    def __init__(self, items: Iterator[T] | Any):
        self._it = iter(items)
        self._box: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._fetch, name="cellst-first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._box["item"] = next(self._it)
        except StopIteration:
            self._box["end"] = True
        except BaseException as exc:  # handed to the consumer below
            self._box["error"] = exc

    def __iter__(self) -> _FirstItemFetchedNow:
        return self

    def __next__(self) -> T:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if "error" in self._box:
                raise self._box.pop("error")
            if "item" in self._box:
                return self._box.pop("item")
            if self._box.pop("end", False):
                raise StopIteration
        return next(self._it)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def _first_item_fetched_now(items: Iterator[T] | Any) -> _FirstItemFetchedNow:
    """See :class:`_FirstItemFetchedNow`."""
    return _FirstItemFetchedNow(items)


def _write_param_digest(model: torch.nn.Module, path: Path) -> None:
    """sha256 of every parameter's bytes: equal files prove the DDP ranks ended identical."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(h.hexdigest())


def _save_overlays(store, kept, folder: Path) -> None:
    from cellst.tracking.figures import overlay_figure, save_figure

    folder.mkdir(parents=True, exist_ok=True)
    for item, pred in kept:
        fig = overlay_figure(store.image(item), store.label(item), pred, title=item)
        save_figure(fig, folder / f"{item}.png")
