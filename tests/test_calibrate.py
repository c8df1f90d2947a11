"""Post-processing calibrated per model: the search, postprocess.json, training writes it,
and prediction (CLI, library, ST++) uses it unless the user sets a field explicitly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tifffile
import torch
import yaml
from typer.testing import CliRunner

from cellst.cli import app
from cellst.data.store import CellStore, StoreError
from cellst.experiment import load_config
from cellst.inference.batch import predict
from cellst.inference.predictor import predict_maps
from cellst.model import (
    CheckpointError,
    ModelConfig,
    build_model,
    load_model,
    save_checkpoint,
)
from cellst.model.checkpoint import load_postprocess, save_postprocess
from cellst.postprocess import PostprocessConfig, postprocess_hover
from cellst.postprocess.calibrate import (
    GRID,
    ValMaps,
    calibrate,
    calibrate_checkpoints,
    calibrate_run,
    effective_postprocess,
    score_maps,
    search_postprocess,
)
from cellst.train.checkpoints import RunPaths
from cellst.train.trainer import check_request
from cellst.train.validate import validate

runner = CliRunner()
FIELDS = tuple(GRID)


BASE = [
    "model.width=8",
    "inference.roi=96",
    "data.val_fraction=0.3",
    "train.val_max_items=3",
    "tracking.system_metrics=false",
]


@pytest.fixture(scope="module")
def learned(learn_store, tmp_path_factory, quick_train):
    """A real model trained briefly in-process on the training items of the split that
    ``cellst train`` uses; returns the config, its checkpoint and the validation items."""
    cfg = load_config(None, [f"store={learn_store}", *BASE])
    store, train_ids, val_ids = check_request(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    quick_train(model, store, train_ids, steps=100)
    ckpt = save_checkpoint(tmp_path_factory.mktemp("learned") / "ck", model, cfg.model)
    return cfg, ckpt, val_ids[: cfg.train.val_max_items]


@pytest.fixture(scope="module")
def calibrated(learned, learn_store, tmp_path_factory):
    """A copy of the learned checkpoint, calibrated (``postprocess.json``)."""
    cfg, ckpt, val_ids = learned
    ck = tmp_path_factory.mktemp("calibrated") / "ck"
    shutil.copytree(ckpt, ck)
    cals = calibrate_checkpoints(
        [ck], CellStore(learn_store), val_ids, cfg.inference, cfg.postprocess, cfg.evaluate
    )
    return cfg, ck, val_ids, cals[str(ck)]


def _expected(model, store, item, infer, post) -> np.ndarray:
    prob, hv = predict_maps(model, store.image(item), infer, "cpu")
    return postprocess_hover(prob, hv, post)


# ----------------------------------------------------------------------------- the search
@pytest.mark.parametrize(
    "start",
    [
        {},
        {"mask_threshold": 0.7, "marker_threshold": 0.25, "sobel_kernel": 5},
    ],
)
def test_calibration_never_lowers_val_f1(learned, learn_store, start):
    cfg, ckpt, val_ids = learned
    store = CellStore(learn_store)
    post = PostprocessConfig(**start)
    cal = calibrate(ckpt, store, val_ids, cfg.inference, post, cfg.evaluate)
    assert cal.f1_after >= cal.f1_before and cal.items == val_ids
    assert cal.base == {k: getattr(post, k) for k in FIELDS}
    # training's validation (an independent path) scores both settings the same
    model, _, _ = load_model(ckpt)
    dev = torch.device("cpu")
    before, _, _ = validate(model, store, val_ids, cfg.inference, post, dev)
    assert cal.f1_before == pytest.approx(before["val_f1"], abs=1e-9)
    chosen = post.model_copy(update=cal.settings)
    after, _, _ = validate(model, store, val_ids, cfg.inference, chosen, dev)
    assert cal.f1_after == pytest.approx(after["val_f1"], abs=1e-9)
    if not start:
        assert cal.f1_before > 0.05  # the model finds cells: not a test of empty predictions
        # deterministic: the same inputs give the same settings
        again = calibrate(model, store, val_ids, cfg.inference, post, cfg.evaluate)
        assert again.settings == cal.settings and again.f1_after == cal.f1_after


def test_ties_keep_the_configured_settings():
    """A model that finds nothing scores F1 0 everywhere: nothing beats the configuration."""
    rng = np.random.default_rng(0)
    label = np.zeros((64, 64), np.int32)
    label[10:20, 10:20] = 1
    label[30:45, 30:40] = 2
    maps = [ValMaps(np.zeros((64, 64), np.float16), rng.random((2, 64, 64)), label)]
    post = PostprocessConfig(mask_threshold=0.55, sobel_kernel=15)
    cal = search_postprocess(maps, post)
    assert cal.f1_before == cal.f1_after == 0.0
    assert cal.settings == {k: getattr(post, k) for k in FIELDS} and not cal.changed


def _noisy_maps() -> list[ValMaps]:
    """Blurred, noisy maps of three synthetic fluorescence images: the search moves on them."""
    from scipy import ndimage as ndi

    from cellst.data.synth import synth_image
    from cellst.model.targets import hover_maps

    maps = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        _, gt = synth_image(rng, "fluorescence", (96, 96), 0.4, (4, 8))
        prob = ndi.gaussian_filter((gt > 0).astype(np.float32), 2.0)
        prob = np.clip(prob + rng.normal(0, 0.15, prob.shape), 0, 1).astype(np.float32)
        hv = hover_maps(gt) + rng.normal(0, 0.3, (2, 96, 96)).astype(np.float32)
        maps.append(ValMaps(prob, hv, gt))
    return maps


def test_fields_set_explicitly_are_held_so_the_settings_used_are_the_settings_scored(tmp_path):
    """Calibration searched every field, those the user set too, while a checkpoint used
    with those settings keeps the user's values: it then ran with the other fields tuned
    beside values it never had, a pair nobody scored (val F1 0.315 where calibration
    reported 0.825, on an auditor's maps). A field set explicitly is now held."""
    maps = _noisy_maps()
    post = load_config(None, ["postprocess.mask_threshold=0.7"]).postprocess  # --set
    free = search_postprocess(maps, post, fixed=())
    assert free.settings["mask_threshold"] != 0.7  # searched, it would move
    cal = search_postprocess(maps, post)
    assert cal.fixed == ["mask_threshold"] and cal.settings["mask_threshold"] == 0.7
    assert cal.f1_after >= cal.f1_before and "held: mask_threshold" in cal.summary()
    torch.manual_seed(0)
    mcfg = ModelConfig(name="hovernet-lite", width=8)
    ck = save_checkpoint(tmp_path / "ck", build_model(mcfg), mcfg)
    save_postprocess(ck, cal.settings, cal.meta())
    used, _ = effective_postprocess(post, ck)  # the same configuration, later
    assert score_maps(maps, used)["val_f1"] == pytest.approx(cal.f1_after, abs=1e-12)
    assert load_postprocess(ck)["meta"]["fixed"] == ["mask_threshold"]


def test_stage_and_trial_configs_set_only_what_the_user_set(tmp_path):
    """An ST++ stage's training config (``base()``) and a sweep trial's (``apply``) were
    rebuilt from a dump of every field, so every ``postprocess.*`` field counted as set
    explicitly: the calibration after those trainings held them all and searched nothing
    (the demo's stage-1 model lost its calibration). They now set what the user set."""
    from cellst.stpp.experiment import load_stpp_config
    from cellst.stpp.pipeline import Pipeline
    from cellst.tune.space import apply

    path = tmp_path / "e.yaml"
    path.write_text(f"store: {tmp_path / 'store'}\n")
    stpp = load_stpp_config(path, ["postprocess.mask_threshold=0.6"])
    stage = Pipeline(stpp).stage_train_config("supervised")
    for cfg in (stpp.base(), stpp.training_base(), stage):
        assert cfg.postprocess.model_fields_set == {"mask_threshold"}
        assert cfg.postprocess.mask_threshold == 0.6
    trial = apply(load_config(None, ["store=s"]), {"train.lr": 0.01})
    assert trial.train.lr == 0.01 and trial.postprocess.model_fields_set == set()
    maps = _noisy_maps()
    assert search_postprocess(maps, stage.postprocess).fixed == ["mask_threshold"]


def test_the_search_on_several_threads_equals_the_search_on_one():
    """Each field's candidates are scored side by side on threads; the settings, scores and
    trial count must be those of one thread, on maps where the search moves."""
    maps = _noisy_maps()
    post = PostprocessConfig(mask_threshold=0.7, min_object_size=40)
    one = search_postprocess(maps, post, workers=1, fixed=())
    three = search_postprocess(maps, post, workers=3, fixed=())
    assert one.changed and one.f1_after > one.f1_before  # the search moved
    assert (three.settings, three.after, three.before, three.trials) == (
        one.settings,
        one.after,
        one.before,
        one.trials,
    )


# ----------------------------------------------------------------------------- training
def test_calibration_switched_off_writes_nothing(learned, learn_store, tmp_path):
    """``train.calibrate_postprocess=false``: the hook that ``cellst train`` runs after
    training writes nothing (the calibrating training itself is tested in test_train.py,
    on its shared DDP run)."""
    cfg, ckpt, val_ids = learned
    over = [f"store={learn_store}", *BASE, f"train.run_dir={tmp_path}"]
    off = RunPaths(tmp_path / "off")
    off.checkpoints.mkdir(parents=True)
    shutil.copytree(ckpt, off.checkpoints / "best")
    cfg_off = load_config(None, [*over, "train.calibrate_postprocess=false"])
    assert calibrate_run(cfg_off, CellStore(learn_store), val_ids, off) == {}
    assert load_postprocess(off.checkpoints / "best") is None
    # switched on, the same hook calibrates that checkpoint
    assert calibrate_run(load_config(None, over), CellStore(learn_store), val_ids, off)
    assert load_postprocess(off.checkpoints / "best")["meta"]["items"] == val_ids


def test_calibration_scores_more_items_than_each_epoch_validates(learned, learn_store, tmp_path):
    """A recipe that validates 1 item per epoch for speed still calibrates on up to
    ``train.calibrate_max_items`` validation items: thresholds tuned on a handful over-fit
    them (bench_quality compares both rules on the test split)."""
    cfg, ckpt, val_ids = learned
    assert len(val_ids) >= 3
    paths = RunPaths(tmp_path / "run")
    paths.checkpoints.mkdir(parents=True)
    shutil.copytree(ckpt, paths.checkpoints / "best")
    over = [f"store={learn_store}", *BASE, f"train.run_dir={tmp_path}", "train.val_max_items=1"]
    store = CellStore(learn_store)
    assert calibrate_run(load_config(None, over), store, val_ids, paths)
    assert load_postprocess(paths.checkpoints / "best")["meta"]["items"] == val_ids
    capped = load_config(None, [*over, "train.calibrate_max_items=2"])
    assert calibrate_run(capped, store, val_ids, paths)
    assert load_postprocess(paths.checkpoints / "best")["meta"]["items"] == val_ids[:2]


# ----------------------------------------------------------------------------- postprocess.json
def test_postprocess_json_round_trip(tmp_path):
    torch.manual_seed(0)
    mcfg = ModelConfig(name="hovernet-lite", width=8)
    ck = save_checkpoint(tmp_path / "ck", build_model(mcfg), mcfg)
    assert load_postprocess(ck) is None
    settings = {"mask_threshold": 0.6, "marker_threshold": 0.3, "min_object_size": 20}
    path = save_postprocess(ck, settings, {"val_f1_before": 0.5, "val_f1_after": np.float32(0.6)})
    assert path == ck / "postprocess.json"
    assert sorted(p.name for p in ck.iterdir()) == ["model.json", "model.pt", "postprocess.json"]
    rec = load_postprocess(ck)
    assert rec["settings"] == settings
    assert rec["meta"]["val_f1_after"] == pytest.approx(0.6)
    # settings for other weights are never applied
    torch.manual_seed(1)
    other = save_checkpoint(tmp_path / "other", build_model(mcfg), mcfg)
    save_postprocess(other, settings)
    torch.manual_seed(2)
    save_checkpoint(other, build_model(mcfg), mcfg)  # new weights: the old record is gone
    assert load_postprocess(other) is None
    stale = tmp_path / "stale"
    shutil.copytree(ck, stale)
    shutil.copy2(other / "model.pt", stale / "model.pt")
    with pytest.warns(UserWarning, match="other weights"):
        assert load_postprocess(stale) is None
    # a damaged record is a clear error (and one line from the CLI)
    (stale / "postprocess.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="postprocess.json"):
        load_postprocess(stale)
    with pytest.raises(StoreError, match="postprocess.json"):
        effective_postprocess(None, stale)
    with pytest.raises(CheckpointError, match="does not exist"):
        save_postprocess(tmp_path / "nothing", settings)


def test_effective_postprocess_explicit_fields_win(tmp_path):
    torch.manual_seed(0)
    mcfg = ModelConfig(name="hovernet-lite", width=8)
    ck = save_checkpoint(tmp_path / "ck", build_model(mcfg), mcfg)
    plain, note = effective_postprocess(PostprocessConfig(), ck)
    assert plain == PostprocessConfig() and "not calibrated" in note
    settings = {"mask_threshold": 0.6, "marker_threshold": 0.3, "min_object_size": 20}
    save_postprocess(ck, settings, {"n_items": 4, "val_f1_before": 0.61, "val_f1_after": 0.66})
    post, note = effective_postprocess(load_config(None, []).postprocess, ck)
    assert {k: getattr(post, k) for k in settings} == settings
    assert "calibrated on 4 validation items (val F1 0.610 -> 0.660)" in note
    # --set and YAML values are explicit: they win over the calibrated ones
    over = load_config(None, ["postprocess.mask_threshold=0.45"]).postprocess
    post, note = effective_postprocess(over, ck)
    assert post.mask_threshold == 0.45 and post.min_object_size == 20
    assert "kept: mask_threshold=0.45" in note
    yml = tmp_path / "e.yaml"
    yml.write_text(yaml.safe_dump({"postprocess": {"min_object_size": 10, "tile": 1024}}))
    post, _ = effective_postprocess(load_config(yml).postprocess, ck)
    assert post.min_object_size == 10 and post.mask_threshold == 0.6 and post.tile == 1024
    # calibrated values that the user's other settings make invalid are not applied
    save_postprocess(ck, {"sobel_kernel": 101}, {})
    tight = PostprocessConfig(tile=256, tile_overlap=64)
    post, note = effective_postprocess(tight, ck)
    assert post == tight and "do not fit" in note


def test_effective_inference_adopts_the_calibrations_settings_unless_set(tmp_path):
    """What a checkpoint was calibrated with (cell-size rescaling, the window) is what
    `cellst predict` and `cellst segment` use where the user leaves it unset: without it a
    demo model lost about 0.08 test F1 in `cellst segment`."""
    from cellst.postprocess.calibrate import effective_inference

    torch.manual_seed(0)
    mcfg = ModelConfig(name="hovernet-lite", width=8)
    ck = save_checkpoint(tmp_path / "ck", build_model(mcfg), mcfg)
    plain = load_config(None, []).inference
    assert effective_inference(plain, ck) == (plain, "")  # not calibrated: as given
    save_postprocess(
        ck, {"mask_threshold": 0.6}, {"inference": {"rescale_diameter": 20.0, "roi": 128}}
    )
    infer, note = effective_inference(plain, ck)
    assert (infer.rescale_diameter, infer.roi, infer.tta) == (20.0, 128, False)
    assert "calibration settings, rescale_diameter=20.0, roi=128" in note
    assert "not as the checkpoint was calibrated" not in note
    assert effective_inference(infer, ck) == (infer, "")  # once applied, nothing more to say
    assert effective_inference(None, ck)[0] == infer
    # --set, YAML and flags are explicit: kept, and the note says they differ
    over = load_config(None, ["inference.roi=256"]).inference
    infer, note = effective_inference(over, ck)
    assert (infer.rescale_diameter, infer.roi) == (20.0, 256)
    assert "roi 128 there, 256 (the default) here" in note
    flagged = load_config(None, []).inference
    flagged.rescale_diameter = None  # as `--rescale-diameter` / `--tta` assign
    infer, note = effective_inference(flagged, ck)
    assert (infer.rescale_diameter, infer.roi) == (None, 128)
    assert "rescale_diameter 20.0 there, none (the default) here" in note
    # a recorded default (absent from the record) is applied too
    save_postprocess(ck, {"mask_threshold": 0.6}, {"inference": {"tta": True}})
    infer, _ = effective_inference(load_config(None, ["inference.roi=64"]).inference, ck)
    assert (infer.tta, infer.roi, infer.rescale_diameter) == (True, 64, None)


# ----------------------------------------------------------------------------- prediction
def test_cli_predict_uses_calibrated_settings(calibrated, learn_store, tmp_path):
    cfg, ck, val_ids, cal = calibrated
    assert cal.changed  # the search moved something on this model
    want = PostprocessConfig(**load_postprocess(ck)["settings"])
    out = tmp_path / "tiffs"
    result = runner.invoke(
        app,
        [
            "predict",
            "--checkpoint",
            str(ck),
            "--input",
            str(learn_store),
            "--split",
            "labeled",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"calibrated on {len(val_ids)} validation items" in result.output
    # the window the checkpoint was calibrated with, not the schema's 256 (no option given)
    assert cfg.inference.roi == 96
    assert "calibration settings, roi=96" in " ".join(result.output.split())
    store = CellStore(learn_store)
    model, _, _ = load_model(ck)
    differs = 0
    for item in store.ids("labeled"):
        got = tifffile.imread(out / f"{item}_label.tiff")
        np.testing.assert_array_equal(got, _expected(model, store, item, cfg.inference, want))
        plain = _expected(model, store, item, cfg.inference, PostprocessConfig())
        differs += not np.array_equal(got, plain)
    assert differs > 0  # the calibrated settings, not the defaults, made these maps


def test_predict_explicit_override_wins(ray_session, calibrated, learn_store, tmp_path):
    cfg, ck, val_ids, _ = calibrated
    settings = load_postprocess(ck)["settings"]
    yml = tmp_path / "e.yaml"
    yml.write_text(yaml.safe_dump({"postprocess": {"min_object_size": 3}}))
    user = load_config(yml, ["inference.roi=96"])
    result = predict(
        ck,
        learn_store,
        out_dir=tmp_path / "tiffs",
        ids=val_ids,
        infer=user.inference,
        post=user.postprocess,
        progress=False,
    )
    want = PostprocessConfig(**{**settings, "min_object_size": 3})
    assert result.postprocess == want.model_dump()
    assert "kept: min_object_size=3" in result.postprocess_note
    store = CellStore(learn_store)
    model, _, _ = load_model(ck)
    for item in val_ids:
        got = tifffile.imread(tmp_path / "tiffs" / f"{item}_label.tiff")
        np.testing.assert_array_equal(got, _expected(model, store, item, cfg.inference, want))
    # calibrated=False: exactly the settings given
    given = predict(
        ck,
        learn_store,
        out_dir=tmp_path / "plain",
        ids=val_ids[:1],
        infer=user.inference,
        post=PostprocessConfig(),
        progress=False,
        calibrated=False,
    )
    assert given.postprocess == PostprocessConfig().model_dump()


def test_stpp_prediction_uses_calibrated_settings(ray_session, calibrated, learn_store, tmp_path):
    """The ST++ stages (reliability, pseudo-labels, evaluation) all predict through
    ``cellst.stpp.bodies.predict_sets``: it applies the checkpoint's calibration."""
    from cellst.stpp import load_stpp_config
    from cellst.stpp.bodies import predict_set
    from cellst.stpp.pipeline import Pipeline

    _, calibrated_ck, val_ids, _ = calibrated
    store = tmp_path / "store"
    shutil.copytree(learn_store, store)
    ck = tmp_path / "ck"
    shutil.copytree(calibrated_ck, ck)
    scfg = load_stpp_config(
        None, [f"store={store}", f"stpp.run_dir={tmp_path / 'stpp'}", "inference.roi=96"]
    )
    logs: list[str] = []
    pipe = Pipeline(scfg, log=logs.append)
    pipe.dir.mkdir(parents=True)
    result, key = predict_set(pipe, "t-test", str(ck), val_ids, scfg.inference, "p")
    rec = load_postprocess(ck)
    assert result.postprocess == PostprocessConfig(**rec["settings"]).model_dump()
    assert any("calibrated on" in line for line in logs), logs
    # the set's key follows the settings used, so a changed calibration re-predicts the set
    (ck / "postprocess.json").unlink()
    again, plain_key = predict_set(pipe, "t-test", str(ck), val_ids, scfg.inference, "p")
    assert plain_key != key and sorted(again.written) == sorted(val_ids)
    assert again.postprocess == scfg.postprocess.model_dump()
    assert json.loads((pipe.dir / "pipeline.json").read_text())["sets"]["t-test"] == plain_key


def test_validation_f1_is_the_f1_cellst_evaluate_reports(
    ray_session, learned, learn_store, tmp_path
):
    """Training's validation (in-process maps, :func:`score_item`) and ``cellst predict``
    + ``cellst evaluate`` (the batch path, label files, the report) are two routes to one
    number: the same checkpoint, items and settings give the same F1 on both."""
    from cellst.data.images import label_file_name
    from cellst.inference.config import PredictConfig
    from cellst.metrics.sources import evaluate_sources

    cfg, ckpt, val_ids = learned
    store = CellStore(learn_store)
    model, _, _ = load_model(ckpt)
    got, _, _ = validate(
        model,
        store,
        val_ids,
        cfg.inference,
        cfg.postprocess,
        torch.device("cpu"),
        evaluate=cfg.evaluate,
    )
    assert got["val_f1"] > 0.05  # the model finds cells: not a test of empty predictions
    gt = tmp_path / "gt"
    gt.mkdir()
    for item in val_ids:
        tifffile.imwrite(gt / label_file_name(item), store.label(item))
    predict(
        ckpt,
        learn_store,
        out_dir=tmp_path / "pred",
        ids=list(val_ids),
        infer=cfg.inference,
        post=cfg.postprocess,
        calibrated=False,
        resources=PredictConfig(num_actors=0),
        progress=False,
    )
    rep = evaluate_sources(gt, tmp_path / "pred", gt_split=None, progress=False)
    assert rep["count"] == len(val_ids) and not rep.get("missing")
    assert rep["f1"] == pytest.approx(got["val_f1"], abs=1e-9)


def test_validation_f1_follows_the_evaluate_section(learned, learn_store):
    """``val_f1`` means what ``cellst evaluate``'s F1 means: the same IoU threshold and
    boundary rule (the ``evaluate`` section), not the defaults."""
    from cellst.config import EvaluateConfig
    from cellst.metrics.instance import image_scores, summarize

    cfg, ckpt, val_ids = learned
    store = CellStore(learn_store)
    model, _, _ = load_model(ckpt)
    strict = EvaluateConfig(iou_threshold=0.9, count_boundary=True)
    got, _, _ = validate(
        model, store, val_ids, cfg.inference, cfg.postprocess, torch.device("cpu"), evaluate=strict
    )
    default, _, _ = validate(model, store, val_ids, cfg.inference, cfg.postprocess, "cpu")
    rows = [
        {
            "modality": store.row(i).modality,
            **image_scores(
                store.label(i),
                _expected(model, store, i, cfg.inference, cfg.postprocess),
                count_boundary=True,
                iou_threshold=0.9,
            ),
        }
        for i in val_ids
    ]
    assert got["val_f1"] == pytest.approx(summarize(rows, by="modality")["f1"], abs=1e-9)
    assert default["val_f1"] > 0.05 and got["val_f1"] < default["val_f1"]
