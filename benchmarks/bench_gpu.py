"""GPU check (issue 13): the GPU paths of cellst, measured on one NVIDIA GPU.

1. **Training.** Two ``cellst train`` runs through the real path (store -> Ray Data
   read-and-augment tasks -> Ray Train worker with ``train.use_gpu``): ``hovernet-fast`` on
   256 px crops with bf16 autocast and channels_last, then the same in fp32. Reported per
   run, from the per-epoch metrics each checkpoint records: images/s, the share of the epoch
   the worker waited for data (``data_wait_share``), the stream start-up of each epoch and
   the step-only rate (images per second of stepping). Steady state = the epochs after the
   first. Also the bf16 / fp32 ratio.
2. **Prediction.** ``cellst predict`` (``cellst.inference.batch.predict``) of the bf16 run's
   best checkpoint over the unlabelled items on a one-actor GPU pool (post-processing in
   separate CPU tasks): images/s after the first item, the share of that time the actor
   spent in the network, the peak GPU memory (``nvidia-smi`` ``memory.used``) and the GPU
   utilisation sampled every ``--sample-ms``.
3. **Does post-processing keep the GPU busy?** Yes when the actor computes most of the time
   (it never waits for the CPU post-processing stage); the GPU utilisation says how much of
   that time kernels ran.

Run on a GPU machine with ``bash benchmarks/gpu_check.sh`` (sets up ``.venv`` if missing,
at most 8 minutes). ``--smoke`` runs the same code path on CPU at tiny sizes (about a
minute; one training, bf16 autocast on CPU) so CI catches rot. Exit codes: 0 done, 1 a stage failed, 3 CUDA unavailable (without
``--smoke``), 130 interrupted (e.g. by the script's time limit); ``summary.json`` holds
whatever was measured before.
"""

import argparse
import dataclasses
import datetime as dt
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

T0 = time.perf_counter()
#: data seed: not used by any other benchmark or test
DATA_SEED = 1313
#: a steady-state data_wait_share above this means the GPU starves for augmented crops
STARVED = 0.2
#: an actor busy share at least this means the post-processing stage never holds it up
BUSY = 0.8


