"""Whole-image inference and distributed batch prediction (`cellst predict`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from cellst.data.store import CellStore, StoreError
from cellst.inference.batch import PredictConfig, SetRequest, predict, predict_sets
from cellst.inference.predictor import HV_KEY, NP_KEY, InferenceConfig, blocks, predict_maps
from cellst.model import ModelConfig, build_model, save_checkpoint
from cellst.raycluster import ClusterError


@pytest.fixture(scope="module")
def lite_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(name="hovernet-lite", width=8)
    model = build_model(cfg).eval()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "lite", model, cfg)


@pytest.fixture(scope="module")
def finding_checkpoints(store_dir, quick_train, tmp_path_factory) -> tuple[Path, Path]:
    """Two checkpoints of other weights that both find cells in every item of the session
    store (a few training steps, then a small perturbation for the second), so that tests
    comparing labels compare cells, not empty maps."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="hovernet-lite", width=8)
    store = CellStore(store_dir, lease=False)
    model = quick_train(build_model(cfg), store, store.ids("labeled"), steps=40)
    root = tmp_path_factory.mktemp("found")
    first = save_checkpoint(root / "a", model, cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    return first, save_checkpoint(root / "b", model.eval(), cfg)


class CoordinateModel(torch.nn.Module):
    """A stand-in network whose HoVer output is the window's centred coordinates.

    Centred coordinates are what HoVer-Net predicts for one cell filling the window; they
    are antisymmetric under flips, so flip TTA leaves them unchanged only if the un-flipped
    channels get their signs right.
    """

    input_size = None

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(b, 1, h, w)
        logits = torch.cat([x[:, :1] * 0, x[:, :1] * 4 - 2], 1) + self.w
        return {NP_KEY: logits, HV_KEY: torch.cat([xs, ys], 1)}


def test_flip_tta_restores_hover_signs():
    image = (np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)
    model = CoordinateModel().eval()
    cfg = InferenceConfig(roi=256, overlap=0.0)
    p0, hv0 = predict_maps(model, image, cfg)
    p1, hv1 = predict_maps(model, image, cfg.model_copy(update={"tta": True}))
    np.testing.assert_allclose(hv1.astype(np.float32), hv0.astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(p1.astype(np.float32), p0.astype(np.float32), atol=2e-3)
    assert np.abs(hv1[0]).mean() > 0.4  # a sign error would average the maps towards zero


class NeighbourhoodModel(torch.nn.Module):
    """A stand-in network whose foreground logit is the 5x5 mean brightness around a pixel:
    what a real network sees at an image edge depends on what the padding puts there."""

    input_size = None

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        mean = torch.nn.functional.avg_pool2d(
            x[:, :1], 5, stride=1, padding=2, count_include_pad=False
        )
        logits = torch.cat([mean * 0, (mean - 0.5) * 20], 1) + self.w
        return {NP_KEY: logits, HV_KEY: torch.zeros_like(x[:, :2])}


@pytest.mark.parametrize("shape", [(150, 170), (97, 61)])  # not multiples of 32 or the roi
def test_padding_mirrors_the_image_no_false_edge(shape):
    # a bright, flat background (brightfield): zero padding made the last rows and columns
    # look dark to the network, which then saw a false object along the right/bottom edges
    image = np.full(shape + (3,), 200, np.uint8)
    prob, _ = predict_maps(NeighbourhoodModel().eval(), image, InferenceConfig(roi=128))
    prob = prob.astype(np.float32)
    assert np.ptp(prob) < 1e-3, "the edges see different context than the interior"


@pytest.mark.parametrize("shape", [(100, 150), (300, 500), (257, 33)])
def test_any_image_size(lite_checkpoint, shape):
    from cellst.model import load_model

    model, _, _ = load_model(lite_checkpoint)
    image = (np.random.default_rng(1).random(shape + (3,)) * 255).astype(np.uint8)
    prob, hv = predict_maps(model, image, InferenceConfig(roi=128))
    assert prob.shape == shape and hv.shape == (2,) + shape
    assert prob.dtype == np.float16 and 0 <= prob.min() and prob.max() <= 1
    assert np.isfinite(hv.astype(np.float32)).all()


def test_block_mode_covers_every_pixel_once(lite_checkpoint):
    h, w = 700, 610
    count = np.zeros((h, w), int)
    for (cy0, cy1, cx0, cx1), (ey0, ey1, ex0, ex1) in blocks(h, w, 256, 48):
        count[cy0:cy1, cx0:cx1] += 1
        assert ey0 <= cy0 and ey1 >= cy1 and ex0 <= cx0 and ex1 >= cx1
    assert (count == 1).all()
    from cellst.model import load_model

    model, _, _ = load_model(lite_checkpoint)
    image = (np.random.default_rng(2).random((h, w, 3)) * 255).astype(np.uint8)
    whole = predict_maps(model, image, InferenceConfig(roi=128, block=4096))
    tiled = predict_maps(model, image, InferenceConfig(roi=128, block=256, block_margin=96))
    assert tiled[0].shape == whole[0].shape
    # away from block seams the two agree closely (same network, same windows' content)
    diff = np.abs(whole[0].astype(np.float32) - tiled[0].astype(np.float32))
    assert np.median(diff) < 0.02


@pytest.mark.slow  # MONAI's full-size HoVer-Net forward passes on CPU
def test_monai_fixed_size_model_output_aligns_with_input():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="hovernet-fast")).eval()
    image = (np.random.default_rng(3).random((200, 180, 3)) * 255).astype(np.uint8)
    prob, hv = predict_maps(model, image, InferenceConfig(sw_batch_size=4))
    assert prob.shape == (200, 180) and hv.shape == (2, 200, 180)
    assert np.isfinite(prob.astype(np.float32)).all()


