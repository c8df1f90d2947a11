"""Search spaces: from the ``tune.space`` section to Ray Tune, and trial settings back to configs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from cellst.config import ConfigError, apply_overrides
from cellst.experiment import ExperimentConfig, load_config
from cellst.model.checkpoint_files import INFO_FILE, is_checkpoint
from cellst.tune.config import Distribution

E = TypeVar("E", bound=ExperimentConfig)


def to_tune(space: Mapping[str, Distribution]) -> dict[str, Any]:
    """Ray Tune's ``param_space``: one flat entry per dotted field."""
    from ray import tune

    make = {
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a),
        "choice": lambda a: tune.choice(list(a)),
        "grid": lambda a: tune.grid_search(list(a)),
    }
    out: dict[str, Any] = {key: make[d.kind](d.args) for key, d in space.items()}
    return out


def overrides_of(params: Mapping[str, Any]) -> list[str]:
    """``key=value`` overrides (``--set`` syntax) of one trial's settings."""
    import json

    return [f"{k}={json.dumps(plain(v))}" for k, v in params.items()]


def plain(v: Any) -> Any:
    """numpy scalars (as Tune samples them) to Python values."""
    return v.item() if hasattr(v, "item") else v


def apply(cfg: E, params: Mapping[str, Any]) -> E:
    """``cfg`` with one trial's settings applied (validated like ``--set`` overrides); as
    set in the copy: what ``cfg`` set, and the trial's settings (:meth:`StppExperimentConfig.base
    <cellst.stpp.experiment.StppExperimentConfig.base>` says why it matters)."""
    data = apply_overrides(cfg.model_dump(mode="json", exclude_unset=True), overrides_of(params))
    return type(cfg).model_validate(data)


def space_problems(cfg: ExperimentConfig) -> list[str]:
    """Keys or bounds of ``cfg.tune.space`` the experiment schema rejects, by field path."""
    base = cfg.model_dump(mode="json")
    problems = []
    t = cfg.tune
    if not t.space:
        problems.append("tune.space: give at least one field to sweep")
    for key, d in t.space.items():
        if t.mode == "postprocess" and not key.startswith("postprocess."):
            problems.append(
                f"tune.space.{key}: a postprocess sweep only varies postprocess.* fields "
                f"(use tune.mode=train to sweep training settings)"
            )
            continue
        for value in d.samples():
            data = apply_overrides(base, overrides_of({key: value}))
            try:
                type(cfg).model_validate(data)
            except ValidationError as exc:
                e = exc.errors()[0]
                path = ".".join(str(p) for p in e["loc"])
                why = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
                if e["type"] == "int_from_float" and d.kind in ("uniform", "loguniform"):
                    problems.append(
                        f"tune.space.{key}: an integer field: use randint or a grid of "
                        f"integers ({d.kind} samples fractions, e.g. {value!r})"
                    )
                    break
                problems.append(f"tune.space.{key}: {why} (at {path}, value {value!r})")
                break
            except ConfigError as exc:
                problems.append(f"tune.space.{key}: {exc}")
                break
    if t.mode == "train" and t.space and all(k.startswith("postprocess.") for k in t.space):
        problems.append(
            "tune.space: every field swept is a postprocess.* one, which post-processing "
            "alone reads: use tune.mode=postprocess (seconds per trial on one checkpoint) "
            "rather than training a model per trial"
        )
    if t.mode == "postprocess" and not t.checkpoint:
        problems.append("tune.checkpoint: a postprocess sweep needs the checkpoint to sweep on")
    if t.mode == "train" and cfg.train.num_workers == 0:
        problems.append(
            "train.num_workers: 0 trains in one process and reports to no Tune trial; a "
            "training sweep needs 1 or more"
        )
    if t.mode == "train" and cfg.train.min_workers is not None:
        problems.append(
            "train.min_workers: a training sweep's trials are fixed groups (Tune places each "
            "trial by its resources, and stops it rather than shrinking it); leave it unset"
        )
    return problems


def load_tune_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Load an experiment for ``cellst tune`` and check its search space.

    Raises
    ------
    ConfigError
        Naming every invalid field, e.g. ``tune.space.postprocess.bogus: unknown key``.
    """
    cfg = load_config(path, list(overrides))
    if not cfg.store:
        raise ConfigError(
            "no store configured: set `store: PATH` in the config or --set store=PATH"
        )
    problems = space_problems(cfg)
    if len(problems) == 1:
        raise ConfigError(f"invalid sweep: {problems[0]}")
    if problems:
        raise ConfigError("invalid sweep:\n  " + "\n  ".join(problems))
    if cfg.tune.checkpoint and not is_checkpoint(cfg.tune.checkpoint):
        raise ConfigError(
            f"tune.checkpoint: {cfg.tune.checkpoint} is not a cellst checkpoint folder "
            f"(no {INFO_FILE}); point it at e.g. runs/<name>/checkpoints/best"
        )
    return cfg
