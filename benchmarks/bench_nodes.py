"""How the training stream and the prediction pool scale with Ray nodes (issue 13, section 4).

For each N in ``--nodes`` (default 1 2 3), a real multi-node Ray cluster is started on this
machine with ``ray.cluster_utils.Cluster``: a head with no CPUs and N worker nodes. Each
node has its own raylet and object store. The same work then runs on it:

* **stream**: training crops/s of cellst's training stream (store -> Ray Data
  read-and-augment tasks, ``cellst.train.trainer.build_dataset``), consumed as batches by
  the driver on the head, as a Ray Train worker consumes its shard;
* **pool**: images/s of ``cellst predict`` (store -> Ray Data read -> model actor pool ->
  post-processing -> writes into the store), end to end and after start-up.

The cluster has the same ``--total-cpus`` logical CPUs for every N (6 by default: one node
of 6, two of 3, three of 2; Ray counts CPUs in whole numbers), so a larger N changes only
how the same budget is split over raylets, and cellst sizes its work per node from it. All
N share this machine's cores, so more nodes cannot be faster. The ratio to one node is the
cost of spreading out: batches crossing object stores, scheduling over more raylets, more
worker processes, and the packing of tasks and actors into smaller nodes.

Run: ``.venv/bin/python benchmarks/bench_nodes.py [--nodes 1 2 3] [--crops 2048]
[--images 48]``. ``--smoke`` runs N = 2 (2 CPUs) at tiny sizes for CI (the ratios
mean nothing there): a smoke run starts one 2-node cluster, whose row is the
multi-node path the full run takes for every N.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

#: where Ray records "the cluster last started on this machine" (read by a plain ray.init())
RAY_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")


def start_cluster(n_nodes: int, cpus: int):
    """A head with no CPUs and ``n_nodes`` worker nodes of ``cpus`` CPUs, each with a
    custom resource of its own; this process connected to it. A plain ``ray.init()``
    elsewhere on this machine keeps finding what it found before (not this cluster)."""
    import ray
    from ray.cluster_utils import Cluster

    saved = RAY_ADDRESS_FILE.read_text() if RAY_ADDRESS_FILE.is_file() else None
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False},
    )
    for i in range(n_nodes):
        c.add_node(num_cpus=cpus, resources={f"node_{i}": 1})
    c.wait_for_nodes()
    if saved is None:
        RAY_ADDRESS_FILE.unlink(missing_ok=True)
    else:
        RAY_ADDRESS_FILE.write_text(saved)
    from cellst.raycluster import ensure_ray, quiet_ray_data

    ensure_ray(address=c.address)
    quiet_ray_data()
    assert len([n for n in ray.nodes() if n["Alive"]]) == n_nodes + 1
    return c


def stream_rate(store_dir: Path, crops: int, crop: int) -> float:
    """Crops/s of the training stream after its first batch."""
    from cellst.data.store import CellStore
    from cellst.experiment import load_config
    from cellst.train.trainer import build_dataset

    cfg = load_config(
        None,
        [
            f"store={store_dir}",
            f"data.crop_size={crop}",
            f"data.crops_per_epoch={crops}",
            "train.batch_size=16",
            "train.epochs=1",
            "model.width=8",
        ],
    )
    store = CellStore(store_dir)
    ids = list(store.ids(split="labeled"))
    ds = build_dataset(cfg, store, ids)
    got, t0, t_first = 0, time.perf_counter(), None
    for batch in ds.iter_batches(batch_size=16, batch_format="numpy", prefetch_batches=4):
        if t_first is None:
            t_first, first = time.perf_counter(), len(batch["image"])
        got += len(batch["image"])
    assert got >= crops, (got, crops)
    return (got - first) / (time.perf_counter() - (t_first or t0))


def pool_rate(ckpt: Path, store_dir: Path, tag: str, actors: int) -> tuple[float, float, set]:
    """``cellst predict`` over the unlabelled items: (end-to-end images/s, after start-up,
    the nodes that wrote items)."""
    from cellst.data.store import CellStore
    from cellst.inference.batch import PredictConfig, predict

    res = predict(
        ckpt,
        store_dir,
        set_name=f"nodes-{tag}",
        split="unlabeled",
        resources=PredictConfig(num_actors=actors),
        progress=False,
    )
    done = CellStore(store_dir, lease=False).pseudo_items(f"nodes-{tag}")
    return len(res.written) / res.seconds, res.steady_rate(), set(done["node_id"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--total-cpus", type=int, default=6, help="logical CPUs, split over nodes")
    ap.add_argument("--crops", type=int, default=2048, help="training crops streamed per N")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--images", type=int, default=48, help="unlabelled images predicted per N")
    ap.add_argument("--size", type=int, default=512, help="image side")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="N = 2 at tiny sizes, for CI")
    args = ap.parse_args()
    if args.smoke:
        args.nodes, args.total_cpus = [2], 2  # the multi-node path; N = 1 adds nothing
        args.crops, args.crop, args.images, args.size = 64, 64, 3, 128
    bad = [n for n in args.nodes if args.total_cpus % n]
    if bad:
        raise SystemExit(f"--total-cpus {args.total_cpus} does not split over {bad} node(s)")
    import ray
    import torch

    from cellst.data.ingest import ingest
    from cellst.data.synth import synthesize_dataset
    from cellst.model import ModelConfig, build_model, save_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthesize_dataset(
            tmp / "src",
            8,
            args.images,
            0,
            seed=7,
            min_size=args.size,
            max_size=args.size,
            progress=False,
        )
        torch.manual_seed(0)
        mcfg = ModelConfig(name="hovernet-lite", width=4 if args.smoke else 16)
        ckpt = save_checkpoint(tmp / "ckpt", build_model(mcfg), mcfg)
        store_dir = tmp / "store"  # ingested on the first cluster, then shared by all
        for n in args.nodes:
            c = start_cluster(n, args.total_cpus // n)
            try:
                if not store_dir.is_dir():
                    ingest(tmp / "src", store_dir, progress=False)
                if not args.smoke:
                    stream_rate(store_dir, min(256, args.crops), args.crop)  # start workers
                crops = stream_rate(store_dir, args.crops, args.crop)
                end, steady, pool_nodes = pool_rate(ckpt, store_dir, str(n), args.actors)
                rows.append((n, crops, end, steady, len(pool_nodes)))
                print(
                    f"  {n} node(s): stream {crops:7.1f} crops/s, pool {end:5.2f} img/s end to "
                    f"end, {steady:5.2f} after start-up",
                    flush=True,
                )
            finally:
                ray.shutdown()
                c.shutdown()
    base = rows[0]
    print(
        f"\nscaling over Ray nodes on one machine ({args.total_cpus} logical CPUs split over "
        f"the nodes; {args.crop}-px training crops, {args.images} images of {args.size} px, "
        f"{args.actors} model actors)"
    )
    print(
        "  nodes | stream crops/s (x 1 node) | pool img/s end to end | after start-up | nodes that wrote"
    )
    for n, crops, end, steady, pn in rows:
        print(
            f"  {n:5d} | {crops:8.1f} ({crops / base[1]:4.2f}x)        | {end:6.2f} "
            f"({end / base[2]:4.2f}x)        | {steady:6.2f} ({steady / base[3]:4.2f}x) | {pn}"
        )
    if args.smoke:
        print("smoke sizes: the ratios mean nothing here")
    assert all(np.isfinite(r[1]) and r[2] > 0 for r in rows)


if __name__ == "__main__":
    main()
