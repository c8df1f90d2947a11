"""Tracking cannot kill a training: a real ``mlflow server`` killed by PID and restarted, a
server answering with errors, a dead server at the start, and a training whose own record
(``run.json``) tells the truth after a failure."""

from __future__ import annotations

import http.server
import json
import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from cellst.cli import app
from cellst.experiment import load_config
from cellst.tracking import (
    PENDING_FILE,
    BufferedMetricLogger,
    TrackingConfig,
    TrackingUnavailable,
    check_tracking,
    log_artifact,
    log_metrics,
    start_run,
)
from cellst.tracking.buffered import REJECTED_FILE
from conftest import free_port

TINY = [
    "model.width=8",
    "data.crop_size=96",
    "data.crops_per_epoch=32",
    "data.crops_per_visit=4",
    "train.batch_size=8",
    "train.val_max_items=2",
    "train.log_every_steps=1",
    "inference.roi=96",
    "tracking.system_metrics=false",
    # calibrating after each tiny training (seconds each) is tested where it is the point
    "train.calibrate_postprocess=false",
]


@pytest.fixture(autouse=True)
def _clean_mlflow_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture
def server(mlflow_server_process):
    """A real mlflow server this module kills by PID and restarts."""
    return mlflow_server_process


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class _Spy:
    """Counts the logger's requests (and still makes them)."""

    def __init__(self, logger: BufferedMetricLogger):
        self.calls, self._send = 0, logger._send
        logger._send = self

    def __call__(self, records):
        self.calls += 1
        return self._send(records)


# --------------------------------------------------------------------------- the buffer