def _arrays_with_run(store: CellStore, set_name: str) -> dict[str, str]:
    base = store.root / "pseudo" / set_name
    return {
        p.name: zarr.open_array(str(p), mode="r").attrs["run_id"]
        for p in base.iterdir()
        if p.is_dir() and not p.name.startswith(".")
    }


def test_predict_two_actors_writes_each_item_once(
    ray_session, store_dir, finding_checkpoints, tmp_path
):
    import shutil

    lite_checkpoint = finding_checkpoints[0]  # a model that finds cells: labels to compare
    store_dir = shutil.copytree(store_dir, tmp_path / "store")  # the session store stays as is
    store = CellStore(store_dir)
    ids = store.ids()
    res = predict(
        lite_checkpoint,
        store_dir,
        set_name="p2",
        out_dir=tmp_path / "tiffs",
        ids=ids,
        infer=InferenceConfig(roi=128),
        resources=PredictConfig(num_actors=2),
        progress=False,
    )
    assert sorted(res.written) == sorted(ids) and not res.skipped
    assert len(set(res.written)) == len(res.written)
    runs = _arrays_with_run(store, "p2")
    assert sorted(runs) == sorted(ids) and len(set(runs.values())) == 1
    stats = CellStore(store_dir).pseudo_items("p2")
    assert sorted(stats["id"]) == sorted(ids)
    for i in ids:
        lab = store.pseudo_label("p2", i)
        assert lab.dtype == np.int32 and lab.shape == (store.row(i).height, store.row(i).width)
        assert stats.set_index("id").loc[i, "n_instances"] == lab.max()  # relabelled 1..N
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "tiffs" / f"{i}_label.tiff"), lab)
    assert (stats["n_instances"] > 0).sum() >= len(ids) - 1  # cells, not empty maps
    # a second run has nothing left to do
    again = predict(
        lite_checkpoint,
        store_dir,
        set_name="p2",
        ids=ids,
        infer=InferenceConfig(roi=128),
        progress=False,
    )
    assert not again.written and sorted(again.skipped) == sorted(ids)
    assert _arrays_with_run(store, "p2") == runs
    # another checkpoint may not silently reuse the set
    other = save_checkpoint(
        tmp_path / "other", build_model(ModelConfig(width=8)), ModelConfig(width=8)
    )
    with pytest.raises(StoreError, match="--overwrite"):
        predict(other, store_dir, set_name="p2", ids=ids, progress=False)


