"""`cellst segment`: image files in, NAME_label.tiff (and exports) out, in-process or on Ray."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import zarr
from PIL import Image
from typer.testing import CliRunner

from cellst.cli import app
from cellst.data.images import is_cellst_label_tiff, normalize_image, read_array
from cellst.experiment import load_config
from cellst.inference.config import SegmentConfig
from cellst.inference.inputs import SegmentError, collect_images
from cellst.inference.predictor import predict_maps
from cellst.inference.segment import filter_instances, segment, use_ray, write_overlay
from cellst.model import ModelConfig, build_model, load_model, save_checkpoint
from cellst.model.checkpoint import save_postprocess
from cellst.postprocess import postprocess_hover

runner = CliRunner()

#: (file name, shape, dtype): png and tif, grey and RGB, 8 and 16 bit, sides not multiples of 32
IMAGES = [
    ("grey.png", (100, 130), np.uint8),
    ("rgb.png", (70, 90, 3), np.uint8),
    ("fluo.tif", (120, 97), np.uint16),
    ("rgb16.tif", (66, 81, 3), np.uint16),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained hovernet-lite: enough to run the whole path."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="hovernet-lite", width=4)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "lite", build_model(cfg), cfg)


class _BlobImages:
    """Bright discs on a dim background and their instance maps, shaped like a store for
    ``quick_train`` (``image(i)`` as uint8 RGB, ``label(i)``)."""

    def __init__(self, n: int, size: int = 128):
        self.pairs = []
        for seed in range(n):
            rng = np.random.default_rng(100 + seed)
            yy, xx = np.mgrid[:size, :size]
            img = rng.random((size, size)) * 0.2
            label = np.zeros((size, size), np.int32)
            for k in range(1, 9):
                cy, cx, r = rng.integers(0, size), rng.integers(0, size), rng.integers(5, 12)
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
                img[disc], label[disc] = 0.9, k
            self.pairs.append((np.repeat((img * 255).astype(np.uint8)[..., None], 3, 2), label))

    def image(self, i: int) -> np.ndarray:
        return self.pairs[i][0]

    def label(self, i: int) -> np.ndarray:
        return self.pairs[i][1]


@pytest.fixture(scope="module")
def finding_checkpoint(quick_train, tmp_path_factory) -> Path:
    """A tiny hovernet-lite trained for a few steps on bright discs: it finds the cells of
    :func:`_blobs` images, so options that change labels can be seen to change them."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="hovernet-lite", width=4)
    data = _BlobImages(6)
    model = quick_train(build_model(cfg), data, list(range(6)), steps=60)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "found", model, cfg)


def _blobs(shape: tuple[int, ...], dtype, seed: int) -> np.ndarray:
    """Bright discs on a dim noisy background (something cell-like to segment)."""
    rng = np.random.default_rng(seed)
    h, w = shape[:2]
    yy, xx = np.mgrid[:h, :w]
    img = rng.random((h, w)) * 0.2
    for _ in range(6):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(5, 12)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 0.9
    top = 255 if dtype == np.uint8 else 4000
    img = (img * top).astype(dtype)
    return np.repeat(img[:, :, None], shape[2], axis=2) if len(shape) == 3 else img


@pytest.fixture()
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (name, shape, dtype) in enumerate(IMAGES):
        arr = _blobs(shape, dtype, i)
        if name.endswith(".png"):
            Image.fromarray(arr).save(folder / name)
        else:
            tifffile.imwrite(folder / name, arr)
    return folder


# ----------------------------------------------------------------------------- pieces
def test_filter_instances_removes_edge_and_small_cells_and_relabels():
    label = np.zeros((12, 12), np.int32)
    label[0:3, 4:7] = 3  # touches the top edge
    label[4:8, 4:8] = 5  # 16 px, inside
    label[9:11, 1:3] = 7  # 4 px, inside
    label[5:7, 10:12] = 9  # touches the right edge
    kept = filter_instances(label, exclude_on_edges=True)
    assert kept.dtype == np.int32
    assert set(np.unique(kept)) == {0, 1, 2}
    assert (kept[4:8, 4:8] == 1).all() and (kept[9:11, 1:3] == 2).all()
    assert kept[0:3, 4:7].max() == 0 and kept[5:7, 10:12].max() == 0
    small_gone = filter_instances(label, exclude_on_edges=True, min_size=5)
    assert set(np.unique(small_gone)) == {0, 1} and (small_gone[4:8, 4:8] == 1).all()
    # no filter: only relabelled 1..N in order
    assert set(np.unique(filter_instances(label))) == {0, 1, 2, 3, 4}


def test_overlay_writes_the_ids_that_fit_inside_their_cells(tmp_path):
    """A big cell gets its id drawn (white text) at its centroid; cells smaller than their
    id's text get only their outline, so that dense images stay readable."""
    label = np.zeros((120, 120), np.int32)
    label[10:70, 10:70] = 1  # big: "1" fits
    for k, (y, x) in enumerate([(90, 10), (90, 40), (90, 70), (90, 100)]):
        label[y : y + 5, x : x + 5] = k + 2  # 5 px: too small for any digit
    image = np.full((120, 120, 3), 100, np.uint8)
    out = write_overlay(tmp_path / "a_overlay.png", image, label)
    rgb = np.asarray(Image.open(out))
    white = (rgb > 200).all(axis=-1)  # the text (anti-aliased); the outlines are yellow
    assert white[30:50, 30:50].any()  # the id of the big cell, near its centroid
    assert not white[80:, :].any()  # no id over the small cells
    outline = (rgb == (255, 255, 0)).all(axis=-1)
    assert outline[90:95, 10:15].any() and outline[90:95, 100:105].any()  # outlined still