def test_buffer_keeps_metrics_when_nothing_listens(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # refuses connections
    logger = BufferedMetricLogger(uri, "r1", tmp_path / "run", retry_every_s=3600)
    spy = _Spy(logger)
    for step in range(1, 4):
        logger.log({"loss": 1.0 / step, "bad": float("nan")}, step)  # never raises
    # one request, then only the file until retry_every_s has passed
    assert spy.calls == 1
    pending = tmp_path / "run" / PENDING_FILE
    recs = _records(pending)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[0]["metrics"] == {"loss": 1.0} and {r["run_id"] for r in recs} == {"r1"}
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "unavailable (connection refused)" in err[0] and str(pending) in err[0]
    assert logger.close() == 3  # a last attempt, whatever the back-off
    assert spy.calls == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "3 record(s) could not be sent" in err[0] and str(pending) in err[0]


class _Failing(http.server.BaseHTTPRequestHandler):
    """A server answering every request with HTTP 500 and an MLflow error body."""

    def _fail(self):
        body = json.dumps({"error_code": "INTERNAL_ERROR", "message": "database is gone"})
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_POST = _fail

    def log_message(self, *args):
        pass


def test_server_answering_errors_is_one_line(tmp_path, capsys):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        logger = BufferedMetricLogger(uri, "r1", tmp_path, retry_every_s=3600)
        logger.log({"loss": 1.0}, 1)
        logger.log({"loss": 0.5}, 2)
        assert [r["step"] for r in _records(tmp_path / PENDING_FILE)] == [1, 2]
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "unavailable (HTTP 500)" in err and "Traceback" not in err
        # the driver: a run cannot begin there, said in one line naming the server
        cfg = TrackingConfig(tracking_uri=uri, system_metrics=False)
        with pytest.raises(TrackingUnavailable, match=f"{uri} is unavailable \\(HTTP 500\\)"):
            check_tracking(cfg, tmp_path, "exp")
        with pytest.raises(TrackingUnavailable, match=f"MLflow tracking at {uri}"):
            with start_run(cfg, tmp_path, "exp", "r"):
                pass
    finally:
        httpd.shutdown()


def test_outage_and_restart(tmp_path, server, capsys):
    """The worker's buffer and the driver's ``start_run``/``log_*`` across a real outage
    (the server killed by PID, restarted on the same port and store): no exception, and
    everything kept is sent, in order, once the server is back."""
    from cellst.tracking import resend_pending

    server.start()
    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("buf")).info.run_id
    run = tmp_path / "worker"
    logger = BufferedMetricLogger(server.uri, run_id, run, retry_every_s=0.01)
    logger.log({"loss": 4.0}, 1)
    assert not run.exists()  # a healthy server: nothing kept locally
    cfg = TrackingConfig(tracking_uri=server.uri, experiment="drv", system_metrics=False)
    drv = tmp_path / "driver"
    note = tmp_path / "note.txt"
    note.write_text("kept")
    with start_run(cfg, drv, "x", "drv") as parent:
        log_metrics({"a": 1.0}, step=1)
        server.kill()
        log_metrics({"a": 2.0}, step=2)
        log_artifact(note, "notes")
        logger.log({"loss": 3.0}, 2)
        logger.log({"loss": 2.0, "lr": 0.1}, 3)
    assert mlflow.active_run() is None
    # the driver's metrics and the run's end status wait in its folder
    assert [r["kind"] for r in _records(drv / PENDING_FILE)] == ["metrics", "artifact", "status"]
    assert [r["step"] for r in _records(run / PENDING_FILE)] == [2, 3]
    capsys.readouterr()

    server.start()  # same port, same backend store
    time.sleep(0.05)  # past retry_every_s: the next call tries the server again
    logger.log({"loss": 1.0}, 4)
    assert not (run / PENDING_FILE).exists()
    hist = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [
        (1, 4.0),
        (2, 3.0),
        (3, 2.0),
        (4, 1.0),
    ]
    assert [m.step for m in client.get_metric_history(run_id, "lr")] == [3]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "is back; sent 3 record(s)" in err[0]
    assert logger.close() == 0
    assert resend_pending(cfg, drv, "x") is None  # what a re-run does
    assert "sent 3 record(s)" in capsys.readouterr().err
    got = client.get_run(parent.info.run_id)
    assert got.info.status == "FINISHED" and got.data.metrics["a"] == 2.0
    assert [a.path for a in client.list_artifacts(got.info.run_id, "notes")] == ["notes/note.txt"]

    # a run the server does not know: refused for good, kept aside and said once
    lost = BufferedMetricLogger(server.uri, "0" * 32, run)
    lost.log({"loss": 1.0}, 1)
    lost.log({"loss": 1.0}, 2)
    assert not (run / PENDING_FILE).exists()
    assert [r["record"]["step"] for r in _records(run / REJECTED_FILE)] == [1, 2]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RESOURCE_DOES_NOT_EXIST" in err and REJECTED_FILE in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- training


def _cfg(store: Path, run_dir: Path, *extra: str):
    return load_config(None, [f"store={store}", f"train.run_dir={run_dir}", *TINY, *extra])


def _wait_for(path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.1)


def test_training_survives_tracking_outage(ray_session, store_dir, tmp_path, server):
    """The server is killed by PID after epoch 1 and stays down to the end: the training
    goes on, finishes and says so; restarted, the server gets every epoch on a re-run.

    The training runs in this process (``train.num_workers=0``, Ray Train's local mode),
    where the loop's logger and the driver's MLflow run share one process; a DDP training
    on two nodes rides out an outage in test_multinode.py."""
    from cellst.train.trainer import train

    server.start()
    cfg = _cfg(
        store_dir,
        tmp_path,
        "train.num_workers=0",
        "train.epochs=3",
        "train.val_every=10",
        "train.run_name=outage",
        f"tracking.tracking_uri={server.uri}",
        "name=outage-exp",
    )
    run = tmp_path / "outage"
    killer = threading.Thread(
        target=lambda: (_wait_for(run / "checkpoints" / "epoch_001"), server.kill())
    )
    killer.start()
    res = train(cfg)
    killer.join()
    # training went on: every epoch's checkpoint, and the run's record is true
    assert res.metrics["epoch"] == 3
    assert (run / "checkpoints" / "epoch_003").is_dir()
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "finished" and PENDING_FILE in state["tracking"]
    kept = _records(run / PENDING_FILE)
    assert any(r["kind"] == "metrics" and r["step"] == 3 and "epoch" in r["metrics"] for r in kept)
    assert kept[-1]["kind"] == "status" and kept[-1]["status"] == "FINISHED"

    server.start()  # same port and backend store
    again = train(cfg)  # finished: nothing to train, the kept records are sent
    assert again.resumed and not (run / PENDING_FILE).exists()
    assert json.loads((run / "run.json").read_text())["tracking"] is None
    client = MlflowClient(server.uri)
    got = client.get_run(res.mlflow_run_id)
    assert got.info.status == "FINISHED"
    for name in ("epoch", "train_loss", "epoch_seconds"):
        assert sorted(m.step for m in client.get_metric_history(got.info.run_id, name)) == [
            1,
            2,
            3,
        ]
    assert "final_epoch" in got.data.metrics
    assert len(client.get_metric_history(got.info.run_id, "step_loss")) == res.metrics["epoch"] * 4
    assert "checkpoints.json" in {a.path for a in client.list_artifacts(got.info.run_id)}


