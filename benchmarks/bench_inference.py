"""Batch prediction throughput and the memory of a very large image (issue 3).

1. images/s of ``cellst predict``'s work on the same store items, side by side:
   a plain in-process loop (predict_maps + post-processing + write) vs the Ray Data
   pipeline with 1 and 2 model actors (CPU, hovernet-lite).
2. Several models over the same items (ST++'s stages 2 and 7): one pass of one actor pool
   holding every model (``predict_sets``) vs one ``predict`` run per model, wall time side by
   side (2 actors).
3. Peak RSS of segmenting one 8192 x 8192 image with hovernet-lite on CPU (block-wise
   inference + tiled post-processing), measured in a fresh child process. Target < 4 GiB
   (reported, not asserted).

``--smoke`` runs the same steps in seconds, for CI: two 256 x 256 images, a width-4 model and
a 512 x 512 "large" image with 256-px blocks and 256-px post-processing tiles (so both the
block-wise and the tiled paths run); the target is not checked there.

Run: ``.venv/bin/python benchmarks/bench_inference.py [--images 12] [--skip-large] [--smoke]``
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from cellst.data.ingest import ingest
from cellst.data.store import CellStore
from cellst.data.synth import synthesize_dataset
from cellst.inference.batch import PredictConfig, SetRequest, predict, predict_sets
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
    ckpt, side, reps, block, margin, tile, overlap = sys.argv[1], *map(int, sys.argv[2:])
    img, _ = synth_image(np.random.default_rng(0), "brightfield", (side, side), density=0.4)
    image = np.tile(img, (reps, reps, 1))
    del img
    model, _, _ = load_model(ckpt)
    t = time.perf_counter()
    prob, hv = predict_maps(model, image, InferenceConfig(block=block, block_margin=margin))
    t1 = time.perf_counter()
    label = postprocess_hover(prob, hv, PostprocessConfig(tile=tile, tile_overlap=overlap))
    t2 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{image.shape[0]}x{image.shape[1]}: inference {t1 - t:.1f} s, post-processing "
          f"{t2 - t1:.1f} s, {int(label.max())} instances, peak RSS {rss:.2f} GiB")
    """
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--models", type=int, default=3, help="models of the one-pass comparison")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (seconds), for CI")
    args = ap.parse_args()
    size, width = (256, 4) if args.smoke else (512, 16)
    # synthetic side, tiles per side, inference block and margin, post-processing tile, overlap
    large = (256, 2, 256, 32, 256, 64) if args.smoke else (1024, 8, 2048, 128, 2048, 256)
    if args.smoke:
        args.images, args.models = 2, 2
    from cellst.raycluster import ensure_ray

    ensure_ray(num_cpus=2)  # a local 2-CPU cluster, or the one RAY_ADDRESS names
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthesize_dataset(
            tmp / "src", 0, args.images, 0, seed=1, min_size=size, max_size=size, progress=False
        )
        ingest(tmp / "src", tmp / "store", progress=False)
        store = CellStore(tmp / "store")
        ids = store.ids()
        torch.manual_seed(0)
        cfg = ModelConfig(name="hovernet-lite", width=width)
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
        print(
            f"\nbatch prediction, {len(ids)} images of {size}x{size}, hovernet-lite width "
            f"{width} on CPU (images/s)"
        )
        print(f"  plain in-process loop : {plain:6.2f}   (1.00x)")
        for n, (r, steady, first) in rates.items():
            print(
                f"  ray data, {n} actor(s)  : {r:6.2f} end to end ({r / plain:.2f}x plain), "
                f"{steady:6.2f} after start-up ({steady / plain:.2f}x); start-up {first:.1f} s"
            )
        models = []
        for k in range(args.models):
            torch.manual_seed(100 + k)
            models.append(save_checkpoint(tmp / f"model{k}", build_model(cfg), cfg))
        both = {"resources": PredictConfig(num_actors=2), "progress": False}
        t = time.perf_counter()
        for k, ck in enumerate(models):
            predict(ck, tmp / "store", set_name=f"sep{k}", ids=ids, calibrated=False, **both)
        separate = time.perf_counter() - t
        t = time.perf_counter()
        requests = [
            SetRequest(str(ck), f"one{k}", PostprocessConfig()) for k, ck in enumerate(models)
        ]
        predict_sets(tmp / "store", requests, ids, **both)
        one_pass = time.perf_counter() - t
        print(f"\n{args.models} models over the same {len(ids)} images, 2 actors (wall s)")
        print(f"  one predict run per model : {separate:6.1f}   (1.00x)")
        print(
            f"  one pass (predict_sets)   : {one_pass:6.1f}   ({separate / one_pass:.2f}x faster)"
        )
        if not args.skip_large:
            side = large[0] * large[1]
            print(f"\nlarge image, {side}x{side}, hovernet-lite on CPU, in a fresh process:")
            out = subprocess.run(
                [sys.executable, "-c", LARGE, str(ckpt), *map(str, large)],
                capture_output=True,
                text=True,
            )
            if out.returncode:
                raise SystemExit(
                    f"large-image run failed ({out.returncode}):\n{out.stderr[-3000:]}"
                )
            target = "not checked at smoke sizes" if args.smoke else "target < 4 GiB"
            print("  " + out.stdout.strip().splitlines()[-1] + f"  ({target})")


if __name__ == "__main__":
    main()
