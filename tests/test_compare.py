"""``cellst compare`` on real MLflow: cellst's embedded SQLite stores and a real ``mlflow
server``, holding runs logged the way cellst logs them (its own tracking functions, tags,
configs, and the metric dicts of its real validation, sweep-trial and ST++ evaluation code),
without running trainings."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from cellst.config import ConfigError
from cellst.experiment import ExperimentConfig
from cellst.tracking import (
    TrackingConfig,
    ensure_experiment,
    log_config,
    log_metrics,
    log_params,
    set_tags,
    start_run,
)
from cellst.tracking.compare import (
    STPP_MODELS,
    CompareError,
    collect_runs,
    compare_command,
    compare_table,
    differing_params,
    f1_columns,
    tracking_sources,
    write_outputs,
)
from conftest import free_port

EXP = "cmp"
#: test F1 of the ST++ models, overall and per modality (as ``evaluate_sources`` reports)
REPORTS = {
    "supervised": {"f1": 0.40, "fluorescence": 0.50, "phase_contrast": 0.30},
    "round1": {"f1": 0.45, "fluorescence": 0.55, "phase_contrast": 0.35},
    "round2": {"f1": 0.52, "fluorescence": 0.60, "phase_contrast": 0.44},
}
#: best validation F1 of each ST++ training stage
STAGE_VAL = {"1_supervised": 0.41, "4_retrain_reliable": 0.47, "6_retrain_all": 0.55}


@pytest.fixture(autouse=True)
def _clean_mlflow_env(monkeypatch):
    """No inherited tracking URI; no run left active by a failing test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


# ----------------------------------------------------------------------------- the real names
@pytest.fixture(scope="module")
def names():
    """The metric dicts of cellst's real code paths: per-epoch validation of a training
    (``validate``), a post-processing trial's score (``score_maps``) and the ST++ test
    table (``f1_table`` + ``table_metrics``)."""
    import torch

    from cellst.inference.config import InferenceConfig
    from cellst.postprocess.calibrate import ValMaps, score_maps
    from cellst.postprocess.config import PostprocessConfig
    from cellst.stpp.report import f1_table, table_metrics
    from cellst.train.validate import validate

    train_val, _, _ = validate(
        torch.nn.Identity(), None, [], InferenceConfig(), PostprocessConfig(), torch.device("cpu")
    )
    from cellst.model.targets import hover_maps

    label = np.zeros((64, 64), np.int32)
    label[8:24, 8:24], label[36:56, 30:50] = 1, 2
    prob = np.select([label == 1, label == 2], [0.6, 0.9], 0.0).astype(np.float32)
    maps = ValMaps(prob, hover_maps(label), label)  # a higher threshold loses cell 1

    def trial(threshold: float) -> dict[str, float]:
        return score_maps([maps], {"mask_threshold": threshold}, {"count_boundary": True})

    reports = {
        m: {
            "f1": r["f1"],
            "count": 4,
            "per_modality": {k: {"f1": v} for k, v in r.items() if k != "f1"},
        }
        for m, r in REPORTS.items()
    }
    return {"train_val": train_val, "trial": trial, "stpp": table_metrics(f1_table(reports))}


def test_metric_names_line_up_across_kinds(names):
    """Training epochs and sweep trials log their validation F1 under one name, and the ST++
    table's names map onto the shared ``test_f1[/<modality>]`` of compare."""
    train_f1 = {k for k in names["train_val"] if "f1" in k}
    trial_f1 = {k for k in names["trial"](0.5) if "f1" in k}
    assert train_f1 == trial_f1 == {"val_f1"}
    assert set(names["train_val"]) >= set(names["trial"](0.5))  # val_precision, val_recall too
    assert list(STPP_MODELS) == ["round2", "round1", "supervised"]  # the final model first
    per_model = {
        f"test_f1_{m}{s}" for m in REPORTS for s in ("", "_fluorescence", "_phase_contrast")
    }
    shared = {"test_f1", "test_f1/fluorescence", "test_f1/phase_contrast"}
    assert set(names["stpp"]) == per_model | shared
    # the shared names carry the pipeline's final model (round 2), as a training's would
    for s in ("", "/fluorescence", "/phase_contrast"):
        assert names["stpp"][f"test_f1{s}"] == names["stpp"][f"test_f1_round2{s.replace('/', '_')}"]


