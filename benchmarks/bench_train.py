"""Training throughput (issue 9), measured side by side in one run.

1. **The real path against the best in-process loop, same cores, same crops.** The real
   path is ``cellst train``: store -> Ray Data read tasks -> augmentation tasks
   (``map_batches``) -> Ray Train worker (DDP-ready, checkpoints, validation). The
   in-process loops read crops from the same store with the same sampler and augment them
   with the same pipeline, either serially on the training thread or in one PyTorch
   ``DataLoader`` worker process; the faster one is the reference. Target: >= 0.9x.
   Also reported: the per-epoch overhead (validation and checkpoint writes) as a share of
   the epoch, and the same training with Ray Data's scheduling loop unpaced
   (``CELLST_PACED_DATA_LOOP=0``, see ``cellst.data.executor``): images/s and the CPU
   seconds of the stream's ``SplitCoordinator`` actor, both ways.
2. **Feeding a GPU.** Crops/s that one CPU core augments at 256 px (the production crop),
   and so how many cores one GPU training ``hovernet-fast`` needs. The GPU's rate is
   measured when CUDA is present, else taken from ``--gpu-images-per-s``.

Run: ``.venv/bin/python benchmarks/bench_train.py [--epochs 6] [--crops 768] [--smoke]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cellst.data.executor import ENV_SWITCH
from cellst.experiment import ExperimentConfig, load_config

DEMO = Path(__file__).resolve().parent.parent / "experiments" / "demo.yaml"


def make_store(root: Path, n_images: int) -> Path:
    """A small synthetic store (development seed 11, never a quality-benchmark seed)."""
    from cellst.data.ingest import ingest
    from cellst.data.synth import synthesize_dataset

    synthesize_dataset(root / "src", n_images, 0, 0, seed=11, min_size=256, max_size=384)
    ingest(root / "src", root / "store", progress=False)
    return root / "store"


def crop_stream(cfg: ExperimentConfig, store_root: Path, seed: int = 0):
    """Endless raw crop batches from the store, sampled as the Ray Data source samples them."""
    from cellst.data.datasource import crop_items, read_crops
    from cellst.data.store import CellStore

    items = crop_items(CellStore(store_root), None, cfg.data.balance_by)
    p = np.asarray([it.weight for it in items])
    rng = np.random.default_rng(seed)
    b, c = cfg.train.batch_size, cfg.data.crop_size
    while True:
        visits = rng.choice(len(items), size=8, p=p / p.sum())
        yield from read_crops(items, visits, c, cfg.data.crops_per_visit, cfg.ingest.chunk, rng, b)


class _AugmentedStream(torch.utils.data.IterableDataset):
    def __init__(self, cfg: ExperimentConfig, store_root: Path):
        self.cfg, self.root = cfg, store_root

    def __iter__(self):
        from cellst.train.step import Augmenter

        aug = Augmenter(self.cfg.augment, self.cfg.data.crop_size)
        for batch in crop_stream(self.cfg, self.root, seed=1):
            yield aug(batch).to_numpy()


def in_process(cfg: ExperimentConfig, store_root: Path, n_images: int, loader: bool) -> float:
    """Images/s of a plain PyTorch loop on every core (after 5 warm-up steps)."""
    from cellst.model import HoVerLoss, build_model
    from cellst.train.step import Augmenter, Batch, make_optimizer, train_step

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = build_model(cfg.model).train()
    opt = make_optimizer(model, cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay)
    loss_fn = HoVerLoss(cfg.loss)
    if loader:
        dl = torch.utils.data.DataLoader(
            _AugmentedStream(cfg, store_root), batch_size=None, num_workers=1, prefetch_factor=4
        )
        batches = (Batch.from_numpy(b) for b in dl)
    else:
        aug = Augmenter(cfg.augment, cfg.data.crop_size)
        batches = (aug(b) for b in crop_stream(cfg, store_root))
    n, t0 = 0, None
    for i, b in enumerate(batches):
        if i == 5:
            n, t0 = 0, time.perf_counter()
        train_step(model, b, loss_fn, opt)
        n += len(b.image)
        if t0 is not None and n >= n_images:
            break
    return n / (time.perf_counter() - t0)


def real_path(cfg: ExperimentConfig, work: Path, run_name: str = "bench-train") -> dict[str, float]:
    """``cellst train`` on the store: steady-state and whole-epoch images/s, and the CPU
    seconds of the ``SplitCoordinator`` actor that ran the stream's scheduling loop."""
    from cellst.model import load_model
    from cellst.train.trainer import train

    t0 = time.perf_counter()
    with CoordinatorCpu() as coordinator:
        res = train(cfg, run_name=run_name)
    wall = time.perf_counter() - t0
    metas = [load_model(ck)[2] for ck in sorted((res.run_path / "checkpoints").glob("epoch_*"))]
    steady = [m["images_per_s"] for m in metas[1:]] or [metas[0]["images_per_s"]]
    epoch = [m["epoch_seconds"] for m in metas[1:]] or [metas[0]["epoch_seconds"]]
    extra = [m.get("val_seconds", 0) + m.get("checkpoint_seconds", 0) for m in metas[1:]] or [0]
    n = cfg.data.crops_per_epoch
    every = [m["epoch_seconds"] for m in metas]
    return {
        "steady": statistics.median(steady),
        # every epoch, the first included: a slow stretch of epochs shows here, not in the median
        "whole_run": n * len(every) / sum(every),
        "with_overhead": n / (statistics.median(epoch) + statistics.median(extra)),
        "overhead_share": statistics.median(extra)
        / (statistics.median(epoch) + statistics.median(extra)),
        "wall": wall,
        "cpus_per_worker": cfg.train.cpus_per_worker or 0,
        "coordinator_cpu_s": coordinator.seconds,
    }


