"""``cellst predict``: distributed batch prediction on a Ray Data actor pool.

The pipeline streams whole images from the store (or an image folder) into an actor pool
(each actor holds the run's model; :func:`predict_sets` gives it several, which predict
each image in one pass, each into its own set). On GPU clusters each actor takes a GPU and
the post-processing and writing run in separate CPU tasks, so GPUs never wait on the
watershed::

    images ──▶ ModelActor (GPU: predict_maps) ──▶ post-process + write (CPU tasks)

On CPUs each actor post-processes and writes its own items (one stage, no CPU contention).

Outputs: a pseudo-label set in the store (``pseudo/<set>/<id>``, int32, with per-item
statistics as array attributes and in ``pseudo/<set>/items.parquet``) and/or challenge
files ``<out>/<id>_label.tiff``. Every item is written to a temporary name and renamed into
place, so an item is either absent or complete; a re-run skips the items already written
(resume) and never writes one twice.

Failures:

* the checkpoint is loaded and checked in the driver before any Ray work or any write, so a
  bad one is one line and leaves nothing behind;
* a set records the identity of the model that writes it (``set.json``: the sha256 of the
  weights, the effective post-processing settings and the inference settings other than
  the defaults, such as flip TTA, :func:`model_identity`); resuming it
  with another model is refused, so a set never mixes two models' labels. Each actor checks
  that the weights it loaded are still the ones the driver checked;
* an item that cannot be read, predicted or written is reported by name while the others
  are written; :func:`predict` then raises :class:`PredictError` unless ``skip_bad``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
from tqdm.auto import tqdm

from cellst.data.datasource import READ_CPUS, import_function
from cellst.data.images import (
    check_min_side,
    label_file_name,
    label_tiff_record,
    normalize_image,
    read_array,
    write_label_tiff,
)
from cellst.data.layout import image_name
from cellst.data.pseudo import PSEUDO_DIR, PseudoLabelSet
from cellst.data.store import (
    CellStore,
    StoreError,
)
from cellst.errors import first_line
from cellst.fingerprint import file_sha256, stable_hash
from cellst.fs import check_writable, check_writing, claim_writing
from cellst.inference.config import InferenceConfig, PredictConfig, inference_identity
from cellst.inference.inputs import SegmentError, collect_images
from cellst.raycluster import (
    ClusterError,
    actors_per_node,
    alive_node_resources,
    cpus_per_actor,
    leave_cpus_to_driver,
)

#: failed items named in a :class:`PredictError` message
_MAX_NAMED = 5


class PredictError(StoreError):
    """Some items could not be predicted; the others were written (``result`` says which)."""

    def __init__(self, message: str, result: PredictResult):
        super().__init__(message)
        self.result = result


@dataclass
class PredictResult:
    """What a prediction run did."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (id, why), bad items
    model_id: str = ""  # digest of the weights and post-processing (see model_identity)
    seconds: float = 0.0
    first_item_seconds: float = 0.0  # start-up: actors, model loading, first image
    stats: pd.DataFrame | None = None
    postprocess: dict[str, Any] = field(default_factory=dict)  # the settings used
    postprocess_note: str = ""  # which ones: calibrated or configured (one line)

    def steady_rate(self) -> float:
        """Images/s after the first item (start-up excluded)."""
        n, dt = len(self.written) - 1, self.seconds - self.first_item_seconds
        return n / dt if n > 0 and dt > 0 else 0.0

    def summary(self) -> str:
        rate = len(self.written) / self.seconds if self.seconds else 0.0
        failed = f", {len(self.failed)} failed" if self.failed else ""
        return (
            f"{len(self.written)} written, {len(self.skipped)} already done (skipped){failed}, "
            f"{self.seconds:.1f} s ({rate:.2f} img/s)"
        )


# ----------------------------------------------------------------------------- the model
def check_checkpoint(checkpoint: str | Path) -> str:
    """Load the checkpoint here (``model.json``, the weights, their fit) before any Ray
    work; returns the sha256 of its weights.

    Raises
    ------
    StoreError
        In one line naming the checkpoint: a missing or invalid ``model.json``, unreadable
        or truncated weights, weights of another architecture or width.
    """
    from cellst.model.checkpoint_files import (
        INFO_FILE,
        CheckpointError,
        is_checkpoint,
        read_checkpoint_info,
    )

    path = Path(checkpoint)
    if not is_checkpoint(path):
        raise StoreError(f"{path} is not a cellst checkpoint (no {INFO_FILE})")
    try:
        read_checkpoint_info(path)  # a bad model.json fails here, before torch is imported
    except CheckpointError as exc:  # it names the file
        raise StoreError(first_line(exc)) from None
    from cellst.model.checkpoint import load_model, weights_digest

    try:
        load_model(path)
        return weights_digest(path)
    except Exception as exc:  # noqa: BLE001 - CheckpointError, or torch/MONAI on odd files
        text = first_line(exc)
        raise StoreError(text if str(path) in text else f"checkpoint {path}: {text}") from None


def _digest(what: dict[str, Any]) -> str:
    return stable_hash(what, spaced=True)


