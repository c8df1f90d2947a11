"""cellst.tracking against real MLflow: embedded SQLite stores and a real tracking server."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient
from PIL import Image
from pydantic import BaseModel

from cellst.tracking import (
    DisabledRun,
    TrackingConfig,
    curve_figure,
    ensure_experiment,
    flatten_params,
    histogram_figure,
    log_config,
    log_figure,
    log_metrics,
    log_table,
    overlay_figure,
    resolve_tracking,
    runs_table,
    save_figure,
    start_run,
    store_tags,
)

VENV_BIN = Path(sys.executable).parent


class _Data(BaseModel):
    crop_size: int = 256
    modalities: list[str] = ["fluorescence", "brightfield"]


class _Ingest(BaseModel):
    low_percentile: float = 1.0


class ExperimentConfig(BaseModel):
    """A nested config like cellst's (kept local so this test does not track config.py)."""

    name: str = "cellst"
    store: str | None = None
    data: _Data = _Data()
    ingest: _Ingest = _Ingest()


@pytest.fixture(autouse=True)
def _clean_mlflow_env(monkeypatch):
    """No inherited tracking URI; no run left active by a failing test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """An empty current directory that must stay empty."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _sample(shape=(96, 128), seed=0):
    from cellst.data.synth import synth_image

    image, label = synth_image(np.random.default_rng(seed), "brightfield", shape)
    pred = np.roll(label, (2, 3), axis=(0, 1))
    return image, label, pred


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- pure helpers


def test_flatten_params_dotted_str_truncated():
    flat = flatten_params({"a": {"b": 1, "c": {"d": [1, 2]}, "e": {}}, "f": None, "g": "x" * 7000})
    assert flat == {"a.b": "1", "a.c.d": "[1, 2]", "a.e": "{}", "f": "None", "g": "x" * 6000}
    assert flatten_params({"lr": 1e-3}, prefix="train") == {"train.lr": "0.001"}


