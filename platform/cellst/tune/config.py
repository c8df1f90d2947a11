"""Configuration of Ray Tune sweeps: the ``tune`` section of an experiment.

A search space maps dotted experiment fields to one distribution each::

    tune:
      mode: postprocess          # or train
      space:
        postprocess.mask_threshold: {uniform: [0.3, 0.7]}
        postprocess.min_object_size: {choice: [5, 10, 20, 40]}

Distributions: ``uniform``/``loguniform`` ``[low, high]``, ``randint`` ``[low, high)``,
``choice`` (random pick from a list) and ``grid`` (every value, ``num_samples`` times).
Every key and every value of the space is checked against the experiment schema when the
file is loaded, so ``tune.space.postprocess.bogus`` or a threshold outside its field's range
is a config error before anything runs.

This module only depends on :class:`cellst.config.Section`, so
:class:`cellst.experiment.ExperimentConfig` can hold a ``tune`` field without an import cycle.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cellst.config import Section, check_name

KINDS = ("uniform", "loguniform", "randint", "choice", "grid")


class Distribution(Section):
    """One search dimension: exactly one of the fields is set."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = None
    grid: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Distribution:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)}, got {given or 'none'}")
        kind = given[0]
        if kind in ("uniform", "loguniform", "randint"):
            lo, hi = getattr(self, kind)
            if not lo < hi:
                raise ValueError(f"{kind}: low must be below high, got [{lo}, {hi}]")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform: bounds must be positive, got [{lo}, {hi}]")
        elif not getattr(self, kind):
            raise ValueError(f"{kind}: give at least one value")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)

    def corners(self) -> list[Any]:
        """Values that bound the distribution (checked against the field's schema)."""
        if self.kind == "randint":
            lo, hi = self.args
            return [lo, hi - 1]
        return list(self.args)

    def samples(self) -> list[Any]:
        """Values the distribution gives, checked against the field's schema: its
        :meth:`corners`, and for ``uniform``/``loguniform`` a fractional value inside the
        range too (what they sample; an integer field takes none of them)."""
        values = self.corners()
        if self.kind in ("uniform", "loguniform"):
            lo, hi = self.args
            inner = (lo + hi) / 2
            while float(inner).is_integer() and inner > lo:  # at most ~log2(hi - lo) halvings
                inner = (lo + inner) / 2
            values.append(inner)
        return values


class TuneConfig(Section):
    """How ``cellst tune`` sweeps settings with Ray Tune (the ``tune`` section)."""

    mode: Literal["postprocess", "train"] = Field(
        "postprocess",
        description="postprocess: sweep post-processing settings on one checkpoint's "
        "validation predictions (seconds per trial); train: each trial trains a model with "
        "its settings (augmentation, learning rate...) and reports validation F1 per epoch",
    )
    checkpoint: str | None = Field(
        None, description="postprocess mode: the checkpoint folder whose predictions are swept"
    )
    space: dict[str, Distribution] = Field(
        default_factory=dict, description="dotted experiment field -> distribution"
    )
    num_samples: int = Field(8, ge=1, le=10000, description="trials (per grid point)")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="None: as many as the cluster's CPUs (GPUs) allow"
    )
    scheduler: Literal["asha", "fifo"] = Field(
        "asha", description="train mode: ASHA stops poor trials early; fifo runs every epoch"
    )
    grace_period: int = Field(2, ge=1, description="ASHA: epochs every trial runs at least")
    trial_cpus: float = Field(
        1.0, gt=0, description="postprocess mode: CPUs per trial (train mode: train.*)"
    )
    seed: int | None = Field(0, description="seed of the random search (None: random)")
    run_dir: str = Field("runs/tune", min_length=1, description="sweeps live in run_dir/name")
    name: str | None = Field(None, description="sweep name; None: the experiment name")
    max_items: int | None = Field(
        None, ge=1, description="postprocess mode: score at most this many validation items"
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        return check_name(v)

    @field_validator("space")
    @classmethod
    def _dotted(cls, v: dict[str, Distribution]) -> dict[str, Distribution]:
        for key in v:
            if key.split(".")[0] in ("tune", "store", "name"):
                raise ValueError(f"{key!r} cannot be swept")
        return v
