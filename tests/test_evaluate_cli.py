"""`cellst evaluate` on label folders: settings honoured, bad files named, unmatched files warned."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
from typer.testing import CliRunner

from cellst.cli import app

runner = CliRunner()


def _cell(shift: int = 0, dtype=np.uint16) -> np.ndarray:
    """One 10 x 10 cell in the middle of a 32 x 32 map, shifted right by ``shift``."""
    lab = np.zeros((32, 32), dtype)
    lab[11:21, 11 + shift : 21 + shift] = 1
    return lab


def _folders(tmp_path: Path, gt: dict, pred: dict) -> tuple[Path, Path]:
    g, p = tmp_path / "gt", tmp_path / "pred"
    for folder, maps in ((g, gt), (p, pred)):
        folder.mkdir()
        for name, lab in maps.items():
            tifffile.imwrite(folder / f"{name}_label.tiff", lab)
    return g, p


def _evaluate(gt: Path, pred: Path, out: Path, *extra: str):
    return runner.invoke(
        app, ["evaluate", "--gt", str(gt), "--pred", str(pred), "--out", str(out), *extra]
    )


def test_iou_threshold_setting_is_honoured(tmp_path):
    # IoU of a 10 x 10 cell and its copy shifted by 2 px: 80 / 120 = 0.67
    gt, pred = _folders(tmp_path, {"a": _cell()}, {"a": _cell(shift=2)})
    res = _evaluate(gt, pred, tmp_path / "r1")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r1" / "metrics.json").read_text())["f1"] == 1.0
    res = _evaluate(gt, pred, tmp_path / "r2", "--set", "evaluate.iou_threshold=0.7")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert report["iou_threshold"] == 0.7 and report["f1"] == 0.0
    assert "IoU >= 0.7" in res.output


def test_non_integer_float_label_names_the_file_exit_2(tmp_path):
    bad = _cell(dtype=np.float32) * 1.5
    gt, pred = _folders(tmp_path, {"a": _cell()}, {"a": bad})
    res = _evaluate(gt, pred, tmp_path / "r")
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "non-integer" in lines[0]
    assert str(pred / "a_label.tiff") in lines[0]
    # integral floats are fine
    (pred / "a_label.tiff").unlink()
    tifffile.imwrite(pred / "a_label.tiff", _cell(dtype=np.float32))
    assert _evaluate(gt, pred, tmp_path / "r").exit_code == 0


def test_a_truncated_label_tiff_is_named_as_unreadable(tmp_path):
    """A label file cut short (a copy interrupted) is named as unreadable, in one line; it
    was ``expected a 2-D label image, got shape (0,)`` after a stray tifffile log line."""
    big = np.zeros((128, 128), np.uint16)
    big[20:60, 20:60] = 1
    gt, pred = _folders(tmp_path, {"a": big}, {"a": big})
    cut = pred / "a_label.tiff"
    cut.write_bytes(cut.read_bytes()[:4000])
    res = _evaluate(gt, pred, tmp_path / "r")
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and f"{cut}: cannot read image" in lines[0], res.output
    assert "shape (0,)" not in res.output


def test_missing_and_extra_predictions_are_warned_by_name(tmp_path):
    gt, pred = _folders(
        tmp_path,
        {"a": _cell(), "b": _cell()},
        {"a": _cell(), "zzz": _cell()},
    )
    res = _evaluate(gt, pred, tmp_path / "r")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert f"warning: no prediction for 'b' in {pred} (scored as F1 0)" in text
    assert f"warning: prediction {pred / 'zzz_label.tiff'} has no ground truth" in text
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert report["missing"] == ["b"] and report["extra"] == ["zzz"]
    assert report["f1"] == 0.5  # a scores 1, the missing b scores 0


def test_names_pair_across_unicode_forms_and_a_case_only_difference_is_pointed_out(tmp_path):
    """A ground truth named on macOS (accents decomposed, NFD) and its prediction written
    on Linux (composed, NFC) look alike but were "no prediction" (F1 0) and "no ground
    truth". They now pair. A name that differs only in letter case is still not a match,
    and the warning says which prediction it is."""
    nfd, nfc = "Zelle_e\u0301", "Zelle_\u00e9"
    gt, pred = _folders(
        tmp_path, {nfd: _cell(), "CellA": _cell()}, {nfc: _cell(), "cella": _cell()}
    )
    res = _evaluate(gt, pred, tmp_path / "r")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert report["missing"] == ["CellA"] and report["extra"] == ["cella"]
    assert report["f1"] == 0.5  # the accented pair scores 1
    text = " ".join(res.output.split())
    assert "no prediction for 'CellA'" in text
    assert "'cella' there differs only in letter case" in text


def test_a_prediction_folder_that_pairs_with_nothing_is_an_error(tmp_path):
    """An empty --pred, one of JPEG label files (lossy), or one whose names match no
    ground truth: exit 1 naming the folder, and no report (before: exit 0, F1 0 for every
    image, as if the model had found no cell). ``NAME_label.png`` files are labels."""
    import imageio.v3 as iio

    gt, pred = _folders(tmp_path, {"a": _cell(), "b": _cell()}, {"x": _cell()})
    (tmp_path / "empty").mkdir()
    (tmp_path / "png").mkdir()
    iio.imwrite(tmp_path / "png" / "a_label.jpg", _cell().astype(np.uint8))
    cases = {
        pred: f"none of the 1 predictions in {pred} names a ground-truth image",
        tmp_path / "empty": f"no prediction label images in {tmp_path / 'empty'}",
        tmp_path / "png": "e.g. a_label.jpg: predictions are TIFF or PNG label files",
    }
    for folder, expected in cases.items():
        res = _evaluate(gt, folder, tmp_path / "r")
        assert res.exit_code == 1, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and expected in " ".join(res.output.split()), res.output
        assert not (tmp_path / "r").exists()
    # a labelling tool's PNG labels (as ingest takes them) are scored
    (tmp_path / "labels_png").mkdir()
    iio.imwrite(tmp_path / "labels_png" / "a_label.png", _cell().astype(np.uint8))
    res = _evaluate(gt, tmp_path / "labels_png", tmp_path / "r")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert report["missing"] == ["b"] and report["f1"] == 0.5


def test_a_users_files_in_the_report_folder_are_kept_unless_overwrite(tmp_path):
    """--out holding the user's own metrics.csv: exit 2 naming it, nothing scored or
    written; a re-run over evaluate's own report replaces it; --overwrite replaces theirs."""
    gt, pred = _folders(tmp_path, {"a": _cell()}, {"a": _cell()})
    out = tmp_path / "r"
    assert _evaluate(gt, pred, out, "--per-cell").exit_code == 0
    assert _evaluate(gt, pred, out, "--per-cell").exit_code == 0  # its own files: replaced
    for name in ("metrics.json", "metrics.csv", "cells.csv"):
        (out / name).write_text("my,own\n")
        res = _evaluate(gt, pred, out, "--per-cell")
        assert res.exit_code == 2, res.output
        text = " ".join(res.output.split())
        assert f"{out / name} was not written by cellst evaluate" in text and "--overwrite" in text
        assert (out / name).read_text() == "my,own\n"
        assert _evaluate(gt, pred, out, "--per-cell", "--overwrite").exit_code == 0
        assert (out / name).read_text() != "my,own\n"


