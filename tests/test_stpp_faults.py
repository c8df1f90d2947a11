"""ST++ pipeline faults: the parent MLflow run is best-effort tracking like every other run,
and a second pipeline on the same run folder is refused naming the run folder."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from cellst.data.store import CellStore, StoreError, store_lock
from cellst.stpp import load_stpp_config, run_stpp
from cellst.stpp.outputs import STAGES
from cellst.stpp.parent_run import ParentRun
from cellst.stpp.stages import StageBook
from cellst.tracking import PENDING_FILE


def _config(tmp_path: Path, store: Path, *overrides: str):
    path = tmp_path / "stpp.yaml"
    data = {"name": "t", "store": str(store), "stpp": {"run_dir": str(tmp_path / "runs")}}
    path.write_text(yaml.safe_dump(data))
    return load_stpp_config(path, ["tracking.system_metrics=false", *overrides], quick=True)


def test_second_pipeline_on_a_run_folder_is_refused_naming_it(store_dir, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(store_dir, store)
    cfg = _config(tmp_path, store, "tracking.enabled=false")
    cfg.pipeline_dir.mkdir(parents=True)
    with store_lock(cfg.pipeline_dir / ".lock"):  # the first pipeline holds it
        with pytest.raises(StoreError) as err:
            run_stpp(cfg, log=lambda _: None)
    assert f"the run folder {cfg.pipeline_dir}" in str(err.value)
    assert not (cfg.pipeline_dir / "stages").exists()  # nothing ran


def test_parent_run_status_and_tags_reach_mlflow(store_dir, tmp_path):
    cfg = _config(tmp_path, store_dir)
    parent = ParentRun(cfg, cfg.pipeline_dir)
    cfg.pipeline_dir.mkdir(parents=True)
    parent.resolve()
    store = CellStore(store_dir)
    parent.open(store)
    client = MlflowClient(parent.uri)
    assert client.get_run(parent.run_id).info.status == "RUNNING"
    # the run names the manifest version it reads (the store's pinned version)
    assert client.get_run(parent.run_id).data.tags["store.version"] == store.version
    # a second attempt re-attaches the same parent run (its id is in pipeline.json)
    again = ParentRun(cfg, cfg.pipeline_dir)
    again.resolve()
    again.open(store)
    assert again.run_id == parent.run_id
    parent.close("FAILED", {"cellst.stpp.note": "x"})
    run = client.get_run(parent.run_id)
    assert run.info.status == "FAILED" and run.data.tags["cellst.stpp.note"] == "x"
    assert not (cfg.pipeline_dir / PENDING_FILE).exists()


class _Unavailable(http.server.BaseHTTPRequestHandler):
    """A tracking server that answers every request 503 and counts each attempt."""

    attempts: list[tuple[str, str, bytes]] = []

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).attempts.append((self.command, self.path, body))
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:  # quiet
        pass


def test_parent_run_calls_survive_a_dead_tracking_server(store_dir, tmp_path, capsys, monkeypatch):
    """The server went away while the stages ran: ending the parent run neither raises nor
    waits minutes; its status is kept in the run folder (sent by a later run) and said.

    Not waiting minutes is cellst's limit on MLflow's retries (``http_limits``: one retry
    per request, against MLflow's own 7 over about 2 minutes), seen as the attempts a server
    answering 503 gets for a request; MLflow's own setting is left as a user has it."""
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    _Unavailable.attempts = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    unavailable = f"http://127.0.0.1:{server.server_address[1]}"
    cfg = _config(tmp_path, store_dir, f"tracking.tracking_uri={unavailable}")
    parent = ParentRun(cfg, cfg.pipeline_dir)
    cfg.pipeline_dir.mkdir(parents=True)
    parent.resolve()
    parent.run_id = "0" * 32  # made while the server still answered

    try:
        parent.close("FAILED", {"cellst.stpp.note": "x"})
        parent.finish(StageBook(cfg.pipeline_dir, STAGES).records(), None)
    finally:
        server.shutdown()

    # each lookup (a GET: never a resend of kept records, which are POSTs) was tried twice,
    # once and one retry, not MLflow's 1 + 7
    lookups = Counter(a for a in _Unavailable.attempts if a[0] == "GET")
    assert lookups and set(lookups.values()) == {2}, _Unavailable.attempts
    pending = [json.loads(x) for x in (cfg.pipeline_dir / PENDING_FILE).read_text().splitlines()]
    assert [r["kind"] for r in pending] == ["tags", "status", "tags", "status"]
    assert [r["status"] for r in pending if r["kind"] == "status"] == ["FAILED", "FINISHED"]
    assert {r["run_id"] for r in pending} == {parent.run_id}
    err = capsys.readouterr().err
    assert unavailable in err and "Traceback" not in err
    assert "kept in" in err


def test_status_names_a_corrupt_record(tmp_path):
    """A truncated ``pipeline.json`` or stage record: `cellst stpp status` names the file
    in one line (was json's bare 'Expecting property name ...')."""
    from typer.testing import CliRunner

    from cellst.cli import app

    (tmp_path / "stages").mkdir()
    for broken in (tmp_path / "pipeline.json", tmp_path / "stages" / "1_supervised.json"):
        broken.write_text('{"stag')
        res = CliRunner().invoke(app, ["stpp", "status", str(tmp_path)])
        assert res.exit_code == 1, res.output
        assert res.output.strip() == (
            f"error: {broken}: not valid JSON (Unterminated string starting at: line 1 "
            "column 2 (char 1)); restore or remove it"
        )
        broken.unlink()
    # valid JSON of another kind (an array, a string): an AttributeError traceback before
    for broken, text, found in (
        (tmp_path / "stages" / "1_supervised.json", "[]", "an array"),
        (tmp_path / "pipeline.json", '"done"', "a string"),
    ):
        (tmp_path / "pipeline.json").write_text("{}")
        broken.write_text(text)
        res = CliRunner().invoke(app, ["stpp", "status", str(tmp_path)])
        assert res.exit_code == 1, res.output
        assert res.output.strip() == (
            f"error: {broken}: expected a JSON object, found {found}; restore or remove it"
        )
        broken.unlink()


def test_a_run_record_that_is_not_an_object_is_named(store_dir, tmp_path):
    """``run.json`` holding valid JSON that is not an object (an array): `cellst train`
    names the file in one line, exit 1 (it was an AttributeError traceback)."""
    from typer.testing import CliRunner

    from cellst.cli import app

    run = tmp_path / "runs" / "x-train"
    run.mkdir(parents=True)
    (run / "run.json").write_text("[1, 2]")
    cfg = tmp_path / "x.yaml"
    cfg.write_text("name: x\n")
    res = CliRunner().invoke(
        app,
        [
            "train",
            str(cfg),
            "--set",
            f"store={store_dir}",
            "--set",
            f"train.run_dir={tmp_path / 'runs'}",
        ],
    )
    assert res.exit_code == 1, res.output
    assert res.output.strip().endswith(
        f"{run / 'run.json'}: expected a JSON object, found an array; restore or remove it"
    )
