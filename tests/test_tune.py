"""Ray Tune sweeps: search-space checks, a postprocess sweep and a training sweep on real Ray,
MLflow parent/child runs, outputs, and resume."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from cellst.cli import app
from cellst.config import ConfigError
from cellst.data.store import CellStore
from cellst.model import ModelConfig, build_model, load_model, save_checkpoint
from cellst.model.checkpoint_files import save_postprocess
from cellst.postprocess import PostprocessConfig
from cellst.train.trainer import check_request
from cellst.train.validate import validate
from cellst.tune.space import apply, load_tune_config, to_tune
from cellst.tune.sweep import run_sweep

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _config(path: Path, **data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("space", "needle"),
    [
        ({"postprocess.bogus": {"uniform": [0, 1]}}, "tune.space.postprocess.bogus: unknown key"),
        ({"postprocess.mask_threshold": {"uniform": [0.5, 1.5]}}, "mask_threshold"),
        ({"postprocess.mask_threshold": {"uniform": [0.7, 0.3]}}, "low must be below high"),
        ({"postprocess.mask_threshold": {"uniform": [0.3, 0.7], "choice": [1]}}, "exactly one"),
        ({"train.lr": {"loguniform": [1e-4, 1e-2]}}, "only varies postprocess"),
        ({}, "at least one field"),
    ],
)
def test_space_errors_name_the_field(tmp_path, space, needle):
    cfg = _config(
        tmp_path / "s.yaml",
        store=str(tmp_path),
        tune={"mode": "postprocess", "checkpoint": str(tmp_path), "space": space},
    )
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_tune_config(cfg)
    res = runner.invoke(app, ["tune", str(cfg)])
    assert res.exit_code == 2 and needle.split(":")[0] in res.output


def test_missing_checkpoint_and_store_are_config_errors(tmp_path):
    space = {"postprocess.mask_threshold": {"uniform": [0.3, 0.7]}}
    cfg = _config(tmp_path / "s.yaml", store=str(tmp_path), tune={"space": space})
    with pytest.raises(ConfigError, match="tune.checkpoint"):
        load_tune_config(cfg)
    cfg = _config(tmp_path / "s.yaml", tune={"space": space, "checkpoint": str(tmp_path)})
    with pytest.raises(ConfigError, match="no store configured"):
        load_tune_config(cfg)
    # a training sweep reports through Ray Train's callbacks: not from a run in one process
    cfg = _config(tmp_path / "s.yaml", store=str(tmp_path), tune={"space": space, "mode": "train"})
    with pytest.raises(ConfigError, match="train.num_workers: 0 trains in one process"):
        load_tune_config(cfg, ["train.num_workers=0"])
    with pytest.raises(ConfigError, match="train.min_workers: a training sweep's trials"):
        load_tune_config(cfg, ["train.num_workers=2", "train.min_workers=1"])


def test_a_damaged_checkpoint_is_named_before_the_sweep_starts(store_dir, tmp_path):
    """Truncated weights, or a model.json that is not text, surfaced as a Ray task's
    traceback (or a bare codec message): one line naming the file, exit 1, nothing run."""
    mcfg = ModelConfig(name="hovernet-lite", width=8)
    ckpt = save_checkpoint(tmp_path / "ckpt", build_model(mcfg), mcfg)
    weights = ckpt / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    space = {"postprocess.mask_threshold": {"uniform": [0.3, 0.7]}}
    tune = {"checkpoint": str(ckpt), "space": space, "run_dir": str(tmp_path / "runs")}
    cfg = _config(tmp_path / "s.yaml", store=str(store_dir), tune=tune)
    res = runner.invoke(app, ["tune", str(cfg)])
    assert res.exit_code == 1, res.output
    assert len(res.output.strip().splitlines()) == 1 and str(ckpt) in res.output, res.output
    assert not (tmp_path / "runs").exists()
    (ckpt / "model.json").write_bytes(b"\xff\xfe\x00binary")
    res = runner.invoke(app, ["tune", str(cfg)])
    assert res.exit_code == 1, res.output
    assert f"{ckpt / 'model.json'} is not readable JSON" in " ".join(res.output.split())


def test_a_second_run_of_a_running_sweep_is_refused_touching_nothing(store_dir, tmp_path):
    """Two `cellst tune` of one sweep at once wrote their trials and sweep.json into one
    folder (and the second could start the first's over under it): while one process holds
    the sweep's lock, another is refused in one line, exit 1, before writing anything."""
    from cellst.fs import file_lock, lock_beside

    mcfg = ModelConfig(name="hovernet-lite", width=4)
    ckpt = save_checkpoint(tmp_path / "ckpt", build_model(mcfg), mcfg)
    space = {"postprocess.mask_threshold": {"uniform": [0.3, 0.7]}}
    runs = tmp_path / "runs"
    tune = {"checkpoint": str(ckpt), "space": space, "run_dir": str(runs), "name": "busy"}
    cfg = _config(tmp_path / "s.yaml", store=str(store_dir), tune=tune)
    runs.mkdir()
    with file_lock(lock_beside(runs / "busy"), wait=False):  # the sweep's running process
        res = runner.invoke(app, ["tune", str(cfg)])
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"sweep {runs / 'busy'} is being run by another process" in lines[0], lines
    assert not (runs / "busy").exists()


def test_a_stopped_trials_placement_group_is_released_and_its_run_marked(
    ray_session, tmp_path, monkeypatch
):
    """What Tune leaves when it stops a training trial (ray-project/ray#54305): the worker
    group's placement group, and a run.json saying "running". Both are put right, the
    record first: removing the group ends the workers, and the trial's training, seeing
    them die, must find "stopped" there (else it writes "failed", as CI once saw)."""
    import sys

    import ray
    from ray.util.placement_group import placement_group

    from cellst.fs import atomic_write_json
    from cellst.tune.sweep import release_stopped_trial, trial_run_dir

    pg = placement_group([{"CPU": 0.01}])
    ray.get(pg.ready(), timeout=60)
    run = trial_run_dir(tmp_path, "s", "abc_00001")
    atomic_write_json(run / "workers" / "rank0.json", {"rank": 0, "placement_group": pg.id.hex()})
    atomic_write_json(run / "run.json", {"status": "running"})
    pgs = sys.modules["ray.util.placement_group"]  # (ray.util.placement_group: a function)
    seen, remove = [], pgs.remove_placement_group

    def record_then_remove(group):
        seen.append(json.loads((run / "run.json").read_text())["status"])
        remove(group)

    monkeypatch.setattr(pgs, "remove_placement_group", record_then_remove)
    assert release_stopped_trial(run) == [pg.id.hex()]
    assert seen == ["stopped"]  # already marked when the workers were ended
    assert ray.util.placement_group_table(pg)["state"] == "REMOVED"
    assert json.loads((run / "run.json").read_text())["status"] == "stopped"
    assert release_stopped_trial(run) == []  # nothing left to release
    finished = trial_run_dir(tmp_path, "s", "abc_00002")
    atomic_write_json(finished / "run.json", {"status": "finished"})
    assert release_stopped_trial(finished) == []
    assert json.loads((finished / "run.json").read_text())["status"] == "finished"
    # a trial whose process died without a word (Tune's on_trial_error) is not "stopped"
    from cellst.tune.sweep import ReleaseStoppedTrials

    died = trial_run_dir(tmp_path, "s", "abc_00003")
    atomic_write_json(died / "run.json", {"status": "running"})
    trial = type("Trial", (), {"trial_id": "abc_00003"})()
    ReleaseStoppedTrials(tmp_path, "s").on_trial_error(0, [], trial)
    state = json.loads((died / "run.json").read_text())
    assert state["status"] == "failed", state
    assert "without its training recording why" in state["error"], state


def test_a_sweep_on_other_inference_settings_than_the_calibrations_is_named(tmp_path):
    """The checkpoint's calibration records the inference settings its maps were predicted
    with; a post-processing sweep that predicts otherwise (another window) scored the
    current settings lower than the calibration had, and said nothing."""
    from cellst.inference.config import InferenceConfig
    from cellst.model.checkpoint_files import save_postprocess
    from cellst.postprocess.calibrate import calibrated_with_other_inference

    mcfg = ModelConfig(name="hovernet-lite", width=8)
    ckpt = save_checkpoint(tmp_path / "ckpt", build_model(mcfg), mcfg)
    assert calibrated_with_other_inference(str(ckpt), InferenceConfig()) == ""  # none yet
    save_postprocess(ckpt, PostprocessConfig().model_dump(), {"inference": {"roi": 96}})
    assert calibrated_with_other_inference(str(ckpt), InferenceConfig(roi=96)) == ""
    assert calibrated_with_other_inference(str(ckpt), InferenceConfig(roi=128, tta=True)) == (
        "roi 96 there, 128 here, tta False (the default) there, True here"
    )


def test_trial_settings_apply_like_overrides():
    from cellst.experiment import ExperimentConfig

    cfg = apply(ExperimentConfig(), {"postprocess.min_object_size": 40, "train.lr": 0.01})
    assert cfg.postprocess.min_object_size == 40 and cfg.train.lr == 0.01
    shipped = load_tune_config(ROOT / "experiments" / "sweep_augment.yaml")
    assert set(to_tune(shipped.tune.space)) == set(shipped.tune.space)


@pytest.fixture(scope="module")
def pp_sweep(ray_session, learn_store, tmp_path_factory, quick_train):
    """A postprocess sweep (CLI) on a real checkpoint of a model that finds cells (so the
    trials' scores depend on their settings), then the same command again."""
    tmp = tmp_path_factory.mktemp("tune")
    torch.manual_seed(3)
    mcfg = ModelConfig(name="hovernet-lite", width=8)
    store = CellStore(learn_store)
    model = quick_train(build_model(mcfg), store, store.ids("labeled"), steps=100)
    ckpt = save_checkpoint(tmp / "ckpt", model, mcfg)
    cfg = _config(
        tmp / "sweep.yaml",
        name="pp",
        store=str(learn_store),
        model={"name": "hovernet-lite", "width": 8},
        inference={"roi": 96, "tta": False},
        data={"val_fraction": 0.3},
        tracking={"system_metrics": False},
        tune={
            "mode": "postprocess",
            "checkpoint": str(ckpt),
            "num_samples": 4,
            "run_dir": str(tmp / "runs"),
            "space": {
                "postprocess.mask_threshold": {"uniform": [0.3, 0.7]},
                "postprocess.min_object_size": {"choice": [5, 40]},
            },
        },
    )
    first = runner.invoke(app, ["tune", str(cfg)])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["tune", str(cfg)])
    assert again.exit_code == 0, again.output
    return load_tune_config(cfg), ckpt, first.output, again.output


