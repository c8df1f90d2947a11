"""Hostile and broken inputs to ingest: each is refused in one line that names the file (or
the CSV line), before any pixel is decoded where possible, and the store stays unchanged."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from cellst.config import IngestConfig
from cellst.data.images import ImageFormatError
from cellst.data.ingest import IngestError, ingest, scan_source
from cellst.data.store import MANIFEST, CellStore, StoreError, store_lock

CELLST = str(Path(sys.executable).with_name("cellst"))
runner = CliRunner()


def _plain(tmp_path: Path, n: int = 2, side: int = 64) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(n):
        iio.imwrite(
            src / f"good{i}.png",
            (np.arange(side * side).reshape(side, side) % 251).astype(np.uint8),
        )
    return src


def _sparse_tiff(path: Path, side: int = 100_000, tile: int = 1024) -> None:
    """A TIFF declaring ``side`` x ``side`` pixels whose tiles are all empty (~1 MB)."""
    per_row = (side + tile - 1) // tile
    n = per_row * per_row

    def tiles():
        yield np.zeros((tile, tile), np.uint8)  # tifffile needs one real tile first
        for _ in range(n - 1):
            yield None  # a sparse tile: offset and byte count 0

    with tifffile.TiffWriter(path, bigtiff=True) as w:
        w.write(tiles(), shape=(side, side), dtype=np.uint8, tile=(tile, tile))


def test_huge_declared_image_is_refused_before_decoding(ray_session, tmp_path):
    src = _plain(tmp_path)
    huge = src / "huge.tif"
    _sparse_tiff(huge)
    assert huge.stat().st_size < 5_000_000  # small on disk, 10^10 pixels declared
    with pytest.raises(IngestError) as exc:
        ingest(src, tmp_path / "store", progress=False)
    msg = str(exc.value)
    assert f"{huge}: image declares 100000 x 100000 = 10,000,000,000 pixels" in msg
    assert "ingest.max_pixels=100,000,000" in msg and "MemoryError" not in msg
    assert not (tmp_path / "store").exists()
    result = ingest(src, tmp_path / "store", skip_bad=True, progress=False)
    assert sorted(result.added) == ["good0", "good1"] and result.skipped[0][0] == str(huge)
    # the limit is a setting: a 64 x 64 image is over a limit of 1000 pixels
    with pytest.raises(IngestError, match="good0.png: image declares 64 x 64"):
        ingest(src, tmp_path / "store2", IngestConfig(max_pixels=1000), progress=False)


def test_empty_and_non_image_files_are_named(ray_session, tmp_path):
    src = _plain(tmp_path)
    (src / "empty.png").write_bytes(b"")
    (src / "text.png").write_bytes(b"hello, I am not a picture\n")
    with pytest.raises(IngestError) as exc:
        ingest(src, tmp_path / "store", progress=False)
    msg = str(exc.value)
    assert f"{src / 'empty.png'}: cannot read image: the file is empty (0 bytes)" in msg
    assert f"{src / 'text.png'}: cannot read image: the file is not an image" in msg
    assert "pip install" not in msg and "backend" not in msg
    # a dangling link of an image name is named too (before: left out unseen, exit 0)
    (src / "empty.png").unlink()
    (src / "text.png").unlink()
    (src / "moved.tif").symlink_to(tmp_path / "gone.tif")
    with pytest.raises(IngestError, match="nothing was written") as exc:
        ingest(src, tmp_path / "store", progress=False)
    assert f"{src / 'moved.tif'}: a link to a missing file ({tmp_path / 'gone.tif'})" in str(
        exc.value
    )
    assert not (tmp_path / "store").exists()


def test_images_of_unusable_shape_or_type_are_named(ray_session, tmp_path):
    """Decoded fine but not a micrograph cellst can use: each problem names its file
    (before, "image: expected a 2-D or 3-D image", "unsupported image dtype bool: " and
    "TypeError: a must be an array of real numbers" named no file, or not this one)."""
    from PIL import Image

    src = _plain(tmp_path)
    tifffile.imwrite(src / "hyper.tif", np.zeros((2, 3, 64, 64), np.uint8))
    Image.fromarray(np.eye(64, dtype=bool)).save(src / "mask.png")  # 1-bit
    tifffile.imwrite(src / "complex.tif", np.ones((64, 64), np.complex64))
    tifffile.imwrite(src / "masked.tif", np.full((64, 64), np.nan, np.float32))
    iio.imwrite(src / "black.png", np.zeros((64, 64), np.uint8))
    tifffile.imwrite(src / "flat.tif", np.full((64, 64), -3, np.int16))  # no contrast
    saturated = np.zeros((64, 64), np.float32)
    saturated[20:30, 20:30] = np.inf  # +inf is the brightest, never black
    tifffile.imwrite(src / "saturated.tif", saturated)
    with pytest.raises(IngestError) as exc:
        ingest(src, tmp_path / "store", progress=False)
    msg = str(exc.value)
    for blank in ("masked.tif", "black.png", "flat.tif"):  # stored as black before, silently
        assert f"{src / blank}: the image holds no signal: it normalises to all black" in msg
    assert "saturated.tif" not in msg
    assert f"{src / 'hyper.tif'}: expected a 2-D or 3-D image, got shape (2, 3, 64, 64)" in msg
    assert f"{src / 'mask.png'}: a 1-bit (binary) image is a mask" in msg
    assert f"{src / 'complex.tif'}: unsupported image dtype complex64" in msg
    assert "\n  image:" not in msg and "TypeError" not in msg


def test_tiny_images_are_refused_unless_skipped(ray_session, tmp_path):
    src = _plain(tmp_path)
    iio.imwrite(src / "dot.png", np.full((1, 1), 7, np.uint8))
    with pytest.raises(IngestError) as exc:
        ingest(src, tmp_path / "store", progress=False)
    assert f"{src / 'dot.png'}: image is 1 x 1 pixels, smaller than ingest.min_side=8" in str(
        exc.value
    )
    result = ingest(src, tmp_path / "store", skip_bad=True, progress=False)
    assert sorted(result.added) == ["good0", "good1"] and "dot" not in CellStore(tmp_path / "store")
    result = ingest(src, tmp_path / "store", IngestConfig(min_side=1), progress=False)
    assert result.added == ["dot"]


def test_modalities_csv_errors_name_the_file_and_line(tmp_path):
    src = _plain(tmp_path)
    table = src / "modalities.csv"
    table.write_text("name,modality\ngood0.png,fluorescence\ngood1.png\n")
    _, problems = scan_source(src)
    assert problems == [(f"{table}:3", "row has a missing field (expected name,modality)")]
    table.write_bytes(
        b"name,modality\ngood0.png,fluorescence\ngood1.png,phase\n" + b"\xff\xfe,dic\n"
    )
    _, problems = scan_source(src)
    assert problems == [(f"{table}:4", "not UTF-8 text (byte 0xff); save it as UTF-8")]
    with pytest.raises(IngestError, match=r"modalities.csv:4: not UTF-8 text"):
        ingest(src, tmp_path / "store", progress=False)  # refused before Ray is needed
    # one image given two modalities (the last row used to win, silently)
    table.write_text("name,modality\ngood0.png,fluorescence\ngood1.png,dic\ngood0,phase\n")
    _, problems = scan_source(src)
    assert problems == [(f"{table}:4", "'good0' is given twice, as 'fluorescence' and 'phase'")]
    table.write_text(
        "name,modality\ngood0.png,fluorescence\ngood1.png,phase_contrast\ngood0.png,fluorescence\n"
    )
    items, problems = scan_source(src)  # the same row twice is no conflict
    assert not problems and [i.modality for i in items] == ["fluorescence", "phase_contrast"]


def test_missing_source_is_refused_before_ray_starts(tmp_path, monkeypatch):
    import cellst.raycluster

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a source that does not exist")

    monkeypatch.setattr(cellst.raycluster, "ensure_ray", no_ray)
    res = runner.invoke(
        __import__("cellst.cli", fromlist=["app"]).app,
        ["ingest", str(tmp_path / "nope"), "--out", str(tmp_path / "store")],
    )
    assert res.exit_code == 1, res.output
    out = res.output.replace("\n", "")
    assert f"{tmp_path / 'nope'}: source folder does not exist" in out
    assert "--skip-bad" not in out and "Traceback" not in out
    assert not (tmp_path / "store").exists()


def test_a_folder_of_the_users_files_never_becomes_a_store(tmp_path, monkeypatch):
    """``--out`` naming the source folder (its ``labels/`` are the ground truth) or the
    folder above it: refused before Ray starts, every file kept. A store would manage
    ``images/`` and ``labels/`` and garbage-collect what its manifest does not name."""
    import cellst.raycluster

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for an --out that cannot be a store")

    monkeypatch.setattr(cellst.raycluster, "ensure_ray", no_ray)
    data = _plain(tmp_path)
    (data / "labels").mkdir()
    tifffile.imwrite(data / "labels" / "good0_label.tiff", np.ones((64, 64), np.uint16))
    (tmp_path / "proj" / "images").mkdir(parents=True)
    iio.imwrite(tmp_path / "proj" / "images" / "a.png", np.zeros((64, 64), np.uint8))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    app = __import__("cellst.cli", fromlist=["app"]).app
    for src, out in ((data, data), (tmp_path / "proj" / "images", tmp_path / "proj")):
        res = runner.invoke(app, ["ingest", str(src), "--out", str(out)])
        assert res.exit_code == 1, res.output
        text = res.output.replace("\n", "")
        assert f"{out}: is not a cellst store and is not empty" in text, text
        assert "Traceback" not in text and "--skip-bad" not in text
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    with pytest.raises(IngestError, match="is not a cellst store"):  # the library refuses too
        ingest(data, data)
    from cellst.data.ingest import check_target

    fresh = tmp_path / "fresh-volume"
    (fresh / "lost+found").mkdir(parents=True)
    (fresh / ".DS_Store").write_bytes(b"")
    check_target(fresh)  # hidden files and a volume's lost+found are no one's data


def test_garbage_collection_removes_only_the_stores_own_arrays(store_dir, tmp_path):
    from cellst.data.store import collect_garbage

    store = tmp_path / "store"
    shutil.copytree(store_dir, store)
    (store / "labels" / "mine_label.tiff").write_bytes(b"a user's file")
    (store / "images" / "notes").mkdir()
    orphan = store / "images" / "orphan-0123456789ab"
    orphan.mkdir()
    (orphan / "zarr.json").write_text("{}")
    report = collect_garbage(store)
    assert report["removed"] == ["images/orphan-0123456789ab"]
    assert (store / "labels" / "mine_label.tiff").read_bytes() == b"a user's file"
    assert (store / "images" / "notes").is_dir() and not orphan.exists()
    CellStore(store, lease=False).image(CellStore(store, lease=False).ids()[0])


def test_lock_messages_name_what_is_locked(tmp_path):
    store = tmp_path / "store"
    with store_lock(tmp_path / ".store.lock"):
        with pytest.raises(
            StoreError, match=f"is held: another process is writing the store {store}$"
        ):
            with store_lock(tmp_path / ".store.lock"):
                pass
    run = tmp_path / "runs" / "stpp-a"
    with store_lock(run / ".lock"):
        with pytest.raises(StoreError, match=f"another process is writing the folder {run}$"):
            with store_lock(run / ".lock"):
                pass
        with pytest.raises(StoreError, match=f"another process is writing the run folder {run}$"):
            with store_lock(run / ".lock", what=f"the run folder {run}"):
                pass


def test_a_folder_reached_through_a_link_is_guarded_by_its_own_lock(ray_session, tmp_path):
    """The lock beside a store or run folder was found from the path as given, so a second
    writer reaching the same folder through a symbolic link took another lock and wrote
    at the same time; both paths now lead to one lock."""
    from cellst.fs import lock_beside
    from cellst.train.trainer import run_folder_lock

    src, store = _plain(tmp_path), tmp_path / "data" / "store"
    ingest(src, store, progress=False)
    (tmp_path / "alias").symlink_to(store, target_is_directory=True)
    assert lock_beside(tmp_path / "alias") == lock_beside(store)
    with store_lock(lock_beside(store)):
        with pytest.raises(StoreError, match=f"another process is writing the store {store}$"):
            ingest(src, tmp_path / "alias", progress=False)
    (tmp_path / "data" / "run").mkdir()
    (tmp_path / "run-alias").symlink_to(tmp_path / "data" / "run", target_is_directory=True)
    with run_folder_lock(tmp_path / "data" / "run"):
        with pytest.raises(StoreError, match="is being trained by another process"):
            with run_folder_lock(tmp_path / "run-alias"):
                pass


def test_a_writer_waits_out_a_status_probe_and_is_still_refused_by_a_writer(tmp_path):
    """``cellst stpp status`` probes the run folder's lock by taking it for an instant
    (``fs.is_locked``); a run starting at that instant used to be refused as if another run
    wrote the folder. A writer now retries for ``LOCK_PROBE_GRACE_S``; a holder that stays
    longer (a real writer) still refuses it."""
    import threading

    from cellst.data.store import LOCK_PROBE_GRACE_S
    from cellst.fs import file_lock, is_locked

    lock = tmp_path / "runs" / "stpp-a" / ".lock"
    held = threading.Event()

    def hold(seconds: float) -> None:
        with file_lock(lock, wait=False):
            held.set()
            time.sleep(seconds)

    for seconds, refused in ((0.2, False), (LOCK_PROBE_GRACE_S + 1.5, True)):
        held.clear()
        holder = threading.Thread(target=hold, args=(seconds,))
        holder.start()
        held.wait(10)
        assert is_locked(lock)
        if refused:
            with pytest.raises(StoreError, match="is held"), store_lock(lock):
                pass
        else:
            with store_lock(lock):
                assert not holder.is_alive()  # it got the lock once the probe let go
        holder.join()


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".readers" not in p.parts
    }


def test_an_ingest_removes_its_own_stale_staging_and_no_other_stores(ray_session, tmp_path):
    """A store named ``s[1]`` took ``s1``'s staging folder (``.s1.staging-*``, a pattern
    match) for a stale one of its own and removed it while the ``s1`` ingest ran: that
    ingest then committed a manifest naming 32 arrays that no longer existed."""
    src = _plain(tmp_path)
    others = [tmp_path / ".s1.0123abcd.staging", tmp_path / ".s1.staging-0123abcd"]
    own = [tmp_path / ".s[1].89abcdef.staging", tmp_path / ".s[1].staging-89abcdef"]
    for folder in [*others, *own]:
        (folder / "images").mkdir(parents=True)
    ingest(src, tmp_path / "s[1]", progress=False)
    assert all(p.is_dir() for p in others) and not any(p.exists() for p in own)
    assert CellStore(tmp_path / "s[1]").ids() == ["good0", "good1"]


def test_a_task_whose_process_dies_is_reported_not_a_traceback(ray_session):
    """An ingest task whose process died past its retries (a decoder's segfault, the OOM
    killer) ended the whole ingest in a 56-line ``WorkerCrashedError`` traceback naming
    no file. The result loop now hands such a task to ``on_crash`` (ingest makes it a bad
    item named by file, so that ``--skip-bad`` goes on); the others' results still come."""
    import ray

    from cellst.data.ingest import SourceItem, _crashed
    from cellst.raycluster import as_completed

    @ray.remote(max_retries=0, num_cpus=0.25)
    def work(i: int) -> dict:
        if i == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # the process dies, as a segfault would
        return {"status": "new", "i": i}

    items = [SourceItem(f"im{i}", "unlabeled", f"/src/im{i}.tif") for i in range(3)]
    refs = [work.remote(i) for i in range(3)]
    outs = list(as_completed(refs, on_crash=lambda i, exc: _crashed(items[i], exc)))
    assert sorted(o.get("i", -1) for o in outs) == [-1, 0, 2]
    (bad,) = [o for o in outs if o["status"] == "bad"]
    assert bad["id"] == "im1" and bad["problem"][0] == "/src/im1.tif"
    assert "the process decoding it died" in bad["problem"][1]
    with pytest.raises(ray.exceptions.WorkerCrashedError):  # without a stand-in: raised
        list(as_completed([work.remote(1)]))