def model_identity(
    weights_sha256: str,
    post: Any,
    ignore_band: float = 0.0,
    normalization: str = "",
    inference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What makes a set's labels: the weights (sha256), the effective post-processing and,
    where used, the uncertainty band of the ignore masks, the normalisation of a folder's
    images when it is not ingest's default, and inference settings other than the defaults
    (:func:`inference_identity`).

    ``model_id`` is a short digest of them; a set is resumed only with the same one. (A set
    without ignore masks, or a folder normalised and predicted as by default, has the
    digest that cellst gave it before those were recorded.) The inference settings are
    recorded beside it (``inference``, ``{}`` for the defaults), also when the digest
    leaves them out.
    """
    settings = post.model_dump(mode="json")
    what: dict[str, Any] = {"weights_sha256": weights_sha256, "postprocess": settings}
    if ignore_band:
        what["ignore_band"] = float(ignore_band)
    if normalization:
        what["normalization"] = normalization
    hashed = {**what, "inference": inference} if inference else what
    return {"model_id": _digest(hashed), **what, "inference": dict(inference or {})}


def _recorded_before_inference(old: dict[str, Any], identity: dict[str, Any]) -> bool:
    """A set written before cellst recorded inference settings (no ``inference`` in its
    ``set.json``) by this model: its digest is this identity's without them. Its inference
    settings cannot be checked; it is resumed as it was then."""
    if "inference" in old or "model_id" not in old:
        return False
    what = {k: v for k, v in identity.items() if k not in ("model_id", "inference")}
    return old["model_id"] == _digest(what)


# ----------------------------------------------------------------------------- stages
class ModelActor:
    """Holds one or more models; turns image rows into probability and HoVer maps, one row
    per (image, model).

    Several models share one pass over the images (:func:`predict_sets`): each image is read
    once and each actor is started once, whatever the number of models. ``need`` maps an
    item to the indices of the models that still have to predict it (default: all).

    With ``writes`` (per model, the keyword arguments of :func:`postprocess_and_write`) the
    actor also post-processes and writes each item itself: on CPU-only runs a separate
    stage would only compete for the same cores (and could starve for CPUs held by the
    actors).

    Failures never raise out of the actor (Ray would restart it forever): a model that
    cannot be loaded, or weights that are no longer the ones the driver checked
    (``weights_sha256``), turn each of its rows into a fatal error row; an image that fails
    turns its own rows into error rows. Rows carry ``model`` (the index into ``models``),
    ``error`` (empty when fine) and ``fatal``.
    """

    def __init__(
        self,
        models: list[dict[str, str]],
        infer: dict,
        use_gpu: bool,
        writes: list[dict] | None = None,
        need: dict[str, list[int]] | None = None,
    ):
        import torch

        from cellst.model.checkpoint import load_model, weights_digest

        torch.set_num_threads(max(1, int(os.environ.get("CELLST_TORCH_THREADS", "1"))))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.cfg = InferenceConfig(**infer)
        self.writes = writes
        self.need = need
        self.models: list[Any] = []
        self.errors: list[str] = []
        for m in models:
            checkpoint, expected = m["checkpoint"], m.get("weights_sha256")
            try:
                model, _, _ = load_model(checkpoint, map_location=self.device)
                if expected and weights_digest(checkpoint) != expected:
                    raise StoreError(
                        f"checkpoint {checkpoint} changed after the run started (its weights "
                        f"are not the ones checked); nothing was predicted with the new weights"
                    )
                self.models.append(model.to(self.device).eval())
                self.errors.append("")
            except Exception as exc:  # noqa: BLE001 - said per row, see the class docstring
                self.models.append(None)
                self.errors.append(f"the model could not be loaded: {first_line(exc)}")

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from cellst.inference.predictor import predict_maps

        ids, which, probs, hvs, shapes, secs, errors, fatal = [], [], [], [], [], [], [], []
        given = batch.get("error")
        for i, image in enumerate(batch["image"]):
            item = str(batch["id"][i])
            todo = range(len(self.models)) if self.need is None else self.need.get(item, [])
            for k in todo:
                t = time.perf_counter()
                error = self.errors[k] or (str(given[i]) if given is not None else "")
                if not error:
                    try:
                        p, m = predict_maps(
                            self.models[k], np.asarray(image), self.cfg, self.device
                        )
                    except Exception as exc:  # noqa: BLE001 - this item fails, not the run
                        error = f"prediction failed: {first_line(exc)}"
                if error:
                    p, m = np.zeros((1, 1), np.float16), np.zeros((2, 1, 1), np.float16)
                ids.append(item)
                which.append(k)
                probs.append(p)
                hvs.append(m)
                shapes.append(np.asarray(image).shape[:2])  # maps may be of a rescaled copy
                errors.append(error)
                fatal.append(bool(self.errors[k]))
                secs.append(time.perf_counter() - t)
        maps = {
            "id": np.asarray(ids, dtype=object),
            "model": np.asarray(which, dtype=np.int32),
            "prob": _object_array(probs),
            "hv": _object_array(hvs),
            "shape": np.asarray(shapes, dtype=np.int64).reshape(-1, 2),
            "infer_seconds": np.asarray(secs, dtype=np.float64),
            "error": np.asarray(errors, dtype=object),
            "fatal": np.asarray(fatal, dtype=bool),
        }
        return maps if self.writes is None else write_rows(maps, self.writes)


def write_rows(batch: dict[str, Any], writes: list[dict]) -> dict[str, Any]:
    """:func:`postprocess_and_write` for rows of several models: each row with the
    settings and destination of its ``model`` (an index into ``writes``)."""
    out: dict[str, list[Any]] = {"id": [], "model": [], "error": [], "fatal": []}
    keys = ("id", "prob", "hv", "shape", "infer_seconds", "error", "fatal")
    for i, k in enumerate(batch["model"]):
        row = {key: batch[key][i : i + 1] for key in keys}
        done = postprocess_and_write(row, **writes[int(k)])
        out["id"].append(str(done["id"][0]))
        out["model"].append(int(k))
        out["error"].append(str(done["error"][0]))
        out["fatal"].append(bool(done["fatal"][0]))
    return {
        "id": np.asarray(out["id"], dtype=object),
        "model": np.asarray(out["model"], dtype=np.int32),
        "error": np.asarray(out["error"], dtype=object),
        "fatal": np.asarray(out["fatal"], dtype=bool),
    }


def _object_array(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def item_stats(label: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """Per-item statistics of a prediction (logged with pseudo-label sets)."""
    fg = label > 0
    n = int(label.max()) if label.size else 0
    return {
        "n_instances": n,
        "foreground_fraction": float(fg.mean()) if label.size else 0.0,
        "mean_prob_foreground": float(prob[fg].astype(np.float32).mean()) if fg.any() else 0.0,
        "mean_cell_area": float(fg.sum() / n) if n else 0.0,
    }


def prob_at(prob: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``prob`` at the image's ``shape`` (bilinear), when cell-size rescaling predicted it on an
    upsampled copy; as it is otherwise."""
    if prob.shape == tuple(shape):
        return prob
    from skimage.transform import resize

    return resize(prob.astype(np.float32), shape, order=1, preserve_range=True).astype(prob.dtype)


def uncertain_pixels(prob: np.ndarray, threshold: float, band: float) -> np.ndarray:
    """Pixels whose foreground probability lies within ``band`` of the mask threshold.

    Parameters
    ----------
    prob : (H, W) array
        Foreground probability.
    threshold : float
        The post-processing's ``mask_threshold`` (foreground: ``prob >= threshold``).
    band : float
        Half-width of the uncertain interval; 0 marks nothing.

    Returns
    -------
    (H, W) bool array, True where ``|prob - threshold| < band``: the pixels a pseudo-label
    is least sure of, which the training loss then skips (the confidence filter of
    FixMatch-style self-training, per pixel).
    """
    if band < 0:
        raise ValueError(f"band must be >= 0, got {band}")
    return np.abs(np.asarray(prob, np.float32) - np.float32(threshold)) < band


def postprocess_and_write(
    batch: dict[str, Any],
    post: dict,
    store_root: str | None,
    set_name: str | None,
    out_dir: str | None,
    run_id: str,
    checkpoint: str,
    model_id: str = "",
    ignore_band: float = 0.0,
    image_arrays: dict[str, str] | None = None,
    sources: dict[str, dict[str, str]] | None = None,
    pixel_sizes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """HoVer post-processing of each row's maps, then atomic writes.

    ``image_arrays`` (item -> the store array its image was read from) is recorded with
    each pseudo-label, so a later re-ingest that changes the image makes it stale;
    ``sources`` (item -> :func:`source_records`) likewise in each ``NAME_label.tiff``, and
    ``pixel_sizes`` (item -> :func:`source_pixel_sizes`) in its resolution tags.

    With ``ignore_band`` > 0, a pseudo-label set also gets each item's ignore mask
    (:func:`uncertain_pixels`). Returns one row per item: ``id``, ``error`` (empty when
    written) and ``fatal``. Rows that arrive with an error are passed on; an item whose
    post-processing or writing fails becomes an error row (the others are still written).
    """
    from cellst.postprocess import PostprocessConfig

    # a cancelled task's import (SciPy, scikit-image) must not poison its process
    postprocess_hover = import_function("cellst.postprocess.tiled", "postprocess_hover")
    pcfg = PostprocessConfig(**post)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    n = len(batch["id"])
    errors = [str(e) for e in batch.get("error", [""] * n)]
    fatal = [bool(f) for f in batch.get("fatal", [False] * n)]
    shapes = batch.get("shape", [None] * n)
    for i, (item_id, prob, hv, secs) in enumerate(
        zip(batch["id"], batch["prob"], batch["hv"], batch["infer_seconds"], strict=True)
    ):
        if errors[i]:
            continue
        try:
            t = time.perf_counter()
            shape = None if shapes[i] is None else tuple(int(v) for v in shapes[i])
            label = postprocess_hover(np.asarray(prob), np.asarray(hv), pcfg, shape=shape)
            prob = prob_at(np.asarray(prob), label.shape)
            stats = {
                "id": str(item_id),
                **item_stats(label, np.asarray(prob)),
                "infer_seconds": float(secs),
                "post_seconds": time.perf_counter() - t,
                "run_id": run_id,
                "checkpoint": checkpoint,
                "model_id": model_id,
                "written_at": time.time(),
                "node_id": node,  # the Ray node that predicted it (multi-node runs)
            }
            if image_arrays and str(item_id) in image_arrays:
                stats["image_array"] = image_arrays[str(item_id)]
            if out_dir is not None:
                source = (sources or {}).get(str(item_id))
                write_label_tiff(
                    Path(out_dir) / label_file_name(item_id),
                    label,
                    model_id,
                    source,
                    pixel_size=(pixel_sizes or {}).get(str(item_id)),
                    before_rename=functools.partial(check_writing, out_dir, run_id),
                )
            if store_root is not None:
                ignore = None
                if ignore_band > 0:
                    ignore = uncertain_pixels(np.asarray(prob), pcfg.mask_threshold, ignore_band)
                    stats["ignored_fraction"] = float(ignore.mean()) if ignore.size else 0.0
                PseudoLabelSet(store_root, set_name).write_item(
                    str(item_id), label, stats, ignore=ignore, run_id=run_id
                )
        except Exception as exc:  # noqa: BLE001 - this item fails, not the run
            errors[i] = f"post-processing or writing failed: {first_line(exc)}"
    return {
        "id": np.asarray([str(i) for i in batch["id"]], dtype=object),
        "error": np.asarray(errors, dtype=object),
        "fatal": np.asarray(fatal, dtype=bool),
    }


def _read_folder_image(
    row: dict[str, Any],
    low: float = 1.0,
    high: float = 99.0,
    max_pixels: int | None = None,
    min_side: int = 1,
) -> dict[str, Any]:
    """Read one image file and normalise it as ``cellst ingest`` does with the ``ingest``
    section's percentiles; a file that cannot be read becomes an error row (a 1-pixel
    placeholder image and the reason), so the other images go on."""
    try:
        raw = read_array(row["path"], max_pixels)
        check_min_side(row["path"], raw.shape[0], raw.shape[1], min_side)
        image = normalize_image(raw, low, high, name=row["path"], channel_axis=-1)
        error = ""
    except Exception as exc:  # noqa: BLE001 - named by the driver with the file
        image, error = np.zeros((1, 1, 3), np.uint8), first_line(exc)
    return {"id": row["id"], "image": image, "error": error}


# ----------------------------------------------------------------------------- driver
def _image_arrays(store: CellStore, ids: list[str]) -> dict[str, str]:
    """Item -> the store array of its image now (recorded with each pseudo-label)."""
    rows = store.manifest.set_index("id")["image_array"]
    return {i: str(rows[i]) for i in ids}


def _drop_stale(store: CellStore, set_name: str, ids: list[str]) -> None:
    """Remove the set's items of ``ids`` predicted from images a re-ingest changed since,
    so that this run predicts them anew (they were kept as done, and trained on)."""
    pset = store.pseudo_set(set_name)
    stale = pset.stale_items(store.manifest, ids)
    if stale:
        print(
            f"{len(stale)} item(s) of pseudo-label set {set_name!r} (e.g. {stale[0]}) were "
            "predicted from images a later ingest changed: predicting them anew"
        )
        pset.remove_items(stale)


def done_items(
    store: CellStore | None, set_name: str | None, out_done: set[str] | None
) -> set[str]:
    """Items whose outputs already exist (complete, since writes are atomic): done in the
    set and, with ``--out``, among ``out_done`` (:func:`check_out_folder`)."""
    done: set[str] | None = None
    if store is not None and set_name is not None:
        done = set(store.pseudo_set(set_name).done_items())
    if out_done is not None:
        done = out_done if done is None else done & out_done
    return done or set()


def check_out_folder(
    out: Path,
    ids: list[str],
    model_id: str,
    overwrite: bool,
    sources: dict[str, dict[str, str]] | None = None,
) -> set[str]:
    """The items of ``ids`` whose ``NAME_label.tiff`` in ``out`` this model already wrote
    from the same image.

    Only this run's items are looked at; nothing else in ``out`` is ever touched. With
    ``overwrite`` none is done (each is replaced when its new file is written, atomically).
    ``sources`` (item -> :func:`source_records`) is compared with the image each file
    records: a file of an image that changed since (same folder, another file or digest) is
    not done, so it is predicted anew, and said; a file written by a cellst that recorded
    no image counts as done.

    Raises
    ------
    StoreError
        Before anything runs, unless ``overwrite``: an output name holds a file cellst did
        not write (say, the ground truth), a label map of another model or
        post-processing, or one predicted from another image of that name (``--out``
        reused for another folder): no silent resume of another folder's labels.
    """
    if overwrite or not out.is_dir():
        return set()
    done: set[str] = set()
    foreign: list[Path] = []
    other: list[Path] = []
    unrecorded: list[Path] = []
    elsewhere: list[Path] = []
    changed: list[str] = []
    for item in ids:
        path = out / label_file_name(item)
        if not (path.exists() or path.is_symlink()):
            continue
        record = label_tiff_record(path)
        if record is None:
            foreign.append(path)
        elif record.get("model_id") != model_id:
            (other if "model_id" in record else unrecorded).append(path)
        else:
            was, now = record.get("source"), (sources or {}).get(item)
            if was is None or now is None or was == now:
                done.add(item)
            elif was.get("folder") == now["folder"]:
                changed.append(item)
            else:
                elsewhere.append(path)
    was = (label_tiff_record(elsewhere[0]) or {}).get("source", {}) if elsewhere else {}
    for paths, why in (
        (foreign, "was not written by cellst"),
        (other, "holds the labels of another model, post-processing or inference settings"),
        (
            unrecorded,
            "was written by cellst without a record of its model (by `cellst "
            "segment` or a cellst before 2026-12-03), so it cannot be resumed",
        ),
        (
            elsewhere,
            f"holds the labels of another image of that name (from {was.get('folder', '?')})",
        ),
    ):
        if paths:
            more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
            raise StoreError(
                f"{paths[0]}{more} {why}; pass --overwrite to replace them, or choose another --out"
            )
    if changed:
        print(
            f"{len(changed)} image(s) (e.g. {changed[0]}) changed since their labels in {out} "
            "were predicted: predicting them anew"
        )
    return done


def source_records(
    store: CellStore | None, paths: dict[str, Path], ids: list[str]
) -> dict[str, dict[str, str]]:
    """Item -> the image its ``NAME_label.tiff`` is predicted from: ``folder`` (of the
    image files, or the store), ``file`` (the image's name there, or the item) and
    ``digest`` (the file's sha256, or the store array, whose name holds its content's
    digest). Recorded in each file written with ``--out``, so a resume keeps a file only
    for the same image (:func:`check_out_folder`)."""
    if store is not None:
        arrays = _image_arrays(store, ids)
        root = str(store.root)
        return {i: {"folder": root, "file": i, "digest": arrays[i]} for i in ids}
    return {
        i: {"folder": str(p.parent), "file": p.name, "digest": file_sha256(p)}
        for i, p in ((i, paths[i]) for i in ids)
    }


def source_pixel_sizes(
    store: CellStore | None, paths: dict[str, Path], ids: list[str]
) -> dict[str, Any]:
    """Item -> the pixel size its source image declares (``(size, unit)``,
    :func:`cellst.data.images.pixel_size`), for the items whose image declares one; the
    ``NAME_label.tiff`` written for it carries that size."""
    from cellst.data.images import pixel_size, source_pixel_size

    if store is not None:  # a source replaced since ingest does not describe the item
        found = {i: source_pixel_size(store.row(i), verified=True) for i in ids}
    else:
        found = {i: pixel_size(paths[i]) for i in ids}
    return {i: size for i, size in found.items() if size is not None}


def _mismatch(old: dict[str, Any], identity: dict[str, Any]) -> str:
    """How the model of an existing set differs from this run's (for the refusal)."""
    if "model_id" not in old:
        return (
            f"it records no model digest (written by an older cellst from checkpoint "
            f"{old.get('checkpoint', '?')}), so it cannot be checked"
        )
    parts = []
    w_old, w_new = str(old.get("weights_sha256", "?")), identity["weights_sha256"]
    if w_old != w_new:
        parts.append(f"weights sha256 {w_old[:12]} there, {w_new[:12]} now")
    post_old = old.get("postprocess") or {}
    changed = [
        f"{k} {post_old.get(k)} there, {v} now"
        for k, v in identity["postprocess"].items()
        if post_old.get(k) != v
    ]
    if changed:
        parts.append("post-processing " + ", ".join(changed))
    b_old, b_new = old.get("ignore_band", 0.0), identity.get("ignore_band", 0.0)
    if b_old != b_new:
        parts.append(f"ignore band {b_old} there, {b_new} now")
    i_old, i_new = old.get("inference", {}), identity.get("inference", {})
    changed = [
        f"{k} {i_old.get(k, 'default')} there, {i_new.get(k, 'default')} now"
        for k in sorted(set(i_old) | set(i_new))
        if i_old.get(k) != i_new.get(k)
    ]
    if changed and "inference" in old:
        parts.append("inference " + ", ".join(changed))
    return f"it was written by another model ({'; '.join(parts) or 'another model id'})"


def check_resume(
    store: CellStore, set_name: str, checkpoint: str, identity: dict[str, Any]
) -> bool:
    """Whether the existing set ``set_name`` was written by the model ``identity``.

    Raises
    ------
    StoreError
        The set holds items of another model (or of an unknown one): resuming it would mix
        two models' labels. Says how to go on (``--overwrite``, another ``--set-name``).
    """
    pset = store.pseudo_set(set_name)
    return _same_model(set_name, store.root, checkpoint, identity)(pset.info(), pset.done_items())


def _same_model(
    set_name: str, root: Path, checkpoint: str, identity: dict[str, Any]
) -> Callable[[dict[str, Any], list[str]], bool]:
    """:meth:`PseudoLabelSet.prepare`'s ``resumable`` for the model ``identity``: the set
    is resumed only by the model that wrote it, taken over when it holds no item, refused
    when it holds another model's."""

    def resumable(old: dict[str, Any], items: list[str]) -> bool:
        if _recorded_before_inference(old, identity):
            return True
        if old.get("model_id") != identity["model_id"] and items:
            raise StoreError(
                f"pseudo-label set {set_name!r} in {root} holds {len(items)} item(s) that "
                f"checkpoint {Path(checkpoint).absolute()} did not predict: "
                f"{_mismatch(old, identity)}; resuming would mix two models' labels. Pass "
                f"--overwrite to replace the set, or choose another --set-name"
            )
        return old.get("model_id") == identity["model_id"]

    return resumable


def prepare_set(
    store: CellStore,
    set_name: str,
    checkpoint: str,
    overwrite: bool,
    identity: dict[str, Any] | None = None,
    *,
    run_id: str,
) -> None:
    """Create the pseudo-label set for run ``run_id``, or check that an existing one is
    ours to resume (:meth:`PseudoLabelSet.prepare`, which claims it first of all).

    A set is resumed only by the model that wrote it: the same ``identity`` (see
    :func:`model_identity`; default: the checkpoint's weights with default post-processing).
    A set that holds items of another model is refused (nothing is written); one that holds
    none is taken over.
    """
    if identity is None:
        from cellst.model.checkpoint_files import weights_digest
        from cellst.postprocess import PostprocessConfig

        identity = model_identity(weights_digest(checkpoint), PostprocessConfig())
    meta = {"checkpoint": str(Path(checkpoint).absolute()), "created": time.time(), **identity}
    store.pseudo_set(set_name).prepare(
        meta,
        run_id=run_id,
        overwrite=overwrite,
        resumable=_same_model(set_name, store.root, checkpoint, identity),
    )


def fit_resources(pcfg: PredictConfig) -> PredictConfig:
    """Check the request against the cluster; shrink CPUs per actor if reads would starve.

    Requests that can never be met (GPUs the cluster lacks) are refused; a CPU request that
    leaves no room for the read tasks (and, on GPUs, the post-processing stage) is scaled
    down with a note, since a pipeline whose stages cannot all be scheduled waits forever.
    """
    if pcfg.num_actors == 0:  # in this process: it holds no Ray resources to fit
        if pcfg.num_gpus_per_actor > 0:
            raise ClusterError(
                "predict.num_actors=0 predicts in this process on its CPUs; set "
                "predict.num_actors to 1 or more for GPU actors"
            )
        return pcfg
    alive = alive_node_resources() or [ray.cluster_resources()]
    nodes = [float(r.get("CPU", 0)) for r in alive]
    limits = None
    if pcfg.num_gpus_per_actor > 0:
        # per node: an actor's GPUs and its CPUs must be on the same machine
        gpus = [float(r.get("GPU", 0)) for r in alive]
        limits = actors_per_node(gpus, pcfg.num_gpus_per_actor)
        if sum(limits) < pcfg.num_actors:
            raise ClusterError(
                f"predict.num_actors={pcfg.num_actors} x num_gpus_per_actor="
                f"{pcfg.num_gpus_per_actor:g} do not fit on the Ray cluster's GPUs (room for "
                f"{sum(limits)} such actor(s) on its nodes); use fewer actors, or 0 GPUs to run "
                "on CPUs"
            )
    other = READ_CPUS + (pcfg.postprocess_cpus if pcfg.num_gpus_per_actor > 0 else 0)
    per_actor = cpus_per_actor(nodes, pcfg.num_actors, pcfg.num_cpus_per_actor, other, limits)
    if per_actor <= 0:
        raise ClusterError(
            f"the Ray cluster's nodes have {', '.join(f'{c:g}' for c in nodes)} CPUs; predict "
            f"needs more than {other:g} on a node beside its actors"
        )
    if per_actor < pcfg.num_cpus_per_actor:
        print(
            f"note: {pcfg.num_actors} actors x {pcfg.num_cpus_per_actor:g} CPUs do not leave "
            f"{other:g} CPUs for the other stages on every node (nodes of "
            f"{', '.join(f'{c:g}' for c in nodes)} CPUs); using {per_actor:.2f} CPUs per actor"
        )
        pcfg = pcfg.model_copy(update={"num_cpus_per_actor": per_actor})
    return pcfg


@contextlib.contextmanager
def _writing_sets(
    source: str | Path, set_names: list[str | None], out_dir: str | Path | None = None
) -> Iterator[None]:
    """The write locks of the named pseudo-label sets of store ``source`` (none for a
    folder of images), held for the block (:meth:`PseudoLabelSet.writing`), and of the
    ``out_dir`` of label files if any (:func:`cellst.fs.writing_folder`)."""
    from cellst.data.layout import is_store
    from cellst.fs import writing_folder

    with contextlib.ExitStack() as held:
        if out_dir is not None:
            held.enter_context(writing_folder(Path(out_dir), "cellst predict or segment"))
        if is_store(source):
            for name in dict.fromkeys(set_names):  # (a name given twice: refused later)
                if name is not None:
                    held.enter_context(PseudoLabelSet(source, name).writing())
        yield


def _holding_set_locks(sets: Callable[[dict[str, Any]], tuple[Any, ...]]):
    """Run the decorated function with the write locks of the pseudo-label sets it writes
    held (:func:`_writing_sets`): ``sets`` maps its bound arguments to ``(store or folder,
    set names[, output folder])``. A second writer of a set or an output folder is refused
    at once, never mixed in."""

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with _writing_sets(*sets(bound.arguments)):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


@_holding_set_locks(lambda a: (a["source"], [a["set_name"]], a["out_dir"]))
def predict(
    checkpoint: str | Path,
    source: str | Path,
    *,
    set_name: str | None = None,
    out_dir: str | Path | None = None,
    ids: list[str] | None = None,
    split: str | None = None,
    infer: InferenceConfig | None = None,
    post: Any = None,
    resources: PredictConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    calibrated: bool = True,
    skip_bad: bool = False,
    ray_address: str | None = None,
    ignore_band: float = 0.0,
    ingest: Any = None,
) -> PredictResult:
    """Predict instance maps for a store's items (or a folder's images) on Ray.

    Everything that can be checked is checked before Ray starts and before anything is
    written: the checkpoint is loaded here (:func:`check_checkpoint`), the source and the
    items exist, and an existing set was written by the same model (:func:`prepare_set`).

    Parameters
    ----------
    checkpoint : path
        A cellst checkpoint directory.
    source : path
        A cellst store, or a folder of images (then ``out_dir`` is required).
    set_name : str, optional
        Pseudo-label set to write into the store.
    out_dir : path, optional
        Folder for challenge-format ``<id>_label.tiff`` files.
    ids, split : optional
        Which store items (default: all unlabelled items, else all items).
    post : PostprocessConfig, optional
        Post-processing settings (default: the defaults).
    calibrated : bool
        Use the checkpoint's calibrated post-processing (``postprocess.json``) for the fields
        of ``post`` that were not set explicitly (see
        :func:`cellst.postprocess.calibrate.effective_postprocess`), and the inference
        settings it was calibrated with for the fields of ``infer`` not set explicitly
        (:func:`~cellst.postprocess.calibrate.effective_inference`); False uses ``post``
        and ``infer`` as given. The result's ``postprocess`` and ``postprocess_note`` say
        what was used.
    skip_bad : bool
        Items that cannot be read, predicted or written are always reported and the others
        written; with ``skip_bad`` they are only listed in the result's ``failed``, else
        :class:`PredictError` is raised at the end. A model that cannot be loaded on the
        actors raises in any case.
    ray_address : str, optional
        Ray cluster to join (see :func:`cellst.raycluster.ensure_ray`).
    ignore_band : float
        With a pseudo-label set, also write each item's ignore mask: the pixels whose
        foreground probability is within this of ``mask_threshold`` (:func:`uncertain_pixels`;
        0 writes none). Part of the set's model identity, so a resume never mixes sets.
    ingest : IngestConfig, optional
        How a folder's images are read and normalised (percentiles, pixel limit), as
        ``cellst ingest`` and ``cellst segment`` do (default: the defaults). A store's items
        were normalised when they were ingested.

    Raises
    ------
    StoreError
        A bad checkpoint, source or request, or a set written by another model (before
        anything is written); :class:`PredictError` for failed items (after the others).
    """
    from cellst.raycluster import check_shared_paths, ensure_ray

    checkpoint = str(Path(checkpoint).absolute())
    weights_sha256 = check_checkpoint(checkpoint)
    settings = _prediction_settings(
        checkpoint, weights_sha256, source, infer, post, calibrated, ignore_band, ingest
    )
    identity = settings.identity
    resources = resources or PredictConfig()
    out = Path(out_dir).absolute() if out_dir is not None else None
    items = _requested_items(source, set_name, out, ids, split)
    store, set_name, ids, paths = items.store, items.set_name, items.ids, items.paths
    if store is not None and set_name is not None and not overwrite:
        check_resume(store, set_name, checkpoint, identity)  # before Ray starts
    if out is not None:  # one line before Ray starts and before the set is touched
        check_writable(out)
    sources = None if out is None else source_records(store, paths, ids)
    out_done = (
        None
        if out is None
        else check_out_folder(out, ids, identity["model_id"], overwrite, sources)
    )
    ensure_ray(ray_address)
    resources = fit_resources(resources)
    # every node may host an actor: it loads the checkpoint, reads the images, writes labels
    check_shared_paths(
        read=[checkpoint, store.root if store is not None else items.folder],
        write=[store.root / PSEUDO_DIR] if store is not None and set_name else [out],
    )
    # this run's tasks write only while it is the one named writer: the tasks of a killed
    # earlier run that Ray has not stopped yet are refused from here on (claim_writing)
    run_id = uuid.uuid4().hex[:12]
    if store is not None and set_name is not None:
        prepare_set(store, set_name, checkpoint, overwrite, identity, run_id=run_id)
        _drop_stale(store, set_name, ids)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        claim_writing(out, run_id)
    done = done_items(store, set_name, out_done)
    todo = [i for i in ids if i not in done]
    post = settings.post
    result = PredictResult(
        skipped=[i for i in ids if i in done],
        postprocess=post.model_dump(),
        postprocess_note=settings.note,
        model_id=identity["model_id"],
    )
    fatal = ""  # why the model failed on the actors (every item fails then)
    t0 = time.perf_counter()
    if todo:
        ds = _input_dataset(store, todo, paths, settings.norm)
        write = {
            "post": post.model_dump(),
            "store_root": str(store.root) if store is not None and set_name else None,
            "set_name": set_name,
            "out_dir": str(out) if out is not None else None,
            "run_id": run_id,
            "checkpoint": checkpoint,
            "model_id": identity["model_id"],
            "ignore_band": float(ignore_band) if set_name else 0.0,
            "image_arrays": _image_arrays(store, todo) if store is not None and set_name else None,
            "sources": {i: sources[i] for i in todo} if sources is not None else None,
            "pixel_sizes": None if out is None else source_pixel_sizes(store, paths, todo),
        }
        model = {"checkpoint": checkpoint, "weights_sha256": weights_sha256}
        (fatal,) = _run_pool(
            ds,
            [model],
            [write],
            None,
            settings.infer,
            resources,
            [result],
            paths,
            len(todo),
            progress,
            t0,
        )
    result.seconds = time.perf_counter() - t0
    if store is not None and set_name is not None:
        result.stats = store.pseudo_set(set_name).collect_stats()
    if result.failed and (fatal or not skip_bad):
        raise PredictError(_failure_message(result, fatal, out, set_name), result)
    return result


@dataclass
class _Settings:
    """What :func:`predict` predicts with, and the model identity of what it writes."""

    infer: InferenceConfig
    post: Any  # PostprocessConfig
    note: str  # which post-processing and inference settings, and why (calibrated or given)
    norm: Any  # IngestConfig: how a folder's images are read and normalised
    identity: dict[str, Any]  # model_identity(...): a set or folder of another never mixes


def _prediction_settings(
    checkpoint: str,
    weights_sha256: str,
    source: str | Path,
    infer: InferenceConfig | None,
    post: Any,
    calibrated: bool,
    ignore_band: float,
    ingest: Any,
) -> _Settings:
    """The settings of :func:`predict`: the checkpoint's calibrated ones for the fields not
    set explicitly (``calibrated``), else those given."""
    from cellst.config import IngestConfig
    from cellst.data.layout import is_store
    from cellst.postprocess import PostprocessConfig

    infer = infer or InferenceConfig()
    post = post or PostprocessConfig()
    if calibrated:
        from cellst.postprocess.calibrate import effective_inference, effective_postprocess

        post, note = effective_postprocess(post, checkpoint)
        infer, infer_note = effective_inference(infer, checkpoint)
        note += f"; {infer_note}" if infer_note else ""
    else:
        note = "post-processing: settings as given"
    _check_ignore_band(ignore_band)
    norm = ingest or IngestConfig()
    default = IngestConfig()
    # a folder's images are normalised here: other percentiles make other labels
    custom = not is_store(source) and (norm.low_percentile, norm.high_percentile) != (
        default.low_percentile,
        default.high_percentile,
    )
    normalization = (
        f"percentiles {norm.low_percentile:g}-{norm.high_percentile:g}" if custom else ""
    )
    identity = model_identity(
        weights_sha256, post, ignore_band, normalization, inference_identity(infer)
    )
    return _Settings(infer, post, note, norm, identity)


@dataclass
class _Items:
    """What :func:`predict` was asked to predict."""

    store: CellStore | None  # the store, or None for a folder of images
    set_name: str | None  # the pseudo-label set to write (None for a folder)
    ids: list[str]
    paths: dict[str, Path]  # a folder's images by id (empty for a store)
    folder: Path | None  # the folder of images (None for a store)


def _requested_items(
    source: str | Path,
    set_name: str | None,
    out: Path | None,
    ids: list[str] | None,
    split: str | None,
) -> _Items:
    """The items of ``source`` to predict: ``ids``, the items of ``split``, else the
    store's unlabelled items (every item where there are none), or a folder's images.
    A request that cannot be met is one :class:`StoreError` line."""
    from cellst.data.layout import is_store

    if is_store(source):
        store = CellStore(source)
        if set_name is None and out is None:
            raise StoreError("give --set-name (write into the store) and/or --out (tiff files)")
        if ids is None and split:
            ids = store.items(split=split)["id"].tolist()
            if not ids:
                have = ", ".join(sorted(set(store.manifest["split"]))) or "none"
                raise StoreError(f"split {split!r} has no items in {store.root} (splits: {have})")
        elif ids is None:  # the unlabelled items, else every item
            df = store.items(split="unlabeled")
            ids = (df if len(df) else store.items())["id"].tolist()
        store.require(ids)
        return _Items(store, set_name, ids, {}, None)
    src = Path(source).absolute()  # its image paths go to Ray tasks in other folders
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is neither a cellst store nor a folder of images")
    if out is None:
        raise StoreError("predicting a folder of images needs --out DIR")
    paths = _folder_images(src, ids)  # by name, in the order of ids where given
    return _Items(None, None, list(paths), paths, src)


def _check_ignore_band(band: float) -> None:
    """An ignore band (the uncertain pixels' margin around ``mask_threshold``) is in
    ``[0, 0.5)``; else one :class:`StoreError` line, before any work."""
    if not 0 <= band < 0.5:
        raise StoreError(f"ignore_band must be in [0, 0.5), got {band}")


def _input_dataset(
    store: CellStore | None,
    todo: list[str],
    paths: dict[str, Path] | None = None,
    norm: Any = None,
):
    """The Ray dataset of the images to predict: a store's items, or a folder's images
    (``paths``) read and normalised (``norm``, an IngestConfig) by Ray tasks."""
    if store is not None:
        from cellst.data.datasource import image_dataset

        return image_dataset(store, todo)
    from cellst.data.executor import pace

    ds = pace(ray.data.from_items([{"id": i, "path": str(paths[i])} for i in todo]))
    return ds.map(
        _read_folder_image,
        fn_kwargs={
            "low": norm.low_percentile,
            "high": norm.high_percentile,
            "max_pixels": norm.max_pixels,
            "min_side": norm.min_side,
        },
        num_cpus=READ_CPUS,
    )


def _folder_images(src: Path, ids: list[str] | None) -> dict[str, Path]:
    """The input images of folder ``src`` by name (``NAME_label.tiff`` is written per name),
    listed as ``cellst segment`` lists a folder (:func:`cellst.inference.inputs.collect_images`).

    Raises
    ------
    StoreError
        The folder holds no image, two of its images share a name (``a.png`` and ``a.tif``:
        one output for both), or an item of ``ids`` has no image there.
    """
    try:
        found = {image_name(p): p for p in collect_images([src])}
    except SegmentError as exc:
        raise StoreError(str(exc)) from None
    wanted = list(found) if ids is None else ids
    missing = [i for i in wanted if i not in found]
    if missing:
        raise StoreError(f"no image file for {missing[:5]} in {src}")
    return {name: found[name] for name in wanted}


@dataclass(frozen=True)
class SetRequest:
    """One model's part in :func:`predict_sets`: its checkpoint, the pseudo-label set it
    writes, its post-processing (a ``PostprocessConfig``, used as given) and the
    uncertainty band of the set's ignore masks (see :func:`uncertain_pixels`)."""

    checkpoint: str
    set_name: str
    post: Any
    ignore_band: float = 0.0


@_holding_set_locks(lambda a: (a["store_root"], [r.set_name for r in a["requests"]]))
def predict_sets(
    store_root: str | Path,
    requests: list[SetRequest],
    ids: list[str],
    *,
    infer: InferenceConfig | None = None,
    resources: PredictConfig | None = None,
    progress: bool = True,
    ray_address: str | None = None,
) -> list[PredictResult]:
    """Several models predict the same store items in one pass, each into its own set.

    Each image is read once and the actor pool is started once, holding every model (ST++'s
    snapshots in stage 2, its three models on the test split in stage 7): with ``K``
    models this saves ``K - 1`` pool start-ups (on a GPU the first item took 50 s) and
    ``K - 1`` reads of every image. Each set keeps :func:`predict`'s guarantees: the
    checkpoint is checked first, a set is resumed only by the model that wrote it, items
    already written are skipped and none is written twice.

    Returns
    -------
    list of PredictResult
        One per request, in order.

    Raises
    ------
    StoreError
        Before anything is written: a bad checkpoint, store or item, a set name given twice,
        or a set written by another model. :class:`PredictError` (for the first set with
        failed items) after the other items were written.
    """
    from cellst.raycluster import check_shared_paths, ensure_ray

    infer = infer or InferenceConfig()
    resources = resources or PredictConfig()
    names = [r.set_name for r in requests]
    if not requests or len(set(names)) != len(names):
        raise StoreError(f"predict_sets needs distinct set names, got {names}")
    store = CellStore(store_root)
    store.require(ids)
    digests: dict[str, str] = {}
    checkpoints, identities = [], []
    for r in requests:
        _check_ignore_band(r.ignore_band)
        ck = str(Path(r.checkpoint).absolute())
        if ck not in digests:
            digests[ck] = check_checkpoint(ck)
        checkpoints.append(ck)
        identities.append(
            model_identity(digests[ck], r.post, r.ignore_band, inference=inference_identity(infer))
        )
        check_resume(store, r.set_name, ck, identities[-1])  # before Ray starts
    ensure_ray(ray_address)
    resources = fit_resources(resources)
    check_shared_paths(read=[*digests, store.root], write=[store.root / PSEUDO_DIR])
    run_id = uuid.uuid4().hex[:12]
    results, writes, need = [], [], {i: [] for i in ids}
    for k, (r, ck, identity) in enumerate(zip(requests, checkpoints, identities, strict=True)):
        prepare_set(store, r.set_name, ck, False, identity, run_id=run_id)
        _drop_stale(store, r.set_name, ids)
        done = set(store.pseudo_set(r.set_name).done_items())
        for i in ids:
            if i not in done:
                need[i].append(k)
        results.append(
            PredictResult(
                skipped=[i for i in ids if i in done],
                postprocess=r.post.model_dump(),
                postprocess_note="post-processing: settings as given",
                model_id=identity["model_id"],
            )
        )
        writes.append(
            {
                "post": r.post.model_dump(),
                "store_root": str(store.root),
                "set_name": r.set_name,
                "out_dir": None,
                "run_id": run_id,
                "checkpoint": ck,
                "model_id": identity["model_id"],
                "ignore_band": float(r.ignore_band),
                "image_arrays": _image_arrays(store, ids),
            }
        )
    need = {i: ks for i, ks in need.items() if ks}
    fatal = [""] * len(requests)
    t0 = time.perf_counter()
    if need:
        models = [{"checkpoint": ck, "weights_sha256": digests[ck]} for ck in checkpoints]
        total = sum(len(ks) for ks in need.values())
        fatal = _run_pool(
            _input_dataset(store, list(need)), models, writes, need, infer, resources, results,
            {}, total, progress, t0,
        )  # fmt: skip
    seconds = time.perf_counter() - t0
    for r, result in zip(requests, results, strict=True):
        result.seconds = seconds
        result.stats = store.pseudo_set(r.set_name).collect_stats()
    for r, result, why in zip(requests, results, fatal, strict=True):
        if result.failed:
            raise PredictError(_failure_message(result, why, None, r.set_name), result)
    return results


def _run_pool(
    ds: Any,
    models: list[dict[str, str]],
    writes: list[dict],
    need: dict[str, list[int]] | None,
    infer: InferenceConfig,
    resources: PredictConfig,
    results: list[PredictResult],
    paths: dict[str, Path],
    total: int,
    progress: bool,
    t0: float,
) -> list[str]:
    """Stream the image rows of ``ds`` through one actor pool holding ``models`` (and, on
    GPUs, CPU tasks that post-process and write); each row's outcome goes to its model's
    result. Returns, per model, why it failed on the actors ("" when it did not).

    With ``resources.num_actors == 0`` the same :class:`ModelActor` runs in this process on
    the rows the read tasks stream here (no actor process to start and import torch in).
    """
    use_gpu = resources.num_gpus_per_actor > 0
    if resources.num_actors == 0:
        batches = _predict_here(ds, models, writes, need, infer, resources)
    else:
        batches = _pool(ds, models, writes, need, infer, resources, use_gpu)
    fatal = [""] * len(models)
    bar = tqdm(total=total, desc="predict", unit="img", disable=not progress)
    try:
        for batch in batches:
            _take_rows(batch, results, paths, fatal, t0)
            bar.update(len(batch["id"]))
    finally:
        bar.close()
    return fatal


def _pool(
    ds: Any,
    models: list[dict[str, str]],
    writes: list[dict],
    need: dict[str, list[int]] | None,
    infer: InferenceConfig,
    resources: PredictConfig,
    use_gpu: bool,
) -> Iterator[dict[str, Any]]:
    """The result rows of ``ds`` through an actor pool (plus, on GPUs, writing tasks)."""
    ds = ds.map_batches(
        ModelActor,
        fn_constructor_kwargs={
            "models": models,
            "infer": infer.model_dump(),
            "use_gpu": use_gpu,
            "writes": None if use_gpu else writes,
            "need": need,
        },
        compute=ray.data.ActorPoolStrategy(size=resources.num_actors),
        batch_size=1,
        num_gpus=resources.num_gpus_per_actor or None,
        num_cpus=resources.num_cpus_per_actor,
    )
    if use_gpu:  # keep GPUs busy: post-process on CPUs in a separate stage
        ds = ds.map_batches(
            write_rows,
            fn_kwargs={"writes": writes},
            batch_size=1,
            num_cpus=resources.postprocess_cpus,
        )
    return ds.iter_batches(batch_size=None, batch_format="numpy")


def _predict_here(
    ds: Any,
    models: list[dict[str, str]],
    writes: list[dict],
    need: dict[str, list[int]] | None,
    infer: InferenceConfig,
    resources: PredictConfig,
) -> Iterator[dict[str, Any]]:
    """The result rows of ``ds`` through one :class:`ModelActor` in this process
    (``predict.num_actors=0``)."""
    import torch

    # this process predicts on num_cpus_per_actor threads that Ray does not count: the
    # read tasks are kept to the rest of the cluster's CPUs
    own = max(1, int(resources.num_cpus_per_actor))
    leave_cpus_to_driver(ds, own, minimum=READ_CPUS)
    threads = torch.get_num_threads()  # the actor sets the process's own; put it back
    try:
        actor = ModelActor(models, infer.model_dump(), False, writes, need)
        torch.set_num_threads(own)  # as an actor's
        for image in ds.iter_batches(batch_size=1, batch_format="numpy"):
            yield actor(image)
    finally:
        torch.set_num_threads(threads)


def _take_rows(
    batch: dict[str, Any],
    results: list[PredictResult],
    paths: dict[str, Path],
    fatal: list[str],
    t0: float,
) -> None:
    """Record each row's outcome (written, or failed and why) in its model's result."""
    rows = zip(batch["id"], batch["model"], batch["error"], batch["fatal"], strict=True)
    for item, k, error, bad in rows:
        result = results[int(k)]
        if not result.written and not result.failed:
            result.first_item_seconds = time.perf_counter() - t0
        if error:
            name = str(paths.get(str(item), f"item {item}"))
            why = str(error)
            result.failed.append((str(item), why if name in why else f"{name}: {why}"))
            fatal[int(k)] = fatal[int(k)] or (why if bad else "")
        else:
            result.written.append(str(item))


def _failure_message(result: PredictResult, fatal: str, out: Path | None, set_name) -> str:
    """One line naming the items that failed and what became of the others."""
    if fatal:  # the same reason for every item: say it once
        return f"{fatal}; {len(result.failed)} item(s) not predicted"
    n = len(result.failed)
    named = "; ".join(why for _, why in result.failed[:_MAX_NAMED])
    if n > _MAX_NAMED:
        named += f"; ... ({n} in all)"
    where = " and ".join(
        w for w in (f"set {set_name!r}" if set_name else "", str(out) if out else "") if w
    )
    return (
        f"{n} item(s) could not be predicted: {named}. The other {len(result.written)} were "
        f"written to {where}; pass --skip-bad to accept them (exit 0), or fix the input and "
        f"run again (finished items are skipped)"
    )
