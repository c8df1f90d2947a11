"""``cellst predict``: distributed batch prediction on a Ray Data actor pool.

The pipeline streams whole images from the store (or an image folder) into an actor pool
(one model per actor). On GPU clusters each actor takes a GPU and the post-processing and
writing run in separate CPU tasks, so GPUs never wait on the watershed::

    images ──▶ ModelActor (GPU: predict_maps) ──▶ post-process + write (CPU tasks)

On CPUs each actor post-processes and writes its own items (one stage, no CPU contention).

Outputs: a pseudo-label set in the store (``pseudo/<set>/<id>``, int32, with per-item
statistics as array attributes and in ``pseudo/<set>/items.parquet``) and/or challenge
files ``<out>/<id>_label.tiff``. Every item is written to a temporary name and renamed into
place, so an item is either absent or complete; a re-run skips the items already written
(resume) and never writes one twice.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from cellst.data.datasource import READ_CPUS
from cellst.data.images import IMAGE_SUFFIXES, normalize_image, read_array, write_label_tiff
from cellst.data.store import (
    CellStore,
    StoreError,
    atomic_write_bytes,
    atomic_write_parquet,
    remove_tree,
    write_array,
)
from cellst.inference.predictor import InferenceConfig

SET_META = "set.json"
ITEMS = "items.parquet"


class PredictConfig(BaseModel):
    """Resources of the batch-prediction actor pool."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    num_actors: int = Field(1, ge=1, description="model replicas (actors)")
    num_gpus_per_actor: float = Field(0, ge=0, description="GPUs per actor; 0 runs on CPU")
    num_cpus_per_actor: float = Field(1, gt=0, description="CPUs per actor")
    postprocess_cpus: float = Field(1, gt=0, description="CPUs per post-processing task")


@dataclass
class PredictResult:
    """What a prediction run did."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    first_item_seconds: float = 0.0  # start-up: actors, model loading, first image
    stats: pd.DataFrame | None = None

    def steady_rate(self) -> float:
        """Images/s after the first item (start-up excluded)."""
        n, dt = len(self.written) - 1, self.seconds - self.first_item_seconds
        return n / dt if n > 0 and dt > 0 else 0.0

    def summary(self) -> str:
        rate = len(self.written) / self.seconds if self.seconds else 0.0
        return (
            f"{len(self.written)} written, {len(self.skipped)} already done (skipped), "
            f"{self.seconds:.1f} s ({rate:.2f} img/s)"
        )


# ----------------------------------------------------------------------------- stages
class ModelActor:
    """Holds one model; turns image rows into probability and HoVer maps.

    With ``write`` (the keyword arguments of :func:`postprocess_and_write`) the actor also
    post-processes and writes each item itself: on CPU-only runs a separate stage would only
    compete for the same cores (and could starve for CPUs held by the actors).
    """

    def __init__(self, checkpoint: str, infer: dict, use_gpu: bool, write: dict | None = None):
        import torch

        from cellst.model.checkpoint import load_model

        torch.set_num_threads(max(1, int(os.environ.get("CELLST_TORCH_THREADS", "1"))))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        model, _, _ = load_model(checkpoint, map_location=self.device)
        self.model = model.to(self.device).eval()
        self.cfg = InferenceConfig(**infer)
        self.write = write

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from cellst.inference.predictor import predict_maps

        probs, hvs, secs = [], [], []
        for image in batch["image"]:
            t = time.perf_counter()
            p, m = predict_maps(self.model, np.asarray(image), self.cfg, self.device)
            probs.append(p)
            hvs.append(m)
            secs.append(time.perf_counter() - t)
        maps = {
            "id": batch["id"],
            "prob": _object_array(probs),
            "hv": _object_array(hvs),
            "infer_seconds": np.asarray(secs),
        }
        return maps if self.write is None else postprocess_and_write(maps, **self.write)


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


def _write_store_item(
    root: Path, set_name: str, item_id: str, label: np.ndarray, attrs: dict
) -> None:
    import zarr

    base = root / "pseudo" / set_name
    tmp = base / f".tmp-{item_id}-{uuid.uuid4().hex[:8]}"
    write_array(tmp, label)
    zarr.open_array(str(tmp), mode="r+").attrs.update(attrs)
    try:
        os.rename(tmp, base / item_id)  # atomic; fails if another writer got there first
    except OSError:
        remove_tree(tmp)


def postprocess_and_write(
    batch: dict[str, Any],
    post: dict,
    store_root: str | None,
    set_name: str | None,
    out_dir: str | None,
    run_id: str,
    checkpoint: str,
) -> dict[str, Any]:
    """HoVer post-processing of each row's maps, then atomic writes; returns statistics."""
    from cellst.postprocess import PostprocessConfig
    from cellst.postprocess.tiled import postprocess_hover

    pcfg = PostprocessConfig(**post)
    rows = []
    for item_id, prob, hv, secs in zip(
        batch["id"], batch["prob"], batch["hv"], batch["infer_seconds"], strict=True
    ):
        t = time.perf_counter()
        label = postprocess_hover(np.asarray(prob), np.asarray(hv), pcfg)
        stats = {
            "id": str(item_id),
            **item_stats(label, np.asarray(prob)),
            "infer_seconds": float(secs),
            "post_seconds": time.perf_counter() - t,
            "run_id": run_id,
            "checkpoint": checkpoint,
            "written_at": time.time(),
        }
        if out_dir is not None:
            write_label_tiff(Path(out_dir) / f"{item_id}_label.tiff", label)
        if store_root is not None:
            _write_store_item(Path(store_root), set_name, str(item_id), label, stats)
        rows.append(stats)
    return {k: np.asarray([r[k] for r in rows]) for k in rows[0]}


