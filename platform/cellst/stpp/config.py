"""Configuration of the ST++ pipeline: the ``stpp`` section of an experiment.

This module only depends on :class:`cellst.config.Section`, so
:class:`cellst.experiment.ExperimentConfig` can hold a ``stpp: StppConfig`` field without an
import cycle. :class:`cellst.stpp.experiment.StppExperimentConfig` is the experiment with the
``stpp`` section and the checks that span sections (enough ST++ snapshots, training fields
the pipeline sets itself), run when the file is loaded, so a bad request fails before
anything runs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from cellst.config import Section, check_name

#: settings of ``--quick`` (tiny model and data; minutes on 2 CPUs), applied before ``--set``;
#: they turn off what only the experiment's own model or GPUs take, so every shipped
#: experiment runs with them (stpp.yaml's hovernet-fast decoder padding was refused)
QUICK_OVERRIDES: tuple[str, ...] = (
    "model.name=hovernet-lite",
    "model.width=8",
    "model.decoder_padding=false",
    "model.pretrained_url=null",
    "train.use_gpu=false",
    "predict.num_gpus_per_actor=0",
    "data.crop_size=96",
    "data.crops_per_epoch=32",
    "data.crops_per_visit=4",
    "train.epochs=3",
    "train.batch_size=4",
    "train.val_max_items=2",
    "train.schedule=none",
    "train.lr=0.001",
    "inference.roi=96",
    "inference.sw_batch_size=4",
)


class StppConfig(Section):
    """How ``cellst stpp`` runs the six ST++ stages (the ``stpp`` section)."""

    run_dir: str = Field(
        "runs",
        min_length=1,
        description="root folder of ST++ pipelines; the pipeline lives in run_dir/name",
    )
    name: str | None = Field(
        None, description="pipeline name (its folder); None: the experiment name"
    )
    set_prefix: str | None = Field(
        None, description="prefix of the pseudo-label sets it writes; None: the pipeline name"
    )
    reliable_fraction: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="share of the unlabelled items, best-scored first, kept as reliable",
    )
    reliability: Literal["instance_f1", "mask_iou"] = Field(
        "instance_f1",
        description="agreement of each earlier snapshot with the final one: instance F1 at IoU "
        "0.5 (seed paper) or IoU of the nuclear masks (original ST++)",
    )
    reliable_per_modality: bool = Field(
        False,
        description="rank and split each modality's unlabelled items on its own (the top "
        "reliable_fraction of every modality is reliable); false: one ranking over all (ST++). "
        "On four fresh seeds of benchmarks/bench_stpp.py it lowered round 1 on each (-0.030 "
        "test F1 mean) and full ST++ by 0.008",
    )
    tta: bool = Field(True, description="flip test-time augmentation when pseudo-labelling")
    ignore_band: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="stages 3 and 5 mark the pixels whose foreground probability is within "
        "this of the mask threshold as uncertain, and stages 4 and 6 leave them out of the "
        "loss (0: every pixel of a pseudo-label counts, as in ST++; 0.2 lowered full ST++ by "
        "0.02-0.09 F1 in benchmarks/bench_stpp.py)",
    )
    fresh_init: bool = Field(
        True, description="re-train stages 4 and 6 from scratch (ST++); else warm-start"
    )
    scale_retrain_crops: bool = Field(
        True,
        description="stages 4 and 6 draw data.crops_per_epoch / (1 - train.pseudo_weight) crops "
        "per epoch (at most 4x), so they see as many labelled crops as stage 1 plus the "
        "pseudo-labelled ones, as ST++ re-trains on labelled + unlabelled images for the same "
        "epochs; false keeps data.crops_per_epoch (the pseudo-labels then replace labelled crops)",
    )
    retrain_epochs: int | None = Field(
        None,
        ge=2,
        description="epochs of the re-training stages 4 and 6; None: train.epochs. Shorter "
        "re-trainings pair with fresh_init: false (fine-tuning the previous stage's model); "
        "the demo's fine-tunes: 6 epochs scored full ST++ +0.02 F1 over 3 on four seeds "
        "(benchmarks/bench_stpp.py)",
    )
    retrain_lr: float | None = Field(
        None,
        gt=0,
        description="peak learning rate of the re-training stages 4 and 6 (same schedule "
        "shape as train.schedule); None: train.lr. For fine-tunes (fresh_init: false): a third "
        "of train.lr lowered full ST++ by 0.05 F1 in benchmarks/bench_stpp.py",
    )
    retrain_ema_decay: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="train.ema_decay of the re-training stages 4 and 6 (a moving average "
        "of the weights, per step); None: train.ema_decay. 0.99 raised round 1 and a "
        "labelled-only fine-tune in benchmarks/bench_stpp.py, but not full ST++",
    )
    evaluate: bool = Field(
        True, description="finally score supervised / round 1 / round 2 on the test split"
    )

    @field_validator("name", "set_prefix")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        return check_name(v)