def test_predict_sets_is_one_pass_equal_to_separate_runs_and_resumes_each_set(
    ray_session, store_dir, finding_checkpoints, tmp_path, monkeypatch
):
    """Two models (other weights, other post-processing) predict the same items in one pass:
    each set holds what a run of its own writes, a set already half written gets only its
    missing items, and a set written by another model is refused before anything runs.

    The runs of their own predict in this process (``predict.num_actors=0``, no actor pool),
    so the pool's sets are also checked equal to the in-process path's."""
    import shutil

    from cellst.inference.batch import ModelActor
    from cellst.postprocess import PostprocessConfig

    store_dir = shutil.copytree(store_dir, tmp_path / "store")
    store = CellStore(store_dir)
    ids = store.ids()[:6]
    lite_checkpoint, other = finding_checkpoints  # other weights; both find cells
    post_a, post_b = PostprocessConfig(), PostprocessConfig(mask_threshold=0.4)
    infer = InferenceConfig(roi=128)
    here = PredictConfig(num_actors=0)
    run = {"infer": infer, "calibrated": False, "progress": False, "resources": here}
    calls: list[int] = []  # the model's calls seen in this process
    with monkeypatch.context() as m:
        real = ModelActor.__call__
        m.setattr(ModelActor, "__call__", lambda self, b: calls.append(1) or real(self, b))
        predict(lite_checkpoint, store_dir, set_name="ra", ids=ids, post=post_a, **run)
        predict(other, store_dir, set_name="rb", ids=ids, post=post_b, **run)
        predict(other, store_dir, set_name="b", ids=ids[:2], post=post_b, **run)  # half done
    assert len(calls) == 2 * len(ids) + 2  # every image, here, not in an actor
    before = _arrays_with_run(store, "b")

    a, b = predict_sets(
        store_dir,
        [SetRequest(str(lite_checkpoint), "a", post_a), SetRequest(str(other), "b", post_b)],
        ids,
        infer=infer,
        resources=PredictConfig(num_actors=2),
        progress=False,
    )
    assert sorted(a.written) == sorted(ids) and not a.skipped and not a.failed
    assert sorted(b.written) == sorted(ids[2:]) and sorted(b.skipped) == sorted(ids[:2])
    runs_b = _arrays_with_run(store, "b")
    assert sorted(runs_b) == sorted(ids) and {i: runs_b[i] for i in before} == before
    one_pass = set(_arrays_with_run(store, "a").values())  # one run wrote set a, and the
    assert len(one_pass) == 1 and {runs_b[i] for i in ids[2:]} == one_pass  # rest of set b
    for i in ids:
        np.testing.assert_array_equal(store.pseudo_label("a", i), store.pseudo_label("ra", i))
        np.testing.assert_array_equal(store.pseudo_label("b", i), store.pseudo_label("rb", i))
    for name in ("a", "b"):  # the labels compared hold cells
        assert sum(int(store.pseudo_label(name, i).max() > 0) for i in ids) >= len(ids) - 1
    assert store.pseudo_set_info("a")["model_id"] == store.pseudo_set_info("ra")["model_id"]
    assert a.model_id != b.model_id

    # set "a" was written by the first model: the second may not resume it, and set "c"
    # (asked for in the same call) is not even created
    with pytest.raises(StoreError, match="--overwrite"):
        predict_sets(
            store_dir,
            [SetRequest(str(other), "a", post_a), SetRequest(str(lite_checkpoint), "c", post_a)],
            ids,
            progress=False,
        )
    assert not (store.root / "pseudo" / "c").exists()
    with pytest.raises(StoreError, match="distinct set names"):
        predict_sets(store_dir, [SetRequest(str(other), "x", post_a)] * 2, ids, progress=False)