def log(msg: str) -> None:
    """A progress line with the elapsed time."""
    print(f"[gpu_check +{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


@dataclass
class Sizes:
    """What one invocation measures (GPU defaults, or tiny CPU sizes with --smoke)."""

    n_labeled: int
    n_unlabeled: int
    min_size: int
    max_size: int
    epochs: int
    crops_per_epoch: int
    batch_size: int
    n_predict: int
    model: tuple[str, ...]


GPU_SIZES = Sizes(48, 200, 512, 512, 3, 1280, 16, 200, ("model.name=hovernet-fast",))
SMOKE_SIZES = Sizes(
    6,
    6,
    128,
    160,
    2,
    16,
    4,
    6,
    (
        "model.name=hovernet-lite",
        "model.width=8",
        "data.crop_size=64",
        "inference.roi=64",
        "inference.sw_batch_size=4",
        "train.val_max_items=1",
    ),
)


#: the compared trainings and their settings (bf16's checkpoint is the one predicted with)
TRAIN_RUNS: dict[str, list[str]] = {
    "bf16": ["train.amp=true", "train.channels_last=true"],
    "fp32": ["train.amp=false", "train.channels_last=false"],
}


# ----------------------------------------------------------------------------- GPU sampling
class GpuSampler:
    """Samples GPU utilisation (%) and memory used (MiB) with ``nvidia-smi`` in loop mode.

    Each sample carries nvidia-smi's own timestamp and is attributed to the phase that was
    current at that time (:meth:`phase`), so pipe buffering cannot misplace it.
    """

    QUERY = "timestamp,index,utilization.gpu,memory.used"

    def __init__(self, period_ms: int):
        self.period_ms = period_ms
        self.exe = shutil.which("nvidia-smi")
        self.proc: subprocess.Popen[str] | None = None
        self.thread: threading.Thread | None = None
        self.samples: list[tuple[float, int, float | None, float | None]] = []
        self.phases: list[tuple[str, float, float]] = []  # (name, start, end) wall clock
        self.gpu = ""

    def start(self) -> None:
        if self.exe is None:
            print("nvidia-smi not found: skipped (no GPU utilisation or memory figures)")
            return
        try:
            self.gpu = subprocess.run(
                [self.exe, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"nvidia-smi failed ({exc}): skipped")
            self.exe = None
            return
        cmd = [
            self.exe,
            f"--query-gpu={self.QUERY}",
            "--format=csv,noheader,nounits",
            f"--loop-ms={self.period_ms}",
        ]
        if shutil.which("stdbuf"):  # line-buffered, so the last samples are not lost on stop
            cmd = ["stdbuf", "-oL", *cmd]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 4:
                continue
            try:
                t = dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            except ValueError:
                t = time.time()
            self.samples.append((t, int(_num(parts[1]) or 0), _num(parts[2]), _num(parts[3])))

    def stop(self) -> None:
        if self.proc is None:
            return
        time.sleep(2 * self.period_ms / 1000)  # let the last samples arrive
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.thread is not None:
            self.thread.join(timeout=5)
        self.proc = None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute the samples taken inside the block to ``name``."""
        start = time.time()
        try:
            yield
        finally:
            self.phases.append((name, start, time.time()))

    def summary(self, where: str | list[tuple[float, float]]) -> dict[str, Any] | None:
        """Utilisation and memory over the samples of phase ``where`` or inside the given
        wall-clock spans (None without samples)."""
        spans = (
            where if isinstance(where, list) else [(a, b) for n, a, b in self.phases if n == where]
        )
        rows = [s for s in self.samples if any(a <= s[0] <= b for a, b in spans)]
        util = [s[2] for s in rows if s[2] is not None]
        mem = [s[3] for s in rows if s[3] is not None]
        if not rows:
            return None
        return {
            "samples": len(rows),
            "util_mean_pct": statistics.fmean(util) if util else None,
            "util_median_pct": statistics.median(util) if util else None,
            "util_busy_share": sum(u >= 50 for u in util) / len(util) if util else None,
            "mem_peak_mib": max(mem) if mem else None,
            "mem_min_mib": min(mem) if mem else None,
        }


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


# ----------------------------------------------------------------------------- data
def _synth_part(args: tuple[str, int, int, int, int, int]) -> str:
    from cellst.data.synth import synthesize_dataset

    out, n_lab, n_unl, seed, lo, hi = args
    synthesize_dataset(
        Path(out), n_lab, n_unl, 0, seed=seed, min_size=lo, max_size=hi, progress=False
    )
    return out


def make_store(work: Path, sizes: Sizes) -> Path:
    """Synthesise the data in parallel parts (one process per CPU), merge them into one
    source folder (names prefixed by part) and ingest it into a store."""
    from cellst.data.ingest import ingest

    n_parts = max(1, min(os.cpu_count() or 1, 16, sizes.n_labeled + sizes.n_unlabeled))
    jobs = [
        (
            str(work / "parts" / f"p{k}"),
            len(range(k, sizes.n_labeled, n_parts)),
            len(range(k, sizes.n_unlabeled, n_parts)),
            DATA_SEED + k,
            sizes.min_size,
            sizes.max_size,
        )
        for k in range(n_parts)
    ]
    jobs = [j for j in jobs if j[1] + j[2] > 0]
    import multiprocessing as mp

    with ProcessPoolExecutor(len(jobs), mp_context=mp.get_context("spawn")) as pool:
        parts = list(pool.map(_synth_part, jobs))
    src = work / "src"
    rows = ["name,modality"]
    for k, part in enumerate(parts):
        part = Path(part)
        for f in sorted(part.rglob("*")):
            if f.is_file() and f.parent.name in ("images", "labels"):
                dst = src / f.relative_to(part).parent / f"p{k}_{f.name}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                f.rename(dst)
        lines = (part / "modalities.csv").read_text().splitlines()[1:]
        rows += [f"p{k}_{line}" for line in lines if line.strip()]
    (src / "modalities.csv").write_text("\n".join(rows) + "\n")
    shutil.rmtree(work / "parts", ignore_errors=True)
    log(
        f"synthesised {sizes.n_labeled} labelled + {sizes.n_unlabeled} unlabelled images of "
        f"{sizes.min_size}-{sizes.max_size} px in {len(jobs)} processes; ingesting"
    )
    ingest(src, work / "store", progress=False)
    return work / "store"


# ----------------------------------------------------------------------------- training
def epoch_rows(run_path: Path) -> list[dict[str, float]]:
    """Per-epoch metrics from the run's ``epoch_NNN`` checkpoints (``model.json`` only)."""
    from cellst.model.checkpoint_files import INFO_FILE, read_checkpoint_info

    rows = []
    for ck in sorted((run_path / "checkpoints").glob("epoch_*")):
        m = read_checkpoint_info(ck)[1]
        # written (hard-linked, mtime kept) right after the epoch's validation
        saved = (ck / INFO_FILE).stat().st_mtime
        secs, ips = float(m["epoch_seconds"]), float(m["images_per_s"])
        wait, first = float(m["data_wait_share"]), float(m["first_batch_seconds"])
        images = ips * secs
        rows.append(
            {
                "epoch": int(m["epoch"]),
                "images": images,
                "images_per_s": ips,
                "data_wait_share": wait,
                "first_batch_seconds": first,
                "epoch_seconds": secs,
                # without the stream start-up every epoch pays (new read tasks)
                "images_per_s_after_first_batch": images / max(secs - first, 1e-9),
                # what the step alone sustains (the GPU's rate if it never waited for data)
                "step_images_per_s": images / max(secs * (1.0 - wait), 1e-9),
                "val_seconds": float(m.get("val_seconds", 0.0)),
                # wall clock of the stepping (for the GPU samples of the epoch)
                "end_wall": saved - float(m.get("val_seconds", 0.0)),
                "start_wall": saved - float(m.get("val_seconds", 0.0)) - secs,
                "val_f1": float(m.get("val_f1", float("nan"))),
            }
        )
    return rows


def steady(rows: list[dict[str, float]], key: str) -> float:
    """Median of ``key`` over the epochs after the first (all epochs if there is one)."""
    vals = [r[key] for r in (rows[1:] or rows)]
    return statistics.median(vals) if vals else float("nan")


def train_run(name: str, overrides: list[str], sampler: GpuSampler) -> dict[str, Any]:
    """One ``cellst train`` run; its per-epoch and steady-state figures."""
    from cellst.experiment import ExperimentConfig, load_config
    from cellst.train.trainer import train

    cfg = load_config(None, overrides, model=ExperimentConfig)
    t = cfg.train
    log(
        f"training {name}: {cfg.model.name}, {t.epochs} epochs x {cfg.data.crops_per_epoch} crops "
        f"of {cfg.data.crop_size} px, batch {t.batch_size}, use_gpu={t.use_gpu}, amp={t.amp}, "
        f"channels_last={t.channels_last}, augment_cpus={t.augment_cpus:g}"
    )
    t0 = time.perf_counter()
    with sampler.phase(f"train-{name}"):
        res = train(cfg, run_name=f"gpu-{name}", force=True)
    wall = time.perf_counter() - t0
    rows = epoch_rows(res.run_path)
    for r in rows:
        log(
            f"  {name} epoch {r['epoch']}: {r['images_per_s']:.1f} images/s, data wait "
            f"{100 * r['data_wait_share']:.1f} %, first batch {r['first_batch_seconds']:.2f} s, "
            f"step-only {r['step_images_per_s']:.1f} images/s, epoch {r['epoch_seconds']:.1f} s"
        )
    out = {
        "run_path": str(res.run_path),
        "best": str(res.best),
        "wall_seconds": wall,
        "steps": sum(math.ceil(round(r["images"]) / t.batch_size) for r in rows),
        "epochs": rows,
        "steady_images_per_s": steady(rows, "images_per_s"),
        "steady_images_per_s_after_first_batch": steady(rows, "images_per_s_after_first_batch"),
        "steady_step_images_per_s": steady(rows, "step_images_per_s"),
        "steady_data_wait_share": steady(rows, "data_wait_share"),
        "steady_first_batch_seconds": steady(rows, "first_batch_seconds"),
        "best_val_f1": max((r["val_f1"] for r in rows), default=float("nan")),
        "augment_cpus": t.augment_cpus,
    }
    log(
        f"  {name}: steady {out['steady_images_per_s']:.1f} images/s "
        f"({out['steady_step_images_per_s']:.1f} step-only), data wait "
        f"{100 * out['steady_data_wait_share']:.1f} %, {out['steps']} steps, {wall:.1f} s wall"
    )
    return out


# ----------------------------------------------------------------------------- prediction
def predict_run(
    checkpoint: str, store_root: Path, infer: Any, n: int, use_gpu: bool, sampler: GpuSampler
) -> dict[str, Any]:
    """``cellst predict`` of ``n`` unlabelled items on a one-actor pool."""
    from cellst.data.store import CellStore
    from cellst.inference.batch import predict
    from cellst.inference.config import PredictConfig

    ids = CellStore(store_root).ids("unlabeled")[:n]
    resources = PredictConfig(num_actors=1, num_gpus_per_actor=1 if use_gpu else 0)
    log(f"predicting {len(ids)} images on 1 actor ({'1 GPU' if use_gpu else 'CPU'})")
    with sampler.phase("idle-before-predict"):
        time.sleep(1.5 if sampler.exe else 0)  # the memory baseline (driver's CUDA context)
    with sampler.phase("predict"):
        res = predict(
            checkpoint,
            store_root,
            set_name="gpu",
            ids=ids,
            infer=infer,
            resources=resources,
            overwrite=True,
            progress=False,
        )
    stats = res.stats
    out: dict[str, Any] = {
        "images": len(res.written),
        "failed": len(res.failed),
        "seconds": res.seconds,
        "first_item_seconds": res.first_item_seconds,
        "images_per_s_end_to_end": len(res.written) / res.seconds if res.seconds else 0.0,
        "images_per_s_steady": res.steady_rate(),
        "postprocess_note": res.postprocess_note,
    }
    if stats is not None and len(stats) > 1:
        ordered = stats.sort_values("written_at")
        first, later = ordered.iloc[0], ordered.iloc[1:]  # the first item pays the start-up
        window = res.seconds - res.first_item_seconds
        out.update(
            # where the first item's wait went: its network call (CUDA context, kernel
            # selection) and post-processing, the rest being actor/task start-up and reads
            first_item_infer_seconds=float(first["infer_seconds"]),
            first_item_post_seconds=float(first["post_seconds"]),
            # wall clock of the steady window (GPU utilisation there, see attach_gpu)
            steady_start_wall=float(first["written_at"]),
            steady_end_wall=float(ordered["written_at"].iloc[-1]),
            infer_seconds_mean=float(later["infer_seconds"].mean()),
            post_seconds_mean=float(later["post_seconds"].mean()),
            # the share of the steady window the actor spent in the network
            actor_busy_share=float(later["infer_seconds"].sum() / window) if window > 0 else 0.0,
            post_per_infer=float(later["post_seconds"].mean() / later["infer_seconds"].mean()),
        )
    busy = out.get("actor_busy_share")
    if not use_gpu:
        out["verdict"] = "CPU run: no GPU to keep busy (the actor post-processes itself)"
    elif busy is None:
        out["verdict"] = "too few items to judge"
    elif busy >= BUSY:
        out["verdict"] = (
            f"yes: the actor spent {100 * busy:.0f} % of the steady window in the network, so "
            "the post-processing tasks never held it up"
        )
    else:
        out["verdict"] = (
            f"no: the actor spent only {100 * busy:.0f} % of the steady window in the network; "
            f"post-processing costs {out['post_per_infer']:.1f}x the network per image, on "
            "CPU tasks that cannot keep up (or reads/transfers stall the actor)"
        )
    log(
        f"  predict: {out['images']} images, {out['images_per_s_steady']:.2f} images/s steady, "
        f"{out['images_per_s_end_to_end']:.2f} images/s end to end ({res.seconds:.1f} s, first "
        f"item {res.first_item_seconds:.1f} s)"
    )
    return out


def attach_gpu(summary: dict[str, Any], sampler: GpuSampler) -> None:
    """Add the GPU samples to each stage (after the sampler stopped: late lines included).

    Training: the whole run (start-up, validation and calibration included) and the
    stepping of the steady epochs alone; prediction: the whole call, and its peak memory
    above the baseline just before it (the driver's own CUDA context).
    """
    for name, r in summary.get("train", {}).items():
        r["gpu"] = sampler.summary(f"train-{name}")
        steady_rows = r["epochs"][1:] or r["epochs"]
        r["gpu_steady_stepping"] = sampler.summary(
            [(e["start_wall"], e["end_wall"]) for e in steady_rows]
        )
    p = summary.get("predict")
    if p is not None:
        gpu, idle = sampler.summary("predict"), sampler.summary("idle-before-predict")
        p["gpu"] = gpu
        if "steady_start_wall" in p:  # after the first item: the start-up left out
            p["gpu_steady"] = sampler.summary([(p["steady_start_wall"], p["steady_end_wall"])])
        if gpu and idle and gpu["mem_peak_mib"] is not None and idle["mem_min_mib"] is not None:
            p["gpu_mem_peak_above_baseline_mib"] = gpu["mem_peak_mib"] - idle["mem_min_mib"]
    summary["gpu_samples"] = len(sampler.samples)


def keep_records(summary: dict[str, Any], out: Path) -> None:
    """Copy each training run's small records (``run.json``, ``checkpoints.json``, the
    calibrated ``postprocess.json`` of ``best``) to ``out/runs/<name>/`` before the work
    folder goes."""
    from cellst.model.checkpoint_files import POSTPROCESS_FILE
    from cellst.train.checkpoints import RunPaths

    for name, r in summary.get("train", {}).items():
        run = RunPaths(Path(r["run_path"]))
        dst = out / "runs" / name
        for src in (run.state, run.checkpoint_list, run.best / POSTPROCESS_FILE):
            if src.is_file():
                dst.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst / src.name)


# ----------------------------------------------------------------------------- report
def _f(v: Any, fmt: str = ".1f", unit: str = "") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return f"{v:{fmt}}{unit}"


def report(summary: dict[str, Any]) -> str:
    """The summary table (text)."""
    lines = [
        f"cellst GPU check ({'smoke, CPU' if summary['smoke'] else 'GPU'}): "
        f"{summary.get('gpu_name') or 'no GPU'}; {summary['cpus']} CPUs; torch "
        f"{summary['torch']} (CUDA {summary['torch_cuda']})",
    ]
    runs = summary.get("train", {})
    if runs:
        lines += [
            "",
            "training (cellst train, Ray Train, 1 worker), steady state = epochs after the first",
            f"  {'run':6s} {'images/s':>9s} {'w/o start':>10s} {'step-only':>10s} "
            f"{'data wait':>10s} {'1st batch':>10s} {'GPU util':>9s} {'GPU mem':>10s} "
            f"{'steps':>6s} {'wall':>8s}",
        ]
        for name, r in runs.items():
            g, gs = r.get("gpu") or {}, r.get("gpu_steady_stepping") or {}
            lines.append(
                f"  {name:6s} {_f(r['steady_images_per_s']):>9s} "
                f"{_f(r['steady_images_per_s_after_first_batch']):>10s} "
                f"{_f(r['steady_step_images_per_s']):>10s} "
                f"{_f(100 * r['steady_data_wait_share'], '.1f', ' %'):>10s} "
                f"{_f(r['steady_first_batch_seconds'], '.2f', ' s'):>10s} "
                f"{_f(gs.get('util_mean_pct'), '.0f', ' %'):>9s} "
                f"{_f(g.get('mem_peak_mib'), '.0f', ' MiB'):>10s} {r['steps']:>6d} "
                f"{_f(r['wall_seconds'], '.0f', ' s'):>8s}"
            )
        lines.append("  (images/s; 'w/o start': without each epoch's stream start-up; 'step-only':")
        lines.append("   images per second of stepping, what the GPU sustains when never waiting;")
        lines.append("   GPU util: mean nvidia-smi utilisation while the steady epochs stepped;")
        lines.append("   GPU mem: peak nvidia-smi memory.used over the whole run)")
        if "bf16" in runs and "fp32" in runs:
            b, f = runs["bf16"], runs["fp32"]
            lines.append(
                f"  bf16 + channels_last / fp32: {b['steady_images_per_s'] / f['steady_images_per_s']:.2f}x "
                f"images/s, {b['steady_step_images_per_s'] / f['steady_step_images_per_s']:.2f}x step-only"
                + (
                    " (CPU: amp and channels_last are off, so this is noise)"
                    if summary["smoke"]
                    else ""
                )
            )
        for name, r in runs.items():
            w = r["steady_data_wait_share"]
            if w > STARVED:
                who = "the training worker" if summary["smoke"] else "the GPU"
                lines.append(
                    f"  {name}: {who} waits for augmented crops {100 * w:.0f} % of each epoch: "
                    f"the read-and-augment tasks (train.augment_cpus={r['augment_cpus']:g} each, "
                    f"{summary['cpus']} CPUs in all) do not keep up"
                )
    p = summary.get("predict")
    if p:
        g, gs = p.get("gpu") or {}, p.get("gpu_steady") or {}
        lines += [
            "",
            "prediction (cellst predict, 1 actor, post-processing in CPU tasks on GPU runs)",
            f"  {p['images']} images: {_f(p['images_per_s_steady'], '.2f')} images/s after the "
            f"first item, {_f(p['images_per_s_end_to_end'], '.2f')} images/s end to end "
            f"({_f(p['seconds'], '.1f', ' s')}, first item {_f(p['first_item_seconds'], '.1f', ' s')})",
            f"  per image: network {_f(p.get('infer_seconds_mean'), '.3f', ' s')}, "
            f"post-processing {_f(p.get('post_seconds_mean'), '.3f', ' s')}; actor in the network "
            f"{_f(100 * p['actor_busy_share'] if 'actor_busy_share' in p else None, '.0f', ' %')} "
            "of the steady window",
            f"  first item: network {_f(p.get('first_item_infer_seconds'), '.2f', ' s')}, "
            f"post-processing {_f(p.get('first_item_post_seconds'), '.2f', ' s')}; the rest of "
            "its wait is actor and task start-up and reads",
            f"  GPU utilisation after the first item: mean "
            f"{_f(gs.get('util_mean_pct'), '.0f', ' %')}, median "
            f"{_f(gs.get('util_median_pct'), '.0f', ' %')} (whole call, start-up included: mean "
            f"{_f(g.get('util_mean_pct'), '.0f', ' %')}); peak GPU memory "
            f"{_f(g.get('mem_peak_mib'), '.0f', ' MiB')} "
            f"({_f(p.get('gpu_mem_peak_above_baseline_mib'), '.0f', ' MiB')} above the "
            "pre-prediction baseline)",
            f"  post-processing keeps the GPU busy: {p['verdict']}",
        ]
        util, busy = gs.get("util_mean_pct"), p.get("actor_busy_share")
        if util is not None and busy is not None and busy >= BUSY and util < 50:
            lines.append(
                f"  but the GPU itself is busy only {util:.0f} % of the steady window (mean): one "
                "image per call (inference.sw_batch_size windows) underuses it; try fractional "
                "GPUs per actor (--num-gpus-per-actor 0.5 with 2 actors) or a larger sw_batch_size"
            )
    if summary.get("error"):
        lines += ["", f"stopped: {summary['error']}"]
    lines.append(f"\ntotal {summary.get('total_seconds', 0):.0f} s")
    return "\n".join(lines)


def save(out: Path, summary: dict[str, Any]) -> None:
    """``summary.json`` (after every stage, so a time-out keeps what was measured)."""
    from cellst.fs import atomic_write_json

    summary["total_seconds"] = time.perf_counter() - T0
    atomic_write_json(out / "summary.json", summary, default=str)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="same path on CPU, tiny sizes (~1 min)")
    ap.add_argument("--out", default=".bench_out/gpu_check", help="folder for summary.json/.txt")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--crops-per-epoch", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--n-predict", type=int, default=None, help="unlabelled images predicted")
    ap.add_argument("--size", type=int, default=None, help="side of the synthetic images (px)")
    ap.add_argument("--augment-cpus", type=float, default=1.0, help="train.augment_cpus on GPU")
    ap.add_argument("--sample-ms", type=int, default=200, help="nvidia-smi sampling period")
    ap.add_argument(
        "--runs",
        default=None,
        help="trainings to run, comma-separated from bf16,fp32 (default: both; --smoke: bf16, "
        "whose CPU run takes the same path as fp32 with autocast on)",
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    runs = (args.runs or ("bf16" if args.smoke else "bf16,fp32")).split(",")
    if not runs or set(runs) - set(TRAIN_RUNS) or "bf16" not in runs:
        ap.error(f"--runs: a comma-separated subset of {','.join(TRAIN_RUNS)} including bf16")

    import torch

    if not args.smoke and not torch.cuda.is_available():
        why = (
            f"torch {torch.__version__} is a CPU build (torch.version.cuda is None); install "
            "the CUDA build of the same version into .venv"
            if torch.version.cuda is None
            else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable GPU "
            "(driver missing or too old, or CUDA_VISIBLE_DEVICES empty)"
        )
        print(f"gpu_check: CUDA is not available: {why}. Nothing was run.", file=sys.stderr)
        return 3
    sizes = dataclasses.replace(SMOKE_SIZES if args.smoke else GPU_SIZES)
    for field, value in (
        ("epochs", args.epochs),
        ("crops_per_epoch", args.crops_per_epoch),
        ("batch_size", args.batch_size),
        ("n_predict", args.n_predict),
    ):
        if value is not None:
            setattr(sizes, field, value)
    if args.size is not None:
        sizes.min_size = sizes.max_size = args.size
    sizes.n_unlabeled = max(sizes.n_unlabeled, sizes.n_predict)
    use_gpu = not args.smoke
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "smoke": args.smoke,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "sizes": vars(sizes) | {"model": list(sizes.model)},
    }
    sampler = GpuSampler(args.sample_ms)
    work_tmp = None if args.work else tempfile.mkdtemp(prefix="cellst-gpu-check-")
    work = Path(args.work or work_tmp).absolute()
    work.mkdir(parents=True, exist_ok=True)
    code = 0
    try:
        log(f"work folder {work}; results in {out}")
        store = make_store(work, sizes)
        sampler.start()
        summary["gpu_name"] = sampler.gpu
        from cellst.raycluster import ensure_ray

        ensure_ray()
        import ray

        res = ray.cluster_resources()
        log(f"Ray: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs")
        base = [
            f"store={store}",
            f"train.run_dir={work / 'runs'}",
            f"train.epochs={sizes.epochs}",
            f"train.keep_last={sizes.epochs}",
            f"data.crops_per_epoch={sizes.crops_per_epoch}",
            f"train.batch_size={sizes.batch_size}",
            "train.num_workers=1",
            f"train.use_gpu={str(use_gpu).lower()}",
            "tracking.system_metrics=false",
            *sizes.model,
            *(
                ["data.crop_size=256", f"train.augment_cpus={args.augment_cpus:g}"]
                if use_gpu
                else []
            ),
        ]
        summary["train"] = {}
        for name in runs:
            flags = TRAIN_RUNS[name]
            summary["train"][name] = train_run(name, [*base, *flags, *args.overrides], sampler)
            save(out, summary)
        if use_gpu and torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # the driver calibrated on the GPU: free its cached blocks
        from cellst.experiment import load_config

        infer = load_config(None, [*base, *args.overrides]).inference
        summary["predict"] = predict_run(
            summary["train"]["bf16"]["best"], store, infer, sizes.n_predict, use_gpu, sampler
        )
    except KeyboardInterrupt:
        summary["error"] = "interrupted (time limit or Ctrl-C)"
        code = 130
    except Exception as exc:  # noqa: BLE001 - what was measured is kept
        import traceback

        traceback.print_exc()  # a benchmark on a borrowed machine: keep everything to debug
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]
        summary["error"] = f"{type(exc).__name__}: {text}"
        code = 1
    finally:
        sampler.stop()
        attach_gpu(summary, sampler)
        keep_records(summary, out)
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001 - shutting down is best effort
            pass
        if work_tmp is not None:
            shutil.rmtree(work_tmp, ignore_errors=True)
    save(out, summary)
    text = report(summary)
    from cellst.fs import atomic_write_text

    atomic_write_text(out / "summary.txt", text + "\n")
    print("\n" + text, flush=True)
    print(f"\nwrote {out / 'summary.json'} and {out / 'summary.txt'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