def test_postprocess_sweep_scores_each_setting_on_validation_items(pp_sweep):
    cfg, ckpt, output, _ = pp_sweep
    # how far it has got, while it runs (it printed nothing until the end)
    assert re.search(r"\[tune\] 4/4 trial\(s\) ended; best val_f1 [\d.]+", output), output
    root = Path(cfg.tune.run_dir) / "pp"
    table = pd.read_csv(root / "results.csv")
    assert len(table) == 4 and (table["status"] == "done").all()
    assert table["val_f1"].is_monotonic_decreasing  # best first
    # a model that finds cells: the scores are real and depend on the trial's settings
    assert table["val_f1"].iloc[0] > 0.05 and table["val_f1"].nunique() > 1
    assert "current settings: val_f1" in output
    store, _, val_ids = check_request(cfg)
    model, _, _ = load_model(ckpt)
    # an independent path: whole-image inference + post-processing + metric, in-process
    for row in table.head(2).to_dict(orient="records"):
        post = PostprocessConfig(
            mask_threshold=row["postprocess.mask_threshold"],
            min_object_size=int(row["postprocess.min_object_size"]),
        )
        got, _, _ = validate(model, store, val_ids, cfg.inference, post, torch.device("cpu"))
        assert row["val_f1"] == pytest.approx(got["val_f1"], abs=1e-6)
    best = yaml.safe_load((root / "best.yaml").read_text())
    top = table["val_f1"].iloc[0]
    assert best["best_trial"]["score"] == pytest.approx(top)
    assert any(s.startswith("postprocess.mask_threshold=") for s in best["best_trial"]["set"])
    # the advice: the best trial where it beats the current settings, else the current ones
    if top > best["current_settings_score"]:
        assert not best["keep_current_settings"] and best["set"] == best["best_trial"]["set"]
        assert "best val_f1" in output
        assert (
            best["config"]["postprocess"]["min_object_size"]
            == table.iloc[0]["postprocess.min_object_size"]
        )
    else:
        assert best["keep_current_settings"] and best["set"] == []
        assert "no trial beat the current settings" in output
    assert (root / "sweep.png").stat().st_size > 1000