def test_gpu_stage_writes_what_the_actor_writes_and_each_model_only_what_it_needs(
    store_dir, finding_checkpoints, tmp_path
):
    """On GPUs the actor only predicts and CPU tasks post-process and write each row with
    its model's settings (:func:`write_rows`); on CPUs the actor writes itself. Both give
    the same sets (run here in this process, on CPU), and ``need`` limits each item to the
    models that still lack it."""
    import shutil

    from cellst.inference.batch import ModelActor, model_identity, prepare_set, write_rows
    from cellst.model.checkpoint_files import weights_digest
    from cellst.postprocess import PostprocessConfig

    store = CellStore(shutil.copytree(store_dir, tmp_path / "store"))
    m = store.manifest
    ids = m.assign(px=m["height"] * m["width"]).nsmallest(2, "px")["id"].tolist()
    cks = [str(ck) for ck in finding_checkpoints]  # other weights; both find cells
    posts = [PostprocessConfig(), PostprocessConfig(mask_threshold=0.3)]
    models = [{"checkpoint": ck, "weights_sha256": weights_digest(ck)} for ck in cks]

    def writes(prefix: str) -> list[dict]:
        out = []
        for k, (ck, post) in enumerate(zip(cks, posts, strict=True)):
            identity = model_identity(models[k]["weights_sha256"], post)
            prepare_set(store, f"{prefix}{k}", ck, False, identity, run_id=prefix)
            out.append(
                {"post": post.model_dump(), "store_root": str(store.root),
                 "set_name": f"{prefix}{k}", "out_dir": None, "run_id": prefix,
                 "checkpoint": ck, "model_id": identity["model_id"]}
            )  # fmt: skip
        return out

    images = np.empty(len(ids), dtype=object)
    images[:] = [store.image(i) for i in ids]
    batch = {"id": np.asarray(ids, dtype=object), "image": images}
    infer = InferenceConfig(roi=128).model_dump()
    cpu = ModelActor(models, infer, False, writes=writes("cpu"))(batch)
    gpu = write_rows(ModelActor(models, infer, False)(batch), writes("gpu"))
    for rows in (cpu, gpu):
        pairs = sorted(zip(rows["id"], rows["model"], strict=True))
        assert pairs == sorted((i, k) for i in ids for k in (0, 1))
        assert not any(rows["error"]) and not rows["fatal"].any()
    for i in ids:
        for k in (0, 1):
            label = store.pseudo_label(f"cpu{k}", i)
            assert label.max() > 0  # cells to compare, not two empty maps
            np.testing.assert_array_equal(label, store.pseudo_label(f"gpu{k}", i))
    maps = ModelActor(models, infer, False, need={ids[0]: [1]})(batch)
    assert list(maps["id"]) == [ids[0]] and list(maps["model"]) == [1]