def test_resolve_tracking(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    uri, art, exp = resolve_tracking(TrackingConfig(), run_dir, "demo")
    assert uri == f"sqlite:///{run_dir}/mlflow.db"
    assert art == str(run_dir / "mlartifacts")
    assert exp == "demo"
    assert not run_dir.exists()  # pure

    monkeypatch.chdir(tmp_path)
    uri, art, _ = resolve_tracking(TrackingConfig(tracking_uri="sqlite:///db/x.db"), run_dir, "d")
    assert uri == f"sqlite:///{tmp_path}/db/x.db"
    assert art == str(tmp_path / "db" / "mlartifacts")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    cfg = TrackingConfig(experiment="mine")
    assert resolve_tracking(cfg, run_dir, "d") == ("http://127.0.0.1:1", None, "mine")
    cfg = TrackingConfig(artifact_root="arts")
    assert resolve_tracking(cfg, run_dir, "d")[1] == str(tmp_path / "arts")

    with pytest.raises(ValueError, match="file store"):
        resolve_tracking(TrackingConfig(tracking_uri=str(tmp_path / "mlruns")), run_dir, "d")
    with pytest.raises(ValueError, match="file store"):
        resolve_tracking(TrackingConfig(tracking_uri="file:///tmp/mlruns"), run_dir, "d")
    with pytest.raises(ValueError):
        TrackingConfig(unknown=1)


def test_store_tags(tmp_path):
    assert store_tags(tmp_path / "nostore") == {"store.path": str(tmp_path / "nostore")}
    root = tmp_path / "store"
    root.mkdir()
    pd.DataFrame({"id": ["a", "b", "c"]}).to_parquet(root / "manifest.parquet")
    import hashlib

    tags = store_tags(root)
    assert tags["store.path"] == str(root)
    assert tags["store.items"] == 3
    sha = hashlib.sha256((root / "manifest.parquet").read_bytes()).hexdigest()
    assert tags["store.manifest_sha256"] == sha


# --------------------------------------------------------------------------- figures


def test_figures(tmp_path):
    image, label, pred = _sample()
    fig = overlay_figure(image, label, pred, title="sample")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3
    out = save_figure(fig, tmp_path / "figs" / "overlay.png")
    assert _is_png(out)
    assert Image.open(out).size[0] > Image.open(out).size[1] > 100
    assert sorted(p.name for p in out.parent.iterdir()) == ["overlay.png"]  # no temp left

    gray = (image[..., 0].astype(np.uint16) * 200).astype(np.uint16)  # not uint8 RGB
    assert len(overlay_figure(gray, label, pred).axes) == 3
    with pytest.raises(ValueError):
        overlay_figure(image, label[:10], pred)

    hist = histogram_figure([0.1, 0.5, 0.9, float("nan")], "scores", "p", threshold=0.5)
    ax = hist.axes[0]
    assert any(list(line.get_xdata()) == [0.5, 0.5] for line in ax.get_lines())
    assert "n=3" in ax.get_title()
    assert _is_png(save_figure(histogram_figure([], "empty", "x"), tmp_path / "h.png"))

    curve = curve_figure([0, 1, 2], {"train": [3, 2, 1], "val": [4, 3, 3]}, "epoch", "loss", "L")
    assert len(curve.axes[0].get_lines()) == 2
    with pytest.raises(ValueError):
        curve_figure([0, 1], {"bad": [1, 2, 3]}, "x", "y", "t")


# --------------------------------------------------------------------------- embedded SQLite


def test_sqlite_default_roundtrip(tmp_path, elsewhere):
    run_dir = tmp_path / "run"
    cfg = TrackingConfig()
    exp_cfg = ExperimentConfig(name="trk", store="/data/store")
    with start_run(cfg, run_dir, exp_cfg.name, "train", tags={"stage": "train"}) as run:
        assert os.environ["MLFLOW_TRACKING_URI"].startswith("sqlite:///")
        log_config(exp_cfg)
        log_config(exp_cfg)  # identical values again: no error
        for step in range(3):
            log_metrics({"loss": 1.0 / (step + 1), "dice": 0.1 * step}, step=step)
        with pytest.warns(RuntimeWarning, match="not finite"):
            logged = log_metrics({"bad": float("nan"), "inf": float("inf"), "ok": 2}, step=3)
        assert logged == {"ok": 2.0}
        image, label, pred = _sample()
        log_figure(overlay_figure(image, label, pred, "x"), "figures/overlay.png")
        log_table(pd.DataFrame({"item": ["a", "b"], "f1": [0.5, 0.7]}), "tables/scores.csv")
        log_table(pd.DataFrame({"item": ["a"], "f1": [0.5]}), "scores.json")
        run_id = run.info.run_id
    # the tracking URI does not leak past the run
    assert "MLFLOW_TRACKING_URI" not in os.environ

    uri = f"sqlite:///{run_dir}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "train"
    assert client.get_experiment(got.info.experiment_id).name == "trk"
    params = got.data.params
    assert params["name"] == "trk"
    assert params["data.crop_size"] == "256"
    assert params["ingest.low_percentile"] == "1.0"
    assert params["store"] == "/data/store"
    assert params["data.modalities"] == "['fluorescence', 'brightfield']"
    hist = client.get_metric_history(run_id, "loss")
    assert [(m.step, round(m.value, 6)) for m in hist] == [(0, 1.0), (1, 0.5), (2, 0.333333)]
    assert "bad" not in got.data.metrics and "inf" not in got.data.metrics
    assert got.data.metrics["ok"] == 2.0
    tags = got.data.tags
    assert tags["cellst.version"] == __import__("cellst").__version__
    assert tags["git.commit"] == "unknown" or len(tags["git.commit"]) == 40
    assert tags["stage"] == "train"

    top = {f.path for f in client.list_artifacts(run_id)}
    assert {"config.yaml", "figures", "tables", "scores.json"} <= top
    assert [f.path for f in client.list_artifacts(run_id, "figures")] == ["figures/overlay.png"]
    art = run_dir / "mlartifacts"
    assert got.info.artifact_uri.endswith(f"{run_id}/artifacts")
    assert str(art) in got.info.artifact_uri
    png = next(art.rglob("overlay.png"))
    assert _is_png(png)
    assert pd.read_csv(next(art.rglob("scores.csv")))["f1"].tolist() == [0.5, 0.7]
    assert "crop_size: 256" in next(art.rglob("config.yaml")).read_text()

    # nothing in the current directory (no ./mlruns, no ./mlflow.db)
    assert list(elsewhere.iterdir()) == []

    # a failing block marks the run FAILED and still restores the URI
    with pytest.raises(RuntimeError), start_run(cfg, run_dir, "trk", "boom") as bad:
        raise RuntimeError("boom")
    assert client.get_run(bad.info.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None
    assert "MLFLOW_TRACKING_URI" not in os.environ

    table = runs_table(uri, "trk", order_by=["attributes.start_time ASC"])
    assert table["run_id"].tolist() == [run_id, bad.info.run_id]
    assert runs_table(uri, "no-such-experiment").empty
    missing = tmp_path / "none" / "mlflow.db"
    assert runs_table(f"sqlite:///{missing}", "trk").empty
    assert not missing.parent.exists()


def test_nested_runs_and_resume(tmp_path, elsewhere):
    run_dir = tmp_path / "run"
    cfg = TrackingConfig(system_metrics=False, experiment="stpp")
    with start_run(cfg, run_dir, "ignored", "stpp") as parent:
        parent_id = parent.info.run_id
        child_ids = []
        for i in range(2):
            with start_run(cfg, run_dir, "ignored", f"stage{i}", nested=True) as child:
                log_metrics({"f1": 0.5 + i}, step=0)
                child_ids.append(child.info.run_id)
        assert mlflow.active_run().info.run_id == parent_id
        log_metrics({"total": 1.0}, step=0)

    uri = f"sqlite:///{run_dir}/mlflow.db"
    children = runs_table(uri, "stpp", filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(children["run_id"]) == sorted(child_ids)
    assert set(children["tags.mlflow.runName"]) == {"stage0", "stage1"}

    # a child started from "another process": explicit parent_run_id, no active run
    with start_run(cfg, run_dir, "ignored", "trial", parent_run_id=parent_id) as trial:
        trial_id = trial.info.run_id
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(trial_id).data.tags["mlflow.parentRunId"] == parent_id

    # resume the parent by id: same run, new metric
    with start_run(cfg, run_dir, "ignored", None, run_id=parent_id, tags={"resumed": 1}) as again:
        assert again.info.run_id == parent_id
        log_metrics({"total": 2.0}, step=1)
    got = client.get_run(parent_id)
    assert got.info.status == "FINISHED"
    assert got.data.tags["resumed"] == "1"
    assert [m.value for m in client.get_metric_history(parent_id, "total")] == [1.0, 2.0]
    assert len(runs_table(uri, "stpp")) == 4
    assert list(elsewhere.iterdir()) == []


def test_disabled_tracking_is_a_noop(tmp_path, elsewhere):
    run_dir = tmp_path / "run"
    cfg = TrackingConfig(enabled=False)
    with start_run(cfg, run_dir, "exp", "train", tags={"a": 1}) as run:
        assert isinstance(run, DisabledRun)
        assert run.info.run_id is None and run.info.run_name == "train"
        assert mlflow.active_run() is None
        log_config(ExperimentConfig())
        assert log_metrics({"loss": 1.0}, step=0) == {}
        log_figure(histogram_figure([1, 2], "t", "x"), "h.png")
        log_table(pd.DataFrame({"a": [1]}), "t.csv")
    assert not run_dir.exists()
    assert list(elsewhere.iterdir()) == []
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_ensure_experiment_concurrent_processes(tmp_path):
    """Processes creating the same experiment in a fresh SQLite store all get its id.

    Without the file lock MLflow 3.17's schema migrations collide on a fresh database.
    """
    uri = f"sqlite:///{tmp_path}/race/mlflow.db"
    script = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from cellst.tracking import ensure_experiment
        sync = Path(sys.argv[3])
        (sync / f"ready{sys.argv[4]}").touch()
        while not (sync / "go").exists():
            time.sleep(0.002)
        print("ID", ensure_experiment(sys.argv[1], "race", sys.argv[2]))
        """
    )
    sync = tmp_path / "sync"
    sync.mkdir()
    n = 3
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, uri, str(tmp_path / "art"), str(sync), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]
    deadline = time.monotonic() + 90
    while len(list(sync.glob("ready*"))) < n and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    (sync / "go").touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    ids = {line.split()[1] for out in outs for line in out.splitlines() if line.startswith("ID ")}
    assert len(ids) == 1, outs
    assert ensure_experiment(uri, "race", str(tmp_path / "art")) == ids.pop()


# --------------------------------------------------------------------------- tracking server


def test_tracking_server_roundtrip(tmp_path, elsewhere, mlflow_server):
    url, srv = mlflow_server
    run_dir = tmp_path / "run"
    cfg = TrackingConfig(tracking_uri=url, experiment="remote", system_metrics=False)
    with start_run(cfg, run_dir, "ignored", "remote-train") as run:
        log_config(ExperimentConfig(name="remote"))
        for step in range(2):
            log_metrics({"loss": 2.0 - step}, step=step)
        image, label, pred = _sample(seed=3)
        log_figure(overlay_figure(image, label, pred), "figures/overlay.png")
        run_id = run.info.run_id
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")

    client = MlflowClient(tracking_uri=url)  # REST client
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["data.crop_size"] == "256"
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [2.0, 1.0]
    assert "git.commit" in got.data.tags
    assert [f.path for f in client.list_artifacts(run_id, "figures")] == ["figures/overlay.png"]
    dst = tmp_path / "download"
    dst.mkdir()
    local = Path(client.download_artifacts(run_id, "figures/overlay.png", str(dst)))
    assert _is_png(local)
    # artifacts went through the server's proxy into --artifacts-destination
    assert _is_png(next((srv / "art").rglob("overlay.png")))
    assert runs_table(url, "remote")["run_id"].tolist() == [run_id]
    # nothing local: no run_dir, nothing in the current directory
    assert not run_dir.exists()
    assert list(elsewhere.iterdir()) == []