def test_best_yaml_keeps_the_current_settings_when_no_trial_beats_them(tmp_path, monkeypatch):
    """A sweep whose every trial scores below the current settings advises keeping them:
    ``best.yaml`` sets nothing (its config is the current one) and still names the best
    trial; one that beats them is the advice. The sweep's MLflow parent run (a real SQLite
    store) headlines the advice's score, and ``cellst compare`` shows that one."""
    from cellst.experiment import load_config
    from cellst.tracking import TrackingConfig, log_metrics, start_run
    from cellst.tracking.compare import collect_runs
    from cellst.tune.sweep import sweep_scores, write_outputs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    cfg = load_config(None, ["postprocess.mask_threshold=0.5"])
    table = pd.DataFrame(
        {"postprocess.mask_threshold": [0.3, 0.7], "val_f1": [0.20, 0.10], "status": "done"}
    )
    for baseline, keep in ((0.25, True), (0.15, False)):
        write_outputs(cfg, tmp_path, table, "val_f1", {"postprocess.mask_threshold": 0.3}, baseline)
        best = yaml.safe_load((tmp_path / "best.yaml").read_text())
        assert best["keep_current_settings"] is keep
        assert best["best_trial"] == {"score": 0.20, "set": ["postprocess.mask_threshold=0.3"]}
        assert best["set"] == ([] if keep else ["postprocess.mask_threshold=0.3"])
        assert best["score"] == (0.25 if keep else 0.20)
        assert best["config"]["postprocess"]["mask_threshold"] == (0.5 if keep else 0.3)
        # the parent run, as run_sweep logs it
        tags = {"cellst.stage": "tune", "cellst.tune.mode": "postprocess"}
        tracking = TrackingConfig(system_metrics=False)
        folder = tmp_path / f"sweep-{keep}"
        with start_run(tracking, folder, "pp", "pp-tune", tags=tags) as run:
            log_metrics(sweep_scores(0.20, baseline, len(table)))
        metrics = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").get_run(run.info.run_id)
        metrics = metrics.data.metrics
        assert metrics["best_val_f1"] == pytest.approx(best["score"])
        assert metrics["best_trial_val_f1"] == pytest.approx(best["best_trial"]["score"])
        assert metrics["baseline_val_f1"] == pytest.approx(baseline)
        assert metrics["keep_current_settings"] == float(keep)
        # and a sweep logged before best_trial_val_f1 (best_val_f1 was the best trial's)
        with start_run(tracking, folder, "pp", "pp-old-tune", tags=tags):
            log_metrics({"best_val_f1": 0.20, "baseline_val_f1": baseline, "trials": 2.0})
        shown = collect_runs(folder).set_index("name")
        assert shown.loc["pp-tune", "val_f1"] == pytest.approx(best["score"])
        assert shown.loc["pp-old-tune", "val_f1"] == pytest.approx(best["score"])