def test_segments_cell_table_in_the_report_folder_is_left_alone(tmp_path):
    """`cellst segment --save-csv` writes its per-cell measurements as ``cells.csv``, the
    name of evaluate's ``--per-cell`` table. Scoring into segment's folder without
    --per-cell refused, naming a file evaluate would not write; it now scores and leaves the
    table as it is. With --per-cell the table is still refused (it would be replaced)."""
    from cellst.export.measure import cell_table, write_cell_tables

    gt, pred = _folders(tmp_path, {"a": _cell()}, {"a": _cell()})
    image = np.full((32, 32), 100, np.uint16)
    write_cell_tables({"a": cell_table(_cell().astype(np.int32), image)}, pred)
    table = (pred / "cells.csv").read_text()
    res = _evaluate(gt, pred, pred)
    assert res.exit_code == 0, res.output
    assert (pred / "cells.csv").read_text() == table and (pred / "metrics.json").is_file()
    res = _evaluate(gt, pred, pred, "--per-cell")
    assert res.exit_code == 2 and f"{pred / 'cells.csv'} was not written" in " ".join(
        res.output.split()
    )
    assert (pred / "cells.csv").read_text() == table


def test_a_report_without_cells_removes_an_earlier_reports_cell_table(tmp_path):
    """An earlier ``--per-cell`` report's ``cells.csv`` in the same ``--out`` described
    other data, beside the new ``metrics.json`` it seemed to belong to: it is removed."""
    gt, pred = _folders(tmp_path, {"a": _cell()}, {"a": _cell()})
    out = tmp_path / "report"
    assert _evaluate(gt, pred, out, "--per-cell").exit_code == 0
    assert (out / "cells.csv").is_file()
    res = _evaluate(gt, pred, out)
    assert res.exit_code == 0, res.output
    assert not (out / "cells.csv").exists() and (out / "metrics.json").is_file()