def test_file_names_that_are_not_utf8_or_hold_a_colon_are_named_whole(ray_session, tmp_path):
    """A name that is not UTF-8 failed the whole ingest, after decoding every image, with
    a pyarrow error naming no file (``--skip-bad`` could not help); a bad file whose name
    holds ": " was reported under half its name (``plate 3``)."""
    src = _plain(tmp_path, n=1)
    odd = os.fsdecode(bytes(src) + b"/bad\xff\xfename.png")
    shutil.copy(src / "good0.png", odd)
    colon = src / "plate 3: well A1.tif"
    colon.write_bytes(b"II*\x00" + b"\x00" * 20)  # a TIFF header, then nothing readable
    items, problems = scan_source(src)
    assert [it.id for it in items] == ["good0", "plate 3: well A1"]
    assert problems == [
        (str(src / "bad\ufffd\ufffdname.png"), "its name is not valid UTF-8 text; rename the file")
    ]
    result = ingest(src, tmp_path / "store", skip_bad=True, progress=False)
    assert CellStore(tmp_path / "store").ids() == ["good0"]
    bad = dict(result.skipped)
    assert str(colon) in bad and bad[str(colon)].startswith("cannot read image"), bad


def test_ctrl_c_during_ingest_removes_staging_and_keeps_the_store(ray_session, tmp_path):
    first = _plain(tmp_path)
    store = tmp_path / "store"
    ingest(first, store, progress=False)
    before = _tree(store)
    src = tmp_path / "many"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        tifffile.imwrite(src / f"im{i:02d}.tif", rng.integers(1, 60000, (768, 768), np.uint16))

    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [CELLST, "ingest", str(src), "--out", str(store)],
        env={**os.environ, "RAY_ADDRESS": address},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's Ctrl-C would hit
    )
    # interrupt once the tasks are writing into the staging folder
    while proc.poll() is None and not list(tmp_path.glob(".store.*.staging/images/*")):
        time.sleep(0.05)
    assert proc.poll() is None, "ingest finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, out + err
    assert "interrupted, the store is unchanged" in err and "Traceback" not in err
    assert not list(tmp_path.glob(".store.*.staging"))
    # no task of the interrupted ingest is left to write into the staging folder later
    total = ray_session.cluster_resources()["CPU"]
    for _ in range(600):
        if ray_session.available_resources().get("CPU", 0) >= total:
            break
        time.sleep(0.1)
    assert not list(tmp_path.glob(".store.*.staging"))
    assert _tree(store) == before
    assert CellStore(store).ids() == ["good0", "good1"]
    assert (store / MANIFEST).is_file()