def test_postprocess_sweep_mlflow_runs_and_resume(pp_sweep):
    cfg, _, _, again = pp_sweep
    root = Path(cfg.tune.run_dir) / "pp"
    state = json.loads((root / "sweep.json").read_text())
    client = MlflowClient(state["uri"])
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED" and "best_val_f1" in parent.data.metrics
    # the headline score is the advice's (best.yaml), the best trial's logged beside it
    best = yaml.safe_load((root / "best.yaml").read_text())
    assert parent.data.metrics["best_val_f1"] == pytest.approx(best["score"])
    assert parent.data.metrics["best_trial_val_f1"] == pytest.approx(best["best_trial"]["score"])
    assert parent.data.metrics["keep_current_settings"] == float(best["keep_current_settings"])
    # the sweep records the manifest version it read, in its state and on its run
    assert state["store_version"] == CellStore(cfg.store).version
    assert parent.data.tags["store.version"] == state["store_version"]
    # the lock its process held: `cellst compare` tells a killed sweep (and its trials) by it
    from cellst.fs import lock_beside
    from cellst.tracking.config import LOCK_TAG

    assert parent.data.tags[LOCK_TAG] == str(lock_beside(root))
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    # the second command resumed the finished sweep: no new trial runs
    assert len(children) == 4 and "resuming" in again
    table = pd.read_csv(root / "results.csv")
    by_id = {r.info.run_id: r for r in children}
    for row in table.to_dict(orient="records"):
        run = by_id[row["mlflow_run_id"]]
        assert run.data.metrics["val_f1"] == pytest.approx(row["val_f1"])
        assert float(run.data.params["postprocess.mask_threshold"]) == pytest.approx(
            row["postprocess.mask_threshold"]
        )


def test_a_sweep_on_a_retrained_checkpoint_starts_over_and_best_yaml_holds_its_calibration(
    pp_sweep, tmp_path
):
    """A post-processing sweep resumed whenever its settings were the same, so after the
    checkpoint at its path was trained again it reported the old weights' trials as the
    new ones'; the weights (and the store's version) are now part of what it resumes on."""
    import shutil

    cfg, ckpt = pp_sweep[0], pp_sweep[1]
    mine = tmp_path / "ckpt"
    shutil.copytree(ckpt, mine)
    data = cfg.model_dump(mode="json", exclude={"postprocess"})  # the checkpoint's apply
    data["tune"].update(name="ppc", num_samples=2, checkpoint=str(mine))
    data["tune"]["run_dir"] = str(tmp_path / "runs")
    path = _config(tmp_path / "sweep.yaml", **data)
    first = runner.invoke(app, ["tune", str(path)])
    assert first.exit_code == 0, first.output
    state = json.loads((tmp_path / "runs" / "ppc" / "sweep.json").read_text())
    model, mcfg, _ = load_model(mine)
    with torch.no_grad():
        next(model.parameters()).mul_(0.5)
    save_checkpoint(mine, model, mcfg)  # trained again: same path, other weights
    save_postprocess(mine, {"marker_threshold": 0.35, "sobel_kernel": 15})  # and calibrated
    again = runner.invoke(app, ["tune", str(path)])
    assert again.exit_code == 0, again.output
    text = " ".join(again.output.split())
    assert "the checkpoint's weights changed since the last run" in text, text[-2000:]
    assert "starting the sweep over" in text and "resuming" not in text
    now = json.loads((tmp_path / "runs" / "ppc" / "sweep.json").read_text())
    assert now["parent_run_id"] != state["parent_run_id"]
    assert now["checkpoint"] != state["checkpoint"]
    # the replaced sweep's parent run names its successor (compare shows it superseded)
    old = MlflowClient(now["uri"]).get_run(state["parent_run_id"])
    assert old.data.tags["cellst.superseded_by"] == now["parent_run_id"]
    # best.yaml's config holds the settings its score refers to: the calibrated ones the
    # trials' own were set on (it held the defaults, which scored something else)
    best = yaml.safe_load((tmp_path / "runs" / "ppc" / "best.yaml").read_text())
    post = best["config"]["postprocess"]
    assert post["marker_threshold"] == 0.35 and post["sobel_kernel"] == 15, post


