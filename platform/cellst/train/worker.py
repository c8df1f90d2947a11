"""What a Ray Train worker does once its crop stream has started: its epochs.

:func:`run_epochs` reads as Ray's ``train_loop_per_worker`` examples do:

1. :class:`Worker` sets up this rank: seed, threads, device, its record in the run folder,
   model, optimiser, schedule, moving average of the weights, and the state to resume from;
2. each epoch, every rank steps on its share of the stream (:meth:`Worker.train_epoch`);
   rank 0 then validates (whole-image F1 and the selection rule) and writes the epoch's
   checkpoint folder; every rank reports (``ray.train.report`` is a barrier);
3. :meth:`Worker.finish` releases the store, flushes the tracking and writes the digest of
   the parameters (equal on every rank).

This module imports torch and MONAI: :mod:`cellst.train.loop` imports it only after the
stream's read tasks have started.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.train
import torch
from ray.train.torch import get_device, prepare_model

from cellst.data.store import CellStore
from cellst.fs import atomic_write_json, process_temp_dir
from cellst.model import HoVerLoss, build_model, load_into, unwrap_model
from cellst.tracking.buffered import BufferedMetricLogger
from cellst.train.checkpoints import (
    TRAIN_STATE_FILE,
    RunPaths,
    keep_checkpoints,
    keep_resume_state,
    publish_best,
    restore_best,
    save_epoch,
)
from cellst.train.config import CHECKPOINT_TEMP_PREFIX
from cellst.train.epoch_log import (
    STEP_METRICS,
    epoch_metrics,
    log_restored_epoch,
    write_step_metrics,
)
from cellst.train.plan import steps_per_epoch
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

if TYPE_CHECKING:
    from cellst.experiment import ExperimentConfig

#: rank 0's step records of an epoch: (step, time in ms, {"step_<term>": value})
StepLog = list[tuple[int, int, dict[str, float]]]


def run_epochs(config: dict[str, Any], cfg: ExperimentConfig, batches: Iterator) -> None:
    """The epochs of :func:`cellst.train.loop.train_loop_per_worker` on its crop stream."""
    worker = Worker(config, cfg)
    hold = config.get("hold_epochs_while")  # test hook: a path whose file holds each epoch
    for epoch in range(worker.start_epoch + 1, cfg.train.epochs + 1):
        while hold and os.path.exists(hold):  # (a node change lands mid-run, not after it)
            time.sleep(0.1)
        steps = worker.train_epoch(epoch, batches)
        if steps.diverged is not None:
            worker.stop_diverged(epoch, steps)
            return
        metrics = steps.metrics(epoch, worker.world, worker.start_epoch)
        saved = None
        if worker.rank == 0:
            worker.validate(epoch, metrics)
            saved = worker.save(epoch, metrics, steps.step_log)
        worker.report(epoch, metrics, saved, steps.step_log)
    worker.finish()


@dataclass
class EpochSteps:
    """One epoch's steps on this rank."""

    lr: float  # the rate the epoch trains at (starts at)
    frozen: bool  # the encoder held still (``train.frozen_encoder_epochs``)
    seconds: float = 0.0
    steps: int = 0
    images: int = 0
    busy: float = 0.0  # seconds spent stepping; the rest of the epoch waited for data
    first_batch_s: float | None = None  # stream start-up: until the first batch arrived
    sums: dict[str, float] = field(default_factory=dict)  # loss terms summed over the steps
    step_log: StepLog = field(default_factory=list)  # rank 0's step_* records
    diverged: str | None = None  # the message of a NaN or infinite loss

    def metrics(self, epoch: int, world: int, resumed_from: int) -> dict[str, Any]:
        """The epoch's training metrics (validation adds its own on rank 0)."""
        s = self.seconds
        return {
            "epoch": epoch,
            "lr": self.lr,
            "encoder_frozen": float(self.frozen),
            "images_per_s": self.images * world / s if s > 0 else 0.0,
            # share of the epoch this worker waited for augmented batches (0: never starved)
            "data_wait_share": max(0.0, 1.0 - self.busy / s) if s > 0 else 0.0,
            "epoch_seconds": s,
            "first_batch_seconds": self.first_batch_s or 0.0,
            "resumed_from_epoch": resumed_from,
            **{f"train_{k}": v / max(1, self.steps) for k, v in self.sums.items()},
        }


