"""``ray job submit``, the way users drive a running cluster, on a real Ray head.

A head started by ``ray start --head --block`` with its dashboard and job server on
127.0.0.1, from the project's environment (its ``bin/`` on ``PATH``, as after activating
``.venv``), with Ray's token authentication on. Ray's own ``ray job`` CLI submits a
``cellst stpp run`` job with ``--working-dir``; the test reads its logs and status, stops it
after stage 1, re-submits it, and checks that the second job starts at stage 2 without
recomputing stage 1. The second job's driver runs on a worker node of its own, and that
whole node is lost during stage 2: a third submission resumes at stage 2, and ends there
(every submission asks for stages 1-2 only, ``--until 2``). A client without the token is
refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
#: where Ray records "the cluster last started on this machine" (read by a plain ray.init())
RAY_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")

pytestmark = pytest.mark.slow


def _client_env(**extra: str) -> dict[str, str]:
    """A user's shell: the project's ``bin/`` first on PATH, nothing of this test session."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_", "MLFLOW_")) and k != "PYTHONPATH"
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    if "PYTHONPATH" in os.environ:  # a frozen copy of the sources (never the case under make)
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return {**env, **extra}


@dataclass(frozen=True)
class Head:
    url: str  # the job server (dashboard)
    address: str  # the GCS, for nodes that join
    temp: Path  # its --temp-dir


@pytest.fixture(scope="module")
def head(ray_session):
    """``ray start --head --block`` with the dashboard on a free port; its job server URL.

    After the session's ``ray.init()``, which leaves Ray's token in ~/.ray/auth_token on a
    fresh machine, so that ``ray start`` turns token authentication on, as it does for a
    user who has used Ray before. Its own short ``--temp-dir`` (sockets live there), so
    nothing of it is left in /tmp/ray; its processes are killed at the end (``ray stop``
    would stop every Ray cluster on this machine, the session's too).
    """
    temp = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
    saved = RAY_ADDRESS_FILE.read_text() if RAY_ADDRESS_FILE.is_file() else None
    dash, gcs = free_port(), free_port()
    log = open(temp / "head.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
            # the job agent's HTTP port: Ray's default, 52365, may be another cluster's here
            f"--dashboard-agent-listen-port={free_port()}",
        ],
        env=_client_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        # polled in this process (Ray's job SDK), not with the ``ray job`` CLI: each CLI
        # call costs a second of CPU, taken from the head starting on the same two cores
        while (client := _sdk(url)) is None:
            assert proc.poll() is None, (temp / "head.log").read_text()[-3000:]
            assert time.time() < deadline, f"no job server at {url}"
            time.sleep(0.5)
        # the job server answers before the node's agent that runs jobs has registered
        # ("No available agent to submit job, please try again later")
        while True:
            try:
                client.submit_job(entrypoint="true")
                break
            except RuntimeError as e:
                assert "No available agent" in str(e), e
                assert time.time() < deadline, "no job agent registered"
                time.sleep(0.5)
        # the user's CLI, with the token it finds on its own
        res = _ray_job("submit", "--", "python", "-c", "print('ready')", url=url, check=False)
        assert res.returncode == 0 and "ready" in res.stdout, res.stdout + res.stderr
        yield Head(url, f"127.0.0.1:{gcs}", temp)
    finally:
        # SIGKILL: on SIGTERM the node drains for up to 30 s; nothing of it is kept anyway
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # processes that left its group (workers, agents) carry the temp dir in their command
        subprocess.run(["pkill", "-9", "-f", str(temp)], check=False)
        log.close()
        if saved is None:
            RAY_ADDRESS_FILE.unlink(missing_ok=True)
        else:
            RAY_ADDRESS_FILE.write_text(saved)
        shutil.rmtree(temp, ignore_errors=True)


def _ray_job(*args: str, url: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [RAY, "job", args[0], "--address", url, *args[1:]],
        capture_output=True,
        text=True,
        env=_client_env(**env),
        timeout=300,
    )
    if check:
        assert res.returncode == 0, f"ray job {' '.join(args)}:\n{res.stdout}\n{res.stderr}"
    return res