def test_cached_validation_predictions_follow_a_reingested_label(pp_sweep, tmp_path):
    """A post-processing sweep caches its validation predictions (with their ground truth)
    by checkpoint, settings and items. A re-ingest that changed a validation label started
    the sweep over, but the cache, keyed by the store's path, was found: every trial was
    scored against the old labels. The items' stored arrays are now part of the key."""
    import shutil

    import numpy as np
    import tifffile

    from cellst.data.ingest import ingest
    from cellst.tune.sweep import prepare_maps

    cfg = pp_sweep[0]
    src, store = tmp_path / "src", tmp_path / "store"
    shutil.copytree(Path(cfg.store).parent / "src", src)
    ingest(src, store, progress=False)
    mine = cfg.model_copy(update={"store": str(store)})
    ids = sorted(CellStore(store, lease=False).ids("labeled"))[:2]
    first = prepare_maps(mine, ids, tmp_path / "sweep", print)
    assert prepare_maps(mine, ids, tmp_path / "sweep", print) == first  # cached
    label_file = next(src.rglob(f"{ids[0]}_label.tiff"))
    arr = tifffile.imread(label_file)
    arr[arr == arr.max()] = 0  # one cell fewer
    tifffile.imwrite(label_file, arr)
    ingest(src, store, progress=False)
    again = prepare_maps(mine, ids, tmp_path / "sweep", print)
    assert again != first
    now = CellStore(store, lease=False).label(ids[0])
    with np.load(again / f"{ids[0]}.npz") as z:
        assert np.array_equal(z["label"] > 0, now > 0)


def test_a_sweep_started_over_removes_the_earlier_sweeps_results(pp_sweep, tmp_path, monkeypatch):
    """A sweep whose checkpoint changed starts over; interrupted before its own results,
    it left the earlier sweep's results.csv, best.yaml and sweep.png beside its new
    sweep.json, another sweep's advice presented as this one's. They go when it starts over."""
    import shutil

    import cellst.tune.sweep as sweep

    cfg, ckpt = pp_sweep[0], pp_sweep[1]
    mine = tmp_path / "ckpt"
    shutil.copytree(ckpt, mine)
    data = cfg.model_dump(mode="json", exclude={"postprocess"})
    data["tune"].update(name="ppo", num_samples=2, checkpoint=str(mine))
    data["tune"]["run_dir"] = str(tmp_path / "runs")
    path = _config(tmp_path / "sweep.yaml", **data)
    assert runner.invoke(app, ["tune", str(path)]).exit_code == 0
    root = tmp_path / "runs" / "ppo"
    assert all((root / f).is_file() for f in sweep.RESULT_FILES)
    model, mcfg, _ = load_model(mine)
    with torch.no_grad():
        next(model.parameters()).mul_(0.5)
    save_checkpoint(mine, model, mcfg)  # trained again: the sweep starts over

    def ctrl_c(*args, **kwargs):  # Ctrl-C while it predicts the validation items anew
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "prepare_maps", ctrl_c)
    again = runner.invoke(app, ["tune", str(path)])
    assert again.exit_code == 130, again.output
    assert "starting the sweep over" in " ".join(again.output.split())
    assert not [f for f in sweep.RESULT_FILES if (root / f).exists()]