def test_collect_images_lists_folders_and_refuses_bad_requests(tmp_path, images):
    (images / "grey_label.tiff").write_bytes(b"")  # outputs of an earlier run are skipped
    (images / "grey_overlay.png").write_bytes(b"")
    (images / "notes.txt").write_text("x")
    # a Cellpose folder: label maps and drawings of the images beside them were segmented
    for made in ("grey_cp_masks.png", "grey_masks.tif", "grey_cp_outlines.png"):
        shutil.copy(images / "grey.png", images / made)
    shutil.copy(images / "grey.png", images / "lone_masks.png")  # no image 'lone': an input
    got = collect_images([images])
    assert [p.name for p in got] == sorted([*(n for n, _, _ in IMAGES), "lone_masks.png"])
    for made in ("grey_cp_masks.png", "grey_masks.tif", "grey_cp_outlines.png", "lone_masks.png"):
        (images / made).unlink()
    with pytest.raises(SegmentError, match="nope"):
        collect_images([tmp_path / "nope"])
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(images / "grey.png", other / "grey.png")
    # beside each image (no --out) the two 'grey' outputs go to two folders: no clash
    both = collect_images([images, other / "grey.png"])
    assert sum(p.name == "grey.png" for p in both) == 2
    with pytest.raises(SegmentError, match="same name 'grey'"):
        collect_images([images, other / "grey.png"], out_dir=tmp_path / "out")
    # names that differ only in Unicode form (NFD from macOS, NFC) are one name twice
    accents = tmp_path / "accents"
    accents.mkdir()
    shutil.copy(images / "grey.png", accents / "caf\u00e9.png")
    shutil.copy(images / "grey.png", accents / "cafe\u0301.tif")
    with pytest.raises(SegmentError, match="would overwrite each other or could not be told"):
        collect_images([accents])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegmentError, match="no image files"):
        collect_images([tmp_path / "empty"])


def test_job_size_picks_ray_for_many_images(images):
    paths = collect_images([images])
    assert not use_ray(paths, SegmentConfig())
    assert use_ray(paths, SegmentConfig(in_process_max_images=3))
    assert use_ray(paths, SegmentConfig(in_process_max_mpx=0.01))


# ----------------------------------------------------------------------------- in-process
@pytest.mark.parametrize("rescale", [[], ["inference.rescale_diameter=1000"]], ids=["", "rescaled"])
def test_segment_equals_predict_and_postprocess_with_ingest_normalisation(
    checkpoint, images, tmp_path, rescale
):
    """Also with cell-size rescaling, where the maps are of 2x copies (every cell this model
    finds is below 1000 px) and the labels still of the image's size."""
    out = tmp_path / "out"
    cfg = load_config(None, ["inference.roi=64", "postprocess.mask_threshold=0.45", *rescale])
    result = segment([images], checkpoint, out_dir=out, infer=cfg.inference, post=cfg.postprocess)
    assert result.mode == "in-process" and not result.failed
    assert sorted(result.written) == sorted(Path(n).stem for n, _, _ in IMAGES)
    model, _, _ = load_model(checkpoint)
    for name, shape, _ in IMAGES:
        label = tifffile.imread(out / f"{Path(name).stem}_label.tiff")
        assert label.shape == shape[:2] and label.dtype == np.uint16
        image = normalize_image(read_array(images / name))  # exactly what ingest stores
        prob, hv = predict_maps(model, image, cfg.inference)
        assert prob.shape == tuple((2 if rescale else 1) * n for n in shape[:2])
        expected = postprocess_hover(prob, hv, cfg.postprocess, shape=shape[:2])
        np.testing.assert_array_equal(label, expected)


def test_cli_segment_folder_with_a_corrupt_image(checkpoint, images, tmp_path):
    bad = images / "broken.png"
    bad.write_bytes(b"not a png at all")
    gone = images / "gone.tif"
    gone.symlink_to(images / "moved-away.tif")  # a dangling link: named, not skipped unseen
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        [
            "segment",
            str(images),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(out),
            "--save-png",
            "--exclude-on-edges",
            "--min-size",
            "20",
            "--set",
            "inference.roi=64",
        ],
    )
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    named = [line for line in res.output.splitlines() if str(bad) in line]
    assert len(named) == 1 and "cannot read image" in named[0]
    assert len([line for line in res.output.splitlines() if str(gone) in line]) == 1
    assert "2 of 6 image(s) could not be segmented" in res.output
    for name, shape, _ in IMAGES:
        stem = Path(name).stem
        label = tifffile.imread(out / f"{stem}_label.tiff")
        assert label.shape == shape[:2]
        border = np.concatenate([label[0], label[-1], label[:, 0], label[:, -1]])
        assert border.max() == 0  # --exclude-on-edges
        sizes = np.bincount(label.ravel())[1:]
        assert (sizes >= 20).all()  # --min-size, labels 1..N without gaps
        overlay = np.asarray(Image.open(out / f"{stem}_overlay.png"))
        assert overlay.shape == (*shape[:2], 3) and overlay.dtype == np.uint8
    assert not (out / "broken_label.tiff").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files