def test_predict_resumes_after_kill(ray_session, store_dir, lite_checkpoint, tmp_path):
    """Kill `cellst predict` mid-run; the re-run writes only what is missing, each once."""
    import shutil

    store_copy = tmp_path / "store"
    shutil.copytree(store_dir, store_copy)
    exe = Path(sys.executable).with_name("cellst")
    cmd = [
        str(exe),
        "predict",
        "--checkpoint",
        str(lite_checkpoint),
        "--input",
        str(store_copy),
        "--set-name",
        "resume",
        "--split",
        "labeled",
        "--set",
        "inference.roi=128",
        "--set",
        "inference.tta=true",
        "--num-actors",
        "1",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    base = store_copy / "pseudo" / "resume"
    deadline = time.time() + 240
    while time.time() < deadline:
        done = (
            [p for p in base.glob("*") if p.is_dir() and not p.name.startswith(".")]
            if base.is_dir()
            else []
        )
        if done:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    store = CellStore(store_copy)
    first = _arrays_with_run(store, "resume")
    labeled = store.ids("labeled")
    assert 1 <= len(first) < len(labeled), "the kill should land mid-run"
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    after = _arrays_with_run(store, "resume")
    assert sorted(after) == sorted(labeled)
    for item, run in first.items():
        assert after[item] == run  # items of the killed run were not rewritten
    # Ray stops the killed run's tasks seconds after its driver: items they finish before the
    # re-run claims the set count as done, any later one is refused (claim_writing), so each
    # item is the killed run's, skipped, or the re-run's, written, once
    (killed,) = set(first.values())
    mine = {after[i] for i in labeled if after[i] != killed}
    assert len(mine) <= 1
    n_killed = sum(after[i] == killed for i in labeled)
    assert f"{len(labeled) - n_killed} written, {n_killed} already done" in res.stdout
    assert not list(base.glob(".tmp-*"))


def test_predict_folder_to_tiffs(ray_session, synth_src, lite_checkpoint, tmp_path):
    folder = synth_src / "test" / "images"
    res = predict(
        lite_checkpoint,
        folder,
        out_dir=tmp_path / "out",
        infer=InferenceConfig(roi=128),
        progress=False,
    )
    names = sorted(p.stem for p in folder.iterdir())
    assert sorted(res.written) == names
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"{n}_label.tiff" for n in names
    ]
    # the folder's images normalised with other percentiles make another model's labels:
    # no silent resume into this folder (the default resumes it, as before)
    from cellst.config import IngestConfig

    kw = {"out_dir": tmp_path / "out", "infer": InferenceConfig(roi=128), "progress": False}
    with pytest.raises(StoreError, match="labels of another model"):
        predict(lite_checkpoint, folder, ingest=IngestConfig(high_percentile=60), **kw)
    again = predict(lite_checkpoint, folder, **kw)
    assert again.written == [] and sorted(again.skipped) == names
    # so do flip TTA and cell-size rescaling: a re-run with them kept the earlier labels
    for infer in (
        InferenceConfig(roi=128, tta=True),
        InferenceConfig(roi=128, rescale_diameter=40),
    ):
        with pytest.raises(StoreError, match="another model, post-processing or inference"):
            predict(lite_checkpoint, folder, **{**kw, "infer": infer})
    # the window's batch size changes no label: resumed
    more = predict(
        lite_checkpoint, folder, **{**kw, "infer": InferenceConfig(roi=128, sw_batch_size=2)}
    )
    assert more.written == []


def test_label_tiffs_carry_the_pixel_size_their_image_declares(
    ray_session, lite_checkpoint, tmp_path
):
    """``cellst predict --out`` writes each image's pixel size (an ImageJ or OME-TIFF's) in
    its ``NAME_label.tiff``'s resolution tags, so areas measured on the labels in Fiji or
    QuPath come in microns; an image that declares none gives a label without them."""
    folder = tmp_path / "in"
    folder.mkdir()
    img = (np.random.default_rng(0).random((96, 96)) * 4000).astype(np.uint16)
    tifffile.imwrite(folder / "ij.tif", img, imagej=True, resolution=(1 / 0.4, 1 / 0.4),
                     metadata={"unit": "micron"})  # fmt: skip
    tifffile.imwrite(folder / "plain.tif", img)
    out = tmp_path / "out"
    res = predict(lite_checkpoint, folder, out_dir=out, infer=InferenceConfig(roi=96),
                  resources=PredictConfig(num_actors=0), progress=False)  # fmt: skip
    assert sorted(res.written) == ["ij", "plain"]
    with tifffile.TiffFile(out / "ij_label.tiff") as tf:
        page = tf.pages[0]
        assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
        assert [1e4 / r for r in page.resolution] == pytest.approx([0.4, 0.4])
    with tifffile.TiffFile(out / "plain_label.tiff") as tf:
        assert tf.pages[0].resolutionunit != tifffile.RESUNIT.CENTIMETER