def test_training_sweep_trains_each_trial(ray_session, store_dir, tmp_path):
    cfg = load_tune_config(
        None,
        [
            f"store={store_dir}",
            "name=ts",
            "model.width=8",
            "data.crop_size=96",
            "data.crops_per_epoch=16",
            "train.epochs=2",
            "train.batch_size=4",
            "train.val_max_items=1",
            "inference.roi=96",
            "tracking.system_metrics=false",
            "tune.mode=train",
            "tune.num_samples=1",
            "tune.scheduler=asha",
            f"tune.run_dir={tmp_path}",
            'tune.space={"train.lr": {"grid": [0.001, 0.003]}}',
        ],
    )
    # ASHA stopped the first trial at its last epoch (max_t), and the worker group's
    # placement group outlived it: the second trial waited for its CPUs for ever
    import ray

    done: dict = {}
    sweep = threading.Thread(
        target=lambda: done.update(result=run_sweep(cfg, log=lambda _: None)), daemon=True
    )
    sweep.start()
    sweep.join(timeout=420)
    assert "result" in done, "the sweep did not end: a stopped trial's CPUs were never freed"
    result = done["result"]
    table = result.table
    assert len(table) == 2 and (table["status"] == "done").all()
    assert table["iterations"].tolist() == [2, 2]  # one report per epoch reached Tune
    assert table["best_val_f1"].between(0, 1).all()
    trials = sorted((tmp_path / "ts" / "trials").iterdir())
    runs = [p for p in trials if (p / "checkpoints" / "best" / "model.json").is_file()]
    assert len(runs) == 2
    # the first trial ends by itself (calibrated); a trial ASHA stops is never "running"
    states = {p: json.loads((p / "run.json").read_text())["status"] for p in runs}
    assert "finished" in states.values(), states
    assert set(states.values()) <= {"finished", "stopped"}, states
    for run, state in states.items():
        assert state != "finished" or (run / "checkpoints" / "best" / "postprocess.json").is_file()
    # the trials' worker groups hold nothing any more (Ray Train removes a finished one's;
    # cellst the one of a trial Tune stopped)
    groups = {
        json.loads(r.read_text())["placement_group"]
        for run in runs
        for r in (run / "workers").glob("rank*.json")
    }
    assert len(groups) == 2, groups
    deadline = time.time() + 60
    while True:
        left = {
            pg: ray.util.placement_group_table().get(pg, {}).get("state")
            for pg in groups
            if ray.util.placement_group_table().get(pg, {}).get("state") != "REMOVED"
        }
        if not left or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not left, left
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
    )
    assert len(children) == 2
    assert sorted(float(c.data.params["train.lr"]) for c in children) == [0.001, 0.003]
    assert all("val_f1" in c.data.metrics for c in children)
    # the parent's best score has the same name in both sweep modes
    assert parent.data.metrics["best_val_f1"] == pytest.approx(table["best_val_f1"].max())
    # each trial's training run logged the settings Tune gave it, and the table's score is
    # its best checkpoint's: the run's last best_val_f1, one of its epochs' val F1 (not
    # always the highest: the selection rule may keep a later epoch within its noise, as a
    # suite run saw with 0.045 then 0 here)
    by_lr = {float(c.data.params["train.lr"]): c for c in children}
    for row in table.to_dict(orient="records"):
        run = by_lr[row["train.lr"]]
        best = client.get_metric_history(run.info.run_id, "best_val_f1")
        assert max(best, key=lambda m: m.step).value == pytest.approx(row["best_val_f1"])
        history = client.get_metric_history(run.info.run_id, "val_f1")
        assert any(m.value == pytest.approx(row["best_val_f1"]) for m in history)
    # ...and trained at it (F1s this small may tie): the rate each run logged for epoch 1
    # is its own setting times the schedule's factor, the same for both
    factor = {
        lr: client.get_metric_history(c.info.run_id, "lr")[0].value / lr for lr, c in by_lr.items()
    }
    assert factor[0.001] == pytest.approx(factor[0.003]) and factor[0.001] > 0, factor
    # each trial folder's training is one of the sweep's child runs, one each
    recorded = {json.loads((run / "run.json").read_text())["mlflow_run_id"] for run in runs}
    assert recorded == {c.info.run_id for c in children}
    # ...which the results table names, trial by trial (it was empty in this mode)
    assert set(table["mlflow_run_id"]) == recorded
    for row in table.to_dict(orient="records"):
        assert by_lr[row["train.lr"]].info.run_id == row["mlflow_run_id"]


def test_a_sweep_keeps_its_trials_when_settings_it_never_reads_change(tmp_path):
    """The sweep's identity hashed the whole config: editing ``predict.*`` or ``stpp.*`` in
    a shared YAML, or ``train.epochs`` beside a post-processing sweep, started the sweep
    over and threw its finished trials away. It now counts what its trials compute; a
    sweep.json of the earlier recipe is still recognised."""
    from cellst.tune.sweep import sweep_changes, sweep_hash

    space = json.dumps({"postprocess.mask_threshold": {"uniform": [0.3, 0.7]}})
    mcfg = ModelConfig(name="hovernet-lite", width=8)
    ck = save_checkpoint(tmp_path / "ck", build_model(mcfg), mcfg)
    pp = ["store=/data", "tune.mode=postprocess", f"tune.checkpoint={ck}", f"tune.space={space}"]
    base = load_tune_config(None, pp)
    for edit in ("predict.num_actors=3", "stpp.reliable_fraction=0.25", "train.epochs=99"):
        assert sweep_hash(load_tune_config(None, [*pp, edit])) == sweep_hash(base), edit
    for edit in ("inference.roi=128", "data.val_fraction=0.3", "tune.num_samples=3"):
        assert sweep_hash(load_tune_config(None, [*pp, edit])) != sweep_hash(base), edit
    space = json.dumps({"train.lr": {"loguniform": [1e-4, 1e-2]}})
    tr = ["store=/data", "tune.mode=train", f"tune.space={space}"]
    trains = load_tune_config(None, tr)
    assert sweep_hash(load_tune_config(None, [*tr, "stpp.tta=true"])) == sweep_hash(trains)
    assert sweep_hash(load_tune_config(None, [*tr, "train.epochs=99"])) != sweep_hash(trains)
    # a sweep.json of the earlier recipe, which counted predict.*: recognised as recorded
    then = load_tune_config(None, [*pp, "predict.num_actors=3"])
    recorded = {"hash": sweep_hash(then, legacy=True), "store_version": "v1"}
    now = {"store_version": "v1"}
    assert sweep_hash(then) != recorded["hash"]
    assert sweep_changes(recorded, sweep_hash(then), now, sweep_hash(then, legacy=True)) == []
    other = load_tune_config(None, [*pp, "predict.num_actors=4"])
    assert sweep_changes(recorded, sweep_hash(other), now, sweep_hash(other, legacy=True)) == [
        "the settings"
    ]