class Worker:
    """One rank of a training: its model, optimiser, schedule and progress."""

    def __init__(self, config: dict[str, Any], cfg: ExperimentConfig):
        tcfg = cfg.train
        self.config, self.cfg = config, cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.manual_seed(tcfg.seed + self.rank)
        # the CPUs this worker holds (Ray sets OMP threads to the integer part only)
        torch.set_num_threads(max(1, math.ceil((tcfg.cpus_per_worker or 1.0) - 1e-6)))
        self.local = bool(config.get("local"))  # in the driver: Ray Train keeps no state
        # local mode (the driver's process) holds no GPU: Ray's get_device() would pick any
        # visible one there
        self.device = torch.device("cpu") if self.local else get_device()
        self.paths = RunPaths(Path(config["run_path"]), config.get("writer"))
        _record_worker(self.paths, self.rank, self.world, self.device)

        self.model = _build_model(cfg, self.world)
        self.opt, self.sched = _optimiser(self.model, cfg)
        # the weights validated, checkpointed and predicted with: the moving average, if kept
        self.ema = (
            make_ema(unwrap_model(self.model), tcfg.ema_decay) if tcfg.ema_decay > 0 else None
        )
        self.start_epoch, self.step, self.best = 0, 0, initial_best()
        self._resume()

        # the version the driver checked: a re-ingest meanwhile does not change what it reads
        self.store = CellStore(config["store"], version=config.get("store_version"))
        self.val_ids = config["val_ids"][: tcfg.val_max_items]
        self.loss_fn = HoVerLoss(cfg.loss)
        # best-effort (a dead tracking server costs a file append per call); only in local
        # mode: else the controller logs each epoch (cellst.train.epoch_log)
        self.logger = self._tracking() if self.rank == 0 and self.local else None
        self.snapshots = set(tcfg.snapshot_epochs())
        self.steps_per_epoch = steps_per_epoch(cfg)
        self.per_step = tcfg.schedule_unit == "step"
        self.inject_nan_at = int(config.get("inject_nan_at_step") or 0)  # test hook: real NaN
        self.model.train()

    @property
    def served(self) -> torch.nn.Module:
        """The weights validated, checkpointed and predicted with."""
        return self.ema.module if self.ema is not None else unwrap_model(self.model)

    def _tracking(self) -> BufferedMetricLogger:
        return BufferedMetricLogger(
            self.config.get("tracking_uri"),
            self.config.get("mlflow_run_id"),
            self.paths.root,
            timeout_s=self.cfg.tracking.timeout_s,
            retry_every_s=self.cfg.tracking.retry_every_s,
        )

    def _resume(self) -> None:
        """Continue from the last kept epoch, if there is one."""
        state = _resume_state(self.paths, self.local, self.device)
        if state is None:
            return
        if self.rank == 0 and self.config.get("mlflow_run_id"):
            # the epoch resumed from was kept, but a kill between keeping and logging it (in
            # the controller, or here in local mode) left it out of MLflow: logged now, once
            repair = self._tracking()
            log_restored_epoch(repair, state["epoch"], state.get("logged"))
            repair.close()
        unwrap_model(self.model).load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.start_epoch, self.step, self.best = state["epoch"], state["step"], state["best"]
        if self.rank == 0:
            restore_best(self.paths, self.best.get("epoch"))
        if self.ema is not None and "ema" in state:  # else it restarts from these weights
            self.ema.load_state_dict(state["ema"])

    def train_epoch(self, epoch: int, batches: Iterator) -> EpochSteps:
        """This rank's ``steps_per_epoch`` steps of epoch ``epoch`` on the crop stream."""
        tcfg, opt = self.cfg.train, self.opt
        frozen = epoch <= tcfg.frozen_encoder_epochs
        opt.param_groups[0]["lr"] = 0.0 if frozen else opt.param_groups[1]["lr"]
        out = EpochSteps(lr=opt.param_groups[1]["lr"], frozen=frozen)
        t0 = time.perf_counter()
        for _ in range(self.steps_per_epoch):
            batch = next(batches, None)  # augmented by the stream's CPU tasks
            if batch is None:  # the stream holds exactly the run's batches; never early
                break
            t_step = time.perf_counter()
            if out.first_batch_s is None:
                out.first_batch_s = t_step - t0
            b = Batch.from_numpy(batch).to(
                self.device, channels_last=tcfg.use_gpu and tcfg.channels_last
            )
            if self.inject_nan_at and self.step + 1 == self.inject_nan_at:
                b.image.fill_(float("nan"))
            try:
                terms = train_step(
                    self.model,
                    b,
                    self.loss_fn,
                    opt,
                    amp=tcfg.amp,
                    grad_clip=tcfg.grad_clip,
                    check=lambda ok: _all_finite(ok, self.device),
                )
            except TrainingDiverged as exc:
                out.diverged = str(exc)
                return out
            if self.ema is not None:
                self.ema.update_parameters(unwrap_model(self.model))
            if self.per_step:
                self.sched.step()
                if frozen:  # the schedule sets every group's rate; the encoder stays still
                    opt.param_groups[0]["lr"] = 0.0
            out.busy += time.perf_counter() - t_step
            self.step += 1
            out.steps += 1
            out.images += len(b.image)
            for k, v in terms.items():
                out.sums[k] = out.sums.get(k, 0.0) + v
            if self.rank == 0 and self.step % tcfg.log_every_steps == 0:  # logged with the epoch
                now_ms = int(time.time() * 1000)
                out.step_log.append((self.step, now_ms, {f"step_{k}": v for k, v in terms.items()}))
        if not self.per_step:
            self.sched.step()
        out.seconds = time.perf_counter() - t0
        return out

    def stop_diverged(self, epoch: int, steps: EpochSteps) -> None:
        """End the training at a NaN or infinite loss: recorded, reported, no checkpoint."""
        self.store.close()
        if self.rank == 0:  # durable: Result.metrics follows the last *checkpointed* report
            self.paths.write_state(diverged={"epoch": epoch, "message": steps.diverged})
        if self.logger is not None:  # the losses that led there (local mode)
            self.logger.log_steps(steps.step_log)
            self.logger.close()
        # ... or by the controller, from the report (there is no checkpoint to hold them)
        ray.train.report({"epoch": epoch, "diverged": steps.diverged, STEP_METRICS: steps.step_log})

    def validate(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Rank 0: validation F1 when due, and the selection rule's best epoch, into
        ``metrics``."""
        tcfg = self.cfg.train
        t_val = time.perf_counter()
        if self.val_ids and (epoch % tcfg.val_every == 0 or epoch == tcfg.epochs):
            val, kept, item_f1 = validate(
                self.served,
                self.store,
                self.val_ids,
                self.cfg.inference,
                self.cfg.postprocess,
                self.device,
                keep=3 if epoch == tcfg.epochs else 0,
                evaluate=self.cfg.evaluate,
            )
            metrics.update(val)
            self.best = update_best(self.best, epoch, val["val_f1"], item_f1, tcfg.best_within_se)
            if kept:
                _save_overlays(self.store, kept, self.paths.overlays)
        metrics["best_val_f1"] = self.best["val_f1"]
        metrics["best_epoch"] = self.best["epoch"]
        metrics["val_seconds"] = time.perf_counter() - t_val

    def save(self, epoch: int, metrics: dict[str, Any], step_log: StepLog) -> Path:
        """Rank 0: the epoch's checkpoint folder (a temporary one, handed to Ray Train by
        :meth:`report`), its copies in the run folder, and the resume state."""
        tcfg = self.cfg.train
        t_ckpt = time.perf_counter()
        tmp = process_temp_dir(CHECKPOINT_TEMP_PREFIX) / "checkpoint"
        state = {
            "model": unwrap_model(self.model).state_dict(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "epoch": epoch,
            "step": self.step,
            "best": self.best,
            # what MLflow gets for the epoch: a resumed run logs it if it never got there
            "logged": {"metrics": epoch_metrics(metrics), "steps": step_log},
        }
        save_epoch(tmp, self.served, self.cfg.model, state, metrics)
        keep_checkpoints(
            self.paths,
            tmp,
            epoch,
            is_best=False,  # best/ once the epoch is kept for a resume (report)
            is_snapshot=epoch in self.snapshots,
            keep_last=tcfg.keep_last,
        )
        if self.local:  # after the epoch's folders: a re-run never skips an unpublished epoch
            keep_resume_state(self.paths, tmp)
        else:  # Ray's copy only: the controller logs them once it holds the checkpoint
            write_step_metrics(tmp, step_log)
        metrics["checkpoint_seconds"] = time.perf_counter() - t_ckpt
        shown = ("train_loss", "val_f1", "images_per_s", "data_wait_share", "lr")
        print(
            f"[cellst train] epoch {epoch}/{tcfg.epochs} "
            + " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in shown),
            file=sys.__stdout__,  # once: Ray Train's print patch would also log it
            flush=True,
        )
        return tmp

    def report(
        self, epoch: int, metrics: dict[str, Any], saved: Path | None, step_log: StepLog
    ) -> None:
        """Every rank: ``ray.train.report`` (a barrier), with rank 0's checkpoint."""
        checkpoint = None if saved is None else ray.train.Checkpoint.from_directory(str(saved))
        try:
            ray.train.report(metrics, checkpoint=checkpoint)  # uploads synchronously
            if saved is not None and self.best["epoch"] == epoch:
                # only now: a kill before the report resumes from the epoch before, whose
                # best it restores, so best/ must not hold this (then discarded) epoch
                publish_best(self.paths, saved)
        finally:
            if saved is not None:  # Ray holds its own copy now: no temp folder left behind
                shutil.rmtree(saved.parent, ignore_errors=True)
        if self.logger is not None:  # local mode: else the controller logs the epoch, once
            # it holds its checkpoint (cellst.train.epoch_log); here, the resume state is kept
            self.logger.log_steps(step_log)
            self.logger.log(epoch_metrics(metrics), epoch)

    def finish(self) -> None:
        """After the last epoch: the store's lease, the tracking, the parameters' digest."""
        # the store version's lease, now: Ray Train may end this process before a garbage
        # collection would (a lease left behind looks held until the next ingest drops it)
        self.store.close()
        if self.logger is not None:
            self.logger.close()  # a last attempt; what is left is said in one line
        _write_param_digest(
            unwrap_model(self.model), self.paths.root / f"params_rank{self.rank}.sha256"
        )