# ----------------------------------------------------------------------------- logging runs
def _tracking(**kw) -> TrackingConfig:
    return TrackingConfig(system_metrics=False, **kw)


def log_train(
    tracking: TrackingConfig,
    run_dir: Path,
    name: str,
    names,
    lr: float = 1e-3,
    val=(0.30, 0.42, 0.38),
    experiment: str = EXP,
    parent: str | None = None,
    tags: dict | None = None,
) -> str:
    """A training run as ``cellst.train.trainer.train`` logs it: tags, whole config,
    per-epoch validation (``best_val_f1`` beside ``val_f1``) and ``final_*``."""
    cfg = ExperimentConfig(name=experiment)
    cfg.train.lr = lr
    run_tags = {"cellst.stage": "train", "cellst.run_name": name, **(tags or {})}
    with start_run(tracking, run_dir, cfg.name, name, parent_run_id=parent, tags=run_tags) as run:
        log_config(cfg)
        best = -1.0
        for epoch, f1 in enumerate(val, start=1):
            best = max(best, f1)
            metrics = {**names["train_val"], "val_f1": f1, "epoch": epoch, "best_val_f1": best}
            log_metrics(metrics, step=epoch)
        log_metrics({f"final_{k}": v for k, v in metrics.items()})
        return run.info.run_id


def log_pipeline(runs: Path, name: str, names) -> str:
    """An ST++ pipeline as ``cellst.stpp.pipeline`` logs it: the parent run (config), child
    runs per stage (training stages are training runs), the final table on the parent."""
    from cellst.stpp.experiment import StppExperimentConfig

    pdir = runs / name
    cfg = StppExperimentConfig(name=EXP)
    tracking = _tracking(tracking_uri=f"sqlite:///{pdir / 'mlflow.db'}", experiment=EXP)
    common = {"cellst.stpp.pipeline": str(pdir)}
    with start_run(
        tracking, pdir, EXP, f"{name}-stpp", tags={"cellst.stage": "stpp", **common}
    ) as run:
        parent = run.info.run_id
        log_config(cfg)
    for key in ("1_supervised", "2_reliability", "4_retrain_reliable", "6_retrain_all"):
        if key == "2_reliability":
            tags = {"cellst.stage": "stpp.reliability", "cellst.stpp.stage": key, **common}
            with start_run(tracking, pdir, EXP, f"{name}-{key}", parent_run_id=parent, tags=tags):
                log_metrics({"n_reliable": 2, "n_unreliable": 2, "cutoff": 0.7})
            continue
        v = STAGE_VAL[key]
        log_train(
            tracking,
            pdir / "train" / key,
            f"{name}-{key}",
            names,
            val=(v - 0.1, v),
            parent=parent,
            tags={"cellst.stpp.stage": key, **common},
        )
    tags = {"cellst.stage": "stpp.evaluate", "cellst.stpp.stage": "7_evaluate", **common}
    with start_run(tracking, pdir, EXP, f"{name}-7_evaluate", parent_run_id=parent, tags=tags):
        log_metrics(names["stpp"])
    with start_run(tracking, pdir, EXP, None, run_id=parent):
        log_metrics(names["stpp"])
        set_tags({"cellst.stpp.completed": "true"})
    return parent


def log_sweep(runs: Path, name: str, names, thresholds=(0.3, 0.5, 0.7)) -> dict[str, float]:
    """A post-processing sweep as ``cellst.tune.sweep`` logs it: parent (config), one child
    per trial (its swept fields and ``score_maps``'s scores), then the best on the parent."""
    sdir = runs / "tune" / name
    tracking = _tracking()
    tags = {"cellst.stage": "tune", "cellst.tune.mode": "postprocess"}
    with start_run(tracking, sdir, EXP, f"{name}-tune", tags=tags) as run:
        parent = run.info.run_id
        log_config(ExperimentConfig(name=EXP))
    uri = f"sqlite:///{sdir / 'mlflow.db'}"
    trial_tracking = _tracking(tracking_uri=uri, experiment=EXP)
    scores = {}
    for i, t in enumerate(thresholds):
        trial = f"t{i:05d}"
        tags = {"cellst.stage": "tune.trial", "cellst.tune.trial_id": trial}
        with start_run(
            trial_tracking, sdir, EXP, f"{name}-{trial}", parent_run_id=parent, tags=tags
        ):
            log_params({"postprocess.mask_threshold": t})
            score = names["trial"](t)
            log_metrics(score)
            scores[f"{name}-{trial}"] = score["val_f1"]
    with start_run(trial_tracking, sdir, EXP, None, run_id=parent):
        log_metrics({"best_val_f1": max(scores.values()), "trials": float(len(scores))})
    return scores