def test_wide_f1_table_is_printed_whole_when_piped():
    import io

    import pandas as pd
    from rich.console import Console

    from cellst.cli import print_whole
    from cellst.stpp.report import format_f1_table

    mods = [f"f1_modality_with_a_long_name_{i}" for i in range(6)]
    df = pd.DataFrame(
        [
            {"model": m, "stage_index": i, "f1": 0.5 + i / 10, **dict.fromkeys(mods, 0.123456)}
            for i, m in enumerate(["supervised", "round1", "round2"])
        ]
    )
    buf = io.StringIO()
    print_whole(format_f1_table(df), out=Console(file=buf, width=120))
    text = buf.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) > 120
    for name in ("supervised (stage 0)", "round1 (stage 1)", "round2 (stage 2)"):
        row = next(line for line in text.splitlines() if name in line)
        assert row.count("0.1235") == len(mods)
    for m in mods:
        assert m[3:] in text  # every column header, unbroken


def test_the_st_pp_table_names_the_iou_threshold_it_was_scored_at():
    """``--set evaluate.iou_threshold=0.7`` scored the ST++ models at 0.7, under a title
    that said IoU 0.5; the threshold is now in the table (and ``report.csv``) and its title."""
    import io

    from rich.console import Console

    from cellst.stpp.report import f1_table, format_f1_table

    reports = {
        label: {"f1": f1, "count": 4, "iou_threshold": 0.7, "per_modality": {}}
        for label, f1 in (("supervised", 0.5), ("round2", 0.6))
    }
    df = f1_table(reports)
    assert df["iou_threshold"].tolist() == [0.7, 0.7]
    buf = io.StringIO()
    Console(file=buf, width=120).print(format_f1_table(df))
    assert "IoU 0.7)" in buf.getvalue() and "IoU 0.5" not in buf.getvalue()


def test_per_cell_match_results(tmp_path):
    """`--per-cell` writes cells.csv: each ground-truth cell with its matched predicted cell
    and IoU, unmatched cells on either side with 0, read back with pandas."""
    import pandas as pd

    gt = np.zeros((40, 40), np.uint16)
    gt[5:15, 5:15] = 3  # matched by pred 7, shifted 2 px: IoU 80 / 120
    gt[20:30, 20:30] = 4  # missed
    pred = np.zeros((40, 40), np.uint16)
    pred[5:15, 7:17] = 7
    pred[25:35, 5:12] = 9  # a false positive
    g, p = _folders(tmp_path, {"a": gt}, {"a": pred})
    res = _evaluate(g, p, tmp_path / "r", "--per-cell")
    assert res.exit_code == 0, res.output
    cells = pd.read_csv(tmp_path / "r" / "cells.csv").sort_values(["gt_label", "pred_label"])
    assert cells[["id", "gt_label", "pred_label", "matched"]].values.tolist() == [
        ["a", 0, 9, False],
        ["a", 3, 7, True],
        ["a", 4, 0, False],
    ]
    assert cells.iou.tolist() == [0.0, 80 / 120, 0.0]
    # the per-image report holds the same counts, and no per-cell rows
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert "cells" not in report and report["images"][0]["tp"] == 1
    assert not (tmp_path / "r2").exists()
    assert _evaluate(g, p, tmp_path / "r2").exit_code == 0
    assert not (tmp_path / "r2" / "cells.csv").exists()  # only on request


