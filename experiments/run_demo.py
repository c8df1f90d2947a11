"""The main job on the embedded synthetic data (``make demo``).

Steps: synthesise multi-modality microscopy -> ``cellst ingest`` into a zarr store ->
segment the test split -> ``cellst evaluate`` (challenge F1 at IoU 0.5).

The ST++ pipeline (training, pseudo-labelling) is not in this version yet; until it lands the
test split is segmented by a classical baseline (Otsu threshold + distance-transform
watershed) so the whole data path and the metric run end to end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.segmentation import watershed

from cellst.config import load_config
from cellst.data.images import write_label_tiff
from cellst.data.ingest import ingest
from cellst.data.store import CellStore
from cellst.data.synth import synthesize_dataset
from cellst.metrics.report import format_table
from cellst.metrics.sources import evaluate_sources
from cellst.raycluster import ensure_ray


def classical_baseline(image: np.ndarray) -> np.ndarray:
    """Otsu on the smoothed gray image (polarity from the border) + distance watershed."""
    gray = gaussian(image.mean(axis=2), 1.5)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]]).mean()
    fg = gray > threshold_otsu(gray) if border < gray.mean() else gray < threshold_otsu(gray)
    fg = ndi.binary_fill_holes(ndi.binary_opening(fg, iterations=2))
    dist = ndi.distance_transform_edt(fg)
    peaks = peak_local_max(dist, min_distance=5, labels=ndi.label(fg)[0], exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-dist, markers, mask=fg).astype(np.int32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).with_name("demo.yaml")))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="demo_out", help="working folder")
    ap.add_argument("--quick", action="store_true", help="tiny data, for tests")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    t0 = time.perf_counter()
    n_lab, n_unl, n_test, size = (8, 8, 4, (160, 256)) if args.quick else (48, 96, 24, (256, 640))

    print(
        f"[1/4] synthesising {n_lab} labelled, {n_unl} unlabelled, {n_test} test images -> {out / 'src'}"
    )
    synthesize_dataset(
        out / "src", n_lab, n_unl, n_test, seed=0, min_size=size[0], max_size=size[1]
    )
    print(f"[2/4] ingesting into {out / 'store'}")
    ensure_ray()
    print("      " + ingest(out / "src", out / "store", cfg.ingest).summary())
    store = CellStore(out / "store")
    print(
        "[3/4] segmenting the test split with the classical baseline "
        "(the ST++ HoVer-Net pipeline is not in this version yet)"
    )
    pred = out / "pred_baseline"
    pred.mkdir(parents=True, exist_ok=True)
    for item in store.ids("test"):
        write_label_tiff(pred / f"{item}_label.tiff", classical_baseline(store.image(item)))
    print("[4/4] evaluating (NeurIPS 2022 CellSeg F1 at IoU 0.5)")
    report = evaluate_sources(
        out / "store",
        pred,
        out / "report",
        gt_split="test",
        count_boundary=cfg.evaluate.count_boundary,
        iou_threshold=cfg.evaluate.iou_threshold,
    )
    from rich.console import Console

    Console().print(format_table(report))
    print(
        f"mean F1 {report['f1']:.4f} over {report['count']} test images; "
        f"report: {out / 'report' / 'metrics.json'}; {time.perf_counter() - t0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