def _read_folder_image(row: dict[str, Any]) -> dict[str, Any]:
    img = normalize_image(read_array(row["path"]))
    return {"id": row["id"], "image": img}


# ----------------------------------------------------------------------------- driver
def done_items(store: CellStore | None, set_name: str | None, out_dir: Path | None) -> set[str]:
    """Items whose outputs already exist (complete, since writes are atomic)."""
    done: set[str] | None = None
    if store is not None and set_name is not None:
        base = store.root / "pseudo" / set_name
        done = (
            {p.name for p in base.iterdir() if not p.name.startswith(".") and p.is_dir()}
            if base.is_dir()
            else set()
        )
    if out_dir is not None:
        files = {p.name[: -len("_label.tiff")] for p in out_dir.glob("*_label.tiff")}
        done = files if done is None else done & files
    return done or set()


def collect_set_stats(store: CellStore, set_name: str) -> pd.DataFrame:
    """Rebuild ``items.parquet`` from the attributes of the arrays written so far."""
    import zarr

    base = store.root / "pseudo" / set_name
    rows = []
    for p in sorted(base.iterdir()):
        if p.is_dir() and not p.name.startswith("."):
            rows.append(dict(zarr.open_array(str(p), mode="r").attrs))
    df = pd.DataFrame(rows)
    atomic_write_parquet(df, base / ITEMS)
    return df


def prepare_set(store: CellStore, set_name: str, checkpoint: str, overwrite: bool) -> None:
    """Create the pseudo-label set, or check that an existing one is ours to resume."""
    base = store.root / "pseudo" / set_name
    meta = {"checkpoint": str(Path(checkpoint).absolute()), "created": time.time()}
    if base.is_dir():
        old = json.loads((base / SET_META).read_text()) if (base / SET_META).is_file() else {}
        if overwrite:
            remove_tree(base)
        elif old.get("checkpoint") != meta["checkpoint"]:
            raise StoreError(
                f"pseudo-label set {set_name!r} in {store.root} was written from checkpoint "
                f"{old.get('checkpoint', '?')}, not {meta['checkpoint']}; pass --overwrite to "
                f"replace it, or choose another --set-name"
            )
        else:
            for tmp in base.glob(".tmp-*"):
                remove_tree(tmp)  # half-written items of an interrupted run
            return
    base.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(base / SET_META, json.dumps(meta, indent=2).encode())