@pytest.fixture(scope="module")
def runs_dir(names, tmp_path_factory):
    """A ``runs/`` folder as cellst leaves it: each training, pipeline and sweep folder with
    its own embedded ``mlflow.db``."""
    runs = tmp_path_factory.mktemp("compare") / "runs"
    log_train(_tracking(), runs / "slow", "slow", names, lr=1e-3, val=(0.30, 0.42, 0.38))
    log_train(_tracking(), runs / "fast", "fast", names, lr=3e-3, val=(0.35, 0.44, 0.46))
    log_train(_tracking(), runs / "other", "other", names, experiment="elsewhere")
    log_pipeline(runs, "pipe", names)
    scores = log_sweep(runs, "pp", names)
    return runs, scores


# ----------------------------------------------------------------------------- sqlite stores
def test_collect_runs_finds_every_kind_in_the_embedded_stores(runs_dir):
    runs, _ = runs_dir
    assert len(tracking_sources(runs)) == 5  # slow, fast, other, pipe, tune/pp
    df = collect_runs(runs)
    assert df["start_time"].is_monotonic_decreasing
    by = df.set_index("name")
    kinds = by["kind"].to_dict()
    assert kinds["slow"] == kinds["fast"] == kinds["pipe-6_retrain_all"] == "train"
    assert kinds["pipe-stpp"] == "pipeline" and kinds["pp-tune"] == "sweep"
    assert kinds["pp-t00000"] == "trial" and kinds["pipe-2_reliability"] == "stage"
    stages = by["stage"].to_dict()
    assert stages["slow"] == "train" and stages["pipe-4_retrain_reliable"] == "4_retrain_reliable"
    assert stages["pipe-stpp"] == "7_evaluate"  # the last stage the pipeline reached
    assert stages["pp-tune"] == "tune.postprocess" and stages["pp-t00001"] == "tune.trial"
    assert set(by["status"]) == {"FINISHED"}
    assert by.loc["other", "experiment"] == "elsewhere" and by.loc["slow", "experiment"] == EXP
    assert by.loc["pipe-6_retrain_all", "parent_run_id"] == by.loc["pipe-stpp", "run_id"]


def test_a_running_run_whose_process_is_gone_shows_as_killed(tmp_path):
    """MLflow keeps a run whose process was killed (SIGKILL, a lost node) RUNNING for ever.
    compare shows it KILLED when the lock file its process held (LOCK_TAG) is left free,
    and the children of such a pipeline too; RUNNING while a process holds the lock, or
    where this machine cannot see the lock file (a run elsewhere)."""
    from mlflow.tracking import MlflowClient

    from cellst.fs import file_lock
    from cellst.tracking.config import LOCK_TAG

    db = tmp_path / "runs" / "r" / "mlflow.db"
    db.parent.mkdir(parents=True)
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.create_experiment(EXP)
    held, free = tmp_path / ".held.lock", tmp_path / ".free.lock"
    held.touch()
    free.touch()

    def run(name: str, lock: Path | None = None, parent: str = "", stage: str = "train") -> str:
        tags = {"mlflow.runName": name, "cellst.stage": stage}
        tags |= {LOCK_TAG: str(lock)} if lock else {}
        tags |= {"mlflow.parentRunId": parent} if parent else {}
        return client.create_run(exp, tags=tags).info.run_id

    run("alive", held)
    run("killed", free)
    run("elsewhere", tmp_path / "other-machine" / ".x.lock")
    run("untagged")
    pipe = run("pipe-stpp", free, stage="stpp")
    run("pipe-2_reliability", parent=pipe, stage="stpp.reliability")
    client.set_terminated(run("ended", free), "FINISHED")
    with file_lock(held, wait=False):
        status = collect_runs(tmp_path / "runs").set_index("name")["status"].to_dict()
    assert status == {
        "alive": "RUNNING",
        "killed": "KILLED",
        "elsewhere": "RUNNING",
        "untagged": "RUNNING",
        "pipe-stpp": "KILLED",
        "pipe-2_reliability": "KILLED",
        "ended": "FINISHED",
    }