def test_dead_server_at_start_fails_fast(ray_session, store_dir, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("name: dead-server\n")
    args = ["train", str(cfg_file), "--set", f"store={store_dir}"]
    for o in [f"train.run_dir={tmp_path}", "train.run_name=dead", f"tracking.tracking_uri={uri}"]:
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    assert f"MLflow tracking server {uri} is unavailable (connection refused)" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "dead").exists()  # nothing started
    # --force over an earlier run: refused the same way, the earlier run left whole
    best = tmp_path / "dead" / "checkpoints" / "best"
    best.mkdir(parents=True)
    (best / "model.pt").write_bytes(b"weights")
    (tmp_path / "dead" / "run.json").write_text('{"status": "finished"}')
    res = CliRunner().invoke(app, [*args, "--force"])
    assert res.exit_code == 1, res.output
    assert f"MLflow tracking server {uri} is unavailable (connection refused)" in res.output
    assert (best / "model.pt").read_bytes() == b"weights"


def test_dead_server_stops_a_sweep_before_it_discards_the_last_one(store_dir, tmp_path):
    """`cellst tune` with changed settings starts its sweep over; with the tracking server
    down it stops first, in one line, and the earlier sweep's trials are still there."""
    uri = f"http://127.0.0.1:{free_port()}"
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(
        "name: dead-sweep\ntune:\n  mode: train\n  num_samples: 2\n"
        "  space:\n    train.lr: {choice: [0.001, 0.003]}\n"
    )
    earlier = tmp_path / "tune" / "dead-sweep"
    trials = earlier / "_ray" / "dead-sweep"
    trials.mkdir(parents=True)
    (trials / "experiment_state.json").write_text("{}")
    (earlier / "sweep.json").write_text('{"hash": "an earlier sweep"}')
    args = ["tune", str(cfg_file), "--set", f"store={store_dir}"]
    for o in [f"tune.run_dir={tmp_path / 'tune'}", f"tracking.tracking_uri={uri}"]:
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    assert f"MLflow tracking server {uri} is unavailable (connection refused)" in res.output
    assert "Traceback" not in res.output and "starting the sweep over" not in res.output
    assert (trials / "experiment_state.json").read_text() == "{}"


def test_failed_training_is_recorded(ray_session, store_dir, tmp_path):
    """A worker killed with no restarts left: ``run.json`` says failed, with the reason."""
    from cellst.train.trainer import train

    cfg = _cfg(
        store_dir,
        tmp_path,
        "train.epochs=3",
        "train.val_every=10",
        "train.run_name=dies",
        "train.max_failures=0",
    )
    run = tmp_path / "dies"

    def kill_worker():
        _wait_for(run / "checkpoints" / "epoch_001")
        os.kill(int((run / "rank0.pid").read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_worker)
    killer.start()
    with pytest.raises(Exception) as exc:  # noqa: PT011 - whatever Ray Train raises
        train(cfg)
    killer.join()
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "failed"
    assert state["error"].startswith(type(exc.value).__name__)