def test_a_task_whose_staging_is_gone_writes_nothing(tmp_path, monkeypatch):
    """An ingest task that outlives its ingest (the driver killed, or the staging removed
    while the task decoded) must not create the staging folder again: zarr makes an
    array's parent folders, so a late write left a stray staging folder beside the store.
    The task stages nothing and names the folder; with the staging there, it stages. A
    large TIFF, written band by band, stops at the first band after the folder went."""
    import cellst.data.ingest as ingest_module
    from cellst.data.ingest import SourceItem, StagingGone, _ingest_one, _stage_image

    src = _plain(tmp_path, n=1)
    label = np.zeros((64, 64), np.uint16)
    label[10:30, 10:30] = 1
    tifffile.imwrite(src / "good0_label.tiff", label)
    item = SourceItem(
        id="good0",
        split="labeled",
        image=str(src / "good0.png"),
        label=str(src / "good0_label.tiff"),
    )
    stage = _ingest_one._function  # what the Ray task runs, in this process
    gone = tmp_path / ".store.0123abcd.staging"
    out = stage(item, str(gone), None, IngestConfig())
    assert out["status"] == "gone" and "staging folder" in out["problem"][1], out
    assert str(gone / "images") in out["problem"][1]
    assert not gone.exists()  # not made again
    (gone / "images").mkdir(parents=True)  # the labels' folder is gone: no label written
    out = stage(item, str(gone), None, IngestConfig())
    assert out["status"] == "gone" and str(gone / "labels") in out["problem"][1], out
    assert not (gone / "labels").exists()
    (gone / "labels").mkdir()
    out = stage(item, str(gone), None, IngestConfig())
    assert out["status"] == "new", out
    assert {p.parent.name for p in gone.glob("*/good0.*")} == {"images", "labels"}

    # band by band: the staging is removed after the array was created, mid-way
    tifffile.imwrite(src / "big.tif", _cyx_uint16(1024, 1024), tile=(256, 256))
    real = ingest_module.normalize_tiff_tiled

    def removed_first(*args, **kwargs):
        shutil.rmtree(gone)
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest_module, "normalize_tiff_tiled", removed_first)
    with pytest.raises(StagingGone, match="staging folder"):
        _stage_image(str(src / "big.tif"), gone / "images" / "big", IngestConfig(tiled_pixels=1))
    assert not gone.exists()