def test_min_size_and_exclude_on_edges_remove_those_cells(finding_checkpoint, images, tmp_path):
    """--min-size and --exclude-on-edges give the labels of :func:`filter_instances` on the
    labels written without them, and remove cells the model found."""
    common = ["segment", str(images), "--checkpoint", str(finding_checkpoint)]
    common += ["--set", "inference.roi=64"]
    res = runner.invoke(app, [*common, "--out", str(tmp_path / "all")])
    assert res.exit_code == 0, res.output
    found = {
        Path(n).stem: tifffile.imread(tmp_path / "all" / f"{Path(n).stem}_label.tiff")
        for n, _, _ in IMAGES
    }
    sizes = np.concatenate([np.bincount(lab.ravel())[1:] for lab in found.values()])
    min_size = int(np.median(sizes))  # some found cells are smaller, some are not
    out = tmp_path / "filtered"
    res = runner.invoke(
        app, [*common, "--out", str(out), "--min-size", str(min_size), "--exclude-on-edges"]
    )
    assert res.exit_code == 0, res.output
    removed = 0
    for name, label in found.items():
        filtered = tifffile.imread(out / f"{name}_label.tiff")
        np.testing.assert_array_equal(filtered, filter_instances(label, True, min_size))
        removed += int(label.max()) - int(filtered.max())
    assert removed > 0 and sizes.size > removed


def test_images_where_nothing_is_found_are_named_and_a_blank_one_is_called_blank(
    finding_checkpoint, images, tmp_path
):
    """An empty label file is written for an image with no cell, and the run says which
    images had none, calling a one-valued image blank; images with cells are not named."""
    Image.fromarray(np.zeros((90, 110), np.uint8)).save(images / "blank.png")
    out = tmp_path / "out"
    res = _segment(str(images), "--checkpoint", str(finding_checkpoint), "--out", str(out))
    assert res.exit_code == 0, res.output
    assert tifffile.imread(out / "blank_label.tiff").max() == 0
    notes = [line for line in res.output.splitlines() if "no cells found" in line]
    assert notes == [
        "note: no cells found in 1 image(s): blank (a blank image: every pixel is 0); "
        "their label files are empty"
    ], res.output
    for name, _, _ in IMAGES:  # the trained model finds cells in every other image
        assert tifffile.imread(out / f"{Path(name).stem}_label.tiff").max() > 0


