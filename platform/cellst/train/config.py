"""Training configuration (the ``train`` section of an experiment)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cellst.config import Section, check_folder_name

#: folders of a run folder (:class:`cellst.train.checkpoints.RunPaths`), and the folder of
#: ``train.run_dir`` (or of a sweep) where Ray Train and Tune keep their own state
CHECKPOINTS_DIR = "checkpoints"
OVERLAYS_DIR = "overlays"
RAY_STORAGE_DIR = "_ray"
#: each epoch's checkpoint is written under a temporary folder of this prefix first (a
#: worker removes those of killed workers on its node when it starts)
CHECKPOINT_TEMP_PREFIX = "cellst-ckpt-"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite (defined here, free of torch, for the CLI)."""


class TrainConfig(Section):
    """How ``cellst train`` trains a model with Ray Train."""

    run_dir: str = Field(
        "runs",
        min_length=1,
        description="root folder of training runs (shared storage on clusters)",
    )
    run_name: str | None = Field(None, description="run name; re-using it resumes the run")

    @field_validator("run_name")
    @classmethod
    def _folder_name(cls, v: str | None) -> str | None:
        return check_folder_name(v)  # the run's folder in run_dir

    epochs: int = Field(20, ge=1, description="passes of data.crops_per_epoch crops")
    batch_size: int = Field(8, ge=1, description="crops per worker per step")
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(1e-4, gt=0, description="learning rate")
    weight_decay: float = Field(1e-5, ge=0)
    schedule: Literal["none", "step", "cosine"] = Field(
        "step", description="learning-rate schedule"
    )
    schedule_unit: Literal["epoch", "step"] = Field(
        "epoch",
        description="when the schedule sets the learning rate: after each epoch, or after "
        "each optimizer step (the same curve, sampled smoothly: a cosine schedule then ends "
        "at 0, not at its last epoch's value, which is a quarter of train.lr in a 3-epoch "
        "fine-tune)",
    )
    step_epochs: int = Field(25, ge=1, description="epochs per step of the step schedule")
    step_gamma: float = Field(0.1, gt=0, le=1)
    frozen_encoder_epochs: int = Field(
        0, ge=0, description="HoVer-Net two-phase schedule: epochs with the encoder frozen first"
    )
    grad_clip: float = Field(0.0, ge=0, description="max gradient norm, 0 = off")
    num_workers: int = Field(
        1,
        ge=0,
        description="DDP workers (Ray Train actors); 0: train in this process (Ray Train's "
        "local mode: no worker actors to start, about 25 s less per training on 2 CPUs; "
        "one process, no restarts, no Tune sweeps)",
    )
    min_workers: int | None = Field(
        None,
        ge=1,
        description="an elastic group (Ray Train's ScalingConfig(num_workers=(min, max))): "
        "after a lost node that nothing replaces, the training goes on from its last "
        "checkpoint with as few as this many workers, and grows back to num_workers when "
        "room returns (Ray Train looks every train.elastic_resize_s). Every rank still "
        "takes its planned steps per epoch, so an epoch of a smaller group trains on fewer "
        "crops and the learning-rate schedule is unchanged. With room for fewer than "
        "min_workers, Ray Train's elastic policy waits for more without a time limit, and "
        "cellst stops it after train.node_wait_s. PACK "
        "or SPREAD only; cellst may raise train.cpus_per_worker so that a node Ray fills "
        "with workers keeps a read-and-augment task. None: always num_workers",
    )
    elastic_resize_s: float = Field(
        60.0,
        gt=0,
        description="seconds between the checks of a running elastic group (train.min_workers) "
        "for room to grow back to num_workers (Ray Train's ScalingConfig("
        "elastic_resize_monitor_interval_s)); a joined node counts once Ray Train's "
        "autoscaling coordinator has seen it (it looks every 20 s in Ray 2.60). Growing "
        "restarts the group from its last checkpoint, so the epochs since then are trained "
        "again",
    )
    use_gpu: bool = Field(False, description="one GPU per worker (NCCL, SyncBN, bf16 autocast)")
    cpus_per_worker: float | None = Field(
        None,
        gt=0,
        description="CPUs each worker holds; its torch uses that many threads (rounded up). "
        "None: 1 with GPUs, else about half the CPUs (the rest read and augment)",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="how Ray places the workers on the nodes: PACK fills a node first (fast "
        "collectives), SPREAD / STRICT_SPREAD put them on different nodes (each node's CPUs "
        "and memory for its own worker)",
    )
    augment_cpus: float = Field(
        0.5,
        gt=0,
        description="CPUs of each read-and-augment task (a Ray Data stage that runs on any "
        "node, off the training thread); as many run as free CPUs allow",
    )
    prefetch_batches: int = Field(
        4, ge=1, description="augmented batches each worker keeps ready ahead of the step"
    )
    amp: bool = Field(True, description="bf16 autocast on GPU")
    channels_last: bool = Field(True, description="channels_last memory format on GPU")
    sync_bn: bool = Field(True, description="SyncBatchNorm across GPU workers")
    pseudo_set: str | None = Field(None, description="pseudo-label set trained on with the labels")
    pseudo_weight: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of crops drawn from the pseudo-labelled items (benchmarks/"
        "bench_stpp.py, full ST++: 0.760 at 0.25, 0.789 at 0.5, 0.803 at 0.75 on four seeds; "
        "+0.028 for 0.75 on two fresh ones, but it also trains 1.4x the crops, and 0.5 given "
        "as many gained +0.017 of that: stpp.retrain_epochs 6 is the demo's instead)",
    )
    init_checkpoint: str | None = Field(None, description="warm-start weights (else fresh init)")
    snapshot_fractions: list[float] = Field(
        [1 / 3, 2 / 3, 1.0],
        description="fractions of training whose weights are always kept (ST++)",
    )
    keep_last: int = Field(2, ge=1, description="latest epoch checkpoints kept")
    val_every: int = Field(1, ge=1, description="validate every N epochs (and at the end)")
    val_max_items: int = Field(32, ge=1, description="validation items scored per validation")
    best_within_se: float = Field(
        1.0,
        ge=0,
        description="the 'best' checkpoint is the latest epoch whose validation F1 is within "
        "this many standard errors (paired, per image) of the highest; on a few validation "
        "images the highest is often an early epoch's luck. 0: the highest validation F1",
    )
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="keep an exponential moving average of the weights (torch's "
        "AveragedModel, decay per step; 0.99 averages about the last 100 steps); validation, "
        "best/last/snapshot checkpoints and predictions then use the averaged weights. "
        "0: off, the weights of the last step",
    )
    calibrate_postprocess: bool = Field(
        True,
        description="after training, tune the post-processing thresholds of the best/last/"
        "snapshot checkpoints on the validation items (postprocess.json beside the weights; "
        "predict uses them unless postprocess.* is set explicitly)",
    )
    calibrate_max_items: int = Field(
        32,
        ge=1,
        description="validation items the post-processing calibration scores, once after "
        "training (not capped by val_max_items: thresholds tuned on a handful of items "
        "over-fit them; benchmarks/bench_quality.py compares both)",
    )
    max_failures: int = Field(2, ge=0, description="worker failures Ray Train recovers from")
    node_wait_s: float | None = Field(
        600,
        gt=0,
        description="seconds the workers may wait in all, over the run, for room on the "
        "cluster (at the start, or after a lost node that nothing replaces) before the "
        "training stops with its checkpoints kept; the same command then resumes it. None: "
        "wait as long as it takes (an autoscaler adds nodes). An elastic group "
        "(train.min_workers) left with room for fewer than min_workers makes no try that "
        "could time out; a cellst callback inside Ray Train's controller stops it after this "
        "long in all as well",
    )
    seed: int = Field(
        0,
        description="seeds the initial weights (torch). The crops and their augmentation are "
        "drawn afresh by each run's read tasks, in the order Ray schedules them, so two runs "
        "of one seed are not bit-identical (README: Train, reproducibility)",
    )
    log_every_steps: int = Field(10, ge=1)

    @field_validator("snapshot_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("give at least one fraction of the epochs (ST++ needs snapshots)")
        if any(not 0 < f <= 1 for f in v):
            raise ValueError(f"each fraction must be in (0, 1], got {v}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _elastic_group(self) -> TrainConfig:
        if self.min_workers is None:
            return self
        if self.num_workers == 0:
            raise ValueError(
                "min_workers needs train.num_workers >= 1 (0 trains in this process, which "
                "has no worker group to shrink)"
            )
        if self.min_workers > self.num_workers:
            raise ValueError(
                f"min_workers ({self.min_workers}) must be at most num_workers ({self.num_workers})"
            )
        if self.placement_strategy.startswith("STRICT_"):
            # Ray Train's elastic policy sizes a restarted group by the resources of the
            # nodes alone: a STRICT_ placement group of that size may never be placed
            raise ValueError(
                f"min_workers cannot go with placement_strategy={self.placement_strategy}: "
                "Ray Train sizes an elastic group by the nodes' resources alone, and a group "
                "it cannot place that strictly waits for ever; use PACK or SPREAD"
            )
        return self

    @model_validator(mode="after")
    def _frozen_within_epochs(self) -> TrainConfig:
        if self.frozen_encoder_epochs >= self.epochs:
            raise ValueError(
                f"frozen_encoder_epochs ({self.frozen_encoder_epochs}) must be below epochs "
                f"({self.epochs})"
            )
        return self

    def snapshot_epochs(self) -> list[int]:
        """Epochs (1-based) whose checkpoints ST++ needs: about 1/3, 2/3 and the end."""
        return sorted({max(1, round(f * self.epochs)) for f in self.snapshot_fractions})