def _sdk(url: str):
    """Ray's job SDK client for ``url``; None while nothing answers there."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError):
        return None


def _poll_status(url: str, job: str) -> str:
    """The job's status through the SDK: what the waits poll (see :func:`_status`)."""
    return str(_sdk(url).get_job_status(job).value)


def _status(url: str, job: str) -> str:
    """PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED, as ``ray job status`` prints it.

    The user's command, for the states the test asserts; the waits poll through
    :func:`_poll_status` instead (a CLI call costs a second of CPU on a busy machine)."""
    res = _ray_job("status", job, url=url)
    out = res.stdout + res.stderr
    m = re.search(r"Status for job '[^']+': (\w+)", out)
    if m:
        return m.group(1)
    for word, phrase in (
        ("SUCCEEDED", "succeeded"),
        ("STOPPED", "was stopped"),
        ("FAILED", "failed"),
    ):
        if f"Job '{job}' {phrase}" in out:
            return word
    return out


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}")


def _stage(pipe: Path, name: str) -> dict:
    path = pipe / "stages" / name
    return json.loads(path.read_text()) if path.is_file() else {}


def _wait_stage(pipe: Path, url: str, job: str, record: str, status: str, what: str) -> None:
    """Until the stage record has ``status``, or the job has ended (the caller's asserts
    then say why)."""
    _wait(
        lambda: (
            _stage(pipe, record).get("status") == status
            or _poll_status(url, job) in ("FAILED", "SUCCEEDED", "STOPPED")
        ),
        600,
        what,
    )


def test_a_client_without_the_token_is_refused(head):
    res = _ray_job("list", url=head.url, check=False, RAY_AUTH_MODE="disabled")
    assert res.returncode != 0
    assert "Authentication required" in res.stdout + res.stderr