def test_cli_segment_missing_input_is_one_line_exit_2(checkpoint, tmp_path):
    res = runner.invoke(
        app, ["segment", str(tmp_path / "nope.png"), "--checkpoint", str(checkpoint)]
    )
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "nope.png") in lines[0]
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["segment", str(tmp_path), "--checkpoint", str(tmp_path / "ck")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1


def _segment(*args: str):
    return runner.invoke(app, ["segment", *args, "--set", "inference.roi=64"])


def test_cli_segment_never_replaces_files_it_did_not_write(checkpoint, images, tmp_path):
    """A ground truth kept beside its image, another tool's GeoJSON or OME-Zarr at an output
    name: refused before anything runs (all left as they were) unless --overwrite; cellst's
    own outputs are replaced on a re-run."""
    truth = np.zeros((100, 130), np.uint16)
    truth[10:30, 10:30] = 1
    tifffile.imwrite(images / "grey_label.tiff", truth)  # the user's ground truth
    (images / "rgb.geojson").write_text('{"type":"FeatureCollection","features":[]}')
    (images / "fluo.ome.zarr").mkdir()
    (images / "fluo.ome.zarr" / "zarr.json").write_text('{"zarr_format":3}')
    before = {p: p.read_bytes() for p in images.rglob("*") if p.is_file()}
    ck = ["--checkpoint", str(checkpoint)]

    res = _segment(str(images), *ck, "--save-geojson", "--save-ome-zarr")
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert f"{images / 'fluo.ome.zarr'} (and 2 more) exists and was not written by cellst" in line
    assert "--overwrite" in line
    assert {p: p.read_bytes() for p in images.rglob("*") if p.is_file()} == before

    # without the exports only the ground truth is in the way; --out elsewhere is fine
    res = _segment(str(images), *ck)
    assert res.exit_code == 2 and str(images / "grey_label.tiff") in res.output
    out = tmp_path / "out"
    args = [str(images), *ck, "--out", str(out), "--save-geojson", "--save-ome-zarr"]
    assert _segment(*args).exit_code == 0
    assert _segment(*args).exit_code == 0  # a re-run replaces cellst's own outputs
    assert {p: p.read_bytes() for p in images.rglob("*") if p.is_file()} == before

    res = _segment(str(images), *ck, "--overwrite")
    assert res.exit_code == 0, res.output
    assert tifffile.imread(images / "grey_label.tiff").shape == truth.shape
    assert not np.array_equal(tifffile.imread(images / "grey_label.tiff"), truth)


def test_cli_segment_never_replaces_a_users_overlay_or_tables(checkpoint, images, tmp_path):
    """The user's own ``NAME_overlay.png``, ``NAME_cells.csv`` / ``.parquet`` and the
    folder's ``cells.csv`` / ``.parquet`` at this run's output names: refused unless
    --overwrite (they were replaced silently); cellst's own are replaced on a re-run."""
    out = tmp_path / "out"
    out.mkdir()
    mine = {
        out / "grey_overlay.png": b"mine",
        out / "rgb_cells.csv": b"my,own\n1,2\n",
        out / "fluo_cells.parquet": b"mine",
        out / "cells.csv": b"my,precious,data\n",
        out / "cells.parquet": b"mine",
    }
    ck = ["--checkpoint", str(checkpoint), "--out", str(out)]
    for path, data in mine.items():
        path.write_bytes(data)
        asked = "--save-png" if path.suffix == ".png" else "--save-csv"
        res = _segment(str(images), *ck, asked)
        assert res.exit_code == 2, (path.name, res.output)
        assert f"{path} exists and was not written by cellst" in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
        assert path.read_bytes() == data and not (out / "grey_label.tiff").exists()
        path.unlink()
    both = [*ck, "--save-png", "--save-csv"]
    assert _segment(str(images), *both).exit_code == 0
    res = _segment(str(images), *both)  # its own outputs: replaced
    assert res.exit_code == 0, res.output
    (out / "cells.csv").write_bytes(mine[out / "cells.csv"])
    assert _segment(str(images), *both, "--overwrite").exit_code == 0
    assert (out / "cells.csv").read_text().startswith("image_id,label,")


def test_cli_segment_refuses_an_output_folder_it_cannot_write(checkpoint, images, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out in (afile, afile / "sub"):
        res = _segment(str(images), "--checkpoint", str(checkpoint), "--out", str(out))
        assert res.exit_code == 2, res.output
        assert (
            res.output.strip()
            == f"error: cannot write the outputs: {afile} is a file, not a folder"
        )
    assert afile.read_text() == "mine"
    # a folder where the run table goes: refused before anything runs, in one line naming it
    out = tmp_path / "out"
    (out / "cells.csv").mkdir(parents=True)
    res = _segment(
        str(images / "grey.png"), "--checkpoint", str(checkpoint), "--out", str(out), "--save-csv"
    )
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert f"{out / 'cells.csv'} exists and was not written by cellst" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["cells.csv"]


def test_cli_segment_run_table_holds_this_runs_images_only(checkpoint, images, tmp_path):
    import pandas as pd

    out = tmp_path / "out"
    out.mkdir()
    pd.DataFrame({"label": [None], "x": [1.0]}).to_parquet(out / "mine_cells.parquet")
    ck = ["--checkpoint", str(checkpoint), "--out", str(out), "--save-csv"]
    ck += ["--set", "postprocess.mask_threshold=0.2"]
    assert _segment(str(images / "grey.png"), str(images / "rgb.png"), *ck).exit_code == 0
    table = pd.read_csv(out / "cells.csv")
    assert set(table["image_id"]) == {"grey", "rgb"}
    res = _segment(str(images / "rgb.png"), *ck)
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out / "cells.csv")
    assert set(table["image_id"]) == {"rgb"}
    assert len(table) == int(tifffile.imread(out / "rgb_label.tiff").max()) > 0
    assert (out / "grey_cells.csv").is_file()  # the earlier run's own table is kept


def test_cli_segment_names_a_bad_device_or_a_checkpoint_file(checkpoint, images):
    res = _segment(str(images), "--checkpoint", str(checkpoint), "--device", "bogus")
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines()[-1] == (
        "error: --device bogus: not a torch device (e.g. cpu, cuda, cuda:1)"
    )
    res = _segment(str(images), "--checkpoint", str(checkpoint / "model.pt"))
    assert res.exit_code == 2, res.output
    assert res.output.strip() == (
        f"error: checkpoint {checkpoint / 'model.pt'} is a file; a checkpoint is the folder "
        f"holding model.json and the weights; pass its folder {checkpoint}"
    )
    assert not list(images.glob("*_label.tiff"))


def test_stacks_of_planes_are_refused_by_name_not_read_as_channels(checkpoint, images):
    """A z-stack (ImageJ metadata, any number of planes) or a 3-D array with no axis that
    can hold channels is named as such; the 2-D images beside it are still segmented."""
    plane = _blobs((64, 80), np.uint8, 0)
    tifffile.imwrite(
        images / "zstack.tif", np.stack([plane] * 4), imagej=True, metadata={"axes": "ZYX"}
    )
    tifffile.imwrite(images / "planes.tif", np.stack([plane] * 20))  # no axes metadata
    tifffile.imwrite(images / "channels.tif", np.stack([plane] * 3))  # 3 pages: channels
    # a line of pixels: ingest refuses it (ingest.min_side); segment "found no cells" in it
    tifffile.imwrite(images / "line.tif", plane[:1])
    res = _segment(str(images), "--checkpoint", str(checkpoint))
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert f"{images / 'line.tif'}: image is 1 x 80 pixels, smaller than ingest.min_side=8" in (
        " ".join(res.output.split())
    )
    assert not (images / "line_label.tiff").exists()
    assert f"{images / 'zstack.tif'}: a z-stack of 4 planes (axes ZYX" in res.output
    assert f"{images / 'planes.tif'}: a 3-D image of shape (20, 64, 80) has no channel axis" in (
        res.output
    )
    assert "3 of 8 image(s) could not be segmented" in res.output
    assert tifffile.imread(images / "channels_label.tiff").shape == (64, 80)
    assert not (images / "zstack_label.tiff").exists()
    assert not (images / "planes_label.tiff").exists()


def test_a_tiffs_declared_channel_axis_is_followed_not_guessed(checkpoint, tmp_path):
    """A TIFF whose metadata names its channel axis is read by it: a small channel-first
    image (2 x 12 x 14) was read as 14 channels of 2 x 12, and a 20-channel multiplexed
    image was refused as a z-stack. A short, wide image of many channels saved channels
    last (12 x 40 x 20, axes YXC) was read as 12 channels of 40 x 20: once its axis was
    moved last, the shape looked channels-first. An image with no such metadata is still
    guessed, and read channels last too."""
    from cellst.data.images import declared_shape, normalize_image, read_array

    folder = tmp_path / "in"
    folder.mkdir()
    small = _blobs((2, 12, 14), np.uint16, 1)
    tifffile.imwrite(folder / "small.tif", small, metadata={"axes": "CYX"})
    many = np.stack([_blobs((64, 80), np.uint16, i) for i in range(20)])
    tifffile.imwrite(folder / "multiplex.ome.tif", many, ome=True, metadata={"axes": "CYX"})
    wide = np.stack([_blobs((12, 40), np.uint16, i) for i in range(20)], axis=-1)
    tifffile.imwrite(folder / "wide.tif", wide, photometric="minisblack", metadata={"axes": "YXC"})
    tifffile.imwrite(folder / "planes.tif", np.moveaxis(wide[:, :, :3], -1, 0))  # no axes
    np.testing.assert_array_equal(read_array(folder / "small.tif"), np.moveaxis(small, 0, -1))
    assert read_array(folder / "multiplex.ome.tif").shape == (64, 80, 20)
    np.testing.assert_array_equal(read_array(folder / "wide.tif"), wide)
    assert declared_shape(folder / "wide.tif") == (12, 40, 20)
    image = normalize_image(read_array(folder / "wide.tif"), channel_axis=-1)
    assert image.shape == (12, 40, 3)
    np.testing.assert_array_equal(read_array(folder / "planes.tif"), wide[:, :, :3])
    assert declared_shape(folder / "planes.tif") == (12, 40, 3)
    res = _segment(str(folder), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    assert tifffile.imread(tmp_path / "o" / "small_label.tiff").shape == (12, 14)
    assert tifffile.imread(tmp_path / "o" / "multiplex_label.tiff").shape == (64, 80)
    assert tifffile.imread(tmp_path / "o" / "wide_label.tiff").shape == (12, 40)
    assert tifffile.imread(tmp_path / "o" / "planes_label.tiff").shape == (12, 40)


def test_cli_options_and_set_win_over_calibrated_postprocessing(
    finding_checkpoint, images, tmp_path
):
    ckpt = tmp_path / "calibrated"
    shutil.copytree(finding_checkpoint, ckpt)
    save_postprocess(
        ckpt,
        {"mask_threshold": 0.6, "marker_threshold": 0.3, "sobel_kernel": 11},
        {"n_items": 4, "val_f1_before": 0.1, "val_f1_after": 0.2},
    )
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        [
            "segment",
            str(images / "rgb16.tif"),
            "--checkpoint",
            str(ckpt),
            "--out",
            str(out),
            "--mask-threshold",
            "0.35",
            "--set",
            "postprocess.sobel_kernel=15",
            "--set",
            "inference.roi=64",
        ],
    )
    assert res.exit_code == 0, res.output
    note = " ".join(res.output.split())
    assert "calibrated on 4 validation items" in note
    assert "marker_threshold=0.3" in note  # calibrated value applied
    assert "kept: mask_threshold=0.35, sobel_kernel=15" in note  # explicit ones win
    # the labels are those of exactly these settings
    post = load_config(
        None,
        ["postprocess.mask_threshold=0.35", "postprocess.sobel_kernel=15"],
    ).postprocess.model_copy(update={"marker_threshold": 0.3})
    model, _, _ = load_model(ckpt)
    prob, hv = predict_maps(
        model,
        normalize_image(read_array(images / "rgb16.tif")),
        load_config(None, ["inference.roi=64"]).inference,
    )
    written = tifffile.imread(out / "rgb16_label.tiff")
    np.testing.assert_array_equal(written, postprocess_hover(prob, hv, post))
    # ... and not those of the calibrated settings alone (the model finds cells in both)
    calibrated = post.model_copy(update={"mask_threshold": 0.6, "sobel_kernel": 11})
    assert written.max() > 0 and postprocess_hover(prob, hv, calibrated).max() > 0
    assert not np.array_equal(written, postprocess_hover(prob, hv, calibrated))
    # a bad option value names its field
    res = runner.invoke(
        app,
        ["segment", str(images), "--checkpoint", str(ckpt), "--sobel-kernel", "4"],
    )
    assert res.exit_code == 2 and "postprocess.sobel_kernel" in res.output


def test_cli_rescale_diameter_option(checkpoint, images, tmp_path):
    """``--rescale-diameter`` is ``inference.rescale_diameter``: the labels are those of the
    rescaled maps, at the image's size."""
    out = tmp_path / "out"
    args = ["segment", str(images / "grey.png"), "--checkpoint", str(checkpoint)]
    res = runner.invoke(
        app, [*args, "--out", str(out), "--rescale-diameter", "1000", "--set", "inference.roi=64"]
    )
    assert res.exit_code == 0, res.output
    infer = load_config(None, ["inference.roi=64", "inference.rescale_diameter=1000"]).inference
    model, _, _ = load_model(checkpoint)
    image = normalize_image(read_array(images / "grey.png"))
    prob, hv = predict_maps(model, image, infer)
    assert prob.shape == (200, 260)  # this model's cells are all below 1000 px: 2x
    label = tifffile.imread(out / "grey_label.tiff")
    assert label.shape == (100, 130)
    np.testing.assert_array_equal(label, postprocess_hover(prob, hv, shape=label.shape))
    res = runner.invoke(app, [*args, "--rescale-diameter", "0"])
    assert res.exit_code == 2


def test_segment_uses_the_inference_settings_the_checkpoint_was_calibrated_with(
    checkpoint, images, tmp_path
):
    """A checkpoint calibrated with cell-size rescaling (the demo recipe) is segmented with
    it by default, and the line about the settings says so; an explicit setting wins."""
    ckpt = tmp_path / "calibrated"
    shutil.copytree(checkpoint, ckpt)
    save_postprocess(
        ckpt, {"mask_threshold": 0.5}, {"inference": {"rescale_diameter": 1000.0, "roi": 64}}
    )
    args = ["segment", str(images / "grey.png"), "--checkpoint", str(ckpt)]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "calibration settings, rescale_diameter=1000.0, roi=64" in " ".join(res.output.split())
    infer = load_config(None, ["inference.roi=64", "inference.rescale_diameter=1000"]).inference
    model, _, _ = load_model(ckpt)
    prob, hv = predict_maps(model, normalize_image(read_array(images / "grey.png")), infer)
    label = tifffile.imread(tmp_path / "a" / "grey_label.tiff")
    np.testing.assert_array_equal(label, postprocess_hover(prob, hv, shape=label.shape))
    res = runner.invoke(
        app, [*args, "--out", str(tmp_path / "b"), "--set", "inference.rescale_diameter=null"]
    )
    assert res.exit_code == 0, res.output
    assert "rescale_diameter 1000.0 there, none (the default) here" in " ".join(res.output.split())
    prob, hv = predict_maps(
        model,
        normalize_image(read_array(images / "grey.png")),
        infer.model_copy(update={"rescale_diameter": None}),
    )
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "b" / "grey_label.tiff"), postprocess_hover(prob, hv)
    )