def test_a_set_resumed_with_other_inference_settings_is_refused(
    store_dir, lite_checkpoint, tmp_path
):
    """A pseudo-label set records its inference settings; resuming it with flip TTA (or
    rescaling) on would mix two kinds of labels, and is refused naming the setting. A set
    of a cellst that did not record them yet is resumed as before."""
    import json
    import shutil

    from cellst.data.store import CellStore
    from cellst.inference.batch import inference_identity, model_identity
    from cellst.model.checkpoint_files import weights_digest
    from cellst.postprocess import PostprocessConfig

    store = tmp_path / "store"
    shutil.copytree(store_dir, store)
    ids = CellStore(store, lease=False).ids("unlabeled")[:2]
    kw = {"set_name": "p", "ids": ids, "progress": False}
    here = PredictConfig(num_actors=0)
    plain = InferenceConfig(roi=128)
    predict(
        lite_checkpoint,
        store,
        infer=plain,
        resources=here,
        ids=ids[:1],
        set_name="p",
        progress=False,
    )
    info = json.loads((store / "pseudo" / "p" / "set.json").read_text())
    assert info["inference"] == {"roi": 128}
    with pytest.raises(StoreError, match="inference tta default there, True now"):
        predict(
            lite_checkpoint, store, infer=InferenceConfig(roi=128, tta=True), resources=here, **kw
        )
    res = predict(lite_checkpoint, store, infer=plain, resources=here, **kw)
    assert res.written == ids[1:]
    # written before inference settings were recorded: its digest left them out
    post = PostprocessConfig.model_validate(info["postprocess"])
    legacy = model_identity(weights_digest(lite_checkpoint), post)
    assert legacy["model_id"] != info["model_id"]
    del info["inference"]
    info["model_id"] = legacy["model_id"]
    (store / "pseudo" / "p" / "set.json").write_text(json.dumps(info))
    again = predict(lite_checkpoint, store, infer=plain, resources=here, **kw)
    assert again.written == [] and inference_identity(plain) == {"roi": 128}


def test_a_set_another_run_writes_is_refused_at_once(store_dir, lite_checkpoint, tmp_path):
    """Two runs writing one set at once mixed two models' labels (both exited 0): while a
    run holds the set, another `predict` or `predict_sets` into it is refused before it
    writes anything; other sets are free."""
    import shutil

    from cellst.data.pseudo import PseudoLabelSet

    root = shutil.copytree(store_dir, tmp_path / "store")
    item = CellStore(root).ids()[:1]
    busy = PseudoLabelSet(root, "busy")
    with busy.writing():  # the first run
        with pytest.raises(
            StoreError, match="'busy' .* is being written or trained on by another run"
        ):
            predict(lite_checkpoint, root, set_name="busy", ids=item, overwrite=True)
        with pytest.raises(StoreError, match="being written or trained on by another run"):
            predict_sets(
                root,
                [SetRequest(str(lite_checkpoint), "free", None), SetRequest(str(lite_checkpoint), "busy", None)],
                item,
            )  # fmt: skip
        assert not busy.exists() and not PseudoLabelSet(root, "free").exists()
        with PseudoLabelSet(root, "free").writing():  # another set is not held
            pass
    with busy.writing():  # released when the first run ends
        pass


def test_predict_bad_requests(ray_session, store_dir, lite_checkpoint, tmp_path):
    with pytest.raises(StoreError, match="not a cellst checkpoint"):
        predict(tmp_path, store_dir, set_name="x", progress=False)
    with pytest.raises(ClusterError, match="GPU"):
        predict(
            lite_checkpoint,
            store_dir,
            set_name="x",
            resources=PredictConfig(num_gpus_per_actor=1),
            progress=False,
        )
    with pytest.raises(ClusterError, match="num_actors=0 predicts in this process on its CPUs"):
        predict(
            lite_checkpoint,
            store_dir,
            set_name="x",
            resources=PredictConfig(num_actors=0, num_gpus_per_actor=1),
            progress=False,
        )
    with pytest.raises(StoreError, match="--set-name"):
        predict(lite_checkpoint, store_dir, progress=False)
    # an --out that cannot be a folder: one line before Ray, and no set is created
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(ValueError, match=f"{afile} is a file, not a folder"):
        predict(lite_checkpoint, store_dir, set_name="late", out_dir=afile, progress=False)
    assert "late" not in CellStore(store_dir, lease=False).pseudo_sets()