def test_planned_trials_counts_grid_points_times_samples():
    from cellst.tune.sweep import planned_trials

    space = {
        "train.lr": {"grid": [0.001, 0.002, 0.003]},
        "train.batch_size": {"grid": [4, 8]},
        "augment.zoom_prob": {"uniform": [0, 0.5]},
    }
    cfg = load_tune_config(
        None, ["store=/data", "tune.mode=train", f"tune.space={json.dumps(space)}"]
    )
    assert planned_trials(2, to_tune(cfg.tune.space)) == 12
    space = {"train.lr": {"loguniform": [1e-4, 1e-2]}}
    cfg = load_tune_config(
        None, ["store=/data", "tune.mode=train", f"tune.space={json.dumps(space)}"]
    )
    assert planned_trials(3, to_tune(cfg.tune.space)) == 3


def test_a_training_trial_is_ranked_by_the_score_of_its_best_checkpoint(tmp_path):
    """A trial's ``best_val_f1`` is its ``best/`` checkpoint's score, which the selection
    rule may move to a later epoch of a slightly lower score: 0.5, 0.7, then 0.667. The
    table ranked the trial at 0.7, a score no checkpoint of it holds; it is now 0.667."""
    from types import SimpleNamespace

    import pandas as pd

    from cellst.tune.sweep import results_table

    def trial(name: str, reports: list[float], lr: float) -> SimpleNamespace:
        df = pd.DataFrame({"best_val_f1": reports, "epoch": range(1, len(reports) + 1)})
        return SimpleNamespace(
            metrics_dataframe=df,
            metrics={"trial_id": name, "epoch": len(reports)},
            config={"train.lr": lr},
            path=str(tmp_path / name),
            error=None,
        )

    grid = [trial("moved", [0.5, 0.7, 0.667], 0.001), trial("steady", [0.6, 0.68], 0.002)]
    table = results_table(grid, "best_val_f1", ["train.lr"])
    assert table["trial_id"].tolist() == ["steady", "moved"]
    assert table["best_val_f1"].tolist() == [0.68, 0.667]