def test_cli_segment_exports(checkpoint, images, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        [
            "segment",
            str(images / "rgb.png"),
            str(images / "fluo.tif"),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(out),
            "--save-csv",
            "--save-geojson",
            "--save-ome-zarr",
            "--set",
            "inference.roi=64",
            "--set",
            "postprocess.mask_threshold=0.2",
        ],
    )
    assert res.exit_code == 0, res.output
    import pandas as pd

    from cellst.export.omezarr import read_ome_zarr

    for stem in ("rgb", "fluo"):
        label = tifffile.imread(out / f"{stem}_label.tiff")
        table = pd.read_csv(out / f"{stem}_cells.csv")
        assert len(table) == int(label.max())
        doc = json.loads((out / f"{stem}.geojson").read_text())
        assert doc["type"] == "FeatureCollection" and len(doc["features"]) == int(label.max())
        image, labels = read_ome_zarr(out / f"{stem}.ome.zarr")
        assert image.shape[:2] == label.shape
        np.testing.assert_array_equal(labels["segmentation"], label)
    both = pd.read_csv(out / "cells.csv")
    assert len(both) == sum(int(tifffile.imread(p).max()) for p in out.glob("*_label.tiff"))


def test_an_export_failing_leaves_the_images_earlier_outputs_whole(
    checkpoint, images, tmp_path, monkeypatch
):
    """A re-run whose OME-Zarr export fails for one image (the disk is full): that image is
    reported failed and keeps its earlier label, table and GeoJSON byte for byte, where a
    new label used to be left beside the old exports; the other image is replaced whole,
    and no staging folder is left behind."""
    import errno

    import cellst.export.omezarr as omezarr

    out = tmp_path / "out"
    args = ["segment", str(images / "rgb.png"), str(images / "fluo.tif"), "--checkpoint",
            str(checkpoint), "--out", str(out), "--save-csv", "--save-geojson",
            "--save-ome-zarr", "--set", "inference.roi=64"]  # fmt: skip
    first = runner.invoke(app, [*args, "--set", "postprocess.mask_threshold=0.2"])
    assert first.exit_code == 0, first.output
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and "fluo" in p.name}
    assert {"fluo_label.tiff", "fluo_cells.csv", "fluo.geojson"} <= set(kept)
    rgb_before = (out / "rgb_label.tiff").read_bytes()
    real = omezarr.write_ome_zarr

    def full_disk(path, *a, **k):
        if "fluo" in Path(path).name:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(omezarr, "write_ome_zarr", full_disk)
    again = runner.invoke(app, [*args, "--set", "postprocess.mask_threshold=0.6"])
    assert again.exit_code == 1 and "fluo.tif" in again.output, again.output
    for name, data in kept.items():
        assert (out / name).read_bytes() == data, name
    assert (out / "rgb_label.tiff").read_bytes() != rgb_before  # the other image: replaced
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- Ray
def test_segment_on_ray_writes_the_same_labels(ray_session, checkpoint, images, tmp_path):
    from cellst.fs import lock_beside, writer_record

    bad = images / "broken.tif"
    bad.write_bytes(b"II*\x00garbage")
    tifffile.imwrite(images / "blank.tif", np.full((40, 50), 7, np.uint16))
    # normalised with other percentiles than ingest's defaults: both paths read them
    cfg = load_config(None, ["inference.roi=64", "ingest.high_percentile=60"])
    seg = cfg.segment.model_copy(update={"exclude_on_edges": True})
    ray_out, local_out = tmp_path / "ray", tmp_path / "local"
    kw = {"infer": cfg.inference, "segment_cfg": seg, "ingest": cfg.ingest}
    # the staging folder of a segment run killed earlier (its process gone) is removed
    gone = subprocess.Popen(["true"])
    gone.wait()
    killed = ray_out / f".cellst-segment-{socket.gethostname()}-{gone.pid}-abc123"
    killed.mkdir(parents=True)
    for beside in (lock_beside(killed), writer_record(killed)):  # of its predict
        beside.write_text("")
    on_ray = segment([images], checkpoint, out_dir=ray_out, ray=True, **kw)
    assert on_ray.mode == "ray"
    assert [p for p, _ in on_ray.failed] == [str(bad)]
    assert str(bad) in on_ray.failed[0][1]
    local = segment([images], checkpoint, out_dir=local_out, ray=False, **kw)
    assert (
        sorted(on_ray.written)
        == sorted(local.written)
        == sorted([*(Path(n).stem for n, _, _ in IMAGES), "blank"])
    )
    # both paths name the images where nothing was found, the blank one as blank
    assert sorted(on_ray.empty) == sorted(local.empty)
    assert ("blank", "a blank image: every pixel is 7") in local.empty
    for stem in local.written:
        np.testing.assert_array_equal(
            tifffile.imread(ray_out / f"{stem}_label.tiff"),
            tifffile.imread(local_out / f"{stem}_label.tiff"),
        )
    assert not [p for p in ray_out.iterdir() if p.name.startswith(".")]  # staging removed
    assert not killed.exists()
    # ... and the setting mattered: with the default percentiles some label differs
    default_out = tmp_path / "default"
    kw["ingest"] = load_config(None, []).ingest
    segment([images], checkpoint, out_dir=default_out, ray=False, **kw)
    assert any(
        not np.array_equal(
            tifffile.imread(default_out / f"{stem}_label.tiff"),
            tifffile.imread(local_out / f"{stem}_label.tiff"),
        )
        for stem in local.written
    )


