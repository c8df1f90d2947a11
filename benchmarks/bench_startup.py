"""Start-up cost of the user-facing commands (issue 11): side by side in one run.

(a) the floor: a fresh ``python -c`` that imports what it needs, loads the checkpoint,
    reads and normalises one image, runs ``predict_maps`` and ``hover_to_instances``;
(b) ``cellst segment IMAGE --checkpoint CKPT --out DIR`` on the same image, end to end
    (interpreter start, imports, model, prediction, post-processing, writing);
(c) ``cellst evaluate`` on a pair of 4 x 4 label files;
(d) ``import monai`` whole, against (e) the same import with the hook every process cellst
    starts installs first (:func:`cellst._monai_import.skip_monai_extras`: MONAI's optional
    mlflow, matplotlib, pandas, scikit-learn and scipy.signal left out). Every Ray worker
    that trains, predicts or augments pays this import once.

Each is a fresh process timed by wall clock, interleaved ``--repeats`` times; the median is
reported. Targets: b / a <= 2.0 (segment runs in-process, no Ray start) and c < 1.5 s
(evaluate imports neither torch nor Ray). The checkpoint is an untrained hovernet-lite
(timing needs no training).

Run: ``.venv/bin/python benchmarks/bench_startup.py [--size 512] [--repeats 3]``;
``--smoke`` runs in seconds (128 px, width 4, one repeat).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

BIN = Path(sys.executable).parent
FLOOR = textwrap.dedent(
    """
    from cellst.data.images import normalize_image, read_array
    from cellst.inference.predictor import predict_maps
    from cellst.model.checkpoint import load_model
    from cellst.postprocess.hover import hover_to_instances

    model, _, _ = load_model({ckpt!r})
    prob, hv = predict_maps(model, normalize_image(read_array({image!r})))
    label = hover_to_instances(prob.astype("float32"), hv.astype("float32"))
    """
)

#: ``import monai`` as the processes cellst starts do it
TRIMMED_MONAI = (
    "from cellst._monai_import import skip_monai_extras; skip_monai_extras(); import monai"
)


def make_inputs(root: Path, size: int, width: int) -> tuple[Path, Path, Path, Path]:
    """A checkpoint, a ``size`` x ``size`` cell-like image and a 4 x 4 label pair."""
    import torch

    from cellst.model import ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(name="hovernet-lite", width=width)
    ckpt = save_checkpoint(root / "ckpt", build_model(cfg), cfg)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    img = rng.random((size, size)) * 0.2
    for _ in range(size * size // 2000):
        cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(5, 12))]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 0.9
    image = root / "cells.png"
    Image.fromarray((img * 255).astype(np.uint8)).save(image)
    lab = np.zeros((4, 4), np.uint16)
    lab[1:3, 1:3] = 1
    for side in ("gt", "pred"):
        (root / side).mkdir()
        tifffile.imwrite(root / side / "x_label.tiff", lab)
    return ckpt, image, root / "gt", root / "pred"


def timed(cmd: list[str]) -> float:
    """Wall-clock seconds of a fresh process (which must succeed)."""
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--width", type=int, default=16, help="hovernet-lite width")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of each")
    ap.add_argument("--smoke", action="store_true", help="seconds: 128 px, width 4, one run")
    args = ap.parse_args()
    if args.smoke:
        args.size, args.width, args.repeats = 128, 4, 1
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        root = Path(tmp)
        ckpt, image, gt, pred = make_inputs(root, args.size, args.width)
        floor = [sys.executable, "-c", FLOOR.format(ckpt=str(ckpt), image=str(image))]
        seg = [str(BIN / "cellst"), "segment", str(image), "--checkpoint", str(ckpt)]
        seg += ["--out", str(root / "out")]
        ev = [str(BIN / "cellst"), "evaluate", "--gt", str(gt), "--pred", str(pred)]
        ev += ["--out", str(root / "report")]
        whole = [sys.executable, "-c", "import monai"]
        trimmed = [sys.executable, "-c", TRIMMED_MONAI]
        times: dict[str, list[float]] = {k: [] for k in "abcde"}
        for _ in range(args.repeats):
            times["a"].append(timed(floor))
            times["b"].append(timed(seg))
            times["c"].append(timed(ev))
            times["d"].append(timed(whole))
            times["e"].append(timed(trimmed))
        assert (root / "out" / "cells_label.tiff").is_file()
    a, b, c, d, e = (statistics.median(times[k]) for k in "abcde")
    print(f"image {args.size} x {args.size}, hovernet-lite width {args.width}, CPU")
    print(f"median of {args.repeats} fresh processes each (wall clock, imports included):")
    print(f"  (a) python -c: load_model + predict_maps + hover_to_instances  {a:6.2f} s")
    print(f"  (b) cellst segment IMAGE --checkpoint CKPT --out DIR          {b:6.2f} s")
    print(f"  (c) cellst evaluate, 4 x 4 label pair                          {c:6.2f} s")
    print(f"b / a = {b / a:.2f} (target <= 2.0): {'ok' if b / a <= 2.0 else 'MISSED'}")
    print(f"c = {c:.2f} s (target < 1.5 s): {'ok' if c < 1.5 else 'MISSED'}")
    print(f"  (d) python -c 'import monai'                                   {d:6.2f} s")
    print(f"  (e) the same, without MONAI's unused optional extras           {e:6.2f} s")
    print(f"MONAI import, trimmed / whole: e / d = {e / d:.2f}")


if __name__ == "__main__":
    main()
