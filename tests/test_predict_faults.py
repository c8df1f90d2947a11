"""`cellst predict` failures: checked in the driver, named, never mixed into a set, and no
process of ours left behind.

Real checkpoints on disk, real stores, the real `cellst` console script, this session's
real Ray cluster (and, for the stray-process test, a local cluster of the command's own).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tifffile
import torch
import zarr
from PIL import Image

from cellst.data.store import CellStore, StoreError
from cellst.inference.batch import predict
from cellst.inference.config import PredictConfig
from cellst.inference.predictor import InferenceConfig
from cellst.model import ModelConfig, build_model, save_checkpoint
from cellst.postprocess import PostprocessConfig

CELLST = str(Path(sys.executable).with_name("cellst"))
ROI = InferenceConfig(roi=128)
#: an address where no Ray cluster answers: a command that does any Ray work with it fails
#: differently (or hangs), so a refusal under it was made before Ray
NO_RAY = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}


def _lite(path: Path, seed: int, width: int = 8) -> Path:
    torch.manual_seed(seed)
    cfg = ModelConfig(name="hovernet-lite", width=width)
    return save_checkpoint(path, build_model(cfg).eval(), cfg)


#: every test here runs `cellst predict` in a process of its own (most with its own Ray)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lite_checkpoint(tmp_path_factory) -> Path:
    return _lite(tmp_path_factory.mktemp("ckpt") / "lite", seed=0)


def _ray_env(ray_session) -> dict[str, str]:
    """Environment for a `cellst` subprocess that joins this session's Ray cluster."""
    return {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}