@pytest.fixture
def driver_node(head):
    """A worker node of its own (``ray start --address --block``) with 0 CPUs and one unit
    of the resource ``driver_node``: only what asks for that resource runs there. Whatever
    the test leaves of it is killed at the end."""
    log = open(head.temp / "driver_node.log", "w")  # noqa: SIM115
    # its own temp folder, as on a machine of its own: nodes that share one unpack a job's
    # working dir into the same place, replacing the folder a running driver stands in
    temp = head.temp / "driver-node"
    proc = subprocess.Popen(
        [
            RAY, "start", f"--address={head.address}", "--block", "--num-cpus=0",
            f"--temp-dir={temp}",
            "--resources=" + json.dumps({"driver_node": 1}), "--disable-usage-stats",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ],
        env=_client_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            _lose_node(proc)
        log.close()


def _node_with(head: Head, resource: str) -> str | None:
    """The ID of the alive node that has ``resource``, if any."""
    from ray.util.state import list_nodes

    for node in list_nodes(address=head.url, filters=[("state", "=", "ALIVE")]):
        if resource in (node.resources_total or {}):
            return node.node_id
    return None


def _lose_node(proc: subprocess.Popen) -> int:
    """The whole node gone at once, as a machine that loses power: SIGKILL to every process
    under its ``ray start`` (raylet, agents, workers, the job's supervisor and driver)."""
    import psutil

    root = psutil.Process(proc.pid)
    every = [root, *root.children(recursive=True)]
    for p in every:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    return len(every)


def test_submit_logs_stop_and_resubmit_resumes_stpp(head, driver_node, store_dir, tmp_path):
    """The user's commands, nothing else: ``ray job submit --working-dir``, ``ray job logs``,
    ``ray job status``, ``ray job stop``, and the same submission again.

    The second submission's driver runs on a worker node of its own
    (``--entrypoint-resources``), and that whole node is lost while stage 2 runs (every
    process on it SIGKILLed). The third submission resumes at stage 2 and, as each
    submission asks (``--until 2``), ends successfully once stage 2 is done."""
    store = tmp_path / "store"
    shutil.copytree(store_dir, store)
    work = tmp_path / "project"  # what --working-dir uploads: the experiment YAML
    (work / "experiments").mkdir(parents=True)
    shutil.copy(ROOT / "experiments" / "demo.yaml", work / "experiments")
    run_dir = tmp_path / "stpp"
    entry = ["cellst", "stpp", "run", "experiments/demo.yaml", "--quick", "--until", "2"]
    # stage 1 trains in the job's driver (train.num_workers=0): the subject is the job's life
    # (submit, logs, stop, a lost driver node, resubmit); Ray Train workers on nodes are
    # test_multinode.py's, and a worker's start costs 10-25 s of these two cores. Stage 2
    # keeps its actor pool: the node is lost while it runs, which in the driver would take
    # seconds, too few to be sure the loss lands inside it
    for o in (f"store={store}", f"stpp.run_dir={run_dir}", "name=job", "data.crops_per_epoch=16",
              "train.val_max_items=1", "tracking.system_metrics=false",
              "train.num_workers=0"):  # fmt: skip
        entry += ["--set", o]
    pipe = run_dir / "job"
    url = head.url

    def submit(job_id: str, *options: str) -> None:
        _ray_job(
            "submit", "--no-wait", "--submission-id", job_id, "--working-dir", str(work),
            *options, "--", *entry, url=url,
        )  # fmt: skip

    _wait(lambda: _node_with(head, "driver_node") is not None, 120, "the extra node")
    lost_node = _node_with(head, "driver_node")
    submit("cellst-stpp-1")
    _wait_stage(pipe, url, "cellst-stpp-1", "1_supervised.json", "done", "stage 1, job 1")
    assert _status(url, "cellst-stpp-1") == "RUNNING", _ray_job(
        "logs", "cellst-stpp-1", url=url
    ).stdout[-3000:]
    _ray_job("stop", "cellst-stpp-1", url=url)
    _wait(lambda: _poll_status(url, "cellst-stpp-1") == "STOPPED", 120, "the job to stop")
    logs = _ray_job("logs", "cellst-stpp-1", url=url).stdout
    assert "[stpp] stage 1/7 supervised" in logs and "done in" in logs, logs[-3000:]
    first = _stage(pipe, "1_supervised.json")
    trainings = sorted(p.name for p in (pipe / "train").iterdir())

    # the second job's driver on the node of its own, which is lost during stage 2
    submit("cellst-stpp-2", "--entrypoint-resources", json.dumps({"driver_node": 1}))
    _wait_stage(pipe, url, "cellst-stpp-2", "2_reliability.json", "running", "stage 2, job 2")
    from ray.job_submission import JobSubmissionClient

    assert JobSubmissionClient(url).get_job_info("cellst-stpp-2").driver_node_id == lost_node
    assert _stage(pipe, "1_supervised.json") == first  # skipped: stage 2 runs already
    assert _lose_node(driver_node) >= 3  # at least ray start, its raylet and the job's driver
    # (the first job may have begun stage 2 too before its stop took effect)
    attempts = _stage(pipe, "2_reliability.json")["attempts"]

    # the same submission once more (no node of its own now): resumes at stage 2
    submit("cellst-stpp-3")
    ended = ("SUCCEEDED", "FAILED", "STOPPED")
    _wait(lambda: _poll_status(url, "cellst-stpp-3") in ended, 600, "the third job to end")
    logs = _ray_job("logs", "cellst-stpp-3", url=url).stdout
    assert _status(url, "cellst-stpp-3") == "SUCCEEDED", logs[-3000:]
    assert "stopped after stage 2/7 reliability, as asked (--until)" in logs, logs[-3000:]
    skipped = "stage 1/7 supervised (supervised training on the labelled items): done, inputs "
    assert skipped + "unchanged -> skipped" in logs, logs[-3000:]
    assert "stage 2/7 reliability" in logs
    stage2 = _stage(pipe, "2_reliability.json")
    assert stage2["status"] == "done" and stage2["attempts"] == attempts + 1, stage2
    assert _stage(pipe, "1_supervised.json") == first  # stage 1 untouched
    assert sorted(p.name for p in (pipe / "train").iterdir()) == trainings  # nothing retrained
    # the head saw the lost node's job end: its driver is gone, not running on
    _wait(lambda: _poll_status(url, "cellst-stpp-2") == "FAILED", 120, "the lost job to fail")
    assert _status(url, "cellst-stpp-2") == "FAILED"