def test_stage_runs_a_force_from_replaced_keep_their_own_scores(tmp_path):
    """After `cellst stpp run --force-from supervised`, the replaced stage-1 run showed the
    new model's test F1 (the parent's current `test_f1_supervised`), and the pipeline row
    the validation F1 of the replaced last stage. A replaced run shows no score it did not
    log, and the pipeline shows its current stages' scores."""
    from mlflow.tracking import MlflowClient

    from cellst.tracking.config import SUPERSEDED_TAG

    db = tmp_path / "runs" / "p" / "mlflow.db"
    db.parent.mkdir(parents=True)
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.create_experiment(EXP)

    def run(name: str, parent: str = "", stage: str = "train", **tags: str) -> str:
        tags = {"mlflow.runName": name, "cellst.stage": stage, **tags}
        tags |= {"mlflow.parentRunId": parent} if parent else {}
        run_id = client.create_run(exp, tags=tags).info.run_id
        client.set_terminated(run_id, "FINISHED")
        return run_id

    pipe = run("pipe", stage="stpp")
    client.log_metric(pipe, "test_f1_supervised", 0.2)  # the current stage 1's score
    new1 = run("pipe-1_supervised-new", pipe, **{"cellst.stpp.stage": "1_supervised"})
    old1 = run(
        "pipe-1_supervised-old", pipe, **{"cellst.stpp.stage": "1_supervised", SUPERSEDED_TAG: new1}
    )
    new6 = run("pipe-6_retrain_all-new", pipe, **{"cellst.stpp.stage": "6_retrain_all"})
    old6 = run(
        "pipe-6_retrain_all-old",
        pipe,
        **{"cellst.stpp.stage": "6_retrain_all", SUPERSEDED_TAG: new6},
    )
    client.log_metric(new6, "best_val_f1", 0.1176)
    client.log_metric(old6, "best_val_f1", 0.0052)
    assert old1
    runs = collect_runs(tmp_path / "runs").set_index("name")
    assert runs.loc["pipe-1_supervised-new", "test_f1"] == 0.2
    assert pd.isna(runs.loc["pipe-1_supervised-old", "test_f1"])
    assert runs.loc["pipe-1_supervised-old", "status"] == "SUPERSEDED"
    assert runs.loc["pipe", "val_f1"] == pytest.approx(0.1176)
    assert runs.loc["pipe", "stage"] == "6_retrain_all"


def test_f1_columns_overall_and_per_modality(runs_dir):
    runs, scores = runs_dir
    by = collect_runs(runs).set_index("name")
    assert f1_columns(by) == [
        "test_f1",
        "test_f1/fluorescence",
        "test_f1/phase_contrast",
        "val_f1",
    ]
    # the pipeline: its final model's test F1, and its last training stage's validation F1
    pipe = by.loc["pipe-stpp"]
    assert pipe["test_f1"] == pytest.approx(REPORTS["round2"]["f1"])
    assert pipe["test_f1/phase_contrast"] == pytest.approx(REPORTS["round2"]["phase_contrast"])
    assert pipe["val_f1"] == pytest.approx(STAGE_VAL["6_retrain_all"])
    assert by.loc["pipe-7_evaluate", "test_f1"] == pytest.approx(REPORTS["round2"]["f1"])
    assert np.isnan(by.loc["pipe-2_reliability", "test_f1"])
    # each training stage: the test F1 of the model it trained
    for stage, model in (("1_supervised", "supervised"), ("4_retrain_reliable", "round1")):
        row = by.loc[f"pipe-{stage}"]
        assert row["test_f1"] == pytest.approx(REPORTS[model]["f1"])
        assert row["test_f1/fluorescence"] == pytest.approx(REPORTS[model]["fluorescence"])
    # a training: its best epoch, not its last
    assert by.loc["slow", "val_f1"] == pytest.approx(0.42) and np.isnan(by.loc["slow", "test_f1"])
    # a sweep: its best trial; a trial: its score
    assert by.loc["pp-tune", "val_f1"] == pytest.approx(max(scores.values()))
    assert len(set(scores.values())) > 1  # the thresholds score differently
    for name, score in scores.items():
        assert by.loc[name, "val_f1"] == pytest.approx(score)


