"""Training benchmarks (issue 4), each measured side by side in one run.

1. Ray Train overhead: the same model, batch size and in-memory crops, timed per step inside
   a Ray Train worker (1 worker) and in a plain PyTorch loop. Target: <= 1.15x.
2. Throughput: images/s with 2 Ray Train workers vs 1 (DDP, gloo, 2 cores).
3. hovernet-lite test-split F1 against training time, as CSV and PNG (``--out``).
4. ``--gpu`` (on a GPU machine): HoVer-Net FAST images/s, bf16 autocast + channels_last vs fp32.

Run: ``.venv/bin/python benchmarks/bench_train.py [--steps 40] [--epochs 12] [--out DIR]``
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from cellst.config import load_config
from cellst.data.synth import synth_image
from cellst.model import HoVerLoss, build_model
from cellst.train.step import Augmenter, make_optimizer, train_step


def crops(n: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    imgs, labs = [], []
    for i in range(n):
        img, lab = synth_image(rng, ("fluorescence", "brightfield")[i % 2], (size, size))
        img = img if img.ndim == 3 else np.repeat((img / max(1, img.max()) * 255)[..., None], 3, 2)
        imgs.append(img.astype(np.uint8))
        labs.append(lab)
    return {"image": np.stack(imgs), "label": np.stack(labs), "source": np.zeros(n, np.int8)}


def plain_steps(cfg, data, steps: int, batch: int) -> list[float]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_model(cfg.model).train()
    opt = make_optimizer(model, "adam", 1e-3, 0)
    aug, loss_fn = Augmenter(cfg.augment, cfg.data.crop_size, seed=0), HoVerLoss(cfg.loss)
    times, n = [], len(data["image"])
    for s in range(steps):
        idx = np.arange(s * batch, (s + 1) * batch) % n
        t = time.perf_counter()
        train_step(model, aug({k: v[idx] for k, v in data.items()}), loss_fn, opt)
        times.append(time.perf_counter() - t)
    return times


def ray_steps(cfg, data, steps: int, batch: int, workers: int) -> tuple[list[float], float]:
    import ray.train
    from ray.train.torch import TorchTrainer

    def loop(c):
        import ray.train.torch

        torch.manual_seed(0)
        torch.set_num_threads(1)
        model = ray.train.torch.prepare_model(build_model(cfg.model).train())
        opt = make_optimizer(model, "adam", 1e-3, 0)
        aug, loss_fn = Augmenter(cfg.augment, cfg.data.crop_size, seed=0), HoVerLoss(cfg.loss)
        shard = ray.train.get_dataset_shard("train")
        times, t0 = [], time.perf_counter()
        it = iter(shard.iter_batches(batch_size=batch, batch_format="numpy", drop_last=True))
        for _ in range(c["steps"]):
            t = time.perf_counter()
            train_step(model, aug(next(it)), loss_fn, opt)
            times.append(time.perf_counter() - t)
        if ray.train.get_context().get_world_rank() == 0:
            # Result.metrics only follows checkpointed reports: hand the timings over by file
            Path(c["out"]).write_text(json.dumps(times))
        ray.train.report({"wall": time.perf_counter() - t0})

    reps = -(-steps * batch * workers // len(data["image"])) + 1
    ds = ray.data.from_numpy(np.concatenate([data["image"]] * reps)).rename_columns(
        {"data": "image"}
    )
    labels = ray.data.from_numpy(np.concatenate([data["label"]] * reps)).rename_columns(
        {"data": "label"}
    )
    ds = ds.zip(labels).materialize()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        res = TorchTrainer(
            loop,
            train_loop_config={"steps": steps, "out": f"{tmp}/times.json"},
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, resources_per_worker={"CPU": 0.9}
            ),
            run_config=ray.train.RunConfig(name="bench", storage_path=tmp),
            datasets={"train": ds},
        ).fit()
        total = time.perf_counter() - t
        del res
        return json.loads(Path(f"{tmp}/times.json").read_text()), total


def f1_vs_time(out: Path, epochs: int) -> None:
    from cellst.data.ingest import ingest
    from cellst.data.synth import synthesize_dataset
    from cellst.inference.batch import predict
    from cellst.metrics.sources import evaluate_sources
    from cellst.model import load_model
    from cellst.tracking.figures import curve_figure, save_figure
    from cellst.train.trainer import train

    work = out / "f1_vs_time"
    synthesize_dataset(work / "src", 24, 0, 8, seed=5, min_size=256, max_size=384, progress=False)
    ingest(work / "src", work / "store", progress=False)
    cfg = load_config(
        None,
        [
            f"store={work / 'store'}",
            f"train.run_dir={work / 'runs'}",
            f"train.epochs={epochs}",
            f"train.keep_last={epochs}",
            "data.crop_size=128",
            "data.crops_per_epoch=128",
            "train.lr=2e-3",
            "inference.roi=128",
            "train.num_workers=2",
            "train.val_every=100",
            "tracking.system_metrics=false",
        ],
    )
    res = train(cfg)
    rows, elapsed = [], 0.0
    for ck in sorted((res.run_path / "checkpoints").glob("epoch_*")):
        meta = load_model(ck)[2]
        elapsed = elapsed + meta["epoch_seconds"] if rows else meta["epoch_seconds"]
        name = f"e{meta['epoch']:03d}"
        predict(
            ck,
            work / "store",
            set_name=name,
            split="test",
            infer=cfg.inference,
            progress=False,
            overwrite=True,
        )
        rep = evaluate_sources(
            work / "store", work / "store", pred_set=name, gt_split="test", progress=False
        )
        rows.append(
            {"epoch": meta["epoch"], "train_seconds": round(elapsed, 2), "test_f1": rep["f1"]}
        )
        print(f"  epoch {meta['epoch']:3d}  {elapsed:7.1f} s  test F1 {rep['f1']:.4f}")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "f1_vs_time.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    fig = curve_figure(
        [r["train_seconds"] for r in rows],
        {"hovernet-lite": [r["test_f1"] for r in rows]},
        "training time (s, 2 CPU workers)",
        "test-split F1 @ IoU 0.5",
        "hovernet-lite: test F1 vs training time",
    )
    save_figure(fig, out / "f1_vs_time.png")
    print(f"  wrote {out / 'f1_vs_time.csv'} and {out / 'f1_vs_time.png'}")


def gpu_precision(steps: int) -> None:
    cfg = load_config(None, ["model.name=hovernet-fast"])
    model = build_model(cfg.model).cuda().train()
    x = torch.rand(16, 3, 256, 256, device="cuda")
    for mode in ("fp32", "bf16+channels_last"):
        m = model.to(memory_format=torch.channels_last) if "bf16" in mode else model
        xi = x.contiguous(memory_format=torch.channels_last) if "bf16" in mode else x
        opt = torch.optim.Adam(m.parameters(), 1e-4)
        for i in range(steps + 5):
            if i == 5:
                torch.cuda.synchronize()
                t = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16, enabled="bf16" in mode):
                out = m(xi)
            loss = sum(v.float().mean() for v in out.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.cuda.synchronize()
        print(f"  {mode:20s}: {steps * 16 / (time.perf_counter() - t):8.1f} images/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--out", default=".bench_out")
    ap.add_argument("--skip-f1", action="store_true")
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()
    if args.gpu:
        gpu_precision(args.steps)
        return
    ray.init(num_cpus=2, logging_level="ERROR", include_dashboard=False)
    from cellst.raycluster import quiet_ray_data

    quiet_ray_data()
    cfg = load_config(None, ["data.crop_size=128", "model.width=16"])
    data = crops(64, 128)
    plain = plain_steps(cfg, data, args.steps, args.batch)
    r1, total1 = ray_steps(cfg, data, args.steps, args.batch, 1)
    r2, total2 = ray_steps(cfg, data, args.steps, args.batch, 2)
    skip = args.steps // 4  # warm-up steps
    med = {k: statistics.median(v[skip:]) for k, v in {"plain": plain, "r1": r1, "r2": r2}.items()}
    print(
        f"\nstep time, hovernet-lite, batch {args.batch} x 128x128 (median of {args.steps - skip})"
    )
    print(f"  plain PyTorch loop      : {med['plain'] * 1000:7.1f} ms   (1.00x)")
    print(
        f"  Ray Train, 1 worker     : {med['r1'] * 1000:7.1f} ms   ({med['r1'] / med['plain']:.2f}x; "
        f"target <= 1.15x)   end to end incl. start-up {total1:.1f} s"
    )
    ips1 = args.batch / med["r1"]
    ips2 = 2 * args.batch / med["r2"]
    print(f"\nimages/s: 1 worker {ips1:.1f} | 2 workers {ips2:.1f} ({ips2 / ips1:.2f}x) on 2 cores")
    if not args.skip_f1:
        print("\nhovernet-lite test F1 vs training time:")
        f1_vs_time(Path(args.out).absolute(), args.epochs)


if __name__ == "__main__":
    main()