def test_an_interrupted_sweep_says_so_and_writes_no_results(ray_session, pp_sweep, tmp_path):
    """Ctrl-C in `cellst tune`: Tune stops and returns, and the sweep used to report the
    trials that had ended as the whole sweep (exit 0, results.csv and best.yaml of a part).
    It now says how far it got, exits 130 and writes neither."""
    import os
    import signal
    import subprocess
    import sys

    cfg = pp_sweep[0]
    data = cfg.model_dump(mode="json")
    data["tune"].update(name="ppi", num_samples=400, run_dir=str(tmp_path / "runs"))
    path = _config(tmp_path / "sweep.yaml", **data)
    root = tmp_path / "runs" / "ppi"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cellst = str(Path(sys.executable).with_name("cellst"))
    proc = subprocess.Popen(
        [cellst, "tune", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        ended = [p for p in root.glob("_ray/ppi/*/result.json") if p.stat().st_size > 0]
        if len(ended) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    text = " ".join(out.decode(errors="replace").split())
    assert proc.returncode == 130, text[-3000:]
    assert "sweep ppi interrupted with" in text and "of 400 trial(s) finished" in text, text[-3000:]
    # no traceback of the command itself. Lines Ray forwards from the trial actors it stops
    # start with "(_postprocess_trial pid=...)"; a stopped actor can print one (Ray's SIGTERM
    # handler raising SystemExit at its exit, seen by a reviewer). The suite saw a
    # "Traceback" here once in 2 runs on 2026-12-05, its source not kept.
    lines = out.decode(errors="replace").splitlines()
    assert not [ln for ln in lines if ln.lstrip().startswith("Traceback")], text[-3000:]
    assert not (root / "results.csv").exists() and not (root / "best.yaml").exists()


def test_a_postprocess_sweep_on_the_checkpoints_training_items_is_refused(learn_store, tmp_path):
    """The checkpoint's run folder records the items it trained on: a sweep whose
    validation split holds some of them (another data.seed or data.val_fraction than the
    training's) would score the settings on images the model has learnt, and is refused in
    one line before anything runs."""
    from cellst.train.checkpoints import RunPaths

    mcfg = ModelConfig(name="hovernet-lite", width=4)
    run = tmp_path / "run"
    ckpt = save_checkpoint(run / "checkpoints" / "best", build_model(mcfg), mcfg)
    store = CellStore(learn_store)
    RunPaths(run).write_state(train_ids=store.ids("labeled"), val_ids=[])
    cfg = _config(
        tmp_path / "s.yaml",
        store=str(learn_store),
        data={"val_fraction": 0.3},
        tune={
            "mode": "postprocess",
            "checkpoint": str(ckpt),
            "run_dir": str(tmp_path / "runs"),
            "space": {"postprocess.mask_threshold": {"uniform": [0.3, 0.7]}},
        },
    )
    res = runner.invoke(app, ["tune", str(cfg)])
    text = " ".join(res.output.split())
    assert res.exit_code == 2, text
    assert f"tune.checkpoint {ckpt} was trained on" in text and "data.seed" in text
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_a_continuous_distribution_on_an_integer_field_is_a_config_error(tmp_path):
    """``uniform: [1, 5]`` passed the check of its (integral) bounds, then every trial
    failed on its fractional sample: the space is refused, in one line, before Ray starts."""
    for kind in ("uniform", "loguniform"):
        space = {"postprocess.min_object_size": {kind: [1, 5]}}
        cfg = _config(
            tmp_path / "s.yaml",
            store=str(tmp_path),
            tune={"mode": "postprocess", "checkpoint": str(tmp_path), "space": space},
        )
        res = runner.invoke(app, ["tune", str(cfg)])
        assert res.exit_code == 2, res.output
        assert res.output.strip().splitlines() == [
            "error: invalid sweep: tune.space.postprocess.min_object_size: an integer field: "
            f"use randint or a grid of integers ({kind} samples fractions, e.g. 1.5)"
        ]
    # integers of an integer field pass the space check (to the checkpoint's)
    space = {"postprocess.min_object_size": {"randint": [1, 5]}}
    cfg = _config(
        tmp_path / "s.yaml",
        store=str(tmp_path),
        tune={"mode": "postprocess", "checkpoint": str(tmp_path), "space": space},
    )
    with pytest.raises(ConfigError, match="not a cellst checkpoint"):
        load_tune_config(cfg)


def test_a_training_sweep_of_post_processing_fields_alone_is_a_config_error(tmp_path):
    """tune.mode=train trained one model per trial just to vary post-processing thresholds."""
    space = {
        "postprocess.mask_threshold": {"uniform": [0.3, 0.7]},
        "postprocess.min_object_size": {"choice": [5, 10]},
    }
    cfg = _config(
        tmp_path / "s.yaml",
        store=str(tmp_path),
        tune={"mode": "train", "space": space},
        train={"num_workers": 1},
    )
    res = runner.invoke(app, ["tune", str(cfg)])
    assert res.exit_code == 2 and "use tune.mode=postprocess" in res.output
    assert len(res.output.strip().splitlines()) == 1
    # mixed with a training setting it is a training sweep
    mixed = {**space, "train.lr": {"loguniform": [1e-4, 1e-2]}}
    cfg = _config(
        tmp_path / "s.yaml",
        store=str(tmp_path),
        tune={"mode": "train", "space": mixed},
        train={"num_workers": 1},
    )
    assert load_tune_config(cfg).tune.mode == "train"


def test_a_restored_training_trial_resumes_its_unfinished_run(tmp_path):
    """A trial Tune restores (a resumed sweep) goes on from its own last checkpoint when
    its run folder records an unfinished training of the same settings; it used to start
    over from epoch 1 whatever the folder held."""
    from cellst.experiment import load_config
    from cellst.fingerprint import VERSION
    from cellst.train.checkpoints import RunPaths
    from cellst.train.trainer import config_hash
    from cellst.tune.sweep import trial_resumes

    cfg = load_config(None, ["model.width=8", "train.lr=0.003"])
    other = load_config(None, ["model.width=8", "train.lr=0.001"])
    run = tmp_path / "ts-abc_00000"
    assert not trial_resumes(run, cfg)  # nothing trained yet
    paths = RunPaths(run)
    for status in ("running", "interrupted", "stopped", "failed"):
        paths.write_state(config_hash=config_hash(cfg), fingerprint=VERSION, status=status)
        assert trial_resumes(run, cfg), status
        assert not trial_resumes(run, other), status  # other settings: start over
    paths.write_state(status="finished")  # Tune wants its reports again: start over
    assert not trial_resumes(run, cfg)
    (run / "run.json").write_text("{damaged")
    assert not trial_resumes(run, cfg)


def test_a_trial_cut_short_by_ctrl_c_is_not_counted_as_ended(ray_session, tmp_path):
    """Ctrl-C during a sweep's last trial: Tune stops that trial on its way out and counts
    it as terminated, so `cellst tune` took the sweep as whole (exit 0, results.csv of a
    part, the trial's run folder saying "failed: ActorDiedError"). A trial has ended only
    when its function returned, the scheduler stopped it, or it failed."""
    import os
    import signal

    from ray import tune

    from cellst.train.checkpoints import RunPaths
    from cellst.tune.sweep import ended_trials, mark_interrupted_trials, trial_run_dir

    def slow(config):
        for i in range(200):
            tune.report({"x": i})
            time.sleep(0.1)

    def quick(config):
        tune.report({"x": 1})

    def fit(trainable, name: str):
        return tune.Tuner(
            trainable,
            param_space={"a": tune.grid_search([1])},
            run_config=tune.RunConfig(name=name, storage_path=str(tmp_path / "_ray"), verbose=0),
        ).fit()

    assert ended_trials(fit(quick, "quick")) == 1
    timer = threading.Timer(6, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        grid = fit(slow, "cut")
    finally:
        timer.cancel()
    assert grid.num_terminated == 1  # what Tune says of the cut trial
    assert ended_trials(grid) == 0
    run = trial_run_dir(tmp_path, "cut", grid[0].metrics["trial_id"])
    RunPaths(run).write_state(status="failed", error="ActorDiedError")
    mark_interrupted_trials(grid, tmp_path, "cut")
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "interrupted" and "resumes it" in state["error"], state