def test_a_rerun_with_new_labels_removes_its_own_outputs_that_no_longer_match(
    checkpoint, images, tmp_path
):
    """Outputs of an earlier run (overlay, tables, GeoJSON, OME-Zarr) describe its labels.
    A re-run that writes other labels and no exports removes them, and rebuilds the run
    table without their images; an image whose labels are unchanged keeps its outputs; an
    OME-Zarr group a user added a label image to is kept, with a warning."""
    from ome_zarr.writer import write_labels

    from cellst.data.images import write_label_tiff

    out = tmp_path / "out"
    ck = ["--checkpoint", str(checkpoint), "--out", str(out)]
    exports = ["--save-png", "--save-csv", "--save-geojson", "--save-ome-zarr"]
    assert _segment(str(images), *ck, *exports).exit_code == 0
    names = [Path(n).stem for n, _, _ in IMAGES]
    derived = ["{}_overlay.png", "{}_cells.csv", "{}_cells.parquet", "{}.geojson", "{}.ome.zarr"]
    assert all((out / d.format(n)).exists() for n in names for d in derived)
    # an earlier run that found other cells in every image but rgb
    for n in names:
        if n != "rgb":
            other = np.zeros(tifffile.imread(out / f"{n}_label.tiff").shape, np.int32)
            other[1:6, 1:6] = 1
            write_label_tiff(out / f"{n}_label.tiff", other)
    mine = np.zeros((1, 100, 130), np.uint16)
    mine[0, :9, :9] = 3
    write_labels(mine, zarr.open_group(out / "grey.ome.zarr", mode="a"), name="mine", axes="cyx")

    res = _segment(str(images), *ck)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "outputs of an earlier run that no longer matched the new labels" in text
    assert f"warning: {out / 'grey.ome.zarr'} is from an earlier run" in text
    for n in names:
        left = {d.format(n) for d in derived if (out / d.format(n)).exists()}
        want = {d.format(n) for d in derived} if n == "rgb" else set()
        assert left == want | ({"grey.ome.zarr"} if n == "grey" else set()), n
    run_table = pd.read_csv(out / "cells.csv")
    assert set(run_table["image_id"]) <= {"rgb"}
    # --save-ome-zarr refreshes that group and keeps the user's label image in it, and the
    # attributes they set on it: NGFF channel settings (made in napari, say) and their own
    group = zarr.open_group(out / "grey.ome.zarr", mode="a")
    omero = {"channels": [{"label": "DAPI", "color": "0000FF", "window": {"start": 0, "end": 90}}]}
    group.attrs.update({"ome": {**group.attrs["ome"], "omero": omero}, "my_notes": "plate 3"})
    assert _segment(str(images), *ck, "--save-ome-zarr").exit_code == 0
    from cellst.export.omezarr import read_ome_zarr

    _, labels = read_ome_zarr(out / "grey.ome.zarr")
    assert set(labels) == {"segmentation", "mine"}
    attrs = zarr.open_group(out / "grey.ome.zarr", mode="r").attrs.asdict()
    assert attrs["ome"]["omero"] == omero and attrs["my_notes"] == "plate 3"
    assert attrs["ome"]["multiscales"] and attrs["cellst"]["command"] == "segment"  # cellst's
    np.testing.assert_array_equal(labels["segmentation"], tifffile.imread(out / "grey_label.tiff"))
    np.testing.assert_array_equal(labels["mine"], mine[0])