def _run(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([CELLST, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _copy_store(store_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "store"
    shutil.copytree(store_dir, dest)
    return dest


def _run_ids(store: CellStore, set_name: str) -> dict[str, str]:
    """item -> run id of the prediction run that wrote it."""
    base = store.root / "pseudo" / set_name
    return {
        p.name: zarr.open_array(str(p), mode="r").attrs["run_id"]
        for p in base.iterdir()
        if p.is_dir() and not p.name.startswith(".")
    }


# ----------------------------------------------------------------------------- bad checkpoints
def _truncated(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest)
    data = (dest / "model.pt").read_bytes()
    (dest / "model.pt").write_bytes(data[: len(data) // 2])


def _other_width(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest)
    info = json.loads((dest / "model.json").read_text())
    info["model"]["width"] = 16  # the weights are width 8
    (dest / "model.json").write_text(json.dumps(info))


def _invalid_json(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest)
    (dest / "model.json").write_text('{"format": "cellst-model/1", "model": ')


#: ways to damage a checkpoint, and what the one-line error must name
DAMAGES = {
    "truncated-model.pt": (_truncated, "model.pt"),
    "model.json-of-another-width": (_other_width, "width"),
    "invalid-json": (_invalid_json, "not readable JSON"),
}


def test_bad_checkpoint_is_one_line_before_ray_and_creates_nothing(
    ray_session, store_dir, lite_checkpoint, tmp_path
):
    """Each damaged checkpoint is refused in one line naming it, before Ray (no cluster
    answers at ``NO_RAY``), and leaves nothing behind: then the good checkpoint writes the
    same set into the same store at once."""
    store = _copy_store(store_dir, tmp_path)
    sets_before = CellStore(store).pseudo_sets()
    out = tmp_path / "tiffs"
    for name, (damage, expected) in DAMAGES.items():
        bad = tmp_path / name
        damage(lite_checkpoint, bad)
        args = ["predict", "--checkpoint", str(bad), "--input", str(store), "--set-name", "p"]
        res = _run([*args, "--out", str(out)], NO_RAY)
        assert res.returncode == 1, (name, res.stdout + res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, (name, res.stderr)
        assert lines[0].startswith("error:") and str(bad) in lines[0], (name, lines[0])
        assert expected in lines[0], (name, lines[0])
        assert "Traceback" not in res.stderr + res.stdout, name
        assert CellStore(store).pseudo_sets() == sets_before, name
        assert not (store / "pseudo" / "p").exists() and not out.exists(), name
    # the retry with the good checkpoint is not blocked by anything the bad runs left
    res = predict(
        lite_checkpoint,
        store,
        set_name="p",
        ids=CellStore(store).ids()[:1],
        infer=ROI,
        progress=False,
    )
    assert len(res.written) == 1


def test_a_folder_without_images_or_with_two_of_a_name_is_refused_before_ray(
    synth_src, lite_checkpoint, tmp_path
):
    """A folder with no input image (here: the split folder above ``images/``, and one of
    only label files) is refused in one line naming it; so is one where two images share a
    name (``a.png`` and ``a.tif`` would both be written as ``a_label.tiff``). Both before
    Ray, and no output folder is created. (Before, the first ran Ray and exited 0 having
    written nothing, the second predicted one of the two.)"""
    split = synth_src / "test"  # holds images/ and labels/, no image itself
    only_labels = split / "labels"
    same_name = tmp_path / "same-name"
    same_name.mkdir()
    pixels = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    Image.fromarray(pixels).save(same_name / "a.png")
    tifffile.imwrite(same_name / "a.tif", pixels)
    cases = {
        split: f"no image files in this folder (expected .tif, .tiff, .png, .bmp, .jpg, "
        f".jpeg); did you mean {split / 'images'}/ (4 images)?",
        only_labels: "no image files in this folder",
        same_name: "have the same name 'a'",
    }
    for folder, expected in cases.items():
        out = tmp_path / f"out-{folder.name}"
        args = ["predict", "--checkpoint", str(lite_checkpoint), "--input", str(folder)]
        res = _run([*args, "--out", str(out)], NO_RAY, timeout=120)  # (Ray: no answer)
        assert res.returncode == 1, (folder, res.stdout + res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (folder, res.stderr)
        assert str(folder) in lines[0] and expected in lines[0], (folder, lines[0])
        assert not out.exists(), folder


# ----------------------------------------------------------------------------- bad images
def _folder_with_a_corrupt_image(synth_src: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    folder = tmp_path / "images"
    folder.mkdir()
    good = sorted((synth_src / "test" / "images").iterdir())[:3]
    for p in good:
        shutil.copy(p, folder / p.name)
    broken = folder / f"broken{good[0].suffix}"
    broken.write_bytes(good[0].read_bytes()[:300])  # a truncated copy: the header reads fine
    return folder, sorted(p.stem for p in good)


def test_corrupt_image_is_named_and_the_good_ones_are_written(
    ray_session, synth_src, lite_checkpoint, tmp_path
):
    folder, good = _folder_with_a_corrupt_image(synth_src, tmp_path)
    env = _ray_env(ray_session)
    common = ["--checkpoint", str(lite_checkpoint), "--input", str(folder)]
    common += ["--set", "inference.roi=128"]

    out = tmp_path / "out"
    res = _run(["predict", *common, "--out", str(out)], env)
    assert res.returncode == 1, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken" in errors[0] and "--skip-bad" in errors[0]
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"{n}_label.tiff" for n in good]

    out2 = tmp_path / "out2"
    res = _run(["predict", *common, "--out", str(out2), "--skip-bad"], env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 written" in res.stdout and "1 failed" in res.stdout
    assert "skipped 1 bad image" in res.stderr and str(folder / "broken") in res.stderr
    assert sorted(p.name for p in out2.iterdir()) == [f"{n}_label.tiff" for n in good]


# ----------------------------------------------------------------------------- resume identity
def test_resume_refuses_another_model_and_resumes_the_same(
    ray_session, store_dir, lite_checkpoint, tmp_path
):
    root = _copy_store(store_dir, tmp_path)
    store = CellStore(root)
    ids = store.ids("labeled")[:4]
    best = tmp_path / "run" / "best"
    shutil.copytree(lite_checkpoint, best)
    first = predict(best, root, set_name="s", ids=ids[:2], infer=ROI, progress=False)
    assert sorted(first.written) == sorted(ids[:2])
    runs = _run_ids(store, "s")
    meta = (root / "pseudo" / "s" / "set.json").read_text()
    assert store.pseudo_set_info("s")["model_id"] == first.model_id

    # a newer training overwrites best/: the resume is refused before Ray, nothing is written
    _lite(best, seed=1)
    res = _run(
        [
            "predict",
            "--checkpoint",
            str(best),
            "--input",
            str(root),
            "--set-name",
            "s",
            "--split",
            "labeled",
            "--set",
            "inference.roi=128",
        ],
        NO_RAY,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "weights sha256" in lines[0] and "mix" in lines[0], res.stderr
    assert "--overwrite" in lines[0] and "--set-name" in lines[0]
    assert _run_ids(store, "s") == runs
    assert (root / "pseudo" / "s" / "set.json").read_text() == meta

    # the same weights with other post-processing settings are another model too
    shutil.rmtree(best)
    shutil.copytree(lite_checkpoint, best)
    with pytest.raises(StoreError, match="mask_threshold 0.5 there, 0.7 now"):
        predict(
            best,
            root,
            set_name="s",
            ids=ids,
            infer=ROI,
            post=PostprocessConfig(mask_threshold=0.7),
            progress=False,
        )
    assert _run_ids(store, "s") == runs

    # the same model resumes: done items are skipped, never rewritten
    again = predict(best, root, set_name="s", ids=ids, infer=ROI, progress=False)
    assert sorted(again.skipped) == sorted(ids[:2]) and sorted(again.written) == sorted(ids[2:])
    after = _run_ids(store, "s")
    assert sorted(after) == sorted(ids) and all(after[i] == runs[i] for i in runs)
    assert set(CellStore(root).pseudo_items("s")["model_id"]) == {first.model_id}


def test_an_out_folder_is_resumed_only_by_its_model_and_never_loses_other_files(
    ray_session, synth_src, store_dir, lite_checkpoint, tmp_path
):
    """``--out`` holding the ground truth, or another model's labels: refused in one line
    before Ray, every file kept (before, each counted as already predicted: exit 0 with the
    ground truth left as the "prediction"; and ``--overwrite`` deleted every
    ``*_label.tiff`` there, this run's or not). ``--overwrite`` replaces this run's files
    only; a re-run of the same model keeps its files. A mistyped ``--split`` is refused
    (before, every item of the store was predicted)."""
    from cellst.data.images import label_tiff_model_id, write_label_tiff

    folder, good = _folder_with_a_corrupt_image(synth_src, tmp_path)
    for p in folder.glob("broken*"):
        p.unlink()
    out = tmp_path / "out"
    out.mkdir()
    truth = np.zeros((64, 64), np.uint16)
    truth[8:20, 8:20] = 1
    tifffile.imwrite(out / f"{good[0]}_label.tiff", truth)  # the user's ground truth
    tifffile.imwrite(out / "unrelated_label.tiff", truth)  # not an item of this run
    write_label_tiff(out / f"{good[1]}_label.tiff", truth, model_id="another-model")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = ["predict", "--checkpoint", str(lite_checkpoint), "--input", str(folder)]
    res = _run([*args, "--out", str(out), "--set", "inference.roi=128"], NO_RAY, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{out / good[0]}_label.tiff was not written by cellst" in lines[0]
    assert "--overwrite" in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / f"{good[0]}_label.tiff").unlink()
    with pytest.raises(StoreError, match="holds the labels of another model"):
        predict(lite_checkpoint, folder, out_dir=out, infer=ROI, progress=False)
    write_label_tiff(out / f"{good[2]}_label.tiff", truth)  # as `cellst segment` writes it
    with pytest.raises(StoreError, match="without a record of its model"):
        predict(lite_checkpoint, folder, out_dir=out, ids=[good[2]], infer=ROI, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == {
        k: v for k, v in before.items() if k != f"{good[0]}_label.tiff"
    }

    local = PredictConfig(num_actors=0)
    res = predict(
        lite_checkpoint,
        folder,
        out_dir=out,
        infer=ROI,
        resources=local,
        overwrite=True,
        progress=False,
    )
    assert sorted(res.written) == good and not res.skipped
    assert (out / "unrelated_label.tiff").read_bytes() == before["unrelated_label.tiff"]
    assert {label_tiff_model_id(out / f"{n}_label.tiff") for n in good} == {res.model_id}
    again = predict(
        lite_checkpoint, folder, out_dir=out, infer=ROI, resources=local, progress=False
    )
    assert sorted(again.skipped) == good and not again.written

    with pytest.raises(StoreError, match="split 'tset' has no items"):
        predict(lite_checkpoint, store_dir, out_dir=tmp_path / "o2", split="tset", infer=ROI)
    assert not (tmp_path / "o2").exists()


def test_an_out_folder_keeps_a_label_only_for_the_image_it_was_predicted_from(
    ray_session, synth_src, store_dir, lite_checkpoint, tmp_path, capsys
):
    """A resumed ``--out`` used to count a file as done whenever the same model wrote it:
    a source image replaced since (here by another image in another format) kept its old
    labels, and ``--out`` reused for another
    folder of the same names kept the first folder's labels as the second's, exit 0. Each
    file now records the image it came from: a changed image is predicted anew (and said),
    another folder's file is refused in one line; the same folder and store still resume.
    """
    from cellst.data.images import label_tiff_record

    local = PredictConfig(num_actors=0)
    folder, good = _folder_with_a_corrupt_image(synth_src, tmp_path)
    for p in folder.glob("broken*"):
        p.unlink()
    out = tmp_path / "out"
    first = predict(lite_checkpoint, folder, out_dir=out, infer=ROI, resources=local)
    assert sorted(first.written) == good
    record = label_tiff_record(out / f"{good[0]}_label.tiff")
    assert record["source"]["folder"] == str(folder)
    assert record["source"]["file"] == next(folder.glob(f"{good[0]}.*")).name

    changed = next(folder.glob(f"{good[0]}.*"))
    other = next(p for p in (synth_src / "test" / "images").iterdir() if p.stem not in good)
    shutil.copy(other, changed.with_suffix(other.suffix))
    if other.suffix != changed.suffix:
        changed.unlink()
    capsys.readouterr()
    again = predict(lite_checkpoint, folder, out_dir=out, infer=ROI, resources=local)
    assert again.written == [good[0]] and sorted(again.skipped) == good[1:]
    assert "1 image(s) (e.g. " in capsys.readouterr().out
    assert (
        label_tiff_record(out / f"{good[0]}_label.tiff")["source"]["digest"]
        != (record["source"]["digest"])
    )

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(folder, elsewhere)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(StoreError, match="holds the labels of another image of that name"):
        predict(lite_checkpoint, elsewhere, out_dir=out, infer=ROI, resources=local)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # a store's items: the file records the item's image array, which a re-ingest changes
    ids = CellStore(store_dir).ids()[:2]
    out2 = tmp_path / "out2"
    predict(lite_checkpoint, store_dir, out_dir=out2, ids=ids, infer=ROI, resources=local)
    resumed = predict(lite_checkpoint, store_dir, out_dir=out2, ids=ids, infer=ROI, resources=local)
    assert sorted(resumed.skipped) == sorted(ids) and not resumed.written
    array = CellStore(store_dir).manifest.set_index("id")["image_array"][ids[0]]
    assert label_tiff_record(out2 / f"{ids[0]}_label.tiff")["source"]["digest"] == array


def test_an_empty_set_of_another_model_is_taken_over(
    ray_session, store_dir, lite_checkpoint, tmp_path
):
    """An empty set (as a failed start of an older cellst left) does not block a retry."""
    root = _copy_store(store_dir, tmp_path)
    base = root / "pseudo" / "left"
    base.mkdir(parents=True)
    (base / "set.json").write_text(json.dumps({"checkpoint": "/elsewhere/best"}))
    store = CellStore(root)
    res = predict(
        lite_checkpoint, root, set_name="left", ids=store.ids()[:1], infer=ROI, progress=False
    )
    assert len(res.written) == 1
    assert store.pseudo_set_info("left")["model_id"] == res.model_id


# ----------------------------------------------------------------------------- stray processes
def _descendants(pid: int) -> dict[int, tuple[str, float]]:
    """pid -> (name, start time) of every process below ``pid`` now."""
    out = {}
    with contextlib.suppress(psutil.Error):
        for p in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                out[p.pid] = (p.name(), p.create_time())
    return out


def _still_running(procs: dict[int, tuple[str, float]]) -> list[psutil.Process]:
    left = []
    for pid, (_, started) in procs.items():
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
    return left


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "error"])
def test_no_process_of_ours_is_left_behind(lite_checkpoint, tmp_path, how):
    """`cellst predict` starting its own local Ray cluster, then killed (SIGKILL: nothing in
    it can react; SIGTERM) mid-run or failing: none of the processes it started remains.
    Without cellst's watcher, Ray's agents outlive a SIGKILLed driver by about a minute."""
    folder, out = tmp_path / "images", tmp_path / "out"
    folder.mkdir()
    rng = np.random.default_rng(0)
    n = 3 if how == "error" else 40
    for i in range(n):
        tifffile.imwrite(folder / f"img{i:02d}.tif", rng.integers(0, 255, (256, 256), np.uint8))
    if how == "error":
        (folder / "img00.tif").write_bytes((folder / "img01.tif").read_bytes()[:300])
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a cluster of its own
    cmd = [CELLST, "predict", "--checkpoint", str(lite_checkpoint), "--input", str(folder)]
    cmd += ["--out", str(out), "--set", "inference.roi=128"]
    log = open(tmp_path / "log.txt", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    seen: dict[int, tuple[str, float]] = {}
    try:
        deadline = time.time() + 400
        while proc.poll() is None and time.time() < deadline:
            seen.update(_descendants(proc.pid))
            if how != "error" and out.is_dir() and any(out.glob("*_label.tiff")):
                break  # the cluster and its actors are up and working
            time.sleep(0.3)
        seen.update(_descendants(proc.pid))
        names = {name for name, _ in seen.values()}
        assert {"gcs_server", "raylet"} <= names, names
        if how == "error":
            assert proc.wait(timeout=400) == 1
        else:
            assert proc.poll() is None, "the run ended before it was signalled"
            os.kill(proc.pid, getattr(signal, how))  # the command only, as `kill` would
            proc.wait(timeout=120)
        deadline = time.time() + 30  # Ray's agents alone would stay about 60 s
        while _still_running(seen) and time.time() < deadline:
            time.sleep(0.5)
        left = [f"{p.pid} {p.name()}" for p in _still_running(seen)]
        assert not left, f"left behind: {left}"
    finally:
        log.close()
        if proc.poll() is None:
            proc.kill()
        for p in _still_running(seen):
            with contextlib.suppress(psutil.Error):
                p.kill()


def test_a_relative_input_folder_is_read_by_the_ray_tasks(
    ray_session, lite_checkpoint, tmp_path, monkeypatch
):
    """`cellst predict -i rs` (a path relative to where the command runs) failed on every
    image, `[Errno 2] No such file or directory: 'rs/x.png'`: the Ray tasks that read the
    images run in other working folders. As `--out` and `--checkpoint`, it is absolute now."""
    (tmp_path / "rs").mkdir()
    rng = np.random.default_rng(0)
    for name in ("x", "y"):
        Image.fromarray(rng.integers(0, 255, (160, 192), np.uint8)).save(
            tmp_path / "rs" / f"{name}.png"
        )
    monkeypatch.chdir(tmp_path)
    res = predict(
        lite_checkpoint, "rs", out_dir="out", infer=ROI, resources=PredictConfig(num_actors=1),
        progress=False,
    )  # fmt: skip
    assert sorted(res.written) == ["x", "y"]
    assert tifffile.imread(tmp_path / "out" / "x_label.tiff").shape == (160, 192)


def test_label_files_of_a_run_whose_folder_was_claimed_by_a_newer_run_are_dropped(tmp_path):
    """A prediction task of a `cellst predict --out` whose driver died may still run when a
    new run has claimed the folder: its label file is dropped (an error row), never mixed in
    with the new run's, whose own write lands."""
    from cellst.fs import claim_writing
    from cellst.inference.batch import postprocess_and_write

    out = tmp_path / "out"
    out.mkdir()
    prob = np.zeros((32, 32), np.float32)
    prob[8:20, 8:20] = 1
    batch = {"id": ["a"], "prob": [prob], "hv": [np.zeros((2, 32, 32), np.float32)]}
    batch["infer_seconds"] = [0.1]
    write = {"post": PostprocessConfig().model_dump(), "store_root": None, "set_name": None}
    write |= {"out_dir": str(out), "checkpoint": "ck", "model_id": "m"}
    claim_writing(out, "new")
    rows = postprocess_and_write(batch, run_id="old", **write)
    assert "now written by run new, not by this run (old)" in rows["error"][0]
    assert list(out.iterdir()) == []  # not even a temporary file
    rows = postprocess_and_write(batch, run_id="new", **write)
    assert rows["error"].tolist() == [""]
    assert [p.name for p in out.iterdir()] == ["a_label.tiff"]
    assert tifffile.imread(out / "a_label.tiff").shape == (32, 32)
