"""Post-processing calibrated per model: thresholds tuned on a checkpoint's validation items.

The HoVer watershed's thresholds (:class:`~cellst.postprocess.PostprocessConfig`) suit some
models better than others: a model trained longer, or on pseudo-labels, is more or less
confident. After each training (:func:`calibrate_run`, called by ``cellst train``) the model
predicts its validation items once; a small deterministic coordinate search over
:data:`GRID` (``mask_threshold``, ``marker_threshold``, ``min_object_size``,
``sobel_kernel``) then post-processes the cached maps and scores them with the challenge F1,
in seconds. A setting replaces the current one only if it scores strictly higher, so the
result never scores below the configuration's own settings on those items. It is stored
with the checkpoint as ``postprocess.json`` (:func:`cellst.model.checkpoint.save_postprocess`).

:func:`effective_postprocess` is what prediction uses (``cellst predict``, the ST++
pseudo-labelling, reliability and evaluation stages, the current settings of a ``cellst
tune`` post-processing sweep): the calibrated values, except for the fields the user set
explicitly (in the YAML file or with ``--set postprocess.x=...``), which win.

Turn calibration off with ``train.calibrate_postprocess: false``; a checkpoint without
``postprocess.json`` is post-processed with the configured settings.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pydantic import ValidationError

from cellst.experiment import ExperimentConfig
from cellst.inference.config import SPEED_ONLY_INFERENCE, InferenceConfig, inference_identity
from cellst.model.checkpoint_files import is_checkpoint
from cellst.postprocess.hover import PostprocessConfig

__all__ = [
    "GRID",
    "Calibration",
    "ValMaps",
    "calibrate",
    "calibrate_checkpoints",
    "calibrate_run",
    "effective_postprocess",
    "predict_val_maps",
    "score_item",
    "score_maps",
    "search_postprocess",
]

#: Candidate values per calibrated field, tried one field at a time (coordinate search).
#: Adding ``marker_radius`` and ``distance_sigma`` was measured: on a few validation items
#: they over-fit, lowering test F1 on 10 of 15 models (README, "Calibrated post-processing").
GRID: dict[str, tuple[float | int, ...]] = {
    "mask_threshold": (0.3, 0.4, 0.5, 0.6, 0.7),
    "marker_threshold": (0.2, 0.3, 0.4, 0.5, 0.6),
    "min_object_size": (0, 5, 10, 20, 40),
    "sobel_kernel": (11, 21, 31),
}
#: A candidate must beat the current F1 by more than this (ties keep the current value).
_MIN_GAIN = 1e-9


class ValMaps(NamedTuple):
    """One validation item's network output and ground truth."""

    prob: np.ndarray  # (H, W) nuclear probability (larger with cell-size rescaling)
    hv: np.ndarray  # (2, H, W) HoVer maps (the same size)
    label: np.ndarray  # (H, W) ground-truth instances


# ----------------------------------------------------------------------------- building blocks
def predict_val_maps(
    model, store, ids: Sequence[str], infer, device: Any = "cpu"
) -> Iterator[ValMaps]:
    """Whole-image maps of ``model`` for the store items ``ids``, with their labels, in order."""
    import torch

    from cellst.inference.predictor import predict_maps

    with torch.no_grad():
        for item in ids:
            prob, hv = predict_maps(model, store.image(item), infer, device)
            yield ValMaps(prob, hv, store.label(item))


def score_item(
    maps: ValMaps | tuple[np.ndarray, np.ndarray, np.ndarray],
    post: PostprocessConfig,
    evaluate: Any = None,
) -> tuple[dict[str, float], np.ndarray]:
    """Post-process one item's maps and score the instances against its label.

    The one "post-process, score" step of every in-process evaluation of a model: the
    validation during training (:func:`cellst.train.validate.validate`), this module's
    calibration and ``cellst tune``'s post-processing sweeps (through :func:`score_maps`).
    ``evaluate`` (an ``EvaluateConfig`` or its fields: IoU threshold, boundary rule) makes
    the F1 mean what ``cellst evaluate``'s F1 means. Returns
    :func:`cellst.metrics.instance.image_scores` and the predicted instance map.
    """
    from cellst.metrics.instance import image_scores
    from cellst.postprocess.tiled import postprocess_hover

    prob, hv, label = maps
    pred = postprocess_hover(prob, hv, post, shape=label.shape)  # maps may be rescaled
    return image_scores(label, pred, **_evaluate_kwargs(evaluate)), pred