def test_the_ome_zarr_keeps_the_pixel_size_an_imagej_or_ome_tiff_declares(checkpoint, tmp_path):
    from cellst.data.images import pixel_size

    folder = tmp_path / "in"
    folder.mkdir()
    arr = _blobs((96, 96), np.uint16, 3)
    tifffile.imwrite(folder / "ij.tif", arr, imagej=True, resolution=(1 / 0.325, 1 / 0.325),
                     metadata={"unit": "micron"})  # fmt: skip
    tifffile.imwrite(folder / "ome.ome.tif", arr, ome=True,
                     metadata={"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})  # fmt: skip
    tifffile.imwrite(folder / "plain.tif", arr)
    # Fiji writes a micro sign as the escape \\u00B5m in its description: it was dropped
    tifffile.imwrite(folder / "fiji.tif", arr, imagej=True, resolution=(1 / 0.65, 1 / 0.65),
                     metadata={"unit": "\\u00B5m"})  # fmt: skip
    assert pixel_size(folder / "plain.tif") is None
    assert pixel_size(folder / "fiji.tif") == (pytest.approx(0.65), "micrometer")
    out = tmp_path / "out"
    res = _segment(
        str(folder), "--checkpoint", str(checkpoint), "--out", str(out), "--save-ome-zarr"
    )
    assert res.exit_code == 0, res.output
    # an OME-TIFF's outputs are named without its ".ome": ome_label.tiff, ome.ome.zarr
    assert (out / "ome_label.tiff").is_file() and not (out / "ome.ome_label.tiff").exists()
    for name, size, unit in (("ij", 0.325, "micrometer"), ("ome", 0.5, "micrometer"),
                             ("fiji", 0.65, "micrometer"), ("plain", 1.0, None)):  # fmt: skip
        ome = zarr.open_group(out / f"{name}.ome.zarr", mode="r").attrs["ome"]["multiscales"][0]
        assert ome["datasets"][0]["coordinateTransformations"][0]["scale"] == pytest.approx(
            [1.0, size, size]
        )
        assert [a.get("unit") for a in ome["axes"]] == [None, unit, unit]
    # the label TIFFs carry it too, in TIFF's own resolution tags (pixels per centimetre),
    # as Fiji, QuPath (Bio-Formats), Pillow and tifffile read them; the plain TIFF's none
    from PIL import Image

    for name, size in (("ij", 0.325), ("ome", 0.5), ("fiji", 0.65)):
        with tifffile.TiffFile(out / f"{name}_label.tiff") as tf:
            page = tf.pages[0]
            assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER, name
            assert [1e4 / r for r in page.resolution] == pytest.approx([size, size]), name
        with Image.open(out / f"{name}_label.tiff") as im:
            assert [25400 / d for d in im.info["dpi"]] == pytest.approx([size, size])
    with tifffile.TiffFile(out / "plain_label.tiff") as tf:
        assert tf.pages[0].resolutionunit != tifffile.RESUNIT.CENTIMETER
    assert is_cellst_label_tiff(out / "ij_label.tiff")  # still cellst's own file


def test_a_folder_another_run_writes_is_refused_at_once(checkpoint, images, tmp_path):
    """Two runs writing label files into one folder at once (`cellst segment`, `cellst
    predict --out`, other checkpoints) both exited 0, the folder holding two models'
    labels, and each removed the other's files in progress as a dead run's. While a run
    holds the folder, another is refused in one line before anything is written."""
    from cellst.fs import writing_folder

    out = tmp_path / "out"
    with writing_folder(out, "test"):  # the first run
        res = _segment(str(images), "--checkpoint", str(checkpoint), "--out", str(out))
        assert res.exit_code == 1, res.output
        assert "is being written by another cellst segment or predict run" in res.output
        assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1, res.output
        res = runner.invoke(app, ["predict", "--checkpoint", str(checkpoint), "--input",
                                  str(images), "--out", str(out)])  # fmt: skip
        assert res.exit_code == 1 and "is being written by another" in res.output, res.output
        assert not out.exists() or not list(out.iterdir())
        # beside the images (no --out): their folder is the one held
        with writing_folder(images, "test"):
            res = _segment(str(images), "--checkpoint", str(checkpoint))
            assert res.exit_code == 1 and "being written by another" in res.output
        assert not list(images.glob("*_label.tiff"))
    res = _segment(str(images), "--checkpoint", str(checkpoint), "--out", str(out))
    assert res.exit_code == 0, res.output  # released when the first run ends
    assert list(out.glob("*_label.tiff"))


def test_a_device_for_a_job_that_goes_to_ray_is_refused(checkpoint, images, tmp_path):
    """``--device`` is the in-process torch device; a job that went to Ray (``--ray``, or
    one too large for this process) dropped it without a word and ran on CPU actors."""
    res = _segment(str(images), "--checkpoint", str(checkpoint), "--ray", "--device", "cpu",
                   "--out", str(tmp_path / "out"))  # fmt: skip
    assert res.exit_code == 2, res.output  # a request that cannot run, as segment's others
    assert "--device cpu applies to segmenting in this process, but --ray was given" in " ".join(
        res.output.split()
    )
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