def test_predict_writes_ignore_masks_that_the_training_stream_carries(
    ray_session, store_dir, lite_checkpoint, tmp_path
):
    """``ignore_band``: each pseudo-label gets the mask of its uncertain pixels, the set's
    identity records the band (a resume without it is refused), and the training stream
    reads those pixels as encoded labels."""
    import shutil

    from cellst.data.datasource import CropItem, read_crops
    from cellst.data.pseudo import decode_ignored
    from cellst.inference.batch import uncertain_pixels
    from cellst.model.checkpoint import load_model

    root = shutil.copytree(store_dir, tmp_path / "store")
    store = CellStore(root)
    ids = store.ids("unlabeled")[:2]
    infer = InferenceConfig(roi=128)
    res = predict(
        lite_checkpoint, root, set_name="p", ids=ids, infer=infer, progress=False, ignore_band=0.1
    )
    assert sorted(res.written) == sorted(ids)
    pset = store.pseudo_set("p")
    assert pset.info()["ignore_band"] == 0.1
    model, _, _ = load_model(lite_checkpoint)
    for i in ids:
        prob, _ = predict_maps(model.eval(), store.image(i), infer)
        want = uncertain_pixels(prob, res.postprocess["mask_threshold"], 0.1)
        got = pset.ignore_mask(i).astype(bool)
        assert got.shape == want.shape and 0 < got.sum() < got.size
        assert (got == want).mean() > 0.999  # (torch threads may differ by an ulp)
        stats = pset.stats().set_index("id")
        assert stats.loc[i, "ignored_fraction"] == pytest.approx(got.mean())
    with pytest.raises(StoreError, match="ignore band 0.1 there, 0.0 now"):
        predict(lite_checkpoint, root, set_name="p", ids=ids, infer=infer, progress=False)
    # the training stream: ignored pixels arrive as negative labels, and decode back
    ref = store.ref(ids[0], "p")
    assert ref.ignore == str(pset.ignore_path(ids[0]))
    assert store.ref(ids[0]).ignore is None  # a labelled item's ref has none
    h, w = ref.height, ref.width
    crop = min(h, w)
    (block,) = read_crops(
        [CropItem(ref, 1.0, 1)], np.array([0]), crop, 1, 256, np.random.default_rng(0), 8
    )
    y0, x0 = int(block["y0"][0]), int(block["x0"][0])
    window = (y0, y0 + crop, x0, x0 + crop)
    lab, ign = decode_ignored(block["label"][0])
    assert np.array_equal(lab, pset.label(ids[0], window))
    assert np.array_equal(ign, pset.ignore_mask(ids[0], window))


def test_rescaled_maps_are_written_at_the_image_size(store_dir, lite_checkpoint, tmp_path):
    """The actor's rows carry each image's shape; maps of an upsampled copy (cell-size
    rescaling) are post-processed at their size and written at the image's size, equal to
    ``postprocess_hover(..., shape=...)``: the cells of the label they were made from."""
    import shutil

    from skimage.draw import disk

    from cellst.inference.batch import ModelActor, model_identity, prepare_set, write_rows
    from cellst.metrics.instance import match_instances
    from cellst.model.checkpoint_files import weights_digest
    from cellst.model.targets import hover_maps
    from cellst.postprocess import PostprocessConfig, postprocess_hover

    store = CellStore(shutil.copytree(store_dir, tmp_path / "store"))
    m = store.manifest
    ids = m.assign(px=m["height"] * m["width"]).nsmallest(2, "px")["id"].tolist()
    ck = str(lite_checkpoint)
    post = PostprocessConfig()
    identity = model_identity(weights_digest(ck), post)
    prepare_set(store, "rescaled", ck, False, identity, run_id="r")
    images = np.empty(len(ids), dtype=object)
    images[:] = [store.image(i) for i in ids]
    batch = {"id": np.asarray(ids, dtype=object), "image": images}
    models = [{"checkpoint": ck, "weights_sha256": weights_digest(ck)}]
    rows = ModelActor(models, InferenceConfig(roi=128).model_dump(), False)(batch)
    assert [tuple(s) for s in rows["shape"]] == [im.shape[:2] for im in images]
    labels, probs, hvs = [], [], []
    for image in images:  # what a perfect network gives on 2x copies of discs of 10 px
        label = np.zeros(image.shape[:2], np.int32)
        for n, (cy, cx) in enumerate(((20, 20), (20, 45), (50, 30), (60, 70)), start=1):
            label[disk((cy, cx), 5, shape=label.shape)] = n
        big = np.kron(label, np.ones((2, 2), np.int32))
        labels.append(label)
        probs.append((big > 0).astype(np.float16))
        hvs.append(hover_maps(big).astype(np.float16))
    rows["prob"][:], rows["hv"][:] = probs, hvs
    write = {"post": post.model_dump(), "store_root": str(store.root), "set_name": "rescaled",
             "out_dir": None, "run_id": "r", "checkpoint": ck, "model_id": identity["model_id"]}  # fmt: skip
    done = write_rows(rows, [write])
    assert not any(done["error"])
    for i, label, prob, hv in zip(ids, labels, probs, hvs, strict=True):
        written = store.pseudo_label("rescaled", i)
        assert written.shape == label.shape
        np.testing.assert_array_equal(written, postprocess_hover(prob, hv, post, label.shape))
        assert match_instances(label, written, 0.5).tp == 4