def test_only_differing_params_are_shown(runs_dir):
    runs, _ = runs_dir
    df = collect_runs(runs, experiments=[EXP])
    assert "params.train.lr" in df and "params.data.crop_size" in df
    trains = df[df["name"].isin(["slow", "fast"])]
    assert differing_params(trains) == ["train.lr"]
    trials = df[df["kind"] == "trial"]
    assert differing_params(trials) == ["postprocess.mask_threshold"]
    table = compare_table(trains, kinds=None)
    assert "train.lr" in table and "data.crop_size" not in table
    assert not [c for c in table if c.startswith("params.")]
    assert sorted(table["train.lr"]) == ["0.001", "0.003"]


def test_sorting_kinds_and_limit(runs_dir):
    runs, _ = runs_dir
    df = collect_runs(runs, experiments=[EXP])
    table = compare_table(df)  # test F1, largest first; pipelines, trainings and sweeps
    assert set(table["kind"]) == {"pipeline", "train", "sweep"}
    assert table["name"].iloc[0] in ("pipe-stpp", "pipe-6_retrain_all")
    assert table["test_f1"].iloc[0] == pytest.approx(REPORTS["round2"]["f1"])
    tested = table["test_f1"].notna()
    assert tested.iloc[: tested.sum()].all()  # runs without test F1 come last
    assert table.loc[tested, "test_f1"].is_monotonic_decreasing
    up = compare_table(df, sort_by="val_f1", ascending=True)
    assert up["val_f1"].dropna().is_monotonic_increasing
    by_mod = compare_table(df, sort_by="test_f1/phase_contrast", kinds=["train"])
    assert list(by_mod["name"][:3]) == [
        "pipe-6_retrain_all",
        "pipe-4_retrain_reliable",
        "pipe-1_supervised",
    ]
    by_lr = compare_table(df, sort_by="train.lr", kinds=["train"], limit=2)
    assert len(by_lr) == 2 and by_lr["name"].iloc[0] == "fast"  # 3e-3 > 1e-3 (numeric)
    trials = compare_table(df, sort_by="val_f1", kinds=["trial"])
    assert set(trials["kind"]) == {"trial"} and "postprocess.mask_threshold" in trials
    # runs none of which has test F1 (the default sort): by val_f1, not newest first
    untested = compare_table(df, kinds=["trial"])
    assert untested["val_f1"].notna().sum() > 1 and len(untested) == len(trials)
    assert untested["val_f1"].dropna().is_monotonic_decreasing
    everything = compare_table(df, kinds=None)
    assert len(everything) == len(df)
    with pytest.raises(ConfigError, match="--sort: no column 'bogus'"):
        compare_table(df, sort_by="bogus")
    with pytest.raises(ConfigError, match="--kind: unknown kind 'pipelines'"):
        compare_table(df, kinds=["pipelines"])


def test_csv_and_png_written_atomically(runs_dir, tmp_path):
    runs, _ = runs_dir
    table = compare_table(collect_runs(runs), kinds=None)
    out = tmp_path / "out"
    csv, png = write_outputs(table, out)
    assert sorted(p.name for p in out.iterdir()) == ["compare.csv", "compare.png"]  # no temps
    back = pd.read_csv(csv)
    assert list(back.columns) == list(table.columns) and len(back) == len(table)
    assert back["test_f1/phase_contrast"].max() == pytest.approx(0.44)
    with Image.open(png) as im:
        im.load()
        assert im.format == "PNG" and im.width > 0 and im.height > 0
        # two panels (test and validation F1): taller than one
        assert im.height > 500
    # rewritten in place (CSV replaced, not appended)
    write_outputs(table.head(2), out)
    assert len(pd.read_csv(csv)) == 2


def test_whole_table_printed_when_piped(runs_dir, capsys):
    runs, _ = runs_dir
    table = compare_command(
        experiment=[EXP], tracking_uri=str(runs), sort="val_f1", kind=["trial", "sweep"]
    )
    out = capsys.readouterr().out
    assert "…" not in out  # nothing cut, however wide
    for name in table["name"]:
        assert name in out
    assert "postprocess.mask_threshold" in out and "tune.postprocess" in out
    # the default store is runs/ of the working directory; MLFLOW_TRACKING_URI wins over it
    assert tracking_sources(None, root=runs) == tracking_sources(runs)