def test_an_ingest_whose_staging_is_removed_under_it_is_refused_whole(
    ray_session, tmp_path, monkeypatch
):
    """Another process removes the staging folder while the tasks run: the ingest ends in
    one error naming the folder, --skip-bad or not (the files are fine: skipping them
    would commit a version without them), and the store keeps its version."""
    import cellst.data.ingest as ingest_module

    store = tmp_path / "store"
    ingest(_plain(tmp_path), store, progress=False)
    before = _tree(store)
    more = tmp_path / "more"
    more.mkdir()
    for i in range(3):
        iio.imwrite(more / f"new{i}.png", np.full((64, 64), 40 + i, np.uint8))
    real = ingest_module.check_shared_paths

    def then_removed(*, read, write):
        real(read=read, write=write)
        for staging in write:
            shutil.rmtree(staging)  # as another process would, before any task writes

    monkeypatch.setattr(ingest_module, "check_shared_paths", then_removed)
    for skip_bad in (False, True):
        with pytest.raises(IngestError) as exc:
            ingest(more, store, progress=False, skip_bad=skip_bad)
        assert "the staging folder was removed while 3 item(s)" in str(exc.value)
        assert "--skip-bad" not in str(exc.value)
        assert _tree(store) == before
        assert not list(tmp_path.glob(".store.*.staging"))