class CoordinatorCpu:
    """CPU seconds of the ``ray::SplitCoordinator`` processes seen while the block runs
    (their /proc times, sampled every 0.5 s: the last sample of each process counts)."""

    def __enter__(self) -> CoordinatorCpu:
        import threading

        self._seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(0.5):
            for p in psutil.process_iter(["cmdline"]):
                try:
                    if "ray::SplitCoordinator" in " ".join(p.info["cmdline"] or []):
                        t = p.cpu_times()
                        self._seen[p.pid] = t.user + t.system
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = sum(self._seen.values())


def augment_rate_256(n: int) -> float:
    """Crops/s one CPU thread augments (standard preset, 256 px, HV targets included)."""
    from cellst.model.augment import AugmentConfig
    from cellst.train.step import Augmenter

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 255, (8, 256, 256, 3), dtype=np.uint8),
        "label": np.repeat(np.arange(256 * 256, dtype=np.int32).reshape(1, 256, 256) // 700, 8, 0),
    }
    aug = Augmenter(AugmentConfig(), 256, seed=0)
    aug(batch)
    t0, done = time.perf_counter(), 0
    while done < n:
        aug(batch)
        done += 8
    return done / (time.perf_counter() - t0)


def gpu_rate(steps: int) -> float | None:
    """hovernet-fast training images/s at 256 px, bf16 + channels_last (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    from cellst.model import build_model

    cfg = load_config(None, ["model.name=hovernet-fast"])
    model = build_model(cfg.model).cuda().train().to(memory_format=torch.channels_last)
    x = torch.rand(16, 3, 256, 256, device="cuda").contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    for i in range(steps + 5):
        if i == 5:
            torch.cuda.synchronize()
            t = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            loss = sum(v.float().mean() for v in model(x).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return steps * 16 / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=str(DEMO), help="the recipe measured (default: the demo)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--epochs",
        type=int,
        default=6,
        help="epochs of each real-path run (Ray Data's loop starts spinning once the stream "
        "is a few epochs ahead of a slower step)",
    )
    ap.add_argument("--crops", type=int, default=768, help="crops per epoch of the real path")
    ap.add_argument(
        "--gpu-images-per-s",
        type=float,
        default=200.0,
        help="hovernet-fast bf16 training rate assumed when no GPU is present",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (seconds), for CI")
    args = ap.parse_args()
    if args.smoke:
        args.epochs, args.crops = 2, 32

    from cellst.raycluster import ensure_ray, quiet_ray_data

    ensure_ray()
    quiet_ray_data()
    with tempfile.TemporaryDirectory(prefix="cellst-bench-train-") as tmp:
        work = Path(tmp)
        store = make_store(work, 4 if args.smoke else 12)
        cfg = load_config(
            args.config,
            [
                f"store={store}",
                f"train.run_dir={work / 'runs'}",
                f"train.epochs={args.epochs}",
                f"train.keep_last={args.epochs}",
                f"data.crops_per_epoch={args.crops}",
                "tracking.system_metrics=false",
                *(
                    ["data.crop_size=64", "inference.roi=64", "train.val_max_items=1"]
                    if args.smoke
                    else []
                ),
                *args.overrides,
            ],
            model=ExperimentConfig,
        )
        n_ref = 32 if args.smoke else min(args.crops, 512)
        serial = in_process(cfg, store, n_ref, loader=False)
        loader = in_process(cfg, store, n_ref, loader=True)
        real = real_path(cfg, work)
        # the same training with Ray Data's scheduling loop left to spin while the stream
        # waits for the step (cellst.data.executor; the Ray Train worker's SplitCoordinator
        # then holds a core of its own)
        # (not at --smoke sizes, where the ratio means nothing: a second Ray Train fit is
        # 20 s of a CI run, and test_datasource.py covers the switch)
        unpaced = None
        if not args.smoke:
            os.environ[ENV_SWITCH] = "0"
            try:
                unpaced = real_path(cfg, work, run_name="bench-train-unpaced")
            finally:
                del os.environ[ENV_SWITCH]
    best = max(serial, loader)
    c = cfg.data.crop_size
    print(
        f"\ntraining images/s, {cfg.model.name} width {cfg.model.width}, batch "
        f"{cfg.train.batch_size} x {c}x{c}, {os.cpu_count()} cores"
    )
    print(f"  in-process, augmentation on the training thread : {serial:7.1f}")
    print(f"  in-process, augmentation in a DataLoader worker : {loader:7.1f}")
    print(
        f"  cellst train (store -> Ray Data -> Ray Train)    : {real['steady']:7.1f}   "
        f"{real['steady'] / best:.2f}x the best in-process loop (target >= 0.9x)"
    )
    if unpaced is None:
        print("  ... with Ray Data's scheduling loop unpaced     : not run at --smoke sizes")
    else:
        print(
            f"  ... with Ray Data's scheduling loop unpaced     : {unpaced['steady']:7.1f}   "
            f"{unpaced['steady'] / best:.2f}x; paced / unpaced = "
            f"{real['steady'] / unpaced['steady']:.2f}x (SplitCoordinator CPU "
            f"{real['coordinator_cpu_s']:.0f} s paced, {unpaced['coordinator_cpu_s']:.0f} s unpaced)"
        )
        print(
            f"  ... over every epoch, paced / unpaced          : {real['whole_run']:7.1f} / "
            f"{unpaced['whole_run']:.1f} = {real['whole_run'] / unpaced['whole_run']:.2f}x"
        )
    print(
        f"  ... counting validation + checkpoint per epoch  : {real['with_overhead']:7.1f}   "
        f"{real['with_overhead'] / best:.2f}x; overhead {100 * real['overhead_share']:.1f}% "
        f"of an epoch of {args.crops} crops"
    )
    aug = augment_rate_256(16 if args.smoke else 160)
    gpu = gpu_rate(20) if not args.smoke else None
    rate = gpu if gpu is not None else args.gpu_images_per_s
    how = "measured" if gpu is not None else "assumed (--gpu-images-per-s)"
    print("\nfeeding a GPU (hovernet-fast, 256 px crops):")
    print(f"  augmentation on one CPU core : {aug:7.1f} crops/s")
    print(f"  GPU training step            : {rate:7.1f} images/s ({how})")
    print(
        f"  => {rate / aug:.1f} CPU cores of augmentation tasks per GPU "
        f"(train.augment_cpus tasks on any node of the cluster)"
    )


if __name__ == "__main__":
    main()