def _record_worker(paths: RunPaths, rank: int, world: int, device: torch.device) -> None:
    """Where this rank runs (node, host, process, device: multi-node clusters), in the run
    folder; rank 0 also records the group's size and removes the records of ranks an
    elastic group no longer has."""
    paths.root.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (paths.root / "rank0.pid").write_text(str(os.getpid()))  # for operators (and tests)
    pg = ray.util.get_current_placement_group()
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
            "placement_group": None if pg is None else pg.id.hex(),
        },
    )
    if rank == 0:
        paths.record_group_size(world)  # `cellst train` says when an elastic group changed
        # an elastic group that shrank (train.min_workers): its gone ranks' records
        for gone in [*paths.workers.glob("rank*.json"), *paths.root.glob("params_rank*.sha256")]:
            n = gone.stem.rpartition("rank")[2]
            if n.isdigit() and int(n) >= world:
                gone.unlink(missing_ok=True)


def _build_model(cfg: ExperimentConfig, world: int) -> torch.nn.Module:
    """The network, from ``train.init_checkpoint`` where set, prepared for DDP and device."""
    tcfg = cfg.train
    model = build_model(cfg.model)
    if tcfg.init_checkpoint:
        load_into(model, cfg.model, tcfg.init_checkpoint)
    if tcfg.use_gpu:
        if tcfg.sync_bn and world > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if tcfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
    return prepare_model(model)