def _cyx_uint16(side_y: int = 700, side_x: int = 900) -> np.ndarray:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 4000, (3, side_y, side_x), dtype=np.uint16)
    img[:, :50] = 0  # empty rows: percentiles are of non-zero pixels only
    img[1, 300:400, 200:500] = 65000  # a bright object
    return img


@pytest.mark.parametrize("dtype", ["uint16", "int16", "uint8", "float32"])
def test_tiled_tiff_normalisation_equals_the_whole_image_path(tmp_path, dtype):
    """Exact for every dtype: histograms for 8/16-bit integers, and for floats a subsample
    that is the whole image when the image is below ``sample_pixels``."""
    from cellst.data.images import normalize_image, normalize_tiff_tiled, read_array

    img = (_cyx_uint16() // (300 if dtype == "uint8" else 2)).astype(dtype)
    if dtype == "int16":
        img[0, 100:120] = -500  # negative values are non-zero pixels too
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, img, tile=(128, 128))
    out = np.zeros((700, 900, 3), np.uint8)
    bands = []

    def write_band(y0: int, band: np.ndarray) -> None:
        bands.append(band.shape[0])
        out[y0 : y0 + band.shape[0]] = band

    assert normalize_tiff_tiled(path, write_band, band=256) == (700, 900)
    assert bands == [256, 256, 188]  # really written band by band
    np.testing.assert_array_equal(out, normalize_image(read_array(path)))