def test_env_tracking_uri_and_database_paths(runs_dir, monkeypatch):
    runs, _ = runs_dir
    db = runs / "pipe" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert tracking_sources(None) == [f"sqlite:///{db}"]
    assert set(collect_runs()["name"]) == {
        "pipe-stpp",
        "pipe-1_supervised",
        "pipe-2_reliability",
        "pipe-4_retrain_reliable",
        "pipe-6_retrain_all",
        "pipe-7_evaluate",
    }
    assert tracking_sources(str(db)) == [f"sqlite:///{db}"]


def test_clear_errors(runs_dir, tmp_path):
    runs, _ = runs_dir
    with pytest.raises(
        CompareError,
        match=r"unknown experiment 'nope' in 5 stores \(experiments: Default, cmp, elsewhere\)",
    ):
        collect_runs(runs, experiments=["nope"])
    with pytest.raises(CompareError, match="no MLflow store"):
        tracking_sources(tmp_path)
    with pytest.raises(CompareError, match="no such MLflow database"):
        tracking_sources(str(tmp_path / "missing.db"))
    with pytest.raises(CompareError, match="no MLflow database at"):
        tracking_sources(f"sqlite:///{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()  # a missing database is not created
    with pytest.raises(CompareError, match=r"no sweep runs in experiment elsewhere at 5 stores; 1"):
        compare_command(experiment=["elsewhere"], tracking_uri=str(runs), kind=["sweep"])
    empty = f"sqlite:///{tmp_path / 'empty' / 'mlflow.db'}"
    ensure_experiment(empty, "empty")
    with pytest.raises(
        CompareError, match=rf"^no pipeline/train/sweep runs in experiment empty at {empty}$"
    ):
        compare_command(experiment=["empty"], tracking_uri=empty)
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CompareError, match=rf"server {url} is unavailable \(connection refused\)"):
        collect_runs(url)


def test_cli_compare(runs_dir, tmp_path):
    """`cellst compare`: exit 0 with the table and files, one line and exit 1 for an unknown
    experiment or a dead server, exit 2 for a bad --sort."""
    runs, _ = runs_dir
    from cellst.cli import app

    runner = CliRunner()
    ok = runner.invoke(
        app, ["compare", "--tracking-uri", str(runs), "-e", EXP, "--out", str(tmp_path / "o")]
    )
    assert ok.exit_code == 0, ok.output
    assert "pipe-stpp" in ok.output and "slow" in ok.output and "compare.png" in ok.output
    assert (tmp_path / "o" / "compare.csv").is_file()
    bad = runner.invoke(app, ["compare", "--tracking-uri", str(runs), "-e", "nope"])
    assert bad.exit_code == 1 and "unknown experiment 'nope'" in bad.output
    assert "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1
    url = f"http://127.0.0.1:{free_port()}"
    dead = runner.invoke(app, ["compare", "--tracking-uri", url])
    assert dead.exit_code == 1 and "unavailable (connection refused)" in dead.output
    trials = runner.invoke(app, ["compare", "--tracking-uri", str(runs), "--kind", "trial"])
    assert trials.exit_code == 0, trials.output
    assert "by val_f1 (largest first), as no run has test_f1" in " ".join(trials.output.split())
    sort = runner.invoke(app, ["compare", "--tracking-uri", str(runs), "--sort", "bogus"])
    assert sort.exit_code == 2 and "--sort: no column 'bogus'" in sort.output

    # its own files are replaced by a re-run; a user's compare.csv only with --overwrite
    args = ["compare", "--tracking-uri", str(runs), "-e", EXP, "--out", str(tmp_path / "o")]
    assert runner.invoke(app, args).exit_code == 0
    (tmp_path / "o" / "compare.csv").write_text("mine,notes\n1,2\n")
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2, refused.output
    assert "compare.csv was not written by cellst compare" in " ".join(refused.output.split())
    assert (tmp_path / "o" / "compare.csv").read_text() == "mine,notes\n1,2\n"
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert (tmp_path / "o" / "compare.csv").read_text().startswith("name,kind,")
    # a figure saved before the PNG mark (plain matplotlib) beside its table is still ours
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.savefig(tmp_path / "o" / "compare.png", format="png")
    plt.close(fig)
    assert runner.invoke(app, args).exit_code == 0