def test_a_bad_modalities_csv_beside_the_labels_is_named(tmp_path):
    """Read as ingest reads it: the file and line in one line, no traceback."""
    gt, pred = _folders(tmp_path, {"a": _cell()}, {"a": _cell()})
    (gt / "modalities.csv").write_text("foo,bar\na,b\n")
    res = _evaluate(gt, pred, tmp_path / "r")
    assert res.exit_code == 2, res.output
    assert res.output.strip() == (
        f"error: {gt / 'modalities.csv'}:1: must have the columns name,modality"
    )
    (gt / "modalities.csv").write_bytes(b"name,modality\na,fluo\xffrescence\n")
    res = _evaluate(gt, pred, tmp_path / "r")
    assert res.exit_code == 2, res.output
    assert f"{gt / 'modalities.csv'}:2: not UTF-8 text" in res.output
    (gt / "modalities.csv").write_text("name,modality\na.tif,fluorescence\n")
    res = _evaluate(gt, pred, tmp_path / "r")
    assert res.exit_code == 0, res.output
    assert "fluorescence" in (tmp_path / "r" / "metrics.json").read_text()  # the modality used


def test_a_store_as_prediction_needs_a_pseudo_label_set(store_dir, tmp_path):
    """``--pred STORE`` without ``--pred-set`` scored the store's ground truth against
    itself (F1 1.0); it is refused, naming the flag."""
    res = _evaluate(store_dir, store_dir, tmp_path / "r")
    assert res.exit_code == 1, res.output
    assert res.output.strip().startswith(
        f"error: --pred {store_dir} is a store: name the pseudo-label set to score with --pred-set"
    )
    assert not (tmp_path / "r").exists()


def test_a_pseudo_label_set_left_by_an_interrupted_run_is_named_incomplete(store_dir, tmp_path):
    """A `cellst predict` stopped before its end leaves items but no item table (written
    last). ``cellst info`` lists the set; scoring it said the store had no such set. It is
    named incomplete, with what to do; once finished, it is scored."""
    import shutil

    from cellst.data.pseudo import PseudoLabelSet
    from cellst.data.store import CellStore

    store = tmp_path / "store"
    shutil.copytree(store_dir, store)
    ids = CellStore(store, lease=False).items(split="test", labeled=True)["id"].tolist()[:2]
    s = PseudoLabelSet(store, "cut")
    s.create({})
    for i in ids:
        s.write_item(i, CellStore(store, lease=False).label(i), {"id": i})
    res = _evaluate(store, store, tmp_path / "r", "--pred-set", "cut", "--gt-split", "test")
    assert res.exit_code == 1, res.output
    assert res.output.strip() == (
        f"error: pseudo-label set 'cut' of store {store} is incomplete: the run writing it "
        "stopped after 2 item(s); run the same `cellst predict` again to finish it"
    )
    s.collect_stats()  # what the finished run writes last
    res = _evaluate(store, store, tmp_path / "r", "--pred-set", "cut", "--gt-split", "test")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["f1"] > 0


def test_a_binary_mask_prediction_is_scored_as_it_is_and_warned_about(tmp_path):
    """A semantic mask (every cell 255) matches at most one cell: F1 stays what the metric
    says, and one warning names the file, its regions and how to make it an instance map."""
    gt = np.zeros((64, 64), np.uint16)
    for k, (r, c) in enumerate([(8, 8), (8, 40), (40, 8), (40, 40)], start=1):
        gt[r : r + 12, c : c + 12] = k
    mask = np.where(gt > 0, 255, 0).astype(np.uint8)
    gt_dir, pred = _folders(tmp_path, {"a": gt, "b": gt}, {"a": mask, "b": gt})
    res = _evaluate(gt_dir, pred, tmp_path / "r")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert report["binary"] == {"a": 4}
    per_image = {row["id"]: row["f1"] for row in report["images"]}
    assert per_image["b"] == 1.0 and per_image["a"] < 0.5  # scored as it is: one cell
    warned = [ln for ln in res.output.splitlines() if "binary mask" in ln]
    assert len(warned) == 1, res.output
    assert str(pred / "a_label.tiff") in warned[0] and "4 separate regions" in warned[0]


def test_labels_written_beside_their_images_are_scored_and_the_images_never_are(tmp_path):
    """``cellst segment``'s default output: ``a_label.tiff`` beside the image ``a.tif``. The
    label files are the predictions; an image whose label is absent (``b.tif``) is a
    missing prediction, not a prediction read from its pixels."""
    gt, pred = _folders(tmp_path, {"a": _cell(), "b": _cell()}, {"a": _cell()})
    rng = np.random.default_rng(0)
    for name in ("a", "b"):  # intensity images, integer like labels
        tifffile.imwrite(pred / f"{name}.tif", rng.integers(0, 4000, (32, 32), dtype=np.uint16))
    res = _evaluate(gt, pred, tmp_path / "r")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert report["missing"] == ["b"] and report["f1"] == 0.5