def test_ink_and_min_is_white_images_are_read_as_displayed(tmp_path):
    """MinIsWhite TIFFs (0 is white) and CMYK TIFFs and JPEGs (ink, not light) were stored
    with their intensities inverted (correlation -1.0 with what a viewer shows). They are
    now read as light, on the whole-image path and band by band alike."""
    from PIL import Image

    from cellst.data.images import normalize_image, normalize_tiff_tiled, read_array

    yy, xx = np.mgrid[0:96, 0:128]
    grey = ((yy * 2 + xx) % 256).astype(np.uint8)
    rgb = np.stack([grey, grey[::-1], grey[:, ::-1]], axis=-1)
    for dtype, top in ((np.uint8, 255), (np.uint16, 65535)):
        light = grey.astype(dtype) * (top // 255)
        path = tmp_path / f"minisw-{np.dtype(dtype).name}.tif"
        tifffile.imwrite(path, top - light, photometric="miniswhite", tile=(32, 32))
        np.testing.assert_array_equal(read_array(path), light)
        out = np.zeros((96, 128, 3), np.uint8)

        def write_band(y0: int, band: np.ndarray, out=out) -> None:
            out[y0 : y0 + band.shape[0]] = band

        normalize_tiff_tiled(path, write_band, band=32)
        np.testing.assert_array_equal(out, normalize_image(read_array(path)))
    ink = np.concatenate([255 - rgb, np.zeros((96, 128, 1), np.uint8)], axis=-1)
    tifffile.imwrite(tmp_path / "cmyk.tif", ink, photometric="separated")
    np.testing.assert_array_equal(read_array(tmp_path / "cmyk.tif"), rgb)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    got = read_array(tmp_path / "cmyk.jpg").astype(float)
    assert got.shape == rgb.shape and np.corrcoef(got.ravel(), rgb.ravel())[0, 1] > 0.95
    tifffile.imwrite(tmp_path / "f.tif", grey.astype(np.float32), photometric="miniswhite")
    with pytest.raises(ImageFormatError, match="f.tif: a MinIsWhite image of float32"):
        read_array(tmp_path / "f.tif")


def test_a_large_1_bit_tiff_is_named_a_mask_as_a_small_one_is(tmp_path):
    """Above ``ingest.tiled_pixels`` a 1-bit TIFF failed with numpy's "boolean subtract"
    TypeError; it is refused as the whole-image path refuses it."""
    from cellst.data.images import normalize_image, normalize_tiff_tiled

    mask = np.random.default_rng(0).random((300, 300)) > 0.5
    tifffile.imwrite(tmp_path / "mask.tif", mask, tile=(64, 64))
    why = "mask.tif: a 1-bit (binary) image is a mask, not a micrograph"
    with pytest.raises(ImageFormatError, match=re.escape(why)):
        normalize_tiff_tiled(tmp_path / "mask.tif", lambda y0, band: None, band=64)
    with pytest.raises(ImageFormatError, match="a 1-bit"):
        normalize_image(mask, name="mask.tif")


def test_tiled_tiff_follows_its_declared_channel_axis(tmp_path):
    """Band by band, a TIFF whose metadata declares 20 channels first (``CYX``) is read
    by that axis, as the whole-image path reads it (the shape alone would call it a
    stack of 20 planes)."""
    from cellst.data.images import declared_shape, normalize_image, normalize_tiff_tiled, read_array

    img = np.stack([_cyx_uint16(300, 200)[i % 3] // (i + 1) for i in range(20)])
    path = tmp_path / "multiplex.tif"
    tifffile.imwrite(path, img, tile=(64, 64), metadata={"axes": "CYX"})
    assert declared_shape(path) == (300, 200, 20)
    out = np.zeros((300, 200, 3), np.uint8)

    def write_band(y0: int, band: np.ndarray) -> None:
        out[y0 : y0 + band.shape[0]] = band

    assert normalize_tiff_tiled(path, write_band, band=128) == (300, 200)
    np.testing.assert_array_equal(out, normalize_image(read_array(path)))
    np.testing.assert_array_equal(out, normalize_image(np.moveaxis(img[:3], 0, -1)))


def test_tiled_float_tiff_sampled_ranges_find_sparse_signal(tmp_path):
    """Above ``sample_pixels`` a float image's range comes from a sample of its non-zero
    values, not a grid of pixels: signal only on odd rows and columns (which a grid of
    every second pixel never sees) is still found, and the sampled range rescales a dense
    image as the whole-image path does, to within a grey level or two."""
    from cellst.data.images import normalize_image, normalize_tiff_tiled

    def tiled(img: np.ndarray, sample_pixels: int) -> np.ndarray:
        path = tmp_path / "f.tif"
        tifffile.imwrite(path, img, tile=(128, 128))
        out = np.zeros((*img.shape, 3), np.uint8)

        def write_band(y0: int, band: np.ndarray) -> None:
            out[y0 : y0 + band.shape[0]] = band

        normalize_tiff_tiled(path, write_band, band=256, sample_pixels=sample_pixels)
        return out

    sparse = np.zeros((700, 900), np.float32)
    rng = np.random.default_rng(5)
    sparse[1::2, 1::2] = rng.uniform(0.5, 1.5, (350, 450)).astype(np.float32)
    out = tiled(sparse, sample_pixels=700 * 900 // 4)  # every 4th value, or a 2-px grid
    signal = sparse > 0
    assert out[signal].mean() > 100 and out[~signal].max() == 0

    dense = rng.normal(1000, 200, (700, 900)).astype(np.float32)
    whole = normalize_image(dense)
    got = tiled(dense, sample_pixels=700 * 900 // 9)
    diff = np.abs(got.astype(int) - whole.astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_large_tiff_is_ingested_band_by_band_with_bounded_memory(ray_session, tmp_path):
    """Above ``ingest.tiled_pixels`` ingest never holds the whole image: peak traced memory
    of ingest's staging of the image (what each ingest task runs) is a fraction of decoding
    the file whole, and the stored image is the same."""
    import tracemalloc

    from cellst.data.images import normalize_image, read_array
    from cellst.data.ingest import _stage_image

    src = tmp_path / "src"
    src.mkdir()
    img = _cyx_uint16(2048, 2048)
    tifffile.imwrite(src / "big.tif", img, tile=(256, 256))
    expected = normalize_image(read_array(src / "big.tif"))

    tracemalloc.start()
    read_array(src / "big.tif")
    whole_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    tracemalloc.clear_traces()
    cfg = IngestConfig(tiled_pixels=1_000_000)  # 2048^2 is over it: the tiled path
    assert _stage_image(str(src / "big.tif"), tmp_path / "staged", cfg) == (2048, 2048)
    tiled_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert tiled_peak < whole_peak / 3, (tiled_peak, whole_peak)
    tifffile.imwrite(tmp_path / "blank.tif", np.zeros_like(img), tile=(256, 256))
    with pytest.raises(ImageFormatError, match="blank.tif: the image holds no signal"):
        _stage_image(str(tmp_path / "blank.tif"), tmp_path / "staged-blank", cfg)

    ingest(src, tmp_path / "store", cfg=cfg, progress=False)
    store = CellStore(tmp_path / "store")
    (item,) = store.manifest.id.tolist()
    np.testing.assert_array_equal(store.image(item), expected)


def test_16bit_colour_pngs_keep_all_16_bits(tmp_path):
    """16-bit RGB, RGBA and grey + alpha PNGs were read through Pillow, which keeps only
    the high byte (uint8, a 12-bit image's maximum 15); 8-bit and palette PNGs unchanged."""
    import imagecodecs
    from PIL import Image

    from cellst.data.images import read_array

    grey = np.random.default_rng(0).integers(0, 4096, (64, 64)).astype(np.uint16)
    for name, samples in (("rgb", 3), ("rgba", 4)):
        (tmp_path / f"{name}.png").write_bytes(imagecodecs.png_encode(np.dstack([grey] * samples)))
        got = read_array(tmp_path / f"{name}.png")
        assert got.dtype == np.uint16, name
        np.testing.assert_array_equal(got, np.dstack([grey] * samples))
    (tmp_path / "la.png").write_bytes(imagecodecs.png_encode(np.dstack([grey, grey])))
    np.testing.assert_array_equal(read_array(tmp_path / "la.png"), grey)  # alpha dropped
    small = (grey % 7).astype(np.uint8)
    Image.fromarray(small).convert("P").save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_array(tmp_path / "palette.png"), np.dstack([small] * 3))
    Image.fromarray(np.dstack([small] * 3)).save(tmp_path / "rgb8.png")
    assert read_array(tmp_path / "rgb8.png").dtype == np.uint8


def test_int64_labels_with_large_ids_are_relabelled_not_refused(ray_session, tmp_path):
    """Only the number of instances has to fit int32, not the ids: a 2**40 id was refused
    ("label values exceed int32") although the map is relabelled 1..N."""
    src = tmp_path / "src"
    src.mkdir()
    iio.imwrite(src / "a.png", (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8))
    label = np.zeros((64, 64), np.int64)
    label[10:20, 10:20] = 2**40
    label[30:40, 30:40] = 7
    tifffile.imwrite(src / "a_label.tiff", label)
    result = ingest(src, tmp_path / "store", progress=False)
    assert result.added == ["a"]
    stored = CellStore(tmp_path / "store").label("a")
    assert stored.dtype == np.int32 and stored[15, 15] == 2 and stored[35, 35] == 1
    negative = np.where(label > 0, -1, 0)
    tifffile.imwrite(src / "a_label.tiff", negative)
    with pytest.raises(IngestError, match="label has negative values"):
        ingest(src, tmp_path / "store2", progress=False)


@pytest.mark.parametrize("tiled", [False, True])
def test_untagged_stack_of_more_than_three_planes_is_refused(ray_session, tmp_path, tiled):
    """A multi-page TIFF declaring no channel (or z) axis with more than 3 planes was read as
    channels and all but the first 3 dropped silently, whole or band by band; 3 untagged
    planes are still RGB, and 5 planes declared as channels (CYX) are read."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    planes = rng.integers(0, 4000, (5, 160, 192)).astype(np.uint16)
    tifffile.imwrite(src / "mp.tif", planes)
    tifffile.imwrite(src / "three.tif", planes[:3])
    tifffile.imwrite(src / "declared.tif", planes, metadata={"axes": "CYX"})
    cfg = IngestConfig(tiled_pixels=1000 if tiled else 10**9)
    with pytest.raises(IngestError) as exc:
        ingest(src, tmp_path / "store", cfg, progress=False)
    msg = str(exc.value)
    assert (
        f"{src / 'mp.tif'}: 5 planes with no channel axis declared (axes QYX, shape "
        "(5, 160, 192)); cellst reads at most 3 such planes as channels: save it with axes CYX"
    ) in msg
    assert "three.tif" not in msg and "declared.tif" not in msg
    (src / "mp.tif").unlink()
    result = ingest(src, tmp_path / "store", cfg, progress=False)
    assert sorted(result.added) == ["declared", "three"]
