"""Which checkpoint to call ``best`` on a weakly labelled set: the selection rules side by side.

Each seed synthesises ``bench_stpp``'s data (12 labelled images of 256-384 px, so 4
validation items, and 24 test images) and trains one supervised model with ``make demo``'s
recipe (``bench_stpp``'s stage 1: 18 epochs x 512 crops, hovernet-lite width 8), keeping every
epoch. The same training then gives, at exactly equal compute, the test-split F1 of

* ``highest``: the epoch of highest validation F1, earliest on ties (``train.best_within_se=0``);
* ``rule``: the run's ``best`` checkpoint, chosen by ``train.best_within_se`` (default 1: the
  latest epoch within one paired standard error of the highest);
* ``last``: the last epoch.

Each is post-processed with the thresholds calibrated on the run's validation items (the
``highest`` epoch by the same function training uses for ``best``), and scored through
cellst's own prediction and metric with the recipe's inference settings.

Beside it, what calibrating on so few items is worth: the ``rule`` checkpoint's test F1
with the configured post-processing, with its calibrated settings, and the ceiling of the
same search run on the test items themselves (a measurement only: nothing uses it).

Run: ``RAY_ADDRESS=local .venv/bin/python benchmarks/bench_selection.py --seeds 51 52 53
--out DIR`` (about 2.5 min per seed on 2 CPU cores). ``--smoke``: one seed of 8 tiny images,
2 epochs, for CI (it checks that everything runs; the F1 values mean nothing there).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RULES = ("highest", "rule", "last")
POST = ("configured", "calibrated", "ceiling")


def test_maps(checkpoint: Path, cfg, store) -> tuple[list[str], list]:
    """The test items' ids and ``checkpoint``'s maps of them (predicted once, scored often)."""
    from cellst.model import load_model
    from cellst.postprocess.calibrate import predict_val_maps

    model = load_model(checkpoint)[0].eval()
    ids = store.items(split="test")["id"].tolist()
    return ids, list(predict_val_maps(model, store, ids, cfg.inference))


def test_f1(checkpoint: Path, cfg, store, maps=None) -> tuple[float, dict[str, float]]:
    """Test-split F1 of ``checkpoint`` (its calibrated settings), overall and per modality."""
    from cellst.postprocess.calibrate import effective_postprocess, score_item

    post, _ = effective_postprocess(cfg.postprocess, checkpoint)
    ids, maps = maps or test_maps(checkpoint, cfg, store)
    per: dict[str, list[float]] = collections.defaultdict(list)
    for item, m in zip(ids, maps, strict=True):
        per[store.row(item).modality].append(score_item(m, post, cfg.evaluate)[0]["f1"])
    every = [f for v in per.values() for f in v]
    return float(np.mean(every)), {m: float(np.mean(v)) for m, v in sorted(per.items())}


def post_processing_f1(checkpoint: Path, cfg, maps: list) -> dict[str, float]:
    """Test-split F1 of ``checkpoint``'s test ``maps`` post-processed three ways: the
    configured settings, its calibrated ones (chosen on the validation items), and the
    ceiling: the calibration's own search
    (:func:`~cellst.postprocess.calibrate.search_postprocess`) run on the test items, the
    most that any calibration over that grid could reach."""
    from cellst.postprocess.calibrate import effective_postprocess, score_maps, search_postprocess

    calibrated, _ = effective_postprocess(cfg.postprocess, checkpoint)
    return {
        "configured": score_maps(maps, cfg.postprocess, cfg.evaluate)["val_f1"],
        "calibrated": score_maps(maps, calibrated, cfg.evaluate)["val_f1"],
        "ceiling": search_postprocess(maps, cfg.postprocess, cfg.evaluate).f1_after,
    }


def run_seed(seed: int, args, out: Path) -> dict:
    from cellst.data.ingest import ingest
    from cellst.data.store import CellStore
    from cellst.data.synth import synthesize_dataset
    from cellst.experiment import load_config
    from cellst.model.checkpoint_files import read_checkpoint_info
    from cellst.postprocess.calibrate import calibrate_checkpoints
    from cellst.raycluster import ensure_ray
    from cellst.train.trainer import train

    work = out / f"seed{seed}"
    src, store_path = work / "src", work / "store"
    if not (src / ".done").is_file():
        synthesize_dataset(
            src,
            args.n_labelled,
            0,
            args.n_test,
            seed=1000 + seed,  # bench_stpp's images for the same seed
            min_size=args.min_size,
            max_size=args.max_size,
            progress=False,
        )
        (src / ".done").touch()
    ensure_ray()
    ingest(src, store_path, progress=False)
    overrides = [
        f"store={store_path}",
        f"train.run_dir={work / 'runs'}",
        f"name=bench-selection-seed{seed}",
        f"train.epochs={args.epochs}",
        f"data.crops_per_epoch={args.crops}",
        f"model.width={args.width}",
        f"train.seed={seed}",
        f"data.seed={seed}",
        f"train.keep_last={args.epochs}",  # every epoch, for the 'highest' rule
        "tracking.system_metrics=false",
        *args.overrides,
    ]
    cfg = load_config(args.config, overrides)
    t0 = time.perf_counter()
    res = train(cfg)
    checkpoints = res.run_path / "checkpoints"
    val_f1 = {}
    for epoch in range(1, args.epochs + 1):
        val_f1[epoch] = read_checkpoint_info(checkpoints / f"epoch_{epoch:03d}")[1]["val_f1"]
    top = max(val_f1.values())
    highest = min(e for e, v in val_f1.items() if v == top)
    # a copy: epoch folders may share files with best/ and last/, whose calibration stays
    chosen = work / "highest"
    shutil.rmtree(chosen, ignore_errors=True)
    shutil.copytree(checkpoints / f"epoch_{highest:03d}", chosen)
    store = CellStore(store_path, lease=False)
    val_ids = json.loads((res.run_path / "run.json").read_text())["val_ids"]
    calibrate_checkpoints(
        [chosen],
        store,
        val_ids[: cfg.train.calibrate_max_items],
        cfg.inference,
        cfg.postprocess,
        cfg.evaluate,
    )
    row: dict = {"seed": seed, "val_f1": val_f1, "epoch": {"highest": highest}}
    row["epoch"]["rule"] = read_checkpoint_info(checkpoints / "best")[1]["epoch"]
    row["epoch"]["last"] = args.epochs
    row["test_f1"], row["test_f1_per_modality"] = {}, {}
    best_maps = test_maps(checkpoints / "best", cfg, store)  # the rule's: scored twice below
    for rule, path in zip(RULES, (chosen, checkpoints / "best", checkpoints / "last"), strict=True):
        maps = best_maps if rule == "rule" else None
        row["test_f1"][rule], row["test_f1_per_modality"][rule] = test_f1(path, cfg, store, maps)
    row["post_processing"] = post_processing_f1(checkpoints / "best", cfg, best_maps[1])
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "experiments" / "demo.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[51, 52, 53])
    ap.add_argument("--n-labelled", type=int, default=12)
    ap.add_argument("--n-test", type=int, default=24)
    ap.add_argument("--min-size", type=int, default=256)
    ap.add_argument("--max-size", type=int, default=384)
    ap.add_argument("--epochs", type=int, default=18)
    ap.add_argument("--crops", type=int, default=512, help="training crops per epoch")
    ap.add_argument("--width", type=int, default=8, help="hovernet-lite width")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(ROOT / ".bench_out" / "selection"))
    ap.add_argument("--smoke", action="store_true", help="one seed, tiniest settings, for CI")
    args = ap.parse_args(argv)
    if args.smoke:  # 8 labelled images: 4 modalities of two, one of each validates
        args.seeds, args.n_labelled, args.n_test = [0], 8, 4
        args.min_size, args.max_size, args.epochs, args.crops, args.width = 96, 128, 2, 16, 4
        args.overrides = [
            "data.crop_size=64",
            "train.batch_size=4",
            "inference.roi=64",
            "inference.sw_batch_size=4",
            "train.num_workers=0",  # in this process (Ray Train's local mode): no start-up
            *args.overrides,
        ]
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"checkpoint selection: seeds {args.seeds}, {args.n_labelled} labelled + {args.n_test} "
        f"test images, {args.epochs} epochs x {args.crops} crops, width {args.width}",
        flush=True,
    )
    rows = []
    for seed in args.seeds:
        r = run_seed(seed, args, out)
        rows.append(r)
        print(
            f"seed {seed}: epoch / test F1  "
            + "  ".join(f"{k} {r['epoch'][k]} / {r['test_f1'][k]:.4f}" for k in RULES)
            + f"  ({r['seconds']:.0f} s)",
            flush=True,
        )
    print()
    print(f"{'rule':<10}{'mean test F1':>14}   per seed")
    for k in RULES:
        v = [r["test_f1"][k] for r in rows]
        print(f"{k:<10}{np.mean(v):>14.4f}   {[round(x, 4) for x in v]}")
    d = np.array([r["test_f1"]["rule"] - r["test_f1"]["highest"] for r in rows])
    print(
        f"rule - highest: {d.mean():+.4f} mean F1, worst seed {d.min():+.4f}, better on "
        f"{int((d > 0).sum())}/{len(d)}, equal on {int((d == 0).sum())}"
    )
    for m in rows[0]["test_f1_per_modality"]["rule"]:
        print(
            f"  {m:<16}"
            + "  ".join(
                f"{k} {np.mean([r['test_f1_per_modality'][k][m] for r in rows]):.3f}" for k in RULES
            )
        )
    pp = {k: np.array([r["post_processing"][k] for r in rows]) for k in POST}
    print(
        "post-processing of the rule's checkpoint, mean test F1: "
        + ", ".join(f"{k} {v.mean():.4f}" for k, v in pp.items())
        + f"; calibrated - configured {np.mean(pp['calibrated'] - pp['configured']):+.4f} "
        f"(better on {int((pp['calibrated'] > pp['configured']).sum())}/{len(rows)}), "
        f"ceiling - calibrated {np.mean(pp['ceiling'] - pp['calibrated']):+.4f}"
    )
    if args.smoke:
        print("smoke settings: everything ran; the F1 values mean nothing here")
    from cellst.fs import atomic_write_json

    atomic_write_json(out / "results.json", {"args": vars(args), "seeds": rows})
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