def test_intensity_images_given_as_predictions_are_warned_about(tmp_path):
    """``--pred`` at the image folder by mistake: its TIFFs were scored as label maps of
    thousands of tiny cells, F1 0 and exit 0 without a word. One warning names the first
    such file and how many more; label maps (the ground truth here) are not named."""
    gt_maps = {}
    for name in ("a", "b"):
        gt = np.zeros((64, 64), np.uint16)
        for k, (r, c) in enumerate([(8, 8), (8, 40), (40, 8), (40, 40)], start=1):
            gt[r : r + 12, c : c + 12] = k
        gt_maps[name] = gt
    gt_dir, _ = _folders(tmp_path, gt_maps, {})
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        noisy = rng.normal(500, 60, (64, 64)) + 2000 * (gt_maps[name] > 0)
        tifffile.imwrite(images / f"{name}.tif", noisy.clip(0, 65535).astype(np.uint16))
    res = _evaluate(gt_dir, images, tmp_path / "r")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert f"warning: prediction {images / 'a.tif'} and 1 other(s) looks like an intensity" in (
        text
    ), res.output
    assert "ground truth" not in text.split("looks like")[0].split("warning:")[-1]
    assert text.count("looks like an intensity image") == 1
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert set(report["scattered"]["pred"]) == {"a", "b"} and report["scattered"]["gt"] == {}


def test_a_binary_ground_truth_is_warned_about(tmp_path):
    two = _cell()
    two[24:30, 2:8] = 1  # a second cell with the same value
    gt, pred = _folders(tmp_path, {"a": two}, {"a": two})
    res = _evaluate(gt, pred, tmp_path / "r")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "warning: ground truth 'a' in" in text and "is a binary mask (2 separate" in text
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["binary_gt"] == {"a": 2}


def test_a_ground_truth_folder_in_the_ingest_layout_points_to_its_labels(tmp_path):
    """``--gt`` naming a folder of ``images/`` and ``labels/`` (the layout ingest reads)
    said only "no ground-truth label images"; the one line now names the labels folder."""
    gt, pred = _folders(tmp_path, {"a": _cell()}, {"a": _cell()})
    layout = tmp_path / "data"
    (layout / "images").mkdir(parents=True)
    gt.rename(layout / "labels")
    res = _evaluate(layout, pred, tmp_path / "r")
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    text = " ".join(res.output.split())
    assert f"its labels are in {layout / 'labels'}: pass that folder as --gt" in text, text
    assert _evaluate(layout / "labels", pred, tmp_path / "r").exit_code == 0


def test_a_report_that_cannot_be_written_whole_leaves_the_earlier_one(tmp_path):
    """The report's files replaced an earlier report's one at a time: a disk that filled up
    while the large ``cells.csv`` was written left this report's ``metrics.json`` beside
    the last one's CSVs, with a traceback. Now each file is written whole before any is
    replaced: the earlier report stays as it was, and the error is one line naming the file.
    (The full disk is real: the command runs under a file-size limit, ``RLIMIT_FSIZE``.)"""
    import resource
    import signal
    import subprocess
    import sys

    lab = np.zeros((400, 400), np.uint16)
    for k, (y, x) in enumerate((y, x) for y in range(0, 400, 20) for x in range(0, 400, 20)):
        lab[y + 2 : y + 16, x + 2 : x + 16] = k + 1  # 400 cells: a cells.csv of about 8 KB
    gt, good = _folders(tmp_path, {"img": lab}, {"img": lab})
    worse = tmp_path / "worse"
    worse.mkdir()
    tifffile.imwrite(worse / "img_label.tiff", np.roll(lab, 3, axis=1))
    out = tmp_path / "report"
    assert _evaluate(gt, good, out, "--per-cell").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert json.loads(before["metrics.json"])["f1"] == 1.0 and len(before["cells.csv"]) > 6000

    def small_files() -> None:  # in the child: writes past 6000 bytes fail (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))

    cellst = str(Path(sys.executable).with_name("cellst"))
    args = ["evaluate", "--gt", str(gt), "--pred", str(worse), "--out", str(out), "--per-cell"]
    res = subprocess.run(
        [cellst, *args], capture_output=True, text=True, preexec_fn=small_files, timeout=120
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stderr.strip() == f"error: {out / 'cells.csv'}: File too large", res.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary left