def fit_resources(pcfg: PredictConfig) -> PredictConfig:
    """Check the request against the cluster; shrink CPUs per actor if reads would starve.

    Requests that can never be met (GPUs the cluster lacks) are refused; a CPU request that
    leaves no room for the read tasks (and, on GPUs, the post-processing stage) is scaled
    down with a note, since a pipeline whose stages cannot all be scheduled waits forever.
    """
    res = ray.cluster_resources()
    cpus = res.get("CPU", 0)
    if pcfg.num_gpus_per_actor > 0:
        have = res.get("GPU", 0)
        if have < pcfg.num_gpus_per_actor:
            raise StoreError(
                f"predict.num_gpus_per_actor={pcfg.num_gpus_per_actor} but the Ray cluster "
                f"has {have:g} GPU(s); use 0 to run on CPUs"
            )
    other = READ_CPUS + (pcfg.postprocess_cpus if pcfg.num_gpus_per_actor > 0 else 0)
    room = cpus - other
    if room <= 0:
        raise StoreError(f"the Ray cluster has {cpus:g} CPUs; predict needs more than {other:g}")
    if pcfg.num_actors * pcfg.num_cpus_per_actor > room:
        per_actor = room / pcfg.num_actors
        print(
            f"note: {pcfg.num_actors} actors x {pcfg.num_cpus_per_actor:g} CPUs do not leave "
            f"room for the other stages on {cpus:g} CPUs; using {per_actor:.2f} CPUs per actor"
        )
        pcfg = pcfg.model_copy(update={"num_cpus_per_actor": per_actor})
    return pcfg


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
) -> PredictResult:
    """Predict instance maps for a store's items (or a folder's images) on Ray.

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
    """
    from cellst.metrics.sources import is_store
    from cellst.postprocess import PostprocessConfig
    from cellst.raycluster import ensure_ray

    checkpoint = str(Path(checkpoint).absolute())
    if not (Path(checkpoint) / "model.json").is_file():
        raise StoreError(f"{checkpoint} is not a cellst checkpoint (no model.json)")
    infer = infer or InferenceConfig()
    post = post or PostprocessConfig()
    resources = resources or PredictConfig()
    out = Path(out_dir).absolute() if out_dir is not None else None
    ensure_ray()
    resources = fit_resources(resources)
    store = None
    if is_store(source):
        store = CellStore(source)
        if set_name is None and out is None:
            raise StoreError("give --set-name (write into the store) and/or --out (tiff files)")
        if ids is None:
            df = store.items(split=split) if split else store.items(split="unlabeled")
            ids = (df if len(df) else store.items())["id"].tolist()
        missing = [i for i in ids if i not in store]
        if missing:
            raise StoreError(f"items not in store {store.root}: {missing[:5]}")
        if set_name is not None:
            prepare_set(store, set_name, checkpoint, overwrite)
    else:
        src = Path(source)
        if not src.is_dir():
            raise FileNotFoundError(f"{src} is neither a cellst store nor a folder of images")
        if out is None:
            raise StoreError("predicting a folder of images needs --out DIR")
        set_name = None
        paths = {
            p.stem: p
            for p in sorted(src.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith("_label")
        }
        ids = list(paths) if ids is None else ids
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for p in out.glob("*_label.tiff"):
                p.unlink()
    done = done_items(store, set_name, out)
    todo = [i for i in ids if i not in done]
    result = PredictResult(skipped=[i for i in ids if i in done])
    t0 = time.perf_counter()
    if todo:
        if store is not None:
            from cellst.data.datasource import image_dataset

            ds = image_dataset(store, todo)
        else:
            ds = ray.data.from_items([{"id": i, "path": str(paths[i])} for i in todo])
            ds = ds.map(_read_folder_image, num_cpus=READ_CPUS)
        write = {
            "post": post.model_dump(),
            "store_root": str(store.root) if store is not None and set_name else None,
            "set_name": set_name,
            "out_dir": str(out) if out is not None else None,
            "run_id": uuid.uuid4().hex[:12],
            "checkpoint": checkpoint,
        }
        use_gpu = resources.num_gpus_per_actor > 0
        ds = ds.map_batches(
            ModelActor,
            fn_constructor_kwargs={
                "checkpoint": checkpoint,
                "infer": infer.model_dump(),
                "use_gpu": use_gpu,
                "write": None if use_gpu else write,
            },
            compute=ray.data.ActorPoolStrategy(size=resources.num_actors),
            batch_size=1,
            num_gpus=resources.num_gpus_per_actor or None,
            num_cpus=resources.num_cpus_per_actor,
        )
        if use_gpu:  # keep GPUs busy: post-process on CPUs in a separate stage
            ds = ds.map_batches(
                postprocess_and_write,
                fn_kwargs=write,
                batch_size=1,
                num_cpus=resources.postprocess_cpus,
            )
        bar = tqdm(total=len(todo), desc="predict", unit="img", disable=not progress)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if not result.written:
                result.first_item_seconds = time.perf_counter() - t0
            result.written += [str(i) for i in batch["id"]]
            bar.update(len(batch["id"]))
        bar.close()
    result.seconds = time.perf_counter() - t0
    if store is not None and set_name is not None:
        result.stats = collect_set_stats(store, set_name)
    return result