def score_maps(
    maps: Iterable[ValMaps | tuple[np.ndarray, np.ndarray, np.ndarray]],
    post: PostprocessConfig | Mapping[str, Any],
    evaluate: Any = None,
) -> dict[str, float]:
    """Mean challenge scores (``val_f1``, ``val_precision``, ``val_recall``) of ``maps``
    post-processed with ``post`` (:func:`score_item` per item)."""
    pcfg = post if isinstance(post, PostprocessConfig) else PostprocessConfig.model_validate(post)
    ev = _evaluate_kwargs(evaluate)  # once, not per item
    rows = [score_item(m, pcfg, ev)[0] for m in maps]
    if not rows:
        raise ValueError("no validation maps to score")
    return {f"val_{k}": float(np.mean([r[k] for r in rows])) for k in ("f1", "precision", "recall")}


def _evaluate_kwargs(evaluate: Any) -> dict[str, Any]:
    if evaluate is None:
        return {}
    data = evaluate if isinstance(evaluate, Mapping) else evaluate.model_dump()
    return {k: data[k] for k in ("count_boundary", "iou_threshold") if k in data}


# ----------------------------------------------------------------------------- the search
@dataclass
class Calibration:
    """What a calibration found: the chosen values and the validation scores around them."""

    settings: dict[str, Any]  # the calibrated fields' chosen values
    base: dict[str, Any]  # the same fields as configured (the starting point)
    before: dict[str, float]  # scores with ``base``
    after: dict[str, float]  # scores with ``settings`` (never below ``before``'s F1)
    items: list[str] = field(default_factory=list)
    trials: int = 0
    seconds: float = 0.0
    #: the inference settings other than the defaults the maps were predicted with
    inference: dict[str, Any] = field(default_factory=dict)
    #: grid fields held at the configured value (set in the YAML or with ``--set``)
    fixed: list[str] = field(default_factory=list)

    @property
    def f1_before(self) -> float:
        return self.before["val_f1"]

    @property
    def f1_after(self) -> float:
        return self.after["val_f1"]

    @property
    def changed(self) -> dict[str, Any]:
        """Fields whose calibrated value differs from the configured one."""
        return {k: v for k, v in self.settings.items() if self.base.get(k) != v}

    def meta(self) -> dict[str, Any]:
        """The record stored beside the settings in ``postprocess.json``."""
        return {
            "val_f1_before": self.f1_before,
            "val_f1_after": self.f1_after,
            "before": self.before,
            "after": self.after,
            "base": self.base,
            "items": list(self.items),
            "n_items": len(self.items),
            "trials": self.trials,
            "inference": self.inference,
            "fixed": list(self.fixed),
            "seconds": round(self.seconds, 3),
            "calibrated_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def summary(self) -> str:
        """One line: items, F1 before -> after, and the values that changed."""
        moved = ", ".join(f"{k}={v:g}" for k, v in self.changed.items()) or "settings unchanged"
        if self.fixed:
            moved += "; set explicitly, held: " + ", ".join(self.fixed)
        return (
            f"calibrated on {len(self.items)} validation items (val F1 {self.f1_before:.3f} -> "
            f"{self.f1_after:.3f}): {moved}"
        )


def search_postprocess(
    maps: Sequence[ValMaps],
    post: PostprocessConfig,
    evaluate: Any = None,
    grid: Mapping[str, Sequence[float | int]] = GRID,
    rounds: int = 2,
    workers: int | None = None,
    fixed: Iterable[str] | None = None,
) -> Calibration:
    """Coordinate search of the ``grid`` fields on in-memory ``maps``, starting at ``post``.

    The fields in ``fixed`` (default: those of ``post`` the user set, in the YAML file or
    with ``--set``: ``post.model_fields_set``) are not searched but held at their value:
    a checkpoint used with the same settings keeps them (:func:`effective_postprocess`),
    so the values searched must be the best beside them, not beside others.

    Each round tries every candidate of one field at a time (the others fixed) and keeps a
    candidate only if its mean F1 beats the best so far by more than ``1e-9``; rounds stop
    early when nothing moved. Candidates that ``PostprocessConfig`` rejects (e.g. a Sobel
    kernel too wide for the tile overlap) are skipped. Deterministic, and the result never
    scores below ``post``.

    The candidates of one field are scored side by side on ``workers`` threads (default:
    the CPUs this process may use, at most 8): post-processing and scoring spend their time
    in numpy, SciPy and scikit-image code that releases the GIL, and a field's candidates
    do not depend on each other, so the result is the same as one after the other
    (``benchmarks/bench_postprocess.py`` measures the speed-up).
    """
    t0 = time.perf_counter()
    base = {k: getattr(post, k) for k in grid}
    held = sorted(set(post.model_fields_set if fixed is None else fixed) & set(grid))
    searched = {k: v for k, v in grid.items() if k not in held}
    seen: dict[tuple, dict[str, float]] = {}
    invalid: set[tuple] = set()

    def key(values: Mapping[str, Any]) -> tuple:
        return tuple(values[k] for k in grid)

    def scores(pool: ThreadPoolExecutor, tries: list[dict[str, Any]]) -> list:
        """The scores of ``tries`` (None where the settings are invalid), new ones at once."""
        new: dict[tuple, PostprocessConfig] = {}
        for values in tries:
            k = key(values)
            if k in seen or k in invalid or k in new:
                continue
            try:
                new[k] = PostprocessConfig.model_validate({**post.model_dump(), **values})
            except ValidationError:
                invalid.add(k)
        got = pool.map(lambda c: score_maps(maps, c, evaluate), new.values())
        seen.update(zip(new, got, strict=True))
        return [seen.get(key(values)) for values in tries]

    n = max(1, workers if workers is not None else min(8, len(_usable_cpus())))
    with ThreadPoolExecutor(n, thread_name_prefix="calibrate") as pool:
        current = dict(base)
        (before,) = scores(pool, [current])
        assert before is not None  # ``post`` itself is valid
        best = before
        for _ in range(rounds):
            moved = False
            for name, candidates in searched.items():
                tries = [{**current, name: v} for v in candidates if v != current[name]]
                # in the candidates' order, as one after the other: only ``name`` differs
                for values, got in zip(tries, scores(pool, tries), strict=True):
                    if got is not None and got["val_f1"] > best["val_f1"] + _MIN_GAIN:
                        current, best, moved = values, got, True
            if not moved:
                break
    return Calibration(
        settings=current,
        base=base,
        before=before,
        after=best,
        trials=len(seen),
        seconds=time.perf_counter() - t0,
        fixed=held,
    )


def _usable_cpus() -> set[int] | range:
    """The CPUs this process may run on (its affinity where the OS tells it)."""
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not on Linux
        return range(os.cpu_count() or 1)


def calibrate(
    model,
    store,
    ids: Sequence[str],
    infer,
    post: PostprocessConfig,
    evaluate: Any = None,
    *,
    device: Any = "cpu",
    grid: Mapping[str, Sequence[float | int]] = GRID,
) -> Calibration:
    """Predict ``ids`` once with ``model`` (a network or a checkpoint folder), then
    :func:`search_postprocess` on the maps. In-process, no Ray."""
    if isinstance(model, str | os.PathLike):
        from cellst.model.checkpoint import load_model

        model, _, _ = load_model(model, map_location=device)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        maps = list(predict_val_maps(model, store, ids, infer, device))
    finally:
        model.train(was_training)
    cal = search_postprocess(maps, post, evaluate, grid)
    cal.items = list(ids)
    from cellst.inference.config import inference_identity

    cal.inference = inference_identity(infer)
    cal.seconds = time.perf_counter() - t0
    return cal


def calibrate_checkpoints(
    checkpoints: Iterable[str | os.PathLike[str]],
    store,
    ids: Sequence[str],
    infer,
    post: PostprocessConfig,
    evaluate: Any = None,
    *,
    device: Any = "cpu",
) -> dict[str, Calibration]:
    """Calibrate each checkpoint and store the result in it (``postprocess.json``).

    Checkpoints holding the same weights (``best`` and ``last`` of one epoch, hard-linked
    copies) are calibrated once. Returns ``{checkpoint path: Calibration}``.
    """
    from cellst.model.checkpoint_files import save_postprocess, weights_digest

    done: dict[str, Calibration] = {}
    out: dict[str, Calibration] = {}
    for ck in checkpoints:
        digest = weights_digest(ck)
        if digest not in done:
            done[digest] = calibrate(ck, store, ids, infer, post, evaluate, device=device)
        cal = done[digest]
        save_postprocess(ck, cal.settings, cal.meta())
        out[str(ck)] = cal
    return out


def calibrate_run(
    cfg: ExperimentConfig, store, val_ids: Sequence[str], paths, log: Callable[[str], None] = print
) -> dict[str, float]:
    """After training: calibrate the run's ``best``, ``last`` and ST++ snapshot checkpoints.

    Uses up to ``train.calibrate_max_items`` validation items, not only the
    ``train.val_max_items`` that each epoch's validation scores: a recipe that validates
    few items per epoch for speed would otherwise tune its thresholds to those few (on a
    development seed, 4 items lowered test F1 below the configured settings, 8 raised it
    above), and the maps are predicted once per checkpoint. Also uses the run's inference,
    post-processing and evaluation settings. Logs ``calib_<best|last>_*``
    metrics (val F1 before/after, the chosen values) to the active MLflow run and returns
    them. Does nothing when ``train.calibrate_postprocess`` is false or there is no
    validation item. A failure is reported, not raised: the trained weights are valid
    without calibration (they are then post-processed with the configured settings).
    """
    if not cfg.train.calibrate_postprocess:
        return {}
    ids = list(val_ids)[: cfg.train.calibrate_max_items]
    if not ids:
        log("[cellst train] no validation items: post-processing not calibrated")
        return {}
    import torch

    from cellst.tracking import log_metrics

    device = "cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu"
    named = [paths.best, paths.last, *paths.snapshots()]
    named = [p for p in named if is_checkpoint(p)]
    if not named:
        return {}
    try:
        cals = calibrate_checkpoints(
            named, store, ids, cfg.inference, cfg.postprocess, cfg.evaluate, device=device
        )
    except Exception as exc:  # noqa: BLE001 - the trained weights stay valid without it
        log(
            f"[cellst train] warning: post-processing calibration failed ({type(exc).__name__}: "
            f"{exc}); the checkpoints keep the configured settings"
        )
        return {}
    metrics: dict[str, float] = {}
    for path, cal in cals.items():
        name = Path(path).name
        if name not in (paths.best.name, paths.last.name):
            continue
        log(f"[cellst train] {name} checkpoint: post-processing {cal.summary()}")
        metrics[f"calib_{name}_val_f1_before"] = cal.f1_before
        metrics[f"calib_{name}_val_f1_after"] = cal.f1_after
        metrics.update({f"calib_{name}_{k}": float(v) for k, v in cal.settings.items()})
    log_metrics(metrics)
    return metrics


# ----------------------------------------------------------------------------- use
def effective_postprocess(
    post: PostprocessConfig | None,
    checkpoint: str | os.PathLike[str],
    explicit: Iterable[str] | None = None,
) -> tuple[PostprocessConfig, str]:
    """The post-processing to use with ``checkpoint``, and a one-line note saying which.

    The checkpoint's calibrated values (``postprocess.json``) replace ``post``'s, except for
    the fields in ``explicit`` (default: ``post.model_fields_set``, i.e. the fields given in
    the YAML file or with ``--set``), which keep the user's values.

    Raises
    ------
    StoreError
        ``postprocess.json`` exists but cannot be read.
    """
    from cellst.data.store import StoreError
    from cellst.model.checkpoint_files import CheckpointError, load_postprocess

    post = post if post is not None else PostprocessConfig()
    chosen = set(post.model_fields_set if explicit is None else explicit)
    try:
        record = load_postprocess(checkpoint)
    except CheckpointError as exc:
        raise StoreError(str(exc)) from None
    if record is None:
        return post, "post-processing: configured settings (checkpoint not calibrated)"
    settings = {k: v for k, v in record["settings"].items() if k in PostprocessConfig.model_fields}
    applied = {k: v for k, v in settings.items() if k not in chosen}
    kept = {k: getattr(post, k) for k in settings if k in chosen}
    try:
        result = PostprocessConfig.model_validate({**post.model_dump(), **applied})
    except ValidationError as exc:
        problem = "; ".join(e["msg"] for e in exc.errors())
        return post, (
            f"post-processing: configured settings (the calibrated ones do not fit them: {problem})"
        )
    meta = record["meta"]
    n, b, a = meta.get("n_items"), meta.get("val_f1_before"), meta.get("val_f1_after")
    head = "post-processing: calibrated"
    if isinstance(n, int) and isinstance(b, int | float) and isinstance(a, int | float):
        head += f" on {n} validation items (val F1 {b:.3f} -> {a:.3f})"
    values = ", ".join(f"{k}={v:g}" for k, v in applied.items()) or "none applied"
    note = f"{head}: {values}"
    if kept:
        note += "; set explicitly, kept: " + ", ".join(f"{k}={v:g}" for k, v in kept.items())
    return result, note


def _recorded_inference(checkpoint: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The inference settings a checkpoint's calibration was predicted with (those that
    make other labels than the defaults, ``meta.inference`` of its ``postprocess.json``);
    None when it records none (not calibrated, or by a cellst before they were recorded).

    Raises
    ------
    StoreError
        ``postprocess.json`` exists but cannot be read.
    """
    from cellst.data.store import StoreError
    from cellst.model.checkpoint_files import CheckpointError, load_postprocess

    try:
        record = load_postprocess(checkpoint) or {}
    except CheckpointError as exc:
        raise StoreError(str(exc)) from None
    then = (record.get("meta") or {}).get("inference")
    return then if isinstance(then, dict) else None


def _differences(then: dict[str, Any], infer: InferenceConfig) -> str:
    """``"roi 96 there, 256 (the default) here"``: where the recorded inference settings
    ``then`` and ``infer`` make other labels; empty when nowhere. A setting left at its
    default is not recorded; it is shown with its value (``none`` for off)."""
    now = inference_identity(infer)
    defaults = InferenceConfig()

    def shown(values: dict[str, Any], key: str) -> str:
        if key in values:
            return str(values[key])
        default = getattr(defaults, key, None)
        return f"{'none' if default is None else default} (the default)"

    return ", ".join(
        f"{k} {shown(then, k)} there, {shown(now, k)} here"
        for k in sorted(set(then) | set(now))
        if then.get(k) != now.get(k)
    )


def calibrated_with_other_inference(
    checkpoint: str | os.PathLike[str], infer: InferenceConfig
) -> str:
    """How the inference settings a checkpoint was calibrated with (recorded in its
    ``postprocess.json``) differ from ``infer``: ``"roi 96 there, 128 here"``; empty when
    they are the same or were not recorded."""
    then = _recorded_inference(checkpoint)
    return "" if then is None else _differences(then, infer)


def effective_inference(
    infer: InferenceConfig | None,
    checkpoint: str | os.PathLike[str],
    explicit: Iterable[str] | None = None,
) -> tuple[InferenceConfig, str]:
    """The inference settings to use with ``checkpoint``, and a one-line note ('' when
    there is nothing to say).

    A checkpoint is calibrated (and its ``best`` chosen) on maps predicted with its
    training's inference settings: cell-size rescaling, the window, flip TTA. Those it
    recorded replace ``infer``'s values, except for the fields in ``explicit`` (default:
    ``infer.model_fields_set``, i.e. those given in the YAML file, with ``--set`` or a
    command-line flag), which keep the user's values; the note then says where they differ
    from the calibration's. As :func:`effective_postprocess` does for the thresholds.

    Raises
    ------
    StoreError
        ``postprocess.json`` exists but cannot be read.
    """
    infer = infer if infer is not None else InferenceConfig()
    then = _recorded_inference(checkpoint)
    if then is None:
        return infer, ""
    chosen = set(infer.model_fields_set if explicit is None else explicit)
    defaults = InferenceConfig()
    applied = {  # what the calibration used (a field it did not record: the default)
        k: then.get(k, getattr(defaults, k))
        for k in InferenceConfig.model_fields
        if k not in chosen and k not in SPEED_ONLY_INFERENCE
    }
    applied = {k: v for k, v in applied.items() if v != getattr(infer, k)}
    try:
        valid = InferenceConfig.model_validate({**infer.model_dump(), **applied})
    except ValidationError as exc:
        problem = "; ".join(e["msg"] for e in exc.errors())
        return infer, f"inference: settings as given (the calibration's do not fit: {problem})"
    applied = {k: getattr(valid, k) for k in applied}
    result = infer.model_copy(update=applied)  # applied fields count as set from now on
    parts = []
    if applied:
        parts.append(
            "inference: the checkpoint's calibration settings, "
            + ", ".join(f"{k}={v}" for k, v in sorted(applied.items()))
        )
    differs = _differences(then, result)  # (the record read once)
    if differs:
        parts.append(
            f"inference set explicitly, not as the checkpoint was calibrated ({differs}): "
            "its thresholds and chosen epoch were tuned on other maps"
        )
    return result, "; ".join(parts)