def _optimiser(model: torch.nn.Module, cfg: ExperimentConfig) -> tuple[Any, Any]:
    """The optimiser, with the encoder's parameters as group 0 (so that the two-phase
    schedule holds the encoder still with a rate of 0, not by toggling ``requires_grad``
    under DDP), and its learning-rate schedule."""
    tcfg = cfg.train
    enc = {id(p) for p in encoder_parameters(model)}
    opt = make_optimizer(model, tcfg.optimizer, tcfg.lr, tcfg.weight_decay)
    params = opt.param_groups[0]["params"]
    opt.param_groups[0]["params"] = [p for p in params if id(p) in enc]
    opt.add_param_group({"params": [p for p in params if id(p) not in enc]})
    sched = make_scheduler(
        opt,
        tcfg.schedule,
        tcfg.epochs,
        tcfg.step_epochs,
        tcfg.step_gamma,
        steps_per_epoch=steps_per_epoch(cfg) if tcfg.schedule_unit == "step" else None,
    )
    return opt, sched


def _resume_state(paths: RunPaths, local: bool, device: torch.device) -> dict[str, Any] | None:
    """The training state to continue from: Ray Train's restored checkpoint, or in local
    mode (``train.num_workers=0``) the run's own ``resume/train_state.pt``; None: start."""
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


def _all_finite(ok: bool, device: torch.device) -> bool:
    """Whether every rank's loss is finite (so all ranks stop together)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _write_param_digest(model: torch.nn.Module, path: Path) -> None:
    """sha256 of every parameter's bytes: equal files prove the DDP ranks ended identical."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(h.hexdigest())


def _save_overlays(store: CellStore, kept: list, folder: Path) -> None:
    """image | label | prediction figures of the kept validation items."""
    from cellst.tracking.figures import overlay_figure, save_figure

    folder.mkdir(parents=True, exist_ok=True)
    for item, pred in kept:
        fig = overlay_figure(store.image(item), store.label(item), pred, title=item)
        save_figure(fig, folder / f"{item}.png")
