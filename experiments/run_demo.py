"""The main job on the embedded synthetic data (``make demo``): ST++ end to end.

Steps: synthesise multi-modality microscopy (fluorescence, brightfield, phase contrast,
DIC) -> ingest into a zarr store -> ST++ with hovernet-lite (supervised training,
reliability across snapshots, two rounds of pseudo-labelling and re-training, all on Ray)
-> test-split F1 of supervised-only vs round 1 vs round 2, overall and per modality.

Re-running the same command resumes: data already synthesised and ingested is kept, and
every finished ST++ stage is skipped (see `cellst stpp status OUT/stpp/<name>`).

    python experiments/run_demo.py                 # about 10-12 minutes on 2 CPU cores
    python experiments/run_demo.py --quick         # tiny data and model, a few minutes
    python experiments/run_demo.py --set train.epochs=12 --out my_demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

#: (labelled, unlabelled, test, min side, max side) of the synthetic data
FULL_DATA = (20, 40, 16, 256, 384)
QUICK_DATA = (8, 8, 4, 160, 256)


def _synthesize(out: Path, spec: tuple[int, int, int, int, int], seed: int) -> str:
    """Write the synthetic data unless the same data is already there."""
    from cellst.data.synth import synthesize_dataset

    stamp = out / ".demo-data.json"
    want = {"spec": list(spec), "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return "already there"
    n_lab, n_unl, n_test, lo, hi = spec
    synthesize_dataset(
        out, n_lab, n_unl, n_test, seed=seed, min_size=lo, max_size=hi, progress=sys.stdout.isatty()
    )
    stamp.write_text(json.dumps(want))
    return "written"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).with_name("demo.yaml")))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="demo_out", help="working folder")
    ap.add_argument("--quick", action="store_true", help="tiny data and model, for tests")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    ap.add_argument(
        "--overwrite", action="store_true", help="replace pseudo-label sets left by another run"
    )
    args = ap.parse_args(argv)

    from cellst.cli import print_whole
    from cellst.config import ConfigError
    from cellst.data.ingest import ingest
    from cellst.data.store import StoreError
    from cellst.raycluster import ensure_ray
    from cellst.stpp import load_stpp_config, run_stpp
    from cellst.stpp.report import format_f1_table
    from cellst.tracking.config import ui_command

    out = Path(args.out).absolute()
    t0 = time.perf_counter()
    try:
        cfg = load_stpp_config(
            args.config,
            [f"store={out / 'store'}", f"stpp.run_dir={out / 'stpp'}", *args.overrides],
            quick=args.quick,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = QUICK_DATA if args.quick else FULL_DATA
    print(
        f"[1/4] synthetic data: {spec[0]} labelled, {spec[1]} unlabelled, {spec[2]} test "
        f"images of {spec[3]}-{spec[4]} px -> {out / 'src'}",
        flush=True,
    )
    print(f"      {_synthesize(out / 'src', spec, args.seed)}", flush=True)
    print(f"[2/4] ingest -> {cfg.store}", flush=True)
    ensure_ray()
    print("      " + ingest(out / "src", cfg.store, cfg.ingest, progress=False).summary())
    print(
        f"[3/4] ST++ ({cfg.model.name}, {cfg.train.epochs} epochs x "
        f"{cfg.data.crops_per_epoch} crops of {cfg.data.crop_size} px per training) -> "
        f"{cfg.pipeline_dir}",
        flush=True,
    )
    try:
        result = run_stpp(cfg, overwrite=args.overwrite)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("[4/4] test-split evaluation (NeurIPS 2022 CellSeg F1 at IoU 0.5)")
    if result.report is not None:
        print_whole(format_f1_table(result.report))  # whole, even when piped
        f1 = dict(zip(result.report["model"], result.report["f1"], strict=True))
        print(
            f"mean test F1: supervised-only {f1['supervised']:.4f}, ST++ round 1 "
            f"{f1['round1']:.4f}, round 2 {f1['round2']:.4f} "
            f"(table: {result.pipeline_dir / 'report.csv'})"
        )
    else:
        print("no test-split evaluation (stpp.evaluate is false or the store has no test items)")
    print(f"stages: cellst stpp status {result.pipeline_dir}")
    ui = ui_command(result.tracking_uri)
    if ui:
        print(f"MLflow: {ui}   (parent run {result.parent_run_id}, one child run per stage)")
    ran = f"{len(result.ran)} stage(s) run, {len(result.skipped)} already done"
    print(f"demo finished in {time.perf_counter() - t0:.0f} s ({ran})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