def test_model_id_keeps_the_digest_stored_sets_were_written_with():
    """``model_identity`` hashes through ``fingerprint.stable_hash`` now; the digest must stay
    the one sets and label TIFFs already carry, or no stored set would resume."""
    import hashlib
    import json

    from cellst.inference.batch import model_identity
    from cellst.postprocess.config import PostprocessConfig

    post = PostprocessConfig(mask_threshold=0.6)
    for band in (0.0, 0.2):
        what = {"weights_sha256": "ab" * 32, "postprocess": post.model_dump(mode="json")}
        if band:
            what["ignore_band"] = band
        before = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
        assert model_identity("ab" * 32, post, band)["model_id"] == before


def test_pseudo_labels_of_images_a_reingest_changed_are_predicted_anew(
    synth_src, store_dir, lite_checkpoint, tmp_path
):
    """A re-ingest that changed an unlabelled image left its pseudo-label (of the old image,
    another shape) in the set: predict skipped it as done, training cut crops from it with
    zero padding, export failed on its shape. Now readers refuse the set naming the item,
    export leaves it out, and predict predicts it anew."""
    import shutil

    import tifffile

    from cellst.data.datasource import crop_items
    from cellst.data.images import read_array
    from cellst.data.ingest import ingest
    from cellst.data.store import CellStore
    from cellst.export.omezarr import export_store

    src, store = tmp_path / "src", tmp_path / "store"
    shutil.copytree(synth_src, src)
    shutil.copytree(store_dir, store)
    ids = ["unlabeled_00001", "unlabeled_00002"]
    kw = {"set_name": "p", "ids": ids, "progress": False, "resources": PredictConfig(num_actors=0)}
    kw["infer"] = InferenceConfig(roi=128)
    assert sorted(predict(lite_checkpoint, store, **kw).written) == ids
    # the first image replaced by one of another size, and ingested again
    image = src / "unlabeled" / "images" / "unlabeled_00001.tif"
    tifffile.imwrite(image, read_array(image)[:96, :80])
    ingest(src, store, progress=False)
    s = CellStore(store, lease=False)
    with pytest.raises(StoreError, match=r"1 item\(s\) \(e.g. unlabeled_00001\) were predicted"):
        crop_items(s, pseudo_set="p")
    lines: list[str] = []
    export_store(store, tmp_path / "exp", items=ids, log=lines.append, progress=False)
    assert any("unlabeled_00001" in line and "left out" in line for line in lines), lines
    again = predict(lite_checkpoint, store, **kw)
    assert again.written == ["unlabeled_00001"] and again.skipped == ["unlabeled_00002"]
    s = CellStore(store, lease=False)
    assert s.pseudo_label("p", "unlabeled_00001").shape == (96, 80)
    assert s.pseudo_set("p").stale_items(s.manifest) == []
    assert len(crop_items(s, pseudo_set="p")) == 2