def test_files_that_are_not_mlflow_stores_are_refused_unchanged(tmp_path):
    """Another program's SQLite database, an empty file, a CSV: one line naming the file,
    and the file as it was (MlflowClient would have written MLflow's schema into it)."""
    import sqlite3

    from cellst.cli import app

    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE mydata (x INTEGER)")
    con.commit()
    con.close()
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    csv = tmp_path / "modalities.csv"
    csv.write_text("name,modality\na,b\n")
    for path in (foreign, empty, csv):
        before = path.read_bytes()
        for uri in (str(path), f"sqlite:///{path}"):
            res = CliRunner().invoke(app, ["compare", "--tracking-uri", uri])
            assert res.exit_code == 1, res.output
            line = res.output.strip()
            assert line.startswith(f"error: {path}: not an MLflow database"), line
            assert len(line.splitlines()) == 1 and "Traceback" not in line
        assert path.read_bytes() == before


def test_module_imports_no_torch_ray_or_monai():
    code = (
        "import sys, cellst.tracking.compare as c\n"
        "heavy = [m for m in ('torch', 'ray', 'monai', 'mlflow') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # not even mlflow until runs are read


# ----------------------------------------------------------------------------- a real server
def test_compare_against_a_tracking_server(names, mlflow_server, tmp_path):
    url, _ = mlflow_server
    tracking = _tracking(tracking_uri=url, experiment=EXP)
    log_train(tracking, tmp_path / "a", "srv-a", names, lr=1e-3, val=(0.2, 0.3))
    log_train(tracking, tmp_path / "b", "srv-b", names, lr=2e-3, val=(0.25, 0.35))
    df = collect_runs(url, experiments=[EXP])
    assert sorted(df["name"]) == ["srv-a", "srv-b"] and set(df["kind"]) == {"train"}
    assert set(df["tracking_uri"]) == {url}
    console = Console(file=io.StringIO(), width=400)
    table = compare_command([EXP], url, "val_f1", tmp_path / "out", 10, console=console)
    assert list(table["name"]) == ["srv-b", "srv-a"] and list(table["val_f1"]) == [0.35, 0.3]
    assert "train.lr" in table.columns and "srv-b" in console.file.getvalue()
    with Image.open(tmp_path / "out" / "compare.png") as im:
        assert im.width > 0 and im.height > 0
    with pytest.raises(CompareError, match=rf"unknown experiment 'nope' in {url}"):
        collect_runs(url, experiments=["nope"])


def test_a_trial_run_again_supersedes_its_earlier_run(tmp_path):
    """A resumed `cellst tune` runs again a trial that ended after Tune last saved its
    state: its MLflow run was there twice, both FINISHED, as equals. The earlier one is
    marked superseded by the new one (`cellst compare` lists it last, SUPERSEDED); other
    trials and other sweeps' runs are left alone."""
    from mlflow.tracking import MlflowClient

    from cellst.tracking import TrackingConfig, supersede_earlier_children
    from cellst.tracking.config import SUPERSEDED_TAG

    root = tmp_path / "runs" / "sw"
    root.mkdir(parents=True)
    cfg = TrackingConfig()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(EXP)

    def run(parent: str = "", trial: str = "") -> str:
        tags = {"mlflow.parentRunId": parent} if parent else {}
        tags |= {"cellst.tune.trial_id": trial} if trial else {}
        run_id = client.create_run(exp, tags=tags).info.run_id
        client.set_terminated(run_id, "FINISHED")
        return run_id

    sweep, other_sweep = run(), run()
    first, other_trial = run(sweep, "t0"), run(sweep, "t1")
    elsewhere, again = run(other_sweep, "t0"), run(sweep, "t0")
    marked = supersede_earlier_children(cfg, root, EXP, sweep, "cellst.tune.trial_id", "t0", again)
    assert marked == [first]
    tags = {r: client.get_run(r).data.tags for r in (first, other_trial, elsewhere, again)}
    assert tags[first][SUPERSEDED_TAG] == again
    assert all(SUPERSEDED_TAG not in tags[r] for r in (other_trial, elsewhere, again))
