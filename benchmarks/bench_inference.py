"""Batch prediction throughput and the memory of a very large image (issue 3).

1. images/s of ``cellst predict``'s work on the same store items, side by side:
   a plain in-process loop (predict_maps + post-processing + write) vs the Ray Data
   pipeline with 1 and 2 model actors (CPU, hovernet-lite).
2. Peak RSS of segmenting one 8192 x 8192 image with hovernet-lite on CPU (block-wise
   inference + tiled post-processing), measured in a fresh child process. Target < 4 GiB.

Run: ``.venv/bin/python benchmarks/bench_inference.py [--images 12] [--skip-large]``
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import ray
import torch

from cellst.data.ingest import ingest
from cellst.data.store import CellStore
from cellst.data.synth import synthesize_dataset
from cellst.inference.batch import PredictConfig, predict
from cellst.inference.predictor import InferenceConfig, predict_maps
from cellst.model import ModelConfig, build_model, load_model, save_checkpoint
from cellst.postprocess import PostprocessConfig
from cellst.postprocess.tiled import postprocess_hover


def plain_loop(ckpt: Path, store: CellStore, ids: list[str], out: Path) -> float:
    from cellst.data.images import write_label_tiff

    torch.set_num_threads(1)
    model, _, _ = load_model(ckpt)
    cfg, post = InferenceConfig(), PostprocessConfig()
    out.mkdir()
    t = time.perf_counter()
    for i in ids:
        prob, hv = predict_maps(model, store.image(i), cfg)
        write_label_tiff(out / f"{i}_label.tiff", postprocess_hover(prob, hv, post))
    return len(ids) / (time.perf_counter() - t)


LARGE = textwrap.dedent(
    """
    import resource, sys, time, numpy as np, torch
    from cellst.data.synth import synth_image
    from cellst.inference.predictor import InferenceConfig, predict_maps
    from cellst.model import load_model
    from cellst.postprocess import PostprocessConfig, postprocess_hover
    torch.set_num_threads(2)
    img, _ = synth_image(np.random.default_rng(0), "brightfield", (1024, 1024), density=0.4)
    image = np.tile(img, (8, 8, 1))
    del img
    model, _, _ = load_model(sys.argv[1])
    t = time.perf_counter()
    prob, hv = predict_maps(model, image, InferenceConfig(block=2048, block_margin=128))
    t1 = time.perf_counter()
    label = postprocess_hover(prob, hv, PostprocessConfig())
    t2 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{image.shape[0]}x{image.shape[1]}: inference {t1 - t:.1f} s, post-processing "
          f"{t2 - t1:.1f} s, {int(label.max())} instances, peak RSS {rss:.2f} GiB")
    """
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--skip-large", action="store_true")
    args = ap.parse_args()
    ray.init(num_cpus=2, logging_level="ERROR", include_dashboard=False)
    from cellst.raycluster import quiet_ray_data

    quiet_ray_data()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthesize_dataset(
            tmp / "src", 0, args.images, 0, seed=1, min_size=512, max_size=512, progress=False
        )
        ingest(tmp / "src", tmp / "store", progress=False)
        store = CellStore(tmp / "store")
        ids = store.ids()
        torch.manual_seed(0)
        cfg = ModelConfig(name="hovernet-lite")
        ckpt = save_checkpoint(tmp / "ckpt", build_model(cfg), cfg)
        plain = plain_loop(ckpt, store, ids, tmp / "plain")
        rates = {}
        for n in (1, 2):
            res = predict(
                ckpt,
                tmp / "store",
                set_name=f"a{n}",
                ids=ids,
                resources=PredictConfig(num_actors=n),
                progress=False,
            )
            rates[n] = (len(res.written) / res.seconds, res.steady_rate(), res.first_item_seconds)
        print(f"\nbatch prediction, {len(ids)} images of 512x512, hovernet-lite on CPU (images/s)")
        print(f"  plain in-process loop : {plain:6.2f}   (1.00x)")
        for n, (r, steady, first) in rates.items():
            print(
                f"  ray data, {n} actor(s)  : {r:6.2f} end to end ({r / plain:.2f}x plain), "
                f"{steady:6.2f} after start-up ({steady / plain:.2f}x); start-up {first:.1f} s"
            )
        if not args.skip_large:
            print("\nlarge image, 8192x8192, hovernet-lite on CPU, in a fresh process:")
            out = subprocess.run(
                [sys.executable, "-c", LARGE, str(ckpt)], capture_output=True, text=True, check=True
            )
            print("  " + out.stdout.strip().splitlines()[-1] + "  (target < 4 GiB)")


if __name__ == "__main__":
    main()
